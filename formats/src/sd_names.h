// Module paths between the two naming trees of Stable Diffusion UNets: SGM / original LDM
// (input_blocks, middle_block, output_blocks: what kohya uses for SDXL) and diffusers
// (down_blocks, mid_block, up_blocks). The rules of diffusers' _maybe_map_sgm_blocks_to_diffusers
// and _convert_unet_lora_key (research/formats.md §4.3), for two layers per block (SD1.x, SDXL).
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace lorakit::formats {

// `path` is a UNet module path without the "unet." component ("input_blocks.4.1.proj_in").
// Returns the diffusers path ("down_blocks.1.attentions.0.proj_in"), or nullopt when `path`
// is not in the SGM tree.
std::optional<std::string> sgm_to_diffusers_unet(std::string_view path);

// The inverse, for the SDXL UNet (whose upsampling blocks all have attentions): the SGM path of
// a diffusers one, or nullopt when `path` is not in the diffusers tree.
std::optional<std::string> diffusers_to_sgm_unet_sdxl(std::string_view path);

}  // namespace lorakit::formats
