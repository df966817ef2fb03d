// The AVX-512 build of small_eigen_impl.h: the same algorithms with function-level target
// attributes (the library stays portable; small_eigen.cpp uses them only when CPUID says
// AVX-512F runs). The vector loops (reflector updates, rotations of the eigenvectors) then run
// eight doubles at a time, and the scalar chain of the QL sweep gets fused multiply-adds.
#if defined(__x86_64__)

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <utility>

#include "small_eigen.h"

namespace lorakit::detail {

namespace {

#define LORAKIT_SMALL_EIGEN_TARGET __attribute__((target("avx512f")))
#include "small_eigen_impl.h"
#undef LORAKIT_SMALL_EIGEN_TARGET

}  // namespace

extern const SmallEigenKernels avx512_small_eigen{"avx512", 96, tridiagonalize_impl, eigen_impl};

}  // namespace lorakit::detail

#endif
