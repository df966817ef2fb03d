#include "dtype_kernels.h"

namespace lorakit::detail {
namespace {

constexpr ConversionKernels scalar{
    "scalar", scalar_f16_to_f32, scalar_bf16_to_f32, scalar_f32_to_f16, scalar_f32_to_bf16,
};

}  // namespace

const ConversionKernels& scalar_kernels() noexcept { return scalar; }

const ConversionKernels& kernels() noexcept { return scalar; }

std::size_t available_kernel_count() noexcept { return 1; }

const ConversionKernels& available_kernel(std::size_t) noexcept { return scalar; }

}  // namespace lorakit::detail
