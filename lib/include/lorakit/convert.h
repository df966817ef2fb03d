// lora-convert: read an adapter in any convention and write it in another, exactly (the applied
// scale of every module is preserved; what a target cannot express is folded into B or refused).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "lorakit/error.h"
#include "lorakit/progress.h"
#include "lorakit/registry.h"
#include "lorakit/tool_result.h"

namespace lorakit {

struct ConvertRequest {
    std::string input;
    std::string output;
    std::string to;     // target convention; "" = the input's
    std::string dtype;  // "" = the factors' own; f32, f16, bf16; q8_0 for gguf
    ModelHints hints;   // --arch, --head-count, --head-count-kv
    std::string base;   // a base model's config.json or GGUF, for the hints it does not give
    std::optional<std::int64_t> rank;  // LyCORIS modules are re-factored into LoRAs of this rank
    // Write what the target can hold when it cannot hold everything (DoRA magnitudes, LoRA
    // biases, non-LoRA tensors, LyCORIS modules without `rank` are left out; a --dtype cast
    // saturates values beyond the dtype's range), with a note for each loss; otherwise such a
    // conversion is refused with a message saying what would be lost.
    bool allow_lossy = false;
    bool force = false;
    bool json = false;
};

// Hints from a base model file: a Hugging Face config.json (model_type, num_attention_heads,
// num_key_value_heads) or a GGUF model (general.architecture, <arch>.attention.head_count[_kv]).
// Values already in `hints` win.
ModelHints hints_from_base(const Registry& registry, const std::string& path, ModelHints hints);

// The adapter with its factors converted to `dtype` (F32, F16 or BF16; alphas unchanged). A
// finite value beyond the dtype's range is refused (ErrorCode::unsupported, naming the module and
// its largest value) unless `saturate`: then it becomes the largest finite value of its sign, and
// `saturated` (when given) counts such values.
Adapter with_factor_dtype(Adapter adapter, DType dtype, bool saturate = false, std::size_t* saturated = nullptr);

// What --allow-lossy leaves out after a writer refused `refusal` (Error::loss()): the DoRA
// magnitudes or LoRA biases of every module, or the non-LoRA tensors it names (all when it names
// none). Returns the loss in words ("the DoRA magnitudes of 4 module(s)"), or "" when `adapter`
// had nothing of that kind.
std::string drop_refused(Adapter& adapter, const Error& refusal);

ToolResult run_convert(const Registry& registry, const ConvertRequest& request, Progress& progress);

}  // namespace lorakit
