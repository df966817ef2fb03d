#include "lorakit/tensor.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <fmt/format.h>

#include "lorakit/error.h"
#include "lorakit/mapped_file.h"

namespace lorakit {

std::int64_t checked_element_count(const Shape& shape) {
    // The product of the non-zero dimensions must fit as well, so that no subset of an
    // empty tensor's dimensions overflows when code multiplies them.
    std::int64_t nonzero = 1;
    bool empty = false;
    for (std::int64_t dim : shape) {
        if (dim < 0) fail(ErrorCode::bad_input, "negative dimension {} in shape {}", dim, format_shape(shape));
        if (dim == 0) {
            empty = true;
            continue;
        }
        if (nonzero > std::numeric_limits<std::int64_t>::max() / dim)
            fail(ErrorCode::bad_input, "shape {} has too many elements", format_shape(shape));
        nonzero *= dim;
    }
    return empty ? 0 : nonzero;
}

std::uint64_t checked_byte_count(const Shape& shape, DType type) {
    const auto count = static_cast<std::uint64_t>(checked_element_count(shape));
    const std::uint64_t size = dtype_size(type);
    if (count > std::numeric_limits<std::uint64_t>::max() / 2 / size)
        fail(ErrorCode::bad_input, "shape {} of {} is too large", format_shape(shape), dtype_name(type));
    return count * size;
}

std::string format_shape(const Shape& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

// ---- TensorView -------------------------------------------------------------------------

std::int64_t TensorView::element_count() const noexcept {
    return static_cast<std::int64_t>(bytes_.size() / dtype_size(type_));
}

std::vector<float> TensorView::to_f32() const {
    std::vector<float> out(static_cast<std::size_t>(element_count()));
    to_f32(out);
    return out;
}

void TensorView::to_f32(std::span<float> out) const { convert_to_f32(type_, bytes_, out); }

const float* TensorView::f32_data(std::vector<float>& scratch) const {
    if (type_ == DType::F32 && reinterpret_cast<std::uintptr_t>(bytes_.data()) % alignof(float) == 0)
        return reinterpret_cast<const float*>(bytes_.data());
    const auto count = static_cast<std::size_t>(element_count());
    if (scratch.size() < count) scratch.resize(count);
    convert_to_f32(type_, bytes_.data(), scratch.data(), count);
    return scratch.data();
}

double TensorView::scalar_value() const {
    if (element_count() != 1)
        fail(ErrorCode::bad_input, "expected a single value, found a tensor of shape {}", format_shape(shape_));
    // Read with pread when it lies in a mapped file: a fault on the mapping (mapping 64 KiB
    // around the value) costs ten times as much, paid per scalar (kohya's alphas are ~1000
    // values spread through the file).
    std::byte copy[8];  // the widest dtype
    read_bytes(bytes_.first(std::min(bytes_.size(), sizeof copy)), copy);
    double value = 0;
    convert_to_f64(type_, copy, &value, 1);
    return value;
}

std::int64_t TensorView::count_nonfinite() const {
    if (!is_floating(type_)) return 0;
    std::int64_t count = 0;
    constexpr std::size_t block = 4096;
    float buffer[block];
    const std::size_t size = dtype_size(type_);
    const auto total = static_cast<std::size_t>(element_count());
    for (std::size_t start = 0; start < total; start += block) {
        const std::size_t n = std::min(block, total - start);
        convert_to_f32(type_, bytes_.data() + start * size, buffer, n);
        for (std::size_t i = 0; i < n; ++i) count += std::isfinite(buffer[i]) ? 0 : 1;
    }
    return count;
}

// ---- Tensor -----------------------------------------------------------------------------

namespace {

void check_size(DType type, const Shape& shape, std::size_t size) {
    const auto expected = checked_byte_count(shape, type);
    if (expected != size)
        fail(ErrorCode::internal, "tensor of {} {} needs {} bytes, got {}", dtype_name(type), format_shape(shape),
             expected, size);
}

}  // namespace

std::int64_t Tensor::element_count() const noexcept { return static_cast<std::int64_t>(size_ / dtype_size(type_)); }

Tensor Tensor::alias(DType type, Shape shape, std::span<const std::byte> bytes, std::shared_ptr<const void> owner) {
    check_size(type, shape, bytes.size());
    return adopt(type, std::move(shape), std::shared_ptr<const std::byte>(std::move(owner), bytes.data()), bytes.size());
}

Tensor Tensor::own(DType type, Shape shape, std::vector<std::byte> bytes) {
    check_size(type, shape, bytes.size());
    auto holder = std::make_shared<const std::vector<std::byte>>(std::move(bytes));
    return adopt(type, std::move(shape), std::shared_ptr<const std::byte>(holder, holder->data()), holder->size());
}

Tensor Tensor::adopt(DType type, Shape shape, std::shared_ptr<const std::byte> data, std::size_t size) {
    Tensor t;
    t.type_ = type;
    t.shape_ = std::move(shape);
    t.size_ = size;
    t.data_ = std::move(data);
    return t;
}

namespace {

// A finite value that a cast to F16 or BF16 would make infinite: refused, as writing it would
// leave a broken tensor (a merge with large weights into f16 factors, say) where a wider dtype
// holds it.
void refuse_overflow(DType type, std::span<const float> values) {
    const Overflow overflow = find_overflow(type, values);
    if (overflow.count > 0)
        fail(ErrorCode::unsupported,
             "{} value(s) beyond {}'s range (largest magnitude {:.4g}) would be written as infinities; use a wider dtype "
             "(--dtype f32)",
             overflow.count, dtype_name(type), overflow.largest);
}

}  // namespace

Tensor Tensor::from_f32(DType type, Shape shape, std::span<const float> values) {
    const auto count = checked_element_count(shape);
    if (static_cast<std::size_t>(count) != values.size())
        fail(ErrorCode::internal, "from_f32: {} values for shape {}", values.size(), format_shape(shape));
    refuse_overflow(type, values);
    // Not zero-filled first: the conversion writes every byte (outputs are hundreds of MB).
    const std::size_t size = values.size() * dtype_size(type);
    std::shared_ptr<std::byte[]> holder = std::make_shared_for_overwrite<std::byte[]>(size);
    convert_from_f32(type, values, std::span<std::byte>(holder.get(), size));
    return adopt(type, std::move(shape), std::shared_ptr<const std::byte>(holder, holder.get()), size);
}

Tensor Tensor::zeros(DType type, Shape shape) {
    std::vector<std::byte> bytes(checked_byte_count(shape, type));
    return own(type, std::move(shape), std::move(bytes));
}

Tensor Tensor::deferred(DType type, Shape shape, std::shared_ptr<TensorMaker> source, std::size_t id) {
    Tensor t;
    t.type_ = type;
    t.size_ = static_cast<std::size_t>(checked_byte_count(shape, type));
    t.shape_ = std::move(shape);
    t.deferred_ = std::make_shared<const DeferredBytes>(std::move(source), id, type, t.size_);
    return t;
}

DeferredBytes::DeferredBytes(std::shared_ptr<TensorMaker> source, std::size_t id, DType type, std::size_t size)
    : source_(std::move(source)), id_(id), type_(type), size_(size) {}

DeferredBytes::~DeferredBytes() = default;

namespace {

Tensor checked_made(Tensor t, std::size_t id, DType type, std::size_t size) {
    if (t.deferred() || t.dtype() != type || t.bytes().size() != size)
        fail(ErrorCode::internal, "deferred tensor {}: made {} bytes of {} for {} bytes of {}", id, t.bytes().size(),
             dtype_name(t.dtype()), size, dtype_name(type));
    return t;
}

}  // namespace

Tensor DeferredBytes::take() const {
    {
        std::lock_guard lock(mutex_);
        if (kept_) return *kept_;
    }
    return checked_made(source_->take(id_), id_, type_, size_);
}

std::span<const std::byte> DeferredBytes::kept() const {
    std::lock_guard lock(mutex_);
    if (!kept_) kept_ = std::make_unique<Tensor>(checked_made(source_->take(id_), id_, type_, size_));
    return kept_->bytes();
}

Tensor Tensor::reshaped(Shape shape) const {
    if (checked_element_count(shape) != element_count())
        fail(ErrorCode::internal, "cannot reshape {} to {}", format_shape(shape_), format_shape(shape));
    Tensor t = *this;
    t.shape_ = std::move(shape);
    return t;
}

Tensor Tensor::converted(DType type) const {
    if (type == type_) return *this;
    const auto values = to_f32();
    return from_f32(type, shape_, values);
}

Tensor Tensor::transposed_2d() const {
    if (ndim() != 2) fail(ErrorCode::internal, "transposed_2d on a tensor of shape {}", format_shape(shape_));
    const auto rows = static_cast<std::size_t>(shape_[0]);
    const auto cols = static_cast<std::size_t>(shape_[1]);
    const std::size_t size = dtype_size(type_);
    std::vector<std::byte> out(size_);
    const std::byte* in = bytes().data();
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = 0; c < cols; ++c) std::memcpy(&out[(c * rows + r) * size], in + (r * cols + c) * size, size);
    return own(type_, Shape{shape_[1], shape_[0]}, std::move(out));
}

}  // namespace lorakit
