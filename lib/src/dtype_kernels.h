// Bulk 16-bit float conversion kernels, chosen once per process by CPU features.
// Every variant must give bit-identical results to the scalar reference in dtype.cpp.
#pragma once

#include <cstddef>
#include <string_view>

namespace lorakit::detail {

struct ConversionKernels {
    std::string_view name;
    void (*f16_to_f32)(const std::byte*, float*, std::size_t) noexcept;
    void (*bf16_to_f32)(const std::byte*, float*, std::size_t) noexcept;
    void (*f32_to_f16)(const float*, std::byte*, std::size_t) noexcept;
    void (*f32_to_bf16)(const float*, std::byte*, std::size_t) noexcept;
    // values[i] = float(double(values[i]) * factor): the product in f64, rounded once to f32.
    void (*scale_f32)(float*, std::size_t, double) noexcept;
};

// The kernels for this CPU (selected on first use, thread-safe).
const ConversionKernels& kernels() noexcept;
// The portable reference kernels (always available; tests compare the others against it).
const ConversionKernels& scalar_kernels() noexcept;
// Every variant this build can run on this CPU, scalar first (for tests and benchmarks).
std::size_t available_kernel_count() noexcept;
const ConversionKernels& available_kernel(std::size_t index) noexcept;

void scalar_f16_to_f32(const std::byte* src, float* dst, std::size_t count) noexcept;
void scalar_bf16_to_f32(const std::byte* src, float* dst, std::size_t count) noexcept;
void scalar_f32_to_f16(const float* src, std::byte* dst, std::size_t count) noexcept;
void scalar_f32_to_bf16(const float* src, std::byte* dst, std::size_t count) noexcept;
void scalar_scale_f32(float* values, std::size_t count, double factor) noexcept;

}  // namespace lorakit::detail
