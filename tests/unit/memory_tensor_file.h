// An in-memory TensorFile for tests of the convention readers: no container involved.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lorakit/registry.h"

namespace lorakit::test {

class MemoryTensorFile final : public TensorFile {
public:
    explicit MemoryTensorFile(std::string name = "memory") : name_(std::move(name)) {}

    std::string_view format_name() const override { return "memory"; }
    const std::string& name() const override { return name_; }
    const std::vector<TensorEntry>& entries() const override { return entries_; }
    const std::map<std::string, std::string>& metadata() const override { return metadata_; }

    void add(const std::string& tensor_name, const Tensor& t) {
        TensorEntry e;
        e.name = tensor_name;
        e.dtype_name = std::string(dtype_name(t.dtype()));
        e.shape = t.shape();
        e.size = t.bytes().size();
        e.tensor = t;
        entries_.push_back(std::move(e));
        build_index();
    }
    // A tensor of the given shape whose bytes all alias one shared zero buffer, so that
    // full-size key sets (Flux: hundreds of MB) cost no memory.
    void add_zeros(const std::string& tensor_name, DType type, const Shape& shape) {
        const auto bytes = checked_byte_count(shape, type);
        if (zeros_->size() < bytes) zeros_ = std::make_shared<std::vector<std::byte>>(bytes);
        add(tensor_name, Tensor::alias(type, shape, std::span(zeros_->data(), bytes), zeros_));
    }
    void add_f32(const std::string& tensor_name, const Shape& shape, const std::vector<float>& values) {
        add(tensor_name, Tensor::from_f32(DType::F32, shape, values));
    }
    // An entry with a dtype lorakit recognises but does not compute with.
    void add_unsupported(const std::string& tensor_name, const std::string& dtype, const Shape& shape) {
        TensorEntry e;
        e.name = tensor_name;
        e.dtype_name = dtype;
        e.shape = shape;
        e.size = 1;
        entries_.push_back(std::move(e));
        build_index();
    }
    std::map<std::string, std::string>& mutable_metadata() { return metadata_; }

private:
    std::string name_;
    std::vector<TensorEntry> entries_;
    std::map<std::string, std::string> metadata_;
    std::shared_ptr<std::vector<std::byte>> zeros_ = std::make_shared<std::vector<std::byte>>(16);
};

}  // namespace lorakit::test
