// Arbitrary bytes through the PyTorch zip-checkpoint reader. Inputs whose first byte is odd are
// wrapped as data.pkl in a valid archive with one 64-float storage, so that most of the effort
// goes into the restricted unpickler; even ones are read as whole archives. Rejections must be
// lorakit::Error; anything else escaping, a crash, a hang or a sanitizer report is a bug.
#include <cstddef>
#include <cstdint>
#include <string>

#include "../../formats/src/pytorch_pickle.h"
#include "lorakit/error.h"

namespace {

std::string u16(std::uint32_t v) { return {static_cast<char>(v & 0xff), static_cast<char>((v >> 8) & 0xff)}; }
std::string u32(std::uint32_t v) { return u16(v & 0xffff) + u16(v >> 16); }

std::string stored_zip(const std::string& pickle) {
    const std::pair<std::string, std::string> files[] = {{"a/data.pkl", pickle}, {"a/data/0", std::string(256, '\x01')}};
    std::string out, central;
    for (const auto& [name, data] : files) {
        const auto offset = static_cast<std::uint32_t>(out.size());
        const auto size = static_cast<std::uint32_t>(data.size()), n = static_cast<std::uint32_t>(name.size());
        out += u32(0x04034b50) + u16(20) + u16(0) + u16(0) + u16(0) + u16(0) + u32(0) + u32(size) + u32(size) + u16(n) +
               u16(0) + name + data;
        central += u32(0x02014b50) + u16(20) + u16(20) + u16(0) + u16(0) + u16(0) + u16(0) + u32(0) + u32(size) + u32(size) +
                   u16(n) + u16(0) + u16(0) + u16(0) + u16(0) + u32(0) + u32(offset) + name;
    }
    const auto cd = static_cast<std::uint32_t>(out.size());
    out += central + u32(0x06054b50) + u16(0) + u16(0) + u16(2) + u16(2) + u32(static_cast<std::uint32_t>(central.size())) +
           u32(cd) + u16(0);
    return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    std::string bytes;
    if (data[0] & 1) bytes = stored_zip(std::string(reinterpret_cast<const char*>(data) + 1, size - 1));
    else bytes.assign(reinterpret_cast<const char*>(data) + 1, size - 1);
    try {
        const auto file = lorakit::formats::read_pytorch_pickle(
            lorakit::MappedFile::from_bytes("fuzz", std::as_bytes(std::span(bytes.data(), bytes.size()))));
        for (const auto& entry : file->entries())
            if (entry.supported()) (void)entry.tensor.view().count_nonfinite();
    } catch (const lorakit::Error&) {
    }
    return 0;
}
