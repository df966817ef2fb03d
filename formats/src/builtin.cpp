#include "lorakit/formats/builtin.h"

#include "conventions.h"
#include "lorakit/formats/gguf.h"
#include "lorakit/formats/safetensors.h"
#include "pytorch_pickle.h"

namespace lorakit::formats {

void register_builtin_formats(Registry& registry) {
    registry.add(std::make_unique<SafetensorsDriver>());
    registry.add(std::make_unique<GgufDriver>());
    registry.add(std::make_unique<PytorchPickleDriver>());
    // Detection takes the highest score; on a tie the earlier driver wins.
    registry.add(make_gguf_lora_driver());
    registry.add(make_peft_driver());
    registry.add(make_mlx_driver());
    registry.add(make_cloneofsimo_driver());
    registry.add(make_kohya_driver());
    registry.add(make_diffusers_driver());
    registry.set_checkpoint_opener(checkpoint_opener());
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
