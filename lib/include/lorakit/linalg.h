// Low-rank linear algebra on LoRA factors, without ever forming the dense out x in product.
//
// For M = Σ_i c_i · B_i · A_i (B_i: out x r_i, A_i: r_i x in, row-major) the factors
// are stacked into B = [c_1 B_1 ... c_k B_k] (out x R) and A = [A_1; ...; A_k] (R x in),
// their R x R Gram matrices are accumulated in double (lorakit's AVX-512 kernel where the CPU
// has it, OpenBLAS's dsyrk otherwise), and everything else is R x R:
// the R factor of B from a pivoted Cholesky of BᵀB, and the spectrum from the small core.
// Only U_k = B·X and V_k = Aᵀ·Y (R x k coefficients) touch the long dimensions again.
// Cost O((out + in) R² + R³). Householder QRs in f32 (sgeqrf) are kept as the cross-check.
//
// LAPACK is called through LAPACKE directly (not through Eigen, whose LAPACKE routing picks
// the slow ?gesvd): see shared research/performance.md §1.1 and §2.
#pragma once

#include <cstdint>
#include <optional>
#include <functional>
#include <span>
#include <vector>

#include "lorakit/dtype.h"

namespace lorakit::linalg {

// One term c · B · A. The factors are row-major values of b_type / a_type (f32 unless said; any
// type convert_to_f32 reads, aligned or not) and must stay valid for the call: callers pass mapped
// file data as it is, and the stacking routines widen it straight into their stacked arrays.
struct LowRankTerm {
    const void* b = nullptr;  // out x rank
    const void* a = nullptr;  // rank x in
    std::int64_t out = 0;
    std::int64_t rank = 0;
    std::int64_t in = 0;
    double coefficient = 1.0;
    DType b_type = DType::F32;
    DType a_type = DType::F32;
};

// Reusable scratch memory. Fresh pages are slow to touch on the machines we target, so
// callers that decompose many modules keep one Workspace per thread.
class Workspace {
public:
    Workspace();
    ~Workspace();
    Workspace(Workspace&&) noexcept;
    Workspace& operator=(Workspace&&) noexcept;

    struct Impl;
    Impl& impl() { return *impl_; }

private:
    Impl* impl_;
};

// The singular values of Σ c_i B_i A_i, descending, min(out, in, R) of them (exact zeros
// included when the stacked factors are rank-deficient). Throws ErrorCode::bad_input when
// the terms disagree in out or in, or ErrorCode::internal when LAPACK fails.
//
// The R factors are obtained as Cholesky factors of the Gram matrices BᵀB and AAᵀ formed in
// double precision (as at the top of this file), by pivoted Cholesky (dpstrf, for
// rank-deficient stacks): the same R as a thin QR, at BLAS-3 speed. For f32 inputs its error (~1e-16 relative to σ_max², from
// the squared condition number) stays below the inputs' own rounding.
std::vector<double> factored_singular_values(std::span<const LowRankTerm> terms, Workspace& workspace);
// The same through Householder QRs in f32 (sgelqf/sgeqrf): the cross-check in tests.
std::vector<double> factored_singular_values_householder(std::span<const LowRankTerm> terms, Workspace& workspace);

// The thin SVD of Σ c_i B_i A_i truncated to the top `keep` triplets (keep <= 0: all
// min(out, in, R)). U is out x k and V is in x k, both row-major f32 with orthonormal
// columns; the full spectrum (all min(out, in, R) values) is returned in `singular_values`.
struct FactoredSvd {
    std::int64_t out = 0;
    std::int64_t in = 0;
    std::int64_t kept = 0;
    std::vector<float> u;                 // out x kept, row-major
    std::vector<double> singular_values;  // full spectrum, descending
    std::vector<float> v;                 // in x kept, row-major
};
FactoredSvd factored_svd(std::span<const LowRankTerm> terms, std::int64_t keep, Workspace& workspace);
// The same with the number of kept triplets chosen from the spectrum by `keep` (a rank rule),
// so that vectors are only formed for what is kept. The spectrum comes from the Gram matrices
// of the stacks in double (pivoted Cholesky of BᵀB, then the eigenproblem of the R x R core's
// Gram; see linalg.cpp); values below 1e-7 σ_1 get zero vectors.
FactoredSvd factored_svd(std::span<const LowRankTerm> terms,
                         const std::function<std::int64_t(const std::vector<double>&)>& keep, Workspace& workspace);

// The best rank-k approximation of Σ c_i B_i A_i as LoRA factors, written straight into the
// caller's buffers with no U or V in between: up = U_k·Σ_k (out x rank, row-major) and
// down = V_kᵀ (rank x in, row-major), or √Σ_k on each side when `balanced`. rank = keep(spectrum)
// (>= 0; it may exceed min(out, in, R), and directions past `kept` are zero, as in
// split_factors). `up` and `down` are resized to out·rank and rank·in values and written
// whole; buffers reused across calls keep their capacity (fresh pages are slow to touch).
struct FactoredLora {
    std::int64_t out = 0;
    std::int64_t in = 0;
    std::int64_t rank = 0;                // width of the factors
    std::int64_t kept = 0;                // directions computed: min(rank, out, in, R)
    std::vector<double> singular_values;  // full spectrum, descending
};
FactoredLora factored_lora(std::span<const LowRankTerm> terms,
                           const std::function<std::int64_t(const std::vector<double>&)>& keep, bool balanced,
                           Workspace& workspace, std::vector<float>& up, std::vector<float>& down);
// LoRA factors of rank k from an SVD: up = U_k·Σ_k (out x k) and down = V_kᵀ (k x in), both
// row-major, or √Σ on each side when `balanced`. Directions past svd.kept are zero.
// `u` is out x kept and `v` in x kept, row-major (FactoredSvd and DenseSvd alike).
void split_factors(const std::vector<float>& u, const std::vector<double>& singular_values, const std::vector<float>& v,
                   std::int64_t out, std::int64_t in, std::int64_t kept, std::int64_t k, bool balanced,
                   std::vector<float>& up, std::vector<float>& down);
inline void split_factors(const FactoredSvd& svd, std::int64_t k, bool balanced, std::vector<float>& up,
                          std::vector<float>& down) {
    split_factors(svd.u, svd.singular_values, svd.v, svd.out, svd.in, svd.kept, k, balanced, up, down);
}
// Through Householder QRs in f32 (sgelqf/sgeqrf + sorglq/sorgqr): the cross-check in tests.
FactoredSvd factored_svd_householder(std::span<const LowRankTerm> terms, std::int64_t keep, Workspace& workspace);

// The Gram matrices of the stacked factors of Σ c_i B_i A_i: G_b = BᵀB and G_a = AAᵀ for
// B = [c_1 B_1 ... c_k B_k] (out x R) and A = [A_1; ...; A_k] (R x in), R x R, symmetric with
// both triangles filled, column-major, accumulated in f32 a cache-sized chunk at a time from
// the factors as stored (the c_i scale G_b afterwards, in double) and returned in double.
// Everything about the terms' products follows from their blocks without forming any out x in
// matrix, e.g. ⟨c_i B_i A_i, c_j B_j A_j⟩_F = Σ_ab G_b[i_a, j_b] · G_a[i_a, j_b]. Throws
// bad_input on NaN or infinite factors.
void stacked_grams(std::span<const LowRankTerm> terms, Workspace& workspace, std::vector<double>& gram_b,
                   std::vector<double>& gram_a);
// The stacks themselves, in f32: B row-major (entry (o, k) at b[o·R + k], without c_i: multiply
// by it where needed) and A row-major (entry (k, j) at a[k·in + j]), valid until the workspace
// is used again.
struct Stacks {
    const float* b = nullptr;
    const float* a = nullptr;
    std::int64_t total_rank = 0, out = 0, in = 0;
};
Stacks stack_factors(std::span<const LowRankTerm> terms, Workspace& workspace);

// The SVD of M = B·A known only through its Gram matrices G_b = BᵀB and G_a = AAᵀ (R x R,
// column-major, double, upper triangles read), by factored_svd's route: a pivoted Cholesky of
// G_b (pivots below relative_tolerance times its largest diagonal entry count as rank
// deficiency; negative: LAPACK's default, R·eps), then the eigenproblem of R_b G_a R_bᵀ.
// keep(σ) chooses k. Returns σ (R values, descending, zero past the rank) and X, Y (R x k,
// column-major) with U_k = B·X and V_k = Aᵀ·Y; directions below 1e-7 σ_1 are left zero.
struct GramSvd {
    std::vector<double> singular_values;
    std::vector<double> x, y;
    std::int64_t k = 0;
};
GramSvd gram_svd(std::span<const double> gram_b, std::span<const double> gram_a, std::int64_t R,
                 const std::function<std::int64_t(const std::vector<double>&)>& keep, double relative_tolerance,
                 Workspace& workspace);

// Eigenvalues (descending) and eigenvectors of a small symmetric n x n matrix given
// column-major in `matrix` (upper triangle read); `matrix` receives the eigenvectors as columns.
void symmetric_eigen(std::vector<double>& matrix, std::int64_t n, std::vector<double>& values);

// A dense row-major rows x cols matrix as stored: F32, F16 or BF16 values (for example a
// checkpoint tensor in its mapped file), not necessarily aligned.
struct DenseView {
    const void* data = nullptr;
    DType dtype = DType::F32;
    std::int64_t rows = 0;
    std::int64_t cols = 0;
};

// ‖W‖_2 of a dense matrix, estimated by seeded block Krylov iteration (blocks of 4 vectors,
// `iterations` passes over W, Rayleigh–Ritz on the whole Krylov space): a lower bound that
// converges to σ_1. Measured (bench shapes, 6 passes): within 1e-6 relative for weights with a
// dominant singular value (σ_1/σ_2 >= 1.4), within 2e-2 for flat Gaussian spectra (σ_1/σ_2 ~
// 1.003), where the block power iteration it replaced was 2-4e-2 off after 9 passes. F16 and
// BF16 values are widened as each pass reads them (exactly: f32 holds every such value), so
// the stored tensor is the only copy. Throws bad_input when W holds NaN or infinite values,
// unsupported for other dtypes.
double spectral_norm(const DenseView& matrix, int iterations = 6, std::uint64_t seed = 0x5eed);
inline double spectral_norm(const float* matrix, std::int64_t rows, std::int64_t cols, int iterations = 6,
                            std::uint64_t seed = 0x5eed) {
    return spectral_norm(DenseView{matrix, DType::F32, rows, cols}, iterations, seed);
}

// One pass over dense values: ‖x‖², max |x| and whether all are finite (vectorised; the sum in
// double).
struct DenseStats {
    double sum_squares = 0;
    float max_abs = 0;  // meaningful only when finite
    bool finite = true;
};
DenseStats dense_stats(const float* values, std::size_t count) noexcept;

// Truncated SVD of a dense row-major rows x cols f32 matrix, for deltas with no low-rank
// structure (merges after TIES/DARE pruning, extraction from two checkpoints).
//   exact:      LAPACK dgesdd on a double copy (reference; used for min(rows, cols) <= exact_below)
//   randomized: Halko–Martinsson–Tropp subspace iteration (their Algorithms 4.4 + 5.1): Gaussian
//               sketch of width k + oversample (seeded: identical results for identical input),
//               power_iterations rounds re-orthonormalised with Householder QR, then an SVD of
//               the small projected matrix in double.
// The returned spectrum holds the k kept values (exact: all min(rows, cols)); frobenius_squared
// is ‖M‖_F² computed exactly, so the retained energy of any truncation is exact too.
struct DenseSvdOptions {
    enum class Method { automatic, exact, randomized };
    Method method = Method::automatic;
    int power_iterations = 2;
    std::int64_t oversample = 10;  // extra sketch columns; -1: k (≤ 1.007x optimal at p=10, q=2: docs/benchmarks.md)
    std::uint64_t seed = 0x10ca;
    std::int64_t exact_below = 512;
    // ‖M‖_F² when the caller has already scanned the matrix with dense_stats and found it
    // finite: truncated_svd then skips its own pass over it.
    std::optional<double> known_frobenius_squared;
};
struct DenseSvd {
    std::int64_t rows = 0, cols = 0, kept = 0;
    std::vector<float> u;                 // rows x kept, row-major
    std::vector<double> singular_values;  // descending
    std::vector<float> v;                 // cols x kept, row-major
    double frobenius_squared = 0;
    bool randomized = false;
};
DenseSvd truncated_svd(const float* matrix, std::int64_t rows, std::int64_t cols, std::int64_t k,
                       const DenseSvdOptions& options = {});

// Reference: singular values of a dense row-major rows x cols f32 matrix (LAPACK sgesdd,
// computed in double internally). For tests and small matrices only.
std::vector<double> dense_singular_values(const float* matrix, std::int64_t rows, std::int64_t cols);

// Sets the number of threads BLAS/LAPACK may use (OpenBLAS); 1 inside our own parallel loops,
// 0 (or less) for all cores. Then stops the worker pool (stop_blas_pool), which setting the count
// starts. Not while another thread is inside a BLAS call.
void set_blas_threads(int threads) noexcept;
int blas_threads() noexcept;

// OpenBLAS (its pthreads build) keeps worker threads, and an idle one spins on sched_yield for
// ~0.1 s (2^28 cycles) before it sleeps: on 2 cores a 0.2 s conversion lost a third of its CPU
// samples to that. This stops them; the next multi-threaded BLAS call starts them again. The
// tools call it first thing; nothing happens with other BLAS builds. Not while another thread is
// inside a BLAS call.
void stop_blas_pool() noexcept;

}  // namespace lorakit::linalg
