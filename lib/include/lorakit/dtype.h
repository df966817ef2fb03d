// Element types of tensors, with their safetensors names, and conversion to and from f32.
//
// Conversions from f32 to a narrower float type round to nearest, ties to even. NaN stays
// NaN (quiet, sign kept), infinities stay infinite where the type has them. Types without
// an infinity (F8_E4M3, "fn": finite + NaN) turn overflow and infinities into NaN, exactly
// as PyTorch's `.to(torch.float8_e4m3fn)` does. Integer targets round to nearest even and
// saturate; NaN becomes 0.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

namespace lorakit {

enum class DType : std::uint8_t {
    BOOL,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F16,
    BF16,
    F32,
    F64,
    F8_E4M3,
    F8_E5M2,
};

inline constexpr DType all_dtypes[] = {
    DType::BOOL, DType::U8,  DType::I8,  DType::U16,  DType::I16, DType::U32,     DType::I32,     DType::U64,
    DType::I64,  DType::F16, DType::BF16, DType::F32, DType::F64, DType::F8_E4M3, DType::F8_E5M2,
};

// The safetensors spelling ("F16", "BF16", "F8_E4M3", ...).
std::string_view dtype_name(DType type) noexcept;

// Parses a safetensors dtype name. Known names that lorakit does not handle (F4, F6_*,
// F8_E8M0, the FNUZ variants, C64) throw ErrorCode::unsupported ("unsupported dtype F4");
// any other string throws ErrorCode::bad_input ("unknown dtype 'X'").
DType parse_dtype(std::string_view name);
// The same without throwing: nullopt for anything not in DType.
std::optional<DType> find_dtype(std::string_view name) noexcept;
// True for the dtype names of the safetensors format that lorakit recognises but refuses.
bool is_known_unsupported_dtype(std::string_view name) noexcept;

std::size_t dtype_size(DType type) noexcept;  // bytes per element
bool is_floating(DType type) noexcept;
bool is_integer(DType type) noexcept;  // BOOL counts as integer

// Element-wise conversion of `count` elements. `src`/`dst` need no alignment: mapped file data
// is often unaligned. Sizes are checked by the span overloads.
void convert_to_f32(DType from, const std::byte* src, float* dst, std::size_t count) noexcept;
void convert_from_f32(DType to, const float* src, std::byte* dst, std::size_t count) noexcept;
void convert_to_f32(DType from, std::span<const std::byte> src, std::span<float> dst);
void convert_from_f32(DType to, std::span<const float> src, std::span<std::byte> dst);
// Exact for every type (f64 holds every value of every supported type except the
// largest 64-bit integers, which round to nearest even).
void convert_to_f64(DType from, const std::byte* src, double* dst, std::size_t count) noexcept;

// For a cast from f32 (round to nearest even): the smallest magnitude that becomes infinite in
// `type` (65520 for F16; +infinity for F32, F64 and types without infinities), and the largest
// finite value of `type` (FLT_MAX for F32 and wider).
float overflow_threshold(DType type) noexcept;
float largest_finite(DType type) noexcept;
// The finite `values` a cast to `type` would make infinite: how many, and the largest magnitude
// among them (0 when none).
struct Overflow {
    std::size_t count = 0;
    float largest = 0;
};
Overflow find_overflow(DType type, std::span<const float> values) noexcept;

// values[i] = float(double(values[i]) * factor) for each i: the product in f64, rounded once to
// f32 (how lorakit folds a scale into stored factors).
void scale_f32(float* values, std::size_t count, double factor) noexcept;

// Scalar conversions, exposed for tests and for small code paths.
float f16_to_f32(std::uint16_t bits) noexcept;
std::uint16_t f32_to_f16(float value) noexcept;
float bf16_to_f32(std::uint16_t bits) noexcept;
std::uint16_t f32_to_bf16(float value) noexcept;
float f8e4m3_to_f32(std::uint8_t bits) noexcept;
std::uint8_t f32_to_f8e4m3(float value) noexcept;
float f8e5m2_to_f32(std::uint8_t bits) noexcept;
std::uint8_t f32_to_f8e5m2(float value) noexcept;

// Which implementation convert_* picked for this CPU ("scalar", "avx2+f16c", ...).
std::string_view conversion_kernel_name() noexcept;

}  // namespace lorakit
