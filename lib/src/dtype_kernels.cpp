#include "dtype_kernels.h"

#include "cpu_features.h"

#include <string_view>
#include <vector>

namespace lorakit::detail {

#if defined(__x86_64__) || defined(__i386__)
void avx2_f16_to_f32(const std::byte*, float*, std::size_t) noexcept;
void avx2_bf16_to_f32(const std::byte*, float*, std::size_t) noexcept;
void avx2_f32_to_f16(const float*, std::byte*, std::size_t) noexcept;
void avx2_f32_to_bf16(const float*, std::byte*, std::size_t) noexcept;
void avx2_scale_f32(float*, std::size_t, double) noexcept;
#endif

namespace {

constexpr ConversionKernels scalar{
    "scalar", scalar_f16_to_f32, scalar_bf16_to_f32, scalar_f32_to_f16, scalar_f32_to_bf16, scalar_scale_f32,
};

#if defined(__x86_64__) || defined(__i386__)
constexpr ConversionKernels avx2{
    "avx2+f16c", avx2_f16_to_f32, avx2_bf16_to_f32, avx2_f32_to_f16, avx2_f32_to_bf16, avx2_scale_f32,
};
#endif

// Every variant this CPU can run, best last.
const std::vector<const ConversionKernels*>& runnable() {
    static const std::vector<const ConversionKernels*> list = [] {
        std::vector<const ConversionKernels*> v{&scalar};
#if defined(__x86_64__) || defined(__i386__)
        if (cpu_has_avx2_f16c()) v.push_back(&avx2);
#endif
        return v;
    }();
    return list;
}

}  // namespace

const ConversionKernels& scalar_kernels() noexcept { return scalar; }

const ConversionKernels& kernels() noexcept {
    // LORAKIT_FORCE_SCALAR=1 selects the portable kernels (to rule SIMD out when debugging).
    static const ConversionKernels* chosen = [] {
        return force_scalar() ? &scalar : runnable().back();
    }();
    return *chosen;
}

std::size_t available_kernel_count() noexcept { return runnable().size(); }

const ConversionKernels& available_kernel(std::size_t index) noexcept { return *runnable().at(index); }

}  // namespace lorakit::detail
