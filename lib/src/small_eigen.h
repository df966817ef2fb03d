// Dense symmetric eigenproblems of small order (the r x r and k x k matrices of lora-stack's
// report and of factored SVDs with a small total rank): Householder reduction to tridiagonal
// form and the implicit QL iteration with Wilkinson shifts, eigenvectors accumulated by the QL
// rotations. At these sizes the work is a chain of dependent scalar steps and short vector
// loops; LAPACK's drivers spend more time in per-call overhead and Eigen's solver (built for
// the portable ISA) runs its loops two doubles at a time, so the library has its own, chosen
// once per process by CPU features like the other kernels (LORAKIT_FORCE_SCALAR=1: portable).
#pragma once

#include <cstddef>
#include <string_view>

namespace lorakit::detail {

struct SmallEigenKernels {
    std::string_view name;
    // The largest order for which `eigen` (with vectors) beat LAPACKE_dsyevd here (measured on
    // the machine of docs/benchmarks.md; dsyevd's divide and conquer wins above it).
    std::size_t max_order;
    // Reduces the symmetric n x n column-major `a` (both triangles filled) to the tridiagonal
    // T = Qᵀ·a·Q: diagonal[0..n) and off[0..n-1), off[i] coupling i and i + 1 (NaN throughout
    // when an entry of `a` is not finite). `scratch` holds small_eigen_scratch(n) doubles.
    void (*tridiagonalize)(const double* a, std::size_t n, double* diagonal, double* off, double* scratch) noexcept;
    // Every eigenvalue of the symmetric n x n column-major `a` (both triangles filled) into
    // values[0..n), descending; with `vectors`, `a` is overwritten by the orthonormal
    // eigenvectors (column j belongs to values[j]). `scratch` holds small_eigen_scratch(n)
    // doubles. False when an entry is not finite, or when the QL iteration does not converge
    // (60 sweeps per eigenvalue), which it does not do for a finite symmetric matrix in practice.
    bool (*eigen)(double* a, std::size_t n, double* values, bool vectors, double* scratch) noexcept;
};

// The kernels work on copies with the order padded to a multiple of 8 (whole vector blocks).
constexpr std::size_t padded_order(std::size_t n) noexcept { return (n + 7) / 8 * 8; }
constexpr std::size_t small_eigen_scratch(std::size_t n) noexcept {
    return 2 * padded_order(n) * padded_order(n) + 5 * padded_order(n);
}

// The kernels for this CPU (LORAKIT_FORCE_SCALAR=1 selects the portable ones).
const SmallEigenKernels& small_eigen_kernels() noexcept;
// Every variant this build can run on this CPU, portable first (for tests).
std::size_t available_small_eigen_kernel_count() noexcept;
const SmallEigenKernels& available_small_eigen_kernel(std::size_t index) noexcept;

}  // namespace lorakit::detail
