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

// The inverse over a whole adapter's modules: diffusers-named Flux modules back to BFL names,
// q/k/v (and proj_mlp) joined into one module. Parts with identical A (as a split leaves them)
// join to A and B stacked by rows, bit for bit; otherwise A is stacked and B block-diagonal,
// each part's scale folded into its block (scale 1). A missing part contributes zero rows.
// Modules that are not diffusers Flux names pass through unchanged. `joined` counts the
// fused modules built.
std::vector<LoraModule> diffusers_to_bfl_flux(const std::vector<LoraModule>& modules, std::size_t& joined);

}  // namespace lorakit::formats
