// lora-merge as a library function: several adapters into one, module by module (modules are
// matched by canonical name; a module missing from some inputs is merged from the others).
//
// With c_i = w_i · s_i (the user's weight times the input's scale):
//   concat            exact: B = [c_1 B_1 … c_n B_n], A = [A_1; …; A_n], rank Σ r_i, scale 1
//   svd               the exact factored SVD of Σ c_i B_i A_i, truncated by a rank rule
// PEFT's LoraModel.add_weighted_adapter, with its math (huggingface/peft model.py, merge_utils.py):
//   cat               as concat, with c_i on the A blocks
//   linear, ties, dare_linear, dare_ties, magnitude_prune
//                     on the factors separately (not exact for n > 1: cross terms B_i A_j):
//                     A' = MERGE({A_i}, sign(c_i)·√|c_i|), B' = MERGE({B_i}, √|c_i|); equal ranks
//   ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
//                     MERGE on the dense deltas D_i = s_i B_i A_i with weights w_i (PEFT >= PR #3111;
//                     --compat peft-legacy: w_i·s_i, the double scaling of earlier PEFT), then a
//                     truncated SVD (B = U_k Σ_k, A = V_kᵀ)
//   MERGE: task arithmetic Σ v_i T_i; ties: magnitude-prune to `density`, elect a sign per entry
//   (total: sign of Σ T_i, frequency: sign of Σ sign T_i; ties go to +), mean of the agreeing
//   weighted entries; dare: keep entries with probability `density` (seeded), rescale by 1/density.
// kohya-ss/sd-scripts (--compat kohya): merge_lora.py's LoRA-into-LoRA merge for `linear`
// (up' = Σ |r_i| up_i, down' = Σ r_i down_i with r_i = sqrt(alpha_i / base_alpha) · w_i, alpha' =
// base_alpha: each input's strength becomes w_i·|w_i|) and for `concat` (the same r_i, factors
// concatenated, alpha' = base_alpha); svd_merge_lora.py for `svd` (Σ w_i s_i up_i down_i, SVD,
// optional quantile clamp of the factors, alpha = rank).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "lorakit/adapter.h"
#include "lorakit/linalg.h"
#include "lorakit/progress.h"
#include "lorakit/rank_rules.h"
#include "lorakit/registry.h"
#include "lorakit/resize.h"
#include "lorakit/tool_result.h"

namespace lorakit {

enum class MergeMethod {
    concat, svd, cat, linear, ties, dare_linear, dare_ties, magnitude_prune,
    ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd,
};
enum class MergeCompat { lorakit, peft_legacy, kohya };
enum class MajoritySign { total, frequency };

MergeMethod parse_merge_method(const std::string& name);
std::string_view merge_method_name(MergeMethod method) noexcept;

struct MergeOptions {
    MergeMethod method = MergeMethod::concat;
    std::vector<double> weights;      // one per input; empty = all 1
    RankSpec rank;                    // svd methods: the rank rule (default: the largest input rank)
    double density = 1.0;             // ties / dare / magnitude_prune
    MajoritySign majority_sign = MajoritySign::total;
    std::uint64_t seed = 0;           // dare
    MergeCompat compat = MergeCompat::lorakit;
    std::optional<double> clamp_quantile;  // svd methods: clamp factors to this quantile of |values|
    FactorSplit split = FactorSplit::up;
    std::optional<DType> dtype;
    linalg::DenseSvdOptions dense_svd;
    int threads = 0;
};

struct ModuleMerge {
    std::string name;
    std::vector<std::size_t> inputs;  // which inputs had the module
    std::int64_t rank = 0;            // of the merged module
    // Truncation of the svd methods (1 and 0 otherwise).
    double fro_retained = 1;
    double relative_error = 0;
};

struct MergeResult {
    Adapter adapter;
    std::vector<ModuleMerge> modules;
    std::vector<std::string> notes;
};

MergeResult merge_adapters(const std::vector<Adapter>& inputs, const MergeOptions& options, Progress& progress);

// The same, written while it is computed when every merged module's rank and alpha are known
// beforehand (concat, cat, kohya's linear, svd to a fixed rank; modules without LoRA biases):
// `write` gets the merged adapter at once, its factors deferred (Tensor::deferred) and made on
// the workers in the order the writer takes them (see resize_adapter_streamed). nullopt, having
// done nothing but the checks on the options, otherwise.
std::optional<MergeResult> merge_adapters_streamed(const std::vector<Adapter>& inputs, const MergeOptions& options,
                                                   Progress& progress,
                                                   const std::function<void(const Adapter&)>& write);

struct MergeRequest {
    std::vector<std::string> inputs;
    std::string output;
    std::string to;
    bool force = false;
    bool json = false;
    MergeOptions options;
};
ToolResult run_merge(const Registry& registry, const MergeRequest& request, Progress& progress);

}  // namespace lorakit
