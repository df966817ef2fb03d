// Arbitrary bytes through the parser of Hugging Face model.safetensors.index.json files (the
// shard list of a sharded checkpoint). Rejections must be lorakit::Error; anything else
// escaping, a crash, a hang or a sanitizer report is a bug. An accepted index must name only
// plain file names beside it (never a path that could leave its directory), each once.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string_view>

#include "conventions.h"
#include "lorakit/error.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    std::vector<std::string> shards;
    try {
        shards = lorakit::formats::parse_shard_index(text, "fuzz.index.json");
    } catch (const lorakit::Error&) {
        return 0;
    }
    for (std::size_t i = 0; i < shards.size(); ++i) {
        const std::filesystem::path path = shards[i];
        if (shards[i].empty() || path.has_parent_path() || path.is_absolute() || shards[i] == "." || shards[i] == "..")
            std::abort();
        if (std::find(shards.begin(), shards.begin() + static_cast<std::ptrdiff_t>(i), shards[i]) != shards.begin() + static_cast<std::ptrdiff_t>(i))
            std::abort();
    }
    return 0;
}
