// Guessing which base model an adapter was trained for.
#pragma once

#include <string>
#include <string_view>

#include "lorakit/adapter.h"

namespace lorakit {

// The model family a model name or architecture string points to ("Qwen/Qwen2.5-3B" ->
// "Qwen", "stable-diffusion-xl-v1-base/lora" -> "SDXL"), or "" when it names none we know.
std::string family_from_model_name(std::string_view name);

// Fills adapter.base_model.family (and evidence) when the convention reader left it empty:
// first from base_model.name, then from the canonical module names and factor shapes.
// Never fails; an adapter it cannot place gets "unknown".
void infer_base_model(Adapter& adapter);

}  // namespace lorakit
