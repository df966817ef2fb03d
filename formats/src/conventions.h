// The key-convention drivers lorakit ships (registered by builtin.cpp, in detection order).
#pragma once

#include <memory>

#include "lorakit/registry.h"

namespace lorakit::formats {

std::unique_ptr<ConventionDriver> make_peft_driver();
std::unique_ptr<ConventionDriver> make_mlx_driver();
std::unique_ptr<ConventionDriver> make_kohya_driver();
std::unique_ptr<ConventionDriver> make_diffusers_driver();
std::unique_ptr<ConventionDriver> make_cloneofsimo_driver();
std::unique_ptr<ConventionDriver> make_gguf_lora_driver();

}  // namespace lorakit::formats
