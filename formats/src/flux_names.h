// Flux.1 transformer modules between BFL names (double_blocks / single_blocks, fused qkv and
// linear1: what kohya and ComfyUI use) and diffusers names (transformer_blocks /
// single_transformer_blocks, separate q, k, v and proj_mlp), as diffusers'
// _convert_kohya_flux_lora_to_diffusers maps them (research/formats.md §4.3).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "lorakit/adapter.h"

namespace lorakit::formats {

// The diffusers modules of one BFL-named module (`name` without "transformer."): a fused
// module becomes one module per part, each with the full A and its rows of B (exact:
// [B_q; B_k; B_v]·A = [B_q·A; B_k·A; B_v·A]); final_layer.adaLN_modulation.1 gets its B halves
// swapped ([shift, scale] -> [scale, shift]). nullopt when the name is not a BFL Flux path.
std::optional<std::vector<LoraModule>> bfl_to_diffusers_flux(const LoraModule& module);

}  // namespace lorakit::formats
