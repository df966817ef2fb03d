// Registration of every format lorakit ships. Tools and programs call builtin_registry();
// nothing registers itself through static initialisers.
#pragma once

#include "lorakit/registry.h"

namespace lorakit::formats {

// Adds every built-in container and convention driver to `registry`, in detection order.
void register_builtin_formats(Registry& registry);

// A process-wide registry with every built-in format (created on first use, thread-safe).
const Registry& builtin_registry();

}  // namespace lorakit::formats
