// Convention detection, adapter reading and inspection on arbitrary tensor files with an
// arbitrary sidecar config: the input is [u16 config length][config text][safetensors bytes].
#include <cstddef>
#include <cstdint>
#include <string>

#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/formats/safetensors.h"
#include "lorakit/inspect.h"
#include "lorakit/linalg.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    lorakit::linalg::set_blas_threads(1);
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 2) return 0;
    const std::size_t config_length = std::min<std::size_t>(size - 2, data[0] | (data[1] << 8));
    const std::string config_text(reinterpret_cast<const char*>(data + 2), config_length);
    const auto bytes = std::span(reinterpret_cast<const std::byte*>(data + 2 + config_length), size - 2 - config_length);
    try {
        const auto& registry = lorakit::formats::builtin_registry();
        auto file = lorakit::formats::read_safetensors(lorakit::MappedFile::from_bytes("fuzz", bytes));
        std::optional<lorakit::SidecarConfig> config;
        if (config_length) config = lorakit::SidecarConfig{"adapter_config.json", config_text};
        if (config)
            for (const auto& driver : registry.conventions()) driver->precheck(*config);
        const lorakit::Adapter adapter = registry.read_adapter("fuzz", *file, config);
        lorakit::InspectOptions options;
        options.threads = 1;
        const auto report = lorakit::inspect_adapter(adapter, options, lorakit::no_progress());
        (void)lorakit::to_json(report).dump();
        (void)lorakit::render_text(report, true);
    } catch (const lorakit::Error&) {
    }
    return 0;
}
