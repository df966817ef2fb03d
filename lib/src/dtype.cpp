#include "lorakit/dtype.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "dtype_kernels.h"
#include "lorakit/error.h"

namespace lorakit {
namespace {

struct DTypeInfo {
    std::string_view name;
    std::size_t size;
    bool floating;
};

constexpr std::array<DTypeInfo, std::size(all_dtypes)> dtype_table = {{
    {"BOOL", 1, false},
    {"U8", 1, false},
    {"I8", 1, false},
    {"U16", 2, false},
    {"I16", 2, false},
    {"U32", 4, false},
    {"I32", 4, false},
    {"U64", 8, false},
    {"I64", 8, false},
    {"F16", 2, true},
    {"BF16", 2, true},
    {"F32", 4, true},
    {"F64", 8, true},
    {"F8_E4M3", 1, true},
    {"F8_E5M2", 1, true},
}};

// Names the safetensors format defines that lorakit reads past but does not compute with.
constexpr std::string_view known_unsupported[] = {
    "F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64",
};

const DTypeInfo& info(DType type) noexcept { return dtype_table[static_cast<std::size_t>(type)]; }

template <typename T>
T load(const std::byte* p) noexcept {
    T value;
    std::memcpy(&value, p, sizeof(T));
    return value;
}

template <typename T>
void store(std::byte* p, T value) noexcept {
    std::memcpy(p, &value, sizeof(T));
}

// Round half to even without std::nearbyint, whose result follows the current rounding mode.
// floor and the subtraction are exact for every double converted from a float.
double round_half_even(double value) noexcept {
    double whole = std::floor(value);
    const double fraction = value - whole;
    if (fraction > 0.5 || (fraction == 0.5 && std::fmod(whole, 2.0) != 0.0)) whole += 1.0;
    return whole;
}

template <typename Int>
Int saturate_round(float value) noexcept {
    if (std::isnan(value)) return 0;
    const double rounded = round_half_even(static_cast<double>(value));
    constexpr double lo = static_cast<double>(std::numeric_limits<Int>::min());
    constexpr double hi = static_cast<double>(std::numeric_limits<Int>::max());
    if (rounded <= lo) return std::numeric_limits<Int>::min();
    // For 64-bit types `hi` rounds up to 2^63 or 2^64, which is itself out of range.
    if (rounded >= hi) return std::numeric_limits<Int>::max();
    return static_cast<Int>(rounded);
}

// |x| / 2^step rounded to nearest even, from the bits of a non-negative f32 `magnitude`.
// The narrow formats use it for their subnormal range, where the result is a count of
// subnormal steps. Integer-only so that the floating-point environment (rounding mode,
// DAZ) cannot change it; the SIMD kernels ignore that environment too.
std::uint32_t steps_round_even(std::uint32_t magnitude, int step) noexcept {
    const std::uint32_t field = magnitude >> 23;
    const std::uint32_t significand = (magnitude & 0x7fffffu) | (field ? 0x800000u : 0u);
    // |x| = significand * 2^(max(field, 1) - 150); callers keep |x| < 2^(step + 23),
    // so that shift >= 1.
    const int shift = 150 + step - static_cast<int>(field ? field : 1u);
    if (shift > 24) return 0;  // below half a step
    const std::uint32_t quotient = significand >> shift;
    const std::uint32_t remainder = significand & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1);
    return quotient + ((remainder > half || (remainder == half && (quotient & 1u))) ? 1u : 0u);
}

template <typename Int>
void ints_to_f32(const std::byte* src, float* dst, std::size_t count) noexcept {
    for (std::size_t i = 0; i < count; ++i) dst[i] = static_cast<float>(load<Int>(src + i * sizeof(Int)));
}

template <typename Int>
void f32_to_ints(const float* src, std::byte* dst, std::size_t count) noexcept {
    for (std::size_t i = 0; i < count; ++i) store<Int>(dst + i * sizeof(Int), saturate_round<Int>(src[i]));
}

template <typename Int>
void ints_to_f64(const std::byte* src, double* dst, std::size_t count) noexcept {
    for (std::size_t i = 0; i < count; ++i) dst[i] = static_cast<double>(load<Int>(src + i * sizeof(Int)));
}

}  // namespace

std::string_view dtype_name(DType type) noexcept { return info(type).name; }
std::size_t dtype_size(DType type) noexcept { return info(type).size; }
bool is_floating(DType type) noexcept { return info(type).floating; }
bool is_integer(DType type) noexcept { return !info(type).floating; }

std::optional<DType> find_dtype(std::string_view name) noexcept {
    for (DType type : all_dtypes)
        if (info(type).name == name) return type;
    return std::nullopt;
}

bool is_known_unsupported_dtype(std::string_view name) noexcept {
    for (auto known : known_unsupported)
        if (known == name) return true;
    return false;
}

DType parse_dtype(std::string_view name) {
    if (auto type = find_dtype(name)) return *type;
    if (is_known_unsupported_dtype(name)) fail(ErrorCode::unsupported, "unsupported dtype {}", name);
    fail(ErrorCode::bad_input, "unknown dtype {}", quote(name));
}

// ---- scalar float formats -------------------------------------------------------------

float f16_to_f32(std::uint16_t h) noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu;
    const std::uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {
        // Zero or subnormal: mantissa * 2^-24, exact in f32.
        const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
        return sign ? -magnitude : magnitude;
    }
    // NaN comes out quiet (as F16C's vcvtph2ps does), payload and sign kept.
    if (exponent == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13) | (mantissa ? 0x400000u : 0u));
    return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

std::uint16_t f32_to_f16(float value) noexcept {
    std::uint32_t x = std::bit_cast<std::uint32_t>(value);
    const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u | ((x >> 13) & 0x3ffu));  // NaN
    if (x >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (x < 0x38800000u) {
        // Below the smallest normal (2^-14) the step is 2^-24; rounding up to 1024 steps
        // gives the smallest normal's pattern.
        return static_cast<std::uint16_t>(sign | steps_round_even(x, -24));
    }
    const std::uint32_t odd = (x >> 13) & 1u;
    x += 0xc8000fffu + odd;  // re-bias the exponent by -112 and add the rounding increment
    return static_cast<std::uint16_t>(sign | (x >> 13));
}

float bf16_to_f32(std::uint16_t bits) noexcept {
    return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

std::uint16_t f32_to_bf16(float value) noexcept {
    const std::uint32_t x = std::bit_cast<std::uint32_t>(value);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);  // quiet NaN
    const std::uint32_t odd = (x >> 16) & 1u;
    return static_cast<std::uint16_t>((x + 0x7fffu + odd) >> 16);
}

float f8e4m3_to_f32(std::uint8_t bits) noexcept {
    const bool negative = bits & 0x80u;
    const std::uint32_t exponent = (bits >> 3) & 0xfu;
    const std::uint32_t mantissa = bits & 0x7u;
    float magnitude;
    if (exponent == 15 && mantissa == 7) magnitude = std::numeric_limits<float>::quiet_NaN();
    else if (exponent == 0) magnitude = static_cast<float>(mantissa) * 0x1p-9f;
    else magnitude = std::bit_cast<float>(((exponent + 120u) << 23) | (mantissa << 20));
    return negative ? -magnitude : magnitude;
}

std::uint8_t f32_to_f8e4m3(float value) noexcept {
    std::uint32_t x = std::bit_cast<std::uint32_t>(value);
    const auto sign = static_cast<std::uint8_t>((x >> 24) & 0x80u);
    x &= 0x7fffffffu;
    // No infinity in this format: NaN, infinities and everything above 464 (the midpoint
    // between the largest finite value 448 and the NaN code, which ties to 448) become NaN.
    if (x > 0x43e80000u) return static_cast<std::uint8_t>(sign | 0x7fu);
    if (x < 0x3c800000u) return static_cast<std::uint8_t>(sign | steps_round_even(x, -9));  // below 2^-6
    const std::uint32_t odd = (x >> 20) & 1u;
    x += (static_cast<std::uint32_t>(7 - 127) << 23) + 0x7ffffu + odd;
    return static_cast<std::uint8_t>(sign | (x >> 20));
}

float f8e5m2_to_f32(std::uint8_t bits) noexcept {
    // E5M2 is the upper byte of an IEEE half.
    return f16_to_f32(static_cast<std::uint16_t>(bits << 8));
}

std::uint8_t f32_to_f8e5m2(float value) noexcept {
    std::uint32_t x = std::bit_cast<std::uint32_t>(value);
    const auto sign = static_cast<std::uint8_t>((x >> 24) & 0x80u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return static_cast<std::uint8_t>(sign | 0x7eu);  // NaN
    if (x >= 0x47700000u) return static_cast<std::uint8_t>(sign | 0x7cu);  // >= 61440 rounds to inf
    if (x < 0x38800000u) return static_cast<std::uint8_t>(sign | steps_round_even(x, -16));  // below 2^-14
    const std::uint32_t odd = (x >> 21) & 1u;
    x += (static_cast<std::uint32_t>(15 - 127) << 23) + 0xfffffu + odd;
    return static_cast<std::uint8_t>(sign | (x >> 21));
}

// ---- bulk conversion ------------------------------------------------------------------

namespace detail {

void scalar_f16_to_f32(const std::byte* src, float* dst, std::size_t count) noexcept {
    for (std::size_t i = 0; i < count; ++i) dst[i] = f16_to_f32(load<std::uint16_t>(src + 2 * i));
}
void scalar_bf16_to_f32(const std::byte* src, float* dst, std::size_t count) noexcept {
    for (std::size_t i = 0; i < count; ++i) dst[i] = bf16_to_f32(load<std::uint16_t>(src + 2 * i));
}
void scalar_f32_to_f16(const float* src, std::byte* dst, std::size_t count) noexcept {
    for (std::size_t i = 0; i < count; ++i) store<std::uint16_t>(dst + 2 * i, f32_to_f16(src[i]));
}
void scalar_f32_to_bf16(const float* src, std::byte* dst, std::size_t count) noexcept {
    for (std::size_t i = 0; i < count; ++i) store<std::uint16_t>(dst + 2 * i, f32_to_bf16(src[i]));
}
void scalar_scale_f32(float* values, std::size_t count, double factor) noexcept {
    for (std::size_t i = 0; i < count; ++i) values[i] = static_cast<float>(static_cast<double>(values[i]) * factor);
}

}  // namespace detail

void convert_to_f32(DType from, const std::byte* src, float* dst, std::size_t count) noexcept {
    const auto& k = detail::kernels();
    switch (from) {
    case DType::BOOL:
        for (std::size_t i = 0; i < count; ++i) dst[i] = src[i] != std::byte{0} ? 1.0f : 0.0f;
        return;
    case DType::U8: return ints_to_f32<std::uint8_t>(src, dst, count);
    case DType::I8: return ints_to_f32<std::int8_t>(src, dst, count);
    case DType::U16: return ints_to_f32<std::uint16_t>(src, dst, count);
    case DType::I16: return ints_to_f32<std::int16_t>(src, dst, count);
    case DType::U32: return ints_to_f32<std::uint32_t>(src, dst, count);
    case DType::I32: return ints_to_f32<std::int32_t>(src, dst, count);
    case DType::U64: return ints_to_f32<std::uint64_t>(src, dst, count);
    case DType::I64: return ints_to_f32<std::int64_t>(src, dst, count);
    case DType::F16: return k.f16_to_f32(src, dst, count);
    case DType::BF16: return k.bf16_to_f32(src, dst, count);
    case DType::F32:
        if (count) std::memcpy(dst, src, count * sizeof(float));
        return;
    case DType::F64:
        for (std::size_t i = 0; i < count; ++i) dst[i] = static_cast<float>(load<double>(src + 8 * i));
        return;
    case DType::F8_E4M3:
        for (std::size_t i = 0; i < count; ++i) dst[i] = f8e4m3_to_f32(static_cast<std::uint8_t>(src[i]));
        return;
    case DType::F8_E5M2:
        for (std::size_t i = 0; i < count; ++i) dst[i] = f8e5m2_to_f32(static_cast<std::uint8_t>(src[i]));
        return;
    }
}

void convert_from_f32(DType to, const float* src, std::byte* dst, std::size_t count) noexcept {
    const auto& k = detail::kernels();
    switch (to) {
    case DType::BOOL:
        for (std::size_t i = 0; i < count; ++i)
            dst[i] = (src[i] != 0.0f && !std::isnan(src[i])) ? std::byte{1} : std::byte{0};
        return;
    case DType::U8: return f32_to_ints<std::uint8_t>(src, dst, count);
    case DType::I8: return f32_to_ints<std::int8_t>(src, dst, count);
    case DType::U16: return f32_to_ints<std::uint16_t>(src, dst, count);
    case DType::I16: return f32_to_ints<std::int16_t>(src, dst, count);
    case DType::U32: return f32_to_ints<std::uint32_t>(src, dst, count);
    case DType::I32: return f32_to_ints<std::int32_t>(src, dst, count);
    case DType::U64: return f32_to_ints<std::uint64_t>(src, dst, count);
    case DType::I64: return f32_to_ints<std::int64_t>(src, dst, count);
    case DType::F16: return k.f32_to_f16(src, dst, count);
    case DType::BF16: return k.f32_to_bf16(src, dst, count);
    case DType::F32:
        if (count) std::memcpy(dst, src, count * sizeof(float));
        return;
    case DType::F64:
        for (std::size_t i = 0; i < count; ++i) store<double>(dst + 8 * i, static_cast<double>(src[i]));
        return;
    case DType::F8_E4M3:
        for (std::size_t i = 0; i < count; ++i) dst[i] = static_cast<std::byte>(f32_to_f8e4m3(src[i]));
        return;
    case DType::F8_E5M2:
        for (std::size_t i = 0; i < count; ++i) dst[i] = static_cast<std::byte>(f32_to_f8e5m2(src[i]));
        return;
    }
}

void convert_to_f64(DType from, const std::byte* src, double* dst, std::size_t count) noexcept {
    switch (from) {
    case DType::U8: return ints_to_f64<std::uint8_t>(src, dst, count);
    case DType::I8: return ints_to_f64<std::int8_t>(src, dst, count);
    case DType::U16: return ints_to_f64<std::uint16_t>(src, dst, count);
    case DType::I16: return ints_to_f64<std::int16_t>(src, dst, count);
    case DType::U32: return ints_to_f64<std::uint32_t>(src, dst, count);
    case DType::I32: return ints_to_f64<std::int32_t>(src, dst, count);
    case DType::U64: return ints_to_f64<std::uint64_t>(src, dst, count);
    case DType::I64: return ints_to_f64<std::int64_t>(src, dst, count);
    case DType::F64:
        for (std::size_t i = 0; i < count; ++i) dst[i] = load<double>(src + 8 * i);
        return;
    default: {
        // Every other type is exactly representable in f32; go through it a block at a time
        // so that the bulk kernels do the work.
        constexpr std::size_t block = 256;
        float buffer[block];
        const std::size_t size = dtype_size(from);
        for (std::size_t done = 0; done < count; done += block) {
            const std::size_t n = std::min(block, count - done);
            convert_to_f32(from, src + done * size, buffer, n);
            for (std::size_t i = 0; i < n; ++i) dst[done + i] = buffer[i];
        }
        return;
    }
    }
}

void convert_to_f32(DType from, std::span<const std::byte> src, std::span<float> dst) {
    if (src.size() != dst.size() * dtype_size(from))
        fail(ErrorCode::internal, "convert_to_f32: {} bytes of {} do not make {} elements", src.size(),
             dtype_name(from), dst.size());
    convert_to_f32(from, src.data(), dst.data(), dst.size());
}

void convert_from_f32(DType to, std::span<const float> src, std::span<std::byte> dst) {
    if (dst.size() != src.size() * dtype_size(to))
        fail(ErrorCode::internal, "convert_from_f32: {} elements do not fit {} bytes of {}", src.size(), dst.size(),
             dtype_name(to));
    convert_from_f32(to, src.data(), dst.data(), src.size());
}

float overflow_threshold(DType type) noexcept {
    switch (type) {
    case DType::F16: return 65520.0f;
    case DType::BF16: return std::bit_cast<float>(std::uint32_t{0x7f7f8000});
    default: return std::numeric_limits<float>::infinity();
    }
}

float largest_finite(DType type) noexcept {
    switch (type) {
    case DType::F16: return 65504.0f;
    case DType::BF16: return std::bit_cast<float>(std::uint32_t{0x7f7f0000});
    default: return std::numeric_limits<float>::max();
    }
}

Overflow find_overflow(DType type, std::span<const float> values) noexcept {
    Overflow found;
    const float threshold = overflow_threshold(type);
    if (threshold == std::numeric_limits<float>::infinity()) return found;
    for (std::size_t at = 0; at < values.size(); at += 4096) {  // 32-bit counts vectorise without widening
        std::uint32_t block = 0;
        for (const float v : values.subspan(at, std::min<std::size_t>(4096, values.size() - at)))
            block += static_cast<std::uint32_t>(std::abs(v) >= threshold) &
                     static_cast<std::uint32_t>(std::abs(v) != std::numeric_limits<float>::infinity());
        found.count += block;
    }
    if (found.count > 0)  // rare: find the largest
        for (const float v : values)
            if (std::isfinite(v)) found.largest = std::max(found.largest, std::abs(v));
    return found;
}

void scale_f32(float* values, std::size_t count, double factor) noexcept {
    detail::kernels().scale_f32(values, count, factor);
}

std::string_view conversion_kernel_name() noexcept { return detail::kernels().name; }

}  // namespace lorakit
