#include "small_eigen.h"

#include "cpu_features.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <utility>
#include <vector>

namespace lorakit::detail {

#if defined(__x86_64__)
extern const SmallEigenKernels avx512_small_eigen;
#endif

namespace {

#define LORAKIT_SMALL_EIGEN_TARGET
#include "small_eigen_impl.h"
#undef LORAKIT_SMALL_EIGEN_TARGET

constexpr SmallEigenKernels portable{"portable", 48, tridiagonalize_impl, eigen_impl};

const std::vector<const SmallEigenKernels*>& runnable() {
    static const std::vector<const SmallEigenKernels*> list = [] {
        std::vector<const SmallEigenKernels*> v{&portable};
#if defined(__x86_64__)
        if (cpu_has_avx512f()) v.push_back(&avx512_small_eigen);
#endif
        return v;
    }();
    return list;
}

}  // namespace

const SmallEigenKernels& small_eigen_kernels() noexcept {
    static const SmallEigenKernels* chosen = [] { return force_scalar() ? &portable : runnable().back(); }();
    return *chosen;
}

std::size_t available_small_eigen_kernel_count() noexcept { return runnable().size(); }

const SmallEigenKernels& available_small_eigen_kernel(std::size_t index) noexcept { return *runnable().at(index); }

}  // namespace lorakit::detail
