// Tensors: a non-owning view over bytes (usually a memory-mapped file) and a shared tensor
// that either aliases such bytes (keeping their owner alive, no copy) or owns its buffer.
//
// Data is little-endian, row-major and densely packed, as in safetensors and GGUF. Bytes
// need not be aligned: readers go through convert_to_f32, which uses unaligned loads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "lorakit/dtype.h"

namespace lorakit {

using Shape = std::vector<std::int64_t>;

// Element count of a shape. Throws ErrorCode::bad_input on a negative dimension or when the
// product does not fit in 63 bits. An empty shape (a scalar) has one element.
std::int64_t checked_element_count(const Shape& shape);
// checked_element_count * dtype_size, overflow-checked the same way.
std::uint64_t checked_byte_count(const Shape& shape, DType type);
// "[4, 768]".
std::string format_shape(const Shape& shape);

class TensorView {
public:
    TensorView() = default;
    // The caller guarantees bytes.size() == checked_byte_count(shape, type).
    TensorView(DType type, Shape shape, std::span<const std::byte> bytes)
        : type_(type), shape_(std::move(shape)), bytes_(bytes) {}

    DType dtype() const noexcept { return type_; }
    const Shape& shape() const noexcept { return shape_; }
    std::size_t ndim() const noexcept { return shape_.size(); }
    std::int64_t dim(std::size_t i) const { return shape_.at(i); }
    std::int64_t element_count() const noexcept;
    std::span<const std::byte> bytes() const noexcept { return bytes_; }

    // The values widened to f32 (a copy).
    std::vector<float> to_f32() const;
    // Writes the values as f32 into `out`, which must hold element_count() floats.
    void to_f32(std::span<float> out) const;
    // The values as f32 without a copy when they already are aligned f32 (mapped files),
    // otherwise converted into `scratch` (kept by the caller so its pages are reused).
    const float* f32_data(std::vector<float>& scratch) const;
    // The single value of a one-element tensor, as f64. Throws bad_input otherwise.
    double scalar_value() const;
    // Number of NaN and infinite values (0 for integer types).
    std::int64_t count_nonfinite() const;

private:
    DType type_ = DType::F32;
    Shape shape_;
    std::span<const std::byte> bytes_;
};

class Tensor;

// Makes tensors on demand (Tensor::deferred). lora-resize and lora-merge make the new factors
// while the output is written, so that only a few modules' factors are held at a time.
class TensorMaker {
public:
    virtual ~TensorMaker() = default;
    // The ids in the order a writer will take them, before its first take, so that the source
    // can make them ahead. Optional: a source also serves takes in any other order.
    virtual void plan(std::span<const std::size_t> ids) = 0;
    // The tensor `id`, made now if it is not made yet (blocking until it is). Handed over: the
    // source keeps no copy, so a second take of the same id makes it again. Throws what making
    // it threw.
    virtual Tensor take(std::size_t id) = 0;
};

// The bytes of a deferred tensor: made by the source when first needed.
class DeferredBytes {
public:
    DeferredBytes(std::shared_ptr<TensorMaker> source, std::size_t id, DType type, std::size_t size);
    ~DeferredBytes();

    TensorMaker& source() const noexcept { return *source_; }
    std::size_t id() const noexcept { return id_; }
    // For a writer that needs the bytes once: the tensor made (or the copy kept, if another use
    // made it already); the caller holds it while it writes. internal error if the source made
    // a tensor of another dtype or size.
    Tensor take() const;
    // For every other use: made once and kept for as long as the deferred tensor lives.
    std::span<const std::byte> kept() const;

private:
    std::shared_ptr<TensorMaker> source_;
    std::size_t id_;
    DType type_;
    std::size_t size_;
    mutable std::mutex mutex_;
    mutable std::unique_ptr<Tensor> kept_;
};

class Tensor {
public:
    Tensor() = default;

    // A tensor over bytes owned by someone else; `owner` is kept alive as long as any copy
    // of this tensor lives (for example the MappedFile the bytes belong to).
    static Tensor alias(DType type, Shape shape, std::span<const std::byte> bytes,
                        std::shared_ptr<const void> owner);
    // A tensor owning `bytes`, which must hold exactly shape x dtype bytes.
    static Tensor own(DType type, Shape shape, std::vector<std::byte> bytes);
    // A tensor of `type` holding `values` rounded once from f32. A finite value that F16 or BF16
    // would round to infinity is refused (ErrorCode::unsupported: a wider dtype holds it).
    static Tensor from_f32(DType type, Shape shape, std::span<const float> values);
    // A zero-filled tensor.
    static Tensor zeros(DType type, Shape shape);
    // A tensor whose bytes `source` makes (its id `id`) when they are first needed: a writer
    // that streams takes them as it writes them (deferred()), any other use of bytes() makes
    // them once and keeps them. Its dtype and shape are known at once.
    static Tensor deferred(DType type, Shape shape, std::shared_ptr<TensorMaker> source, std::size_t id);

    bool empty() const noexcept { return !data_ && !deferred_ && shape_.empty(); }
    DType dtype() const noexcept { return type_; }
    const Shape& shape() const noexcept { return shape_; }
    std::size_t ndim() const noexcept { return shape_.size(); }
    std::int64_t dim(std::size_t i) const { return shape_.at(i); }
    std::int64_t element_count() const noexcept;
    // A deferred tensor's bytes are made here if no one made them yet (this can throw).
    std::span<const std::byte> bytes() const {
        return deferred_ ? deferred_->kept() : std::span<const std::byte>{data_.get(), size_};
    }
    TensorView view() const { return TensorView(type_, shape_, bytes()); }
    // Non-null for a tensor made on demand (Tensor::deferred).
    const std::shared_ptr<const DeferredBytes>& deferred() const noexcept { return deferred_; }
    operator TensorView() const { return view(); }

    std::vector<float> to_f32() const { return view().to_f32(); }
    double scalar_value() const { return view().scalar_value(); }

    // The same bytes under another shape with the same element count (no copy).
    Tensor reshaped(Shape shape) const;
    // A copy converted to another dtype (no copy when the dtype is unchanged).
    Tensor converted(DType type) const;
    // The transpose of a 2-D tensor, as a new owned tensor (exact: moves bytes only).
    Tensor transposed_2d() const;

private:
    // A tensor over `size` bytes at `data` (which keeps its owner alive).
    static Tensor adopt(DType type, Shape shape, std::shared_ptr<const std::byte> data, std::size_t size);

    DType type_ = DType::F32;
    Shape shape_;
    std::shared_ptr<const std::byte> data_;
    std::size_t size_ = 0;
    std::shared_ptr<const DeferredBytes> deferred_;
};

struct NamedTensor {
    std::string name;
    Tensor tensor;
};

}  // namespace lorakit
