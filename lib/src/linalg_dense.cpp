// Truncated SVD of dense matrices: exact (LAPACK) and randomized (Halko, Martinsson, Tropp,
// "Finding structure with randomness", SIAM Review 2011, Algorithms 4.4 and 5.1).
#include <lapacke.h>

#include <algorithm>
#include <bit>
#include <cmath>

#include "lorakit/error.h"
#include "lorakit/linalg.h"
#include "lorakit/random.h"
#include "gram_kernels.h"

extern "C" {
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
void cblas_dgemm(int layout, int trans_a, int trans_b, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc);
void cblas_dsyrk(int layout, int uplo, int trans, int n, int k, double alpha, const double* a, int lda, double beta,
                 double* c, int ldc);
}

namespace lorakit::linalg {

namespace {

constexpr int col_major = 102, no_trans = 111, trans = 112, upper = 121;

int as_int(std::int64_t n) {
    if (n > 2147483647) fail(ErrorCode::unsupported, "a dimension of {} exceeds LAPACK's 32-bit indices", n);
    return static_cast<int>(n);
}

void check(lapack_int info, const char* routine) {
    if (info < 0) fail(ErrorCode::internal, "{}: argument {} had an illegal value", routine, -info);
    if (info > 0) fail(ErrorCode::internal, "{} did not converge (info {})", routine, info);
}

// Orthonormalises the columns of the column-major n x l matrix `y` in place (Householder QR).
void orthonormalise(std::vector<float>& y, int n, int l) {
    std::vector<float> tau(static_cast<std::size_t>(std::min(n, l)));
    check(LAPACKE_sgeqrf(LAPACK_COL_MAJOR, n, l, y.data(), n, tau.data()), "sgeqrf");
    check(LAPACKE_sorgqr(LAPACK_COL_MAJOR, n, std::min(n, l), std::min(n, l), y.data(), n, tau.data()), "sorgqr");
}

// Standard normal deviates from the deterministic generator (Box–Muller).
void gaussian(std::vector<float>& out, std::uint64_t seed) {
    SplitMix64 random(seed);
    for (std::size_t i = 0; i < out.size(); i += 2) {
        const double u1 = (static_cast<double>(random.next() >> 11) + 1.0) * 0x1p-53;
        const double u2 = static_cast<double>(random.next() >> 11) * 0x1p-53;
        const double radius = std::sqrt(-2.0 * std::log(u1));
        out[i] = static_cast<float>(radius * std::cos(2 * M_PI * u2));
        if (i + 1 < out.size()) out[i + 1] = static_cast<float>(radius * std::sin(2 * M_PI * u2));
    }
}

DenseSvd exact_svd(const float* m, std::int64_t rows, std::int64_t cols, std::int64_t k) {
    // Row-major rows x cols = column-major cols x rows = Mᵀ; SVD of Mᵀ = V Σ Uᵀ.
    const int mt_rows = as_int(cols), mt_cols = as_int(rows);
    const int n = std::min(mt_rows, mt_cols);
    std::vector<double> a(static_cast<std::size_t>(rows * cols));
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = m[i];
    std::vector<double> s(static_cast<std::size_t>(n)), left(static_cast<std::size_t>(mt_rows) * n),
        right_t(static_cast<std::size_t>(n) * mt_cols);
    check(LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'S', mt_rows, mt_cols, a.data(), mt_rows, s.data(), left.data(), mt_rows,
                         right_t.data(), n),
          "dgesdd");
    DenseSvd r;
    r.rows = rows;
    r.cols = cols;
    r.kept = std::min<std::int64_t>(k, n);
    r.singular_values = s;
    // left (cols x n, column-major) holds V; right_t (n x rows, column-major) holds Uᵀ.
    r.u.resize(static_cast<std::size_t>(rows * r.kept));
    r.v.resize(static_cast<std::size_t>(cols * r.kept));
    for (std::int64_t j = 0; j < r.kept; ++j) {
        for (std::int64_t i = 0; i < rows; ++i)
            r.u[static_cast<std::size_t>(i * r.kept + j)] = static_cast<float>(right_t[static_cast<std::size_t>(j + i * n)]);
        for (std::int64_t i = 0; i < cols; ++i)
            r.v[static_cast<std::size_t>(i * r.kept + j)] = static_cast<float>(left[static_cast<std::size_t>(i + j * mt_rows)]);
    }
    return r;
}

DenseSvd randomized_svd(const float* m, std::int64_t rows, std::int64_t cols, std::int64_t k,
                        const DenseSvdOptions& options) {
    // Work on the column-major view of the row-major matrix: A = Mᵀ (cols x rows), so that
    // products need no copies. A's left vectors are M's right vectors and vice versa.
    const int ar = as_int(cols), ac = as_int(rows);
    const std::int64_t oversample = options.oversample < 0 ? k : options.oversample;
    const int l = static_cast<int>(std::min<std::int64_t>(k + oversample, std::min(rows, cols)));
    std::vector<float> omega(static_cast<std::size_t>(ac) * l), y(static_cast<std::size_t>(ar) * l),
        z(static_cast<std::size_t>(ac) * l);
    gaussian(omega, options.seed);
    cblas_sgemm(col_major, no_trans, no_trans, ar, l, ac, 1.0f, m, ar, omega.data(), ac, 0.0f, y.data(), ar);
    orthonormalise(y, ar, l);
    for (int q = 0; q < options.power_iterations; ++q) {
        cblas_sgemm(col_major, trans, no_trans, ac, l, ar, 1.0f, m, ar, y.data(), ar, 0.0f, z.data(), ac);
        orthonormalise(z, ac, l);
        cblas_sgemm(col_major, no_trans, no_trans, ar, l, ac, 1.0f, m, ar, z.data(), ac, 0.0f, y.data(), ar);
        orthonormalise(y, ar, l);
    }
    // B = Qᵀ A (l x ac), small. Its SVD in double from the l x l Gram B·Bᵀ = Ub Σ² Ubᵀ (dsyrk +
    // dsyevd) and Vt = Σ⁻¹ Ubᵀ B (dgemm): for this wide B that is several times faster than
    // dgesdd's bidiagonalisation, which dominated the whole routine. The squaring costs accuracy
    // only in values below ~1e-8 σ_1, whose directions carry no energy.
    cblas_sgemm(col_major, trans, no_trans, l, ac, ar, 1.0f, y.data(), ar, m, ar, 0.0f, z.data(), l);
    const std::vector<double> b(z.begin(), z.begin() + static_cast<std::ptrdiff_t>(l) * ac);
    std::vector<double> ub(static_cast<std::size_t>(l) * l), s2;
    cblas_dsyrk(col_major, upper, no_trans, l, ac, 1.0, b.data(), l, 0.0, ub.data(), l);
    symmetric_eigen(ub, l, s2);  // ub: eigenvectors, values descending
    DenseSvd r;
    r.rows = rows;
    r.cols = cols;
    r.kept = std::min<std::int64_t>(k, l);
    r.randomized = true;
    const int kept = static_cast<int>(r.kept);
    r.singular_values.resize(static_cast<std::size_t>(kept));
    for (int j = 0; j < kept; ++j) r.singular_values[static_cast<std::size_t>(j)] = std::sqrt(std::max(0.0, s2[static_cast<std::size_t>(j)]));
    // M's left vectors (rows x kept, row-major) = (Σ⁻¹ Ubᵀ B)ᵀ: the kept x ac column-major
    // product has exactly that layout.
    std::vector<double> w(static_cast<std::size_t>(kept) * ac);
    cblas_dgemm(col_major, trans, no_trans, kept, ac, l, 1.0, ub.data(), l, b.data(), l, 0.0, w.data(), kept);
    const double floor = 1e-7 * (kept > 0 ? r.singular_values.front() : 0.0);
    r.u.resize(static_cast<std::size_t>(rows * r.kept));
    for (std::int64_t i = 0; i < rows; ++i)
        for (int j = 0; j < kept; ++j) {
            const double sv = r.singular_values[static_cast<std::size_t>(j)];
            r.u[static_cast<std::size_t>(i * kept + j)] =
                sv > floor ? static_cast<float>(w[static_cast<std::size_t>(j + i * kept)] / sv) : 0.0f;
        }
    // M's right vectors (cols x kept, row-major) = Q·Ub: computed as the kept x ar column-major
    // Ubᵀ·Qᵀ, which is that layout.
    std::vector<float> ubf(ub.begin(), ub.begin() + static_cast<std::ptrdiff_t>(l) * kept);
    r.v.resize(static_cast<std::size_t>(cols * r.kept));
    cblas_sgemm(col_major, trans, trans, kept, ar, l, 1.0f, ubf.data(), l, y.data(), ar, 0.0f, r.v.data(), kept);
    return r;
}

}  // namespace

double spectral_norm(const DenseView& matrix, int iterations, std::uint64_t seed) {
    const std::int64_t rows = matrix.rows, cols = matrix.cols;
    if (matrix.dtype != DType::F32 && matrix.dtype != DType::F16 && matrix.dtype != DType::BF16)
        fail(ErrorCode::unsupported, "spectral norm of {} values", dtype_name(matrix.dtype));
    if (rows <= 0 || cols <= 0) return 0.0;
    // Block Krylov (block Lanczos with full reorthogonalisation): orthonormal blocks of up to l
    // vectors spanning [Z, MᵀM Z, ..., (MᵀM)^{s-1} Z], one pass over M each (normal_apply); then
    // Rayleigh–Ritz on the whole span, the largest eigenvalue of Qᵀ MᵀM Q = Qᵀ [MᵀM Q_0 ...],
    // which is σ_1² from below as long as Q is orthonormal. The whole Krylov space converges
    // much faster than the last block of a power iteration with as many passes (Musco & Musco
    // 2015): `iterations` passes in all.
    const int n = as_int(cols);
    const int l = static_cast<int>(std::min<std::int64_t>(4, std::min(rows, cols)));
    const int passes = std::max(1, iterations);
    const std::size_t column = static_cast<std::size_t>(n);
    // Each pass is MᵀM Q_j, one cache-sized panel of rows at a time (the Gram kernels'
    // normal_apply: t = P z, then out += Pᵀ t while P is still in cache, reading the stored
    // values in place; two sgemm calls over the whole of M would read it from memory twice and
    // pack a copy of it each time, which for a block this thin is the whole cost).
    const detail::GramKernels& kernels = detail::gram_kernels();
    const auto* stored = static_cast<const std::byte*>(matrix.data);
    DType type = matrix.dtype;
    thread_local std::vector<float> widened;  // only grows
    if (type != DType::F32 && !kernels.widens_in_registers) {  // once, not once per pass
        const auto count = static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols);
        if (widened.size() < count) widened.resize(count);
        convert_to_f32(type, stored, widened.data(), count);
        stored = reinterpret_cast<const std::byte*>(widened.data());
        type = DType::F32;
    }
    std::vector<float> q(column * static_cast<std::size_t>(l)), w, next, h;
    std::vector<float> t(kernels.normal_scratch(column, static_cast<std::size_t>(l)));
    gaussian(q, seed);
    orthonormalise(q, n, l);
    int width = 0, block = l;  // columns of q before the newest block, and its width
    auto project = [&](int span) {  // next -= Q Qᵀ next over q's first `span` columns
        h.resize(static_cast<std::size_t>(span) * static_cast<std::size_t>(block));
        cblas_sgemm(col_major, trans, no_trans, span, block, n, 1.0f, q.data(), n, next.data(), n, 0.0f, h.data(), span);
        cblas_sgemm(col_major, no_trans, no_trans, n, block, span, -1.0f, q.data(), n, h.data(), span, 1.0f, next.data(), n);
    };
    for (int pass = 0;; ++pass) {
        w.resize(column * static_cast<std::size_t>(width + block));
        float* wj = w.data() + column * static_cast<std::size_t>(width);
        kernels.normal_apply(stored, type, static_cast<std::size_t>(rows), column,
                             q.data() + column * static_cast<std::size_t>(width), static_cast<std::size_t>(block), wj,
                             t.data());
        const DenseStats stats = dense_stats(wj, column * static_cast<std::size_t>(block));  // vectorised
        if (!stats.finite) fail(ErrorCode::bad_input, "the matrix holds NaN or infinite values");
        width += block;
        if (pass + 1 == passes || width >= n) break;
        // The next block: MᵀM Q_j without its components in the span so far (twice, for
        // orthogonality in f32), reduced to the directions it really has: the remainder's
        // singular directions above 1e-4 of MᵀM Q_j's size (noise below that would come out of
        // a QR as vectors that are not orthogonal to the span). None left: the span is
        // invariant and the Ritz value exact.
        next.assign(wj, wj + column * static_cast<std::size_t>(block));
        const double energy = stats.sum_squares;
        project(width);
        project(width);
        std::vector<double> gram(static_cast<std::size_t>(block) * static_cast<std::size_t>(block)), values;
        for (int a = 0; a < block; ++a)
            for (int b = a; b < block; ++b) {  // the upper triangle (symmetric_eigen reads it)
                const float *x = next.data() + static_cast<std::size_t>(a) * column,
                            *y = next.data() + static_cast<std::size_t>(b) * column;
                double sum[4] = {0, 0, 0, 0};  // four chains instead of one dependent sum
                int k = 0;
                for (; k + 4 <= n; k += 4)
                    for (int u = 0; u < 4; ++u) sum[u] += static_cast<double>(x[k + u]) * y[k + u];
                for (; k < n; ++k) sum[0] += static_cast<double>(x[k]) * y[k];
                gram[static_cast<std::size_t>(a) + static_cast<std::size_t>(b) * static_cast<std::size_t>(block)] =
                    (sum[0] + sum[1]) + (sum[2] + sum[3]);
            }
        symmetric_eigen(gram, block, values);
        int keep = 0;
        while (keep < block && keep < n - width && values[static_cast<std::size_t>(keep)] > 1e-8 * energy) ++keep;
        if (keep == 0) break;
        // The kept directions (next · V_k, orthogonal), then once more projected and orthonormalised.
        std::vector<float> directions(column * static_cast<std::size_t>(keep), 0.0f);
        for (int c = 0; c < keep; ++c)
            for (int b = 0; b < block; ++b) {
                const auto v = static_cast<float>(gram[static_cast<std::size_t>(b) + static_cast<std::size_t>(c) * static_cast<std::size_t>(block)]);
                const float* src = next.data() + static_cast<std::size_t>(b) * column;
                float* dst = directions.data() + static_cast<std::size_t>(c) * column;
                for (int k = 0; k < n; ++k) dst[k] += v * src[k];
            }
        next.swap(directions);
        block = keep;
        project(width);
        orthonormalise(next, n, block);
        q.resize(column * static_cast<std::size_t>(width + block));
        std::copy(next.begin(), next.end(), q.begin() + static_cast<std::ptrdiff_t>(column * static_cast<std::size_t>(width)));
    }
    // T = Qᵀ W over the span (f32 products, ~1e-7 relative: far below what the ratio needs),
    // symmetrised in double; its top eigenvalue.
    std::vector<float> tf(static_cast<std::size_t>(width) * static_cast<std::size_t>(width));
    cblas_sgemm(col_major, trans, no_trans, width, width, n, 1.0f, q.data(), n, w.data(), n, 0.0f, tf.data(), width);
    std::vector<double> tm(tf.begin(), tf.end()), values;
    for (int a = 0; a < width; ++a)
        for (int b = 0; b < a; ++b) {
            const std::size_t ab = static_cast<std::size_t>(a) + static_cast<std::size_t>(b) * static_cast<std::size_t>(width),
                              ba = static_cast<std::size_t>(b) + static_cast<std::size_t>(a) * static_cast<std::size_t>(width);
            tm[ab] = tm[ba] = 0.5 * (tm[ab] + tm[ba]);
        }
    symmetric_eigen(tm, width, values);
    return std::sqrt(std::max(values.front(), 0.0));
}

#if defined(__x86_64__) && defined(__GNUC__)
// An AVX2 clone chosen at load time (the build stays portable; SSE2 has no unsigned max).
__attribute__((target_clones("avx2", "default")))
#endif
DenseStats dense_stats(const float* values, std::size_t count) noexcept {
    // |x| as bits: for non-negative floats the integer order is the float order, and NaN/Inf
    // (exponent all ones) compare above every finite value, so one integer max (which
    // vectorises, unlike a float max with NaN semantics) gives both the max and finiteness.
    // Squares go into float partial sums of 8 lanes over short blocks, then into double.
    constexpr std::size_t block = 64;  // 8 squares per float lane: ≤ 5e-7 relative rounding
    std::uint32_t max_bits = 0;
    double total = 0;
    for (std::size_t start = 0; start < count; start += block) {
        const std::size_t end = std::min(count, start + block);
        float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::size_t i = start;
        for (; i + 8 <= end; i += 8)
            for (int j = 0; j < 8; ++j) {
                const float x = values[i + static_cast<std::size_t>(j)];
                lanes[j] += x * x;
                max_bits = std::max(max_bits, std::bit_cast<std::uint32_t>(x) & 0x7fffffffu);
            }
        for (; i < end; ++i) {
            lanes[0] += values[i] * values[i];
            max_bits = std::max(max_bits, std::bit_cast<std::uint32_t>(values[i]) & 0x7fffffffu);
        }
        double sum = 0;
        for (float lane : lanes) sum += lane;
        total += sum;
    }
    DenseStats stats;
    stats.finite = max_bits < 0x7f800000u;
    stats.max_abs = stats.finite ? std::bit_cast<float>(max_bits) : 0.0f;
    stats.sum_squares = total;
    return stats;
}

DenseSvd truncated_svd(const float* matrix, std::int64_t rows, std::int64_t cols, std::int64_t k,
                       const DenseSvdOptions& options) {
    if (rows <= 0 || cols <= 0 || k <= 0) fail(ErrorCode::internal, "truncated_svd of {}x{} at rank {}", rows, cols, k);
    double energy = 0;
    if (options.known_frobenius_squared) {
        energy = *options.known_frobenius_squared;
    } else {
        const DenseStats stats = dense_stats(matrix, static_cast<std::size_t>(rows * cols));
        if (!stats.finite) fail(ErrorCode::bad_input, "the matrix holds NaN or infinite values");
        energy = stats.sum_squares;
    }
    using Method = DenseSvdOptions::Method;
    const bool exact = options.method == Method::exact ||
                       (options.method == Method::automatic && std::min(rows, cols) <= options.exact_below) ||
                       k >= std::min(rows, cols) / 2;
    DenseSvd r = exact ? exact_svd(matrix, rows, cols, k) : randomized_svd(matrix, rows, cols, k, options);
    r.frobenius_squared = energy;
    return r;
}

}  // namespace lorakit::linalg
