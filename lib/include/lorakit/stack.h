// lora-stack as a library function: several adapters applied together, ΔW = Σ w_i·s_i·B_i·A_i
// per module (as ComfyUI, A1111, diffusers and llama.cpp apply a stack), with stability
// metrics computed from the factors only: the Gram matrices of the stacked factors (linalg::
// stacked_grams) and R x R algebra, never the dense out x in matrix.
//
// Per module, with ΔW_i = w_i·s_i·B_i·A_i (the adapter at its weight) and D_i = s_i·B_i·A_i
// (at weight 1, as trained):
//   fro_i, spectral_i        ‖ΔW_i‖_F, ‖ΔW_i‖_2
//   cosine_ij                ⟨ΔW_i, ΔW_j⟩_F / (‖ΔW_i‖_F ‖ΔW_j‖_F)
//   kappa                    ‖Σ ΔW_i‖_F² / Σ ‖ΔW_i‖_F²  (1: orthogonal, n: n copies of one, 0: cancel)
//   growth                   ‖Σ ΔW_i‖_2 / max_i ‖ΔW_i‖_2
//   strength                 ‖Σ ΔW_i‖_2 / max_i ‖D_i‖_2: the stack against its strongest adapter at
//                            weight 1 (one adapter at weight w has strength |w|); drives the verdict
//   overlap (out, in)        principal angles between the adapters' top singular subspaces
//                            (the vectors carrying `subspace_energy` of each ‖D_i‖_F²): the
//                            largest cosine and φ = ‖U_iᵀU_j‖_F² / min(k_i, k_j) (LoRA paper §7)
//   sign_conflict_ij         among sampled entries (a seeded grid of rows x columns) that are in
//                            the top `top_fraction` by magnitude for both i and j, the fraction
//                            of opposite signs
//   with a base checkpoint:  base_ratio = ‖Σ ΔW_i‖_2 / ‖W‖_2 (block Krylov iteration on W) and
//                            whether W + Σ ΔW_i exceeds the largest finite value of W's dtype
// Verdict per module (thresholds in StackThresholds, justified in README.md "lora-stack"):
//   unstable  strength >= strength_unstable, base_ratio >= base_unstable, or an overflow
//   warn      strength > strength_warn or base_ratio > base_warn
//   ok        otherwise
// All verdict inputs scale linearly with a common factor t on the weights, so the largest t
// that makes a module `ok` is exact (for overflow: the largest t with |W + t·ΣΔW| in range).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "lorakit/adapter.h"
#include "lorakit/merge.h"
#include "lorakit/progress.h"
#include "lorakit/registry.h"
#include "lorakit/tool_result.h"

namespace lorakit {

enum class Verdict { ok, warn, unstable };
std::string_view verdict_name(Verdict verdict) noexcept;

struct StackThresholds {
    double strength_warn = 1.5;
    double strength_unstable = 2.0;
    double base_warn = 0.5;
    double base_unstable = 1.0;
};

struct StackOptions {
    std::vector<double> weights;     // one per adapter; empty = all 1
    StackThresholds thresholds;
    double subspace_energy = 0.9;    // the part of ‖D_i‖_F² whose singular vectors define i's subspaces
    std::int64_t samples = 8192;     // entries sampled per module for the sign-conflict estimate
    double top_fraction = 0.2;       // "largest-magnitude entries": this top fraction of each adapter's samples
    std::uint64_t seed = 0;
    int threads = 0;
    // With a base: how far the base is read ahead of the workers (bytes read and not yet used).
    std::uint64_t read_ahead_bytes = std::uint64_t{256} << 20;
};

struct PairStats {
    std::size_t first = 0, second = 0;  // adapter indices (first < second)
    double cosine = 0;
    double out_max_cosine = 0, out_phi = 0;  // output subspaces (columns of B)
    double in_max_cosine = 0, in_phi = 0;    // input subspaces (rows of A)
    double sign_conflict = 0;                // NaN when no sampled entry is in both top sets
    std::int64_t sign_samples = 0;           // entries in both top sets
    std::int64_t modules = 0;                // in StackReport::pair_summary: modules both adapters have
};

struct BaseStats {
    std::string tensor;   // the checkpoint tensor (and row range) the module applies to
    std::string dtype;
    double spectral = 0;  // ‖W‖_2
    double ratio = 0;     // ‖Σ ΔW‖_2 / ‖W‖_2
    double limit = 0;     // the largest finite value of the dtype (0: not checked, e.g. quantized)
    double max_abs = 0;   // max |W + Σ ΔW| over the entries checked exactly (others are bounded below limit)
    std::int64_t overflow_count = 0;
    double overflow_factor = 1;  // the largest t <= 1 with |W + t ΣΔW| <= limit everywhere
};

struct ModuleStack {
    std::string name;
    std::vector<std::size_t> inputs;  // adapters that have the module
    std::vector<double> fro, spectral;  // per entry of `inputs`, at the adapter's weight
    std::vector<PairStats> pairs;
    double sum_fro = 0, sum_spectral = 0;  // ‖Σ ΔW‖_F, ‖Σ ΔW‖_2
    double kappa = 1, growth = 1, strength = 0;
    std::optional<BaseStats> base;
    Verdict verdict = Verdict::ok;
    std::vector<std::string> reasons;  // why not ok
    double ok_factor = 1;              // the largest t <= 1 on all weights that makes this module ok
};

struct StackReport {
    std::vector<std::string> names;  // the adapters, as given
    std::vector<double> weights;     // as applied (after --auto-scale)
    double total_weight = 0;         // Σ |w_i|
    std::vector<ModuleStack> modules;  // in the first adapter's module order
    // Per adapter pair (i < j, row-major over pairs): RMS of the module cosines, over the modules both have.
    std::vector<PairStats> pair_summary;
    Verdict verdict = Verdict::ok;
    std::size_t counts[3] = {0, 0, 0};  // modules per verdict
    double suggested_factor = 1;        // min over modules of ok_factor
    double applied_factor = 1;          // the factor --auto-scale applied (1 without it)
    std::vector<std::string> notes;
};

// Dense base weights for a module, supplied by the caller (lora-stack --base): the rows of the
// checkpoint tensor the module's ΔW adds to, as out x flat_in row-major values (transposed
// already for fan_in_fan_out and embeddings), its dtype's finite limit (0: no overflow check),
// and names. The values are either f32 in `values` (usually into `storage`) or, when `stored`
// is set, the tensor's own F32, F16 or BF16 values read in place (a mapped checkpoint tensor
// used whole: no converted copy); `release`, when set, is called once the module is done.
struct BaseWeight {
    std::span<const float> values;  // out x flat_in, usually into `storage`
    std::vector<float> storage;     // reused by load() from module to module; only grows
    const std::byte* stored = nullptr;
    DType stored_dtype = DType::F32;
    std::function<void()> release;
    std::string tensor;
    std::string dtype;
    double limit = 0;
};
class BaseWeights {
public:
    virtual ~BaseWeights() = default;
    // Fills `into` (its storage is reused from module to module: fresh pages are slow to touch,
    // and a resize would zero-fill); false when the checkpoint has no tensor for the module
    // (reported, not an error).
    virtual bool load(const LoraModule& module, BaseWeight& into) const = 0;
    // Reads the base tensor of `module` into memory now (waiting for the disk): called from a
    // thread that runs ahead of the workers, in module order. Returns the bytes it read (0:
    // nothing to read), which bound how far ahead that thread runs.
    virtual std::uint64_t prefetch(const LoraModule&) const { return 0; }
};

// Computes the report. With `auto_scale`, multiplies the weights by the suggested factor and
// recomputes, so the report describes the stack as it will be applied.
StackReport analyse_stack(const std::vector<Adapter>& adapters, const StackOptions& options, bool auto_scale,
                          const BaseWeights* base, Progress& progress);

struct StackRequest {
    std::vector<std::string> inputs;  // "PATH" or "PATH:WEIGHT"
    std::string base;
    std::string output;
    std::string to;
    bool force = false;
    bool json = false;
    bool strict = false;
    bool auto_scale = false;
    std::size_t top = 15;  // rows of the human table (0: all)
    StackOptions options;
    std::optional<RankSpec> rank;  // -o with --rank/--dynamic: factored-SVD compression
    std::optional<DType> dtype;
};
ToolResult run_stack(const Registry& registry, const StackRequest& request, Progress& progress);

}  // namespace lorakit
