// lora-bake as a library function: adapters merged into a base checkpoint,
//   W' = W + Σ_i c_i · s_i · B_i·A_i   (c_i = the adapter's weight, negated with `subtract`)
// accumulated in f32 per tensor and rounded once to the output dtype, streamed one tensor at a
// time from the mapped checkpoint (memory: the largest tensor plus the adapters). DoRA modules
// follow PEFT's merge: W' = m / ‖W + ΔW‖ · (W + ΔW), the norm per output row (per input column
// for LyCORIS's input-side dora_scale). LoRA biases add into the tensor's bias. Modules are
// matched to tensors by Checkpoint::locate (fused Flux/OpenCLIP rows, GGUF q/k order, ...).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "lorakit/progress.h"
#include "lorakit/registry.h"
#include "lorakit/tool_result.h"

namespace lorakit {

struct BakeRequest {
    std::string base;
    std::vector<std::string> adapters;  // "PATH" or "PATH:WEIGHT"
    std::string output;
    std::optional<DType> dtype;         // nullopt: every tensor keeps its dtype
    // --dtype q8_0 (GGUF bases only): matrices are quantized to Q8_0 the way llama.cpp's
    // converter does (norms and other 1-D tensors stay F32, rows not a multiple of 32 go to F16).
    bool q8_0 = false;
    bool subtract = false;              // remove previously baked adapters (W - ΣΔW)
    bool allow_unmatched = false;       // modules with no tensor: a warning instead of an error
    bool force = false;
    bool json = false;
    std::uint64_t shard_size = 0;       // > 0: sharded output directory
    int threads = 0;                    // threads: one writes, the others compute the products (0: all cores)
};

ToolResult run_bake(const Registry& registry, const BakeRequest& request, Progress& progress);

// "5GB", "500MB", "2GiB", "1000000" -> bytes; usage error otherwise.
std::uint64_t parse_size(const std::string& text);

}  // namespace lorakit
