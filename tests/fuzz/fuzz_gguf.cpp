// Arbitrary bytes through the GGUF reader. Rejections must be lorakit::Error; anything else
// escaping, a crash, a hang or a sanitizer report is a bug. An accepted file must survive a
// round trip through the writer (pairs, names, types, shapes and raw bytes unchanged), and
// its metadata text must be computable.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "lorakit/error.h"
#include "lorakit/formats/gguf.h"

namespace {

void check(bool condition) {
    if (!condition) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace lorakit::formats;
    const auto bytes = std::span(reinterpret_cast<const std::byte*>(data), size);
    (void)GgufDriver().identify(bytes.first(std::min<std::size_t>(size, 64)), "fuzz");
    std::unique_ptr<GgufFile> file;
    try {
        file = read_gguf(lorakit::MappedFile::from_bytes("fuzz", bytes));
    } catch (const lorakit::Error&) {
        return 0;
    }
    for (const auto& entry : file->entries())
        if (entry.supported()) (void)entry.to_f32();  // decodes Q8_0 too
    std::vector<GgufTensorToWrite> tensors;
    for (std::size_t i = 0; i < file->entries().size(); ++i) {
        GgufTensorToWrite t;
        t.name = file->entries()[i].name;
        t.type = file->ggml_type(i);
        t.shape = file->entries()[i].shape;
        t.view = file->raw(i);
        tensors.push_back(std::move(t));
    }
    const auto again_bytes = serialize_gguf(file->kv(), tensors);
    const auto again = read_gguf(lorakit::MappedFile::from_bytes("round trip", again_bytes));
    check(again->kv() == file->kv());
    check(again->metadata() == file->metadata());
    check(again->entries().size() == file->entries().size());
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        check(again->entries()[i].name == tensors[i].name && again->entries()[i].shape == tensors[i].shape);
        check(again->ggml_type(i) == tensors[i].type);
        const auto a = again->raw(i), b = file->raw(i);
        check(a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0));
    }
    return 0;
}
