// Arbitrary bytes through the safetensors reader. Rejections must be lorakit::Error; anything
// else escaping, a crash, a hang or a sanitizer report is a bug.
#include <cstddef>
#include <cstdint>

#include "lorakit/error.h"
#include "lorakit/formats/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const auto bytes = std::span(reinterpret_cast<const std::byte*>(data), size);
    try {
        auto file = lorakit::formats::read_safetensors(lorakit::MappedFile::from_bytes("fuzz", bytes));
        // Touch what a reader would: every supported tensor's values.
        for (const auto& entry : file->entries())
            if (entry.supported()) (void)entry.tensor.view().count_nonfinite();
    } catch (const lorakit::Error&) {
    }
    return 0;
}
