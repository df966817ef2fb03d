// Containers lorakit recognises but does not read yet: they are identified by their magic
// bytes so that the user gets a precise refusal instead of "not a recognised tensor file".
#pragma once

#include "lorakit/registry.h"

namespace lorakit::formats {

void register_stub_containers(Registry& registry);

}  // namespace lorakit::formats
