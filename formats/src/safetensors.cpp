// Placeholder: being implemented.
#include "lorakit/formats/safetensors.h"

#include "lorakit/error.h"

namespace lorakit::formats {

int SafetensorsDriver::identify(std::span<const std::byte>, const std::filesystem::path&) const { return 0; }
std::unique_ptr<TensorFile> SafetensorsDriver::open(std::shared_ptr<const MappedFile> file) const {
    return read_safetensors(std::move(file));
}
std::unique_ptr<TensorFile> read_safetensors(std::shared_ptr<const MappedFile>) {
    fail(ErrorCode::internal, "not implemented");
}

}  // namespace lorakit::formats
