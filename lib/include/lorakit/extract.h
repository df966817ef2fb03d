// lora-extract as a library function: a LoRA from the difference of a fine-tuned checkpoint
// and its base. Per tensor pair (matched by module: Checkpoint::modules_at on the tuned model,
// Checkpoint::locate on the base, so fused rows, GGUF q/k order and OpenCLIP's in_proj are
// handled), streamed one at a time from the mapped files:
//   Δ = W_tuned - W_base in f32; max|Δ| <= min_diff: skipped (counted);
//   a truncated SVD of Δ (randomized: Halko–Martinsson–Tropp subspace iteration, seeded; exact
//   LAPACK for small matrices, for sv_cumulative, or on request) at the rank the rule gives;
//   up = U_k·Σ_k, down = V_kᵀ and alpha = k (scale 1), as kohya's extract_lora_from_models.py
//   and PEFT-style files expect; kohya's clamp of both factors to a quantile when asked.
// Conv kernels are flattened to out x (in·kh·kw); kernels larger than 1x1 need a conv rank.
// Embeddings, norms and biases are not factored: changed ones are listed in the report.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "lorakit/linalg.h"
#include "lorakit/progress.h"
#include "lorakit/rank_rules.h"
#include "lorakit/registry.h"
#include "lorakit/tool_result.h"

namespace lorakit {

// One truncated factorisation of a dense delta (rows x cols, row-major f32).
struct LowRankFit {
    std::int64_t rank = 0;
    std::vector<float> up;    // rows x rank, U_k·Σ_k
    std::vector<float> down;  // rank x cols, V_kᵀ
    std::vector<double> singular_values;  // the computed values (at least the kept ones)
    double frobenius_squared = 0;         // ‖Δ‖_F², exact
    double fro_retained = 1;              // ‖Δ_k‖_F / ‖Δ‖_F
    double relative_error = 0;            // ‖Δ - up·down‖_F / ‖Δ‖_F (after clamping, when clamped)
    bool randomized = false;
};

struct FitOptions {
    RankSpec rank;                        // fixed (rank, or conv_rank for convolutions) or a dynamic rule
    bool conv = false;                    // selects conv_rank
    std::optional<double> clamp_quantile; // kohya: clamp up and down to ±quantile(concat(up, down), Q)
    linalg::DenseSvdOptions svd;
};

// The rank and factors for a dense delta. Dynamic rules run the randomized SVD at a growing
// width until the rule is decided by the computed values and ‖Δ‖_F (energy, sv_fro, sv_ratio);
// sv_cumulative needs Σσ, so it takes the exact SVD.
LowRankFit fit_low_rank(const float* delta, std::int64_t rows, std::int64_t cols, const FitOptions& options);

struct ExtractRequest {
    std::string base;
    std::string tuned;
    std::string output;
    std::string to;                 // "peft" or "kohya"; "" = kohya for SD/SDXL/Flux, PEFT otherwise
    FitOptions fit;
    double min_diff = 0;            // tensors whose largest |Δ| is at most this are skipped
    std::optional<DType> dtype;     // factor dtype; default: the tuned tensor's float dtype
    bool allow_unmatched = false;   // tuned tensors with no base counterpart: warning, not error
    // Changed tensors that are not factored (norms, biases, embeddings) kept whole: a changed
    // bias of an extracted module as its LoRA bias; others as PEFT modules_to_save (the tuned
    // values) or LyCORIS full diffs (kohya: "diff", "diff_b").
    bool keep_full = false;
    bool force = false;
    bool json = false;
    int threads = 0;                // workers, one weight each, BLAS single-threaded in them (0: all cores)
};

ToolResult run_extract(const Registry& registry, const ExtractRequest& request, Progress& progress);

}  // namespace lorakit
