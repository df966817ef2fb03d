// lora-resize as a library function: every module re-factored to a lower rank from the exact
// SVD of its B·A (factored, see linalg.h), the rank chosen by a rule (rank_rules.h).
//
// The scale is kept: the new factors hold U_k·Σ_k and V_kᵀ of B·A and the alpha becomes
// scale·k (scale·√k for rsLoRA; mlx-style fixed scales stay), kohya's new_alpha rule, so
// ΔW' = scale·B'A' is the best rank-k approximation of ΔW (Eckart–Young).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "lorakit/adapter.h"
#include "lorakit/progress.h"
#include "lorakit/rank_rules.h"
#include "lorakit/registry.h"
#include "lorakit/tool_result.h"

namespace lorakit {

// Where the singular values go when a product is split into two factors.
enum class FactorSplit {
    up,        // B = U·Σ, A = Vᵀ: kohya resize/svd_merge/extract, PEFT svd merges, LyCORIS
    balanced,  // B = U·√Σ, A = √Σ·Vᵀ: mergekit, sd-mecha
};

struct ResizeOptions {
    RankSpec rank;
    FactorSplit split = FactorSplit::up;
    std::optional<DType> dtype;  // output dtype of the factors (default: each factor's own)
    int threads = 0;             // 0 = all cores
};

struct ModuleResize {
    std::string name;
    std::int64_t old_rank = 0;
    RankChoice choice;       // new rank and retention statistics
    bool unchanged = false;  // already at or below the target: copied as is
};

struct ResizeResult {
    Adapter adapter;
    std::vector<ModuleResize> modules;
    std::vector<std::string> notes;
};

ResizeResult resize_adapter(const Adapter& input, const ResizeOptions& options, Progress& progress);

// The same, written while it is computed, when every module's new rank is known before its
// spectrum (rank_without_spectrum: a fixed rank): `write` gets the resized adapter at once, each
// module's factors deferred (Tensor::deferred) and made on the workers in the order the writer
// takes them, so the writing overlaps the computing and only a few modules' factors are held.
// Returns what resize_adapter returns (the adapter's factors still deferred: made again if
// read), or nullopt, having done nothing, when the rule needs the spectra.
std::optional<ResizeResult> resize_adapter_streamed(const Adapter& input, const ResizeOptions& options,
                                                    Progress& progress,
                                                    const std::function<void(const Adapter&)>& write);

// New factors for one module from the exact SVD of its B·A, at rank k (padded with zero
// directions when k exceeds the numerical rank, as kohya's fixed ranks may ask).
// `singular_values` receives the full spectrum of B·A (without the scale).
LoraModule refactor_module(const LoraModule& module, std::int64_t k, FactorSplit split, std::optional<DType> dtype,
                           std::vector<double>* singular_values = nullptr);

// The whole lora-resize command: read INPUT, resize, write OUTPUT in the input's convention
// (or `to`), report per module as a table or JSON.
struct ResizeRequest {
    std::string input;
    std::string output;
    std::string to;  // output convention; "" = the input's
    bool force = false;
    bool json = false;
    ResizeOptions options;
};
ToolResult run_resize(const Registry& registry, const ResizeRequest& request, Progress& progress);

}  // namespace lorakit
