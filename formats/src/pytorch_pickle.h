// PyTorch zip checkpoints (torch.save, PyTorch >= 1.6) read without executing anything: see
// pytorch_pickle.cpp for the restricted unpickler's rules.
#pragma once

#include <memory>

#include "lorakit/registry.h"

namespace lorakit::formats {

class PytorchPickleDriver final : public ContainerDriver {
public:
    std::string_view name() const override { return "pytorch-pickle"; }
    int identify(std::span<const std::byte> head, const std::filesystem::path& path) const override;
    std::unique_ptr<TensorFile> open(std::shared_ptr<const MappedFile> file) const override;
};

// The state dict's tensors (nested dicts flattened with '.'), its string and number values as
// metadata. Throws bad_input on a malformed archive or pickle, unsupported on a global other
// than the tensor-rebuilding ones, a legacy pickle, compressed or big-endian storages.
std::unique_ptr<TensorFile> read_pytorch_pickle(std::shared_ptr<const MappedFile> file);

}  // namespace lorakit::formats
