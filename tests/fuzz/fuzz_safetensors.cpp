// Arbitrary bytes through the safetensors reader. Rejections must be lorakit::Error; anything
// else escaping, a crash, a hang or a sanitizer report is a bug. A file that is accepted must
// also survive a round trip through the writer unchanged (names, dtypes, shapes, bytes,
// metadata), which checks reader and writer against each other.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "lorakit/error.h"
#include "lorakit/formats/safetensors.h"

namespace {

void check(bool condition) {
    if (!condition) std::abort();
}

void round_trip(const lorakit::TensorFile& file) {
    std::vector<lorakit::formats::TensorToWrite> tensors;
    for (const auto& entry : file.entries())
        if (entry.supported()) tensors.push_back({entry.name, entry.tensor.view()});
    const auto bytes = lorakit::formats::serialize_safetensors(tensors, file.metadata());
    const auto again = lorakit::formats::read_safetensors(lorakit::MappedFile::from_bytes("round trip", bytes));
    check(again->metadata() == file.metadata());
    check(again->entries().size() == tensors.size());
    for (const auto& t : tensors) {
        const lorakit::TensorEntry* entry = again->find(t.name);
        check(entry != nullptr);
        check(entry->tensor.dtype() == t.view.dtype() && entry->shape == t.view.shape());
        const auto a = entry->tensor.bytes();
        const auto b = t.view.bytes();
        check(a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0));
    }
    check(lorakit::formats::safetensors_data_sha256(bytes).size() == 64);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const auto bytes = std::span(reinterpret_cast<const std::byte*>(data), size);
    (void)lorakit::formats::SafetensorsDriver().identify(bytes.first(std::min<std::size_t>(size, 64)), "fuzz");
    std::unique_ptr<lorakit::TensorFile> file;
    try {
        file = lorakit::formats::read_safetensors(lorakit::MappedFile::from_bytes("fuzz", bytes));
    } catch (const lorakit::Error&) {
        return 0;
    }
    // Touch what a reader would: every supported tensor's values.
    for (const auto& entry : file->entries())
        if (entry.supported()) (void)entry.tensor.view().count_nonfinite();
    round_trip(*file);
    return 0;
}
