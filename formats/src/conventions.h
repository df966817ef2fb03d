// The key-convention drivers lorakit ships (registered by builtin.cpp, in detection order).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lorakit/registry.h"

namespace lorakit::formats {

std::unique_ptr<ConventionDriver> make_peft_driver();
std::unique_ptr<ConventionDriver> make_mlx_driver();
std::unique_ptr<ConventionDriver> make_kohya_driver();
std::unique_ptr<ConventionDriver> make_diffusers_driver();
std::unique_ptr<ConventionDriver> make_cloneofsimo_driver();
std::unique_ptr<ConventionDriver> make_gguf_lora_driver();

// Opens base model checkpoints (checkpoint.cpp), for Registry::set_checkpoint_opener.
Registry::CheckpointOpener checkpoint_opener();
// The shard file names of a Hugging Face model.safetensors.index.json ("weight_map": tensor ->
// file), each once, in first-seen order; every name must be a plain file name beside the index.
// Throws bad_input naming `name` (the index's path) otherwise.
std::vector<std::string> parse_shard_index(std::string_view text, const std::string& name);

// llama.cpp tensor names of Hugging Face Llama-family modules (gguf_lora.cpp):
// "model.layers.12.mlp.up_proj" -> "blk.12.ffn_up", or nullopt for a path the map lacks.
std::optional<std::string> hf_to_gguf(std::string_view hf);
// The reverse: "blk.12.ffn_up" -> "model.layers.12.mlp.up_proj".
std::optional<std::string> gguf_to_hf(std::string_view gguf);
// Whether llama.cpp's converter permutes the q/k rows of this architecture (LlamaModel.permute).
bool permutes_qk(std::string_view arch);
// For each Hugging Face row of a q/k projection with `out` rows and `heads` heads, the row it
// has in llama.cpp's rotary order (gguf row h*hd + 2j + s <- hf row h*hd + s*hd/2 + j).
std::vector<std::int64_t> rotary_rows(std::int64_t out, std::int64_t heads);

}  // namespace lorakit::formats
