#include "lorakit/formats/builtin.h"

#include "lorakit/formats/safetensors.h"

namespace lorakit::formats {

void register_builtin_formats(Registry& registry) {
    registry.add(std::make_unique<SafetensorsDriver>());
}

const Registry& builtin_registry() {
    static const Registry registry = [] {
        Registry r;
        register_builtin_formats(r);
        return r;
    }();
    return registry;
}

}  // namespace lorakit::formats
