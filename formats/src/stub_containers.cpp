#include "stub_containers.h"

#include <cstring>

#include "lorakit/error.h"

namespace lorakit::formats {

namespace {

bool starts_with_bytes(std::span<const std::byte> head, std::string_view magic) {
    return head.size() >= magic.size() && std::memcmp(head.data(), magic.data(), magic.size()) == 0;
}

class PickleStub final : public ContainerDriver {
public:
    std::string_view name() const override { return "pytorch-pickle"; }
    int identify(std::span<const std::byte> head, const std::filesystem::path& path) const override {
        // torch.save's zip container, or a legacy pickle stream (protocol 2+ starts with 0x80).
        if (starts_with_bytes(head, "PK\x03\x04")) return 90;
        if (!head.empty() && head[0] == std::byte{0x80}) {
            const auto ext = path.extension();
            if (ext == ".bin" || ext == ".pt" || ext == ".pth" || ext == ".ckpt") return 60;
        }
        return 0;
    }
    std::unique_ptr<TensorFile> open(std::shared_ptr<const MappedFile>) const override {
        fail(ErrorCode::unsupported,
             "PyTorch pickle files (.bin, .pt, .ckpt) are not readable by this version of lorakit yet; "
             "save the adapter as safetensors");
    }
};

}  // namespace

void register_stub_containers(Registry& registry) {
    registry.add(std::make_unique<PickleStub>());
}

}  // namespace lorakit::formats
