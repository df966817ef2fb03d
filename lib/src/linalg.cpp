// Factored SVD of sums of LoRA products (see linalg.h for the method).
//
// Layout trick: a row-major out x R matrix B is, read column-major, the R x out matrix Bᵀ.
// So the LQ factorisation of that R x out array (sgelqf) gives Bᵀ = L·Q, i.e. B = Qᵀ·Lᵀ with
// R_b = Lᵀ, without transposing anything; and a row-major R x in matrix A is column-major
// Aᵀ (in x R), whose QR (sgeqrf) gives R_a directly. Only the stacked copies (needed anyway
// to apply the coefficients) touch the factors' memory.
#include "lorakit/linalg.h"

#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "lorakit/error.h"
#include "gram_kernels.h"
#include "parallel.h"
#include "small_eigen.h"

extern "C" {
// OpenBLAS's thread control (declared here: the right cblas.h depends on the BLAS variant).
void openblas_set_num_threads(int threads);
int openblas_get_num_threads(void);
// OpenBLAS (pthreads build) stops its worker threads; the next multi-threaded call starts them
// again. Weak: absent from other BLAS builds, where it is simply not called.
void blas_thread_shutdown_(void) __attribute__((weak));
// CBLAS routines (from libopenblas).
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
void cblas_ssyrk(int layout, int uplo, int trans, int n, int k, float alpha, const float* a, int lda, float beta,
                 float* c, int ldc);
void cblas_dgemm(int layout, int trans_a, int trans_b, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc);
void cblas_dtrsm(int layout, int side, int uplo, int trans_a, int diag, int m, int n, double alpha, const double* a,
                 int lda, double* b, int ldb);
}
#include <functional>

namespace lorakit::linalg {

namespace {
constexpr int cblas_col_major = 102;
constexpr int cblas_no_trans = 111;
constexpr int cblas_trans = 112;
constexpr int cblas_upper = 121;
constexpr int cblas_non_unit = 131;
constexpr int cblas_left = 141;
}  // namespace

struct Workspace::Impl {
    std::vector<float> b;       // R x out, column-major (= stacked B, row-major)
    std::vector<float> a;       // in x R, column-major (= stacked A, row-major)
    std::vector<float> tau_b, tau_a, work;
    std::vector<double> core;   // k_b x k_a, column-major
    std::vector<double> u, vt, s, dwork;
    std::vector<lapack_int> iwork;
    std::vector<float> small;   // float copies of the core's singular vectors
    std::vector<float> rows;    // rows of a factor widened to f32 on their way into b
    std::vector<double> wide;   // a chunk of a stacked factor widened to double (Gram route)
    std::vector<double> rb, ra;
    std::vector<lapack_int> piv;
    // The Gram route of factored_svd: kept across calls so that their pages are touched once.
    std::vector<double> gb, ga, z, gz, kgram, x, y, mu;
    std::vector<double> coefficients;  // per stacked column: its term's coefficient
    std::vector<float> transposed;     // X or Y (R x k) row-major, for the products
    std::vector<float> panel;          // the products' packed panels (R x 64)
    std::vector<double> grams;         // stacked_grams' G_b and G_a (ld x ld each)
};

Workspace::Workspace() : impl_(new Impl) {}
Workspace::~Workspace() { delete impl_; }
Workspace::Workspace(Workspace&& other) noexcept : impl_(other.impl_) { other.impl_ = nullptr; }
Workspace& Workspace::operator=(Workspace&& other) noexcept {
    std::swap(impl_, other.impl_);
    return *this;
}

namespace {

template <typename T>
T* sized(std::vector<T>& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
}

lapack_int to_lapack(std::int64_t n, const char* what) {
    if (n > 2147483647)
        fail(ErrorCode::unsupported, "{} of {} exceeds what LAPACK's 32-bit indices can address", what, n);
    return static_cast<lapack_int>(n);
}

void check_lapack(lapack_int info, const char* routine) {
    if (info < 0) fail(ErrorCode::internal, "{}: argument {} had an illegal value", routine, -info);
    if (info > 0) fail(ErrorCode::internal, "{} did not converge (info {})", routine, info);
}

struct Stacked {
    std::int64_t out = 0, in = 0, total_rank = 0;
    // The f32 stacks (R x out and in x R, column-major) where stack_with_grams left them: the
    // workspace's arrays, or a lone aligned f32 term's own factors.
    const float* b = nullptr;
    const float* a = nullptr;
};

// The common shape of the terms and their total rank; refuses terms that disagree.
Stacked check_terms(std::span<const LowRankTerm> terms) {
    if (terms.empty()) fail(ErrorCode::internal, "factored SVD of no terms");
    Stacked s;
    s.out = terms[0].out;
    s.in = terms[0].in;
    for (const auto& t : terms) {
        if (t.out != s.out || t.in != s.in)
            fail(ErrorCode::bad_input, "cannot add a {}x{} low-rank term to a {}x{} one", t.out, t.in, s.out, s.in);
        if (t.rank <= 0 || t.out <= 0 || t.in <= 0)
            fail(ErrorCode::internal, "low-rank term of shape {}x{}x{}", t.out, t.rank, t.in);
        s.total_rank += t.rank;
    }
    return s;
}

// `count` values of a factor of `type` from element `first`, widened to f32 into dst.
void widen(DType type, const void* factor, std::size_t first, std::size_t count, float* dst) {
    convert_to_f32(type, static_cast<const std::byte*>(factor) + first * dtype_size(type), dst, count);
}

// Rows [o0, o1) of c·B_i (row-major, r wide) into columns `column`.. of the R x out array `b`
// (ld R), through `scratch` (cache-sized: the widened rows are read back at once). When `wide`
// is given, the same values also go to it in double (row o - o0 of rows of wide_ld doubles).
void stack_rows(const LowRankTerm& t, std::size_t o0, std::size_t o1, std::size_t column, std::size_t R, float* b,
                double* wide, std::size_t wide_ld, std::vector<float>& scratch) {
    const auto r = static_cast<std::size_t>(t.rank);
    const auto c = static_cast<float>(t.coefficient);
    const std::size_t step = std::max<std::size_t>(1, 16384 / r);
    float* rows = sized(scratch, std::min(step, o1 - o0) * r);
    for (std::size_t p0 = o0; p0 < o1; p0 += step) {
        const std::size_t p1 = std::min(o1, p0 + step);
        widen(t.b_type, t.b, p0 * r, (p1 - p0) * r, rows);
        for (std::size_t o = p0; o < p1; ++o) {
            const float* src = rows + (o - p0) * r;
            float* dst = b + o * R + column;
            for (std::size_t k = 0; k < r; ++k) dst[k] = c * src[k];
            if (wide) {
                double* wd = wide + (o - o0) * wide_ld + column;
                for (std::size_t k = 0; k < r; ++k) wd[k] = dst[k];
            }
        }
    }
}

// Fills the workspace with [c_1 B_1 ... c_k B_k] (or [B_1 ... B_k] when not `scaled`) and
// [A_1; ...; A_k], checking shapes.
Stacked stack_terms(std::span<const LowRankTerm> terms, Workspace::Impl& w, bool scaled = true) {
    const Stacked s = check_terms(terms);
    const auto R = static_cast<std::size_t>(s.total_rank);
    const auto out = static_cast<std::size_t>(s.out);
    const auto in = static_cast<std::size_t>(s.in);
    float* b = sized(w.b, R * out);
    float* a = sized(w.a, R * in);
    std::size_t column = 0;
    for (const auto& t : terms) {
        const auto r = static_cast<std::size_t>(t.rank);
        // Row o of B_i lands in column o of the R x out array, rows column..column+r.
        if (scaled) {
            stack_rows(t, 0, out, column, R, b, nullptr, 0, w.rows);
        } else {
            // Straight into place, a row (r values) at a time: no scratch copy, no second pass.
            for (std::size_t o = 0; o < out; ++o) widen(t.b_type, t.b, o * r, r, b + o * R + column);
        }
        // A_i's rows are the next r columns of the in x R array: one contiguous block.
        widen(t.a_type, t.a, 0, r * in, a + column * in);
        column += r;
    }
    return s;
}

struct Triangles {
    lapack_int kb = 0, ka = 0, R = 0;
};

// Factorises the stacked arrays in place: L of Bᵀ (R x kb, lower) and R_a (ka x R, upper).
Triangles factorise(const Stacked& s, Workspace::Impl& w) {
    Triangles t;
    t.R = to_lapack(s.total_rank, "total rank");
    const lapack_int out = to_lapack(s.out, "output size");
    const lapack_int in = to_lapack(s.in, "input size");
    t.kb = std::min(out, t.R);
    t.ka = std::min(in, t.R);
    float query = 0;
    check_lapack(LAPACKE_sgelqf_work(LAPACK_COL_MAJOR, t.R, out, w.b.data(), t.R, sized(w.tau_b, t.kb), &query, -1),
                 "sgelqf");
    lapack_int lwork = static_cast<lapack_int>(query);
    check_lapack(LAPACKE_sgeqrf_work(LAPACK_COL_MAJOR, in, t.R, w.a.data(), in, sized(w.tau_a, t.ka), &query, -1),
                 "sgeqrf");
    lwork = std::max(lwork, static_cast<lapack_int>(query));
    float* work = sized(w.work, static_cast<std::size_t>(std::max<lapack_int>(lwork, 1)));
    check_lapack(LAPACKE_sgelqf_work(LAPACK_COL_MAJOR, t.R, out, w.b.data(), t.R, w.tau_b.data(), work, lwork), "sgelqf");
    check_lapack(LAPACKE_sgeqrf_work(LAPACK_COL_MAJOR, in, t.R, w.a.data(), in, w.tau_a.data(), work, lwork), "sgeqrf");
    return t;
}

// core = R_b · R_aᵀ in double, with R_b = Lᵀ (kb x R, L lower in the R x out array) and R_a
// upper (ka x R) in the in x R array. core(i, j) = Σ_k L(k, i) · R_a(j, k), k >= max(i, j).
void form_core(const Triangles& t, std::int64_t in, Workspace::Impl& w) {
    double* core = sized(w.core, static_cast<std::size_t>(t.kb) * static_cast<std::size_t>(t.ka));
    const float* L = w.b.data();
    const float* Ra = w.a.data();
    const auto ld_b = static_cast<std::size_t>(t.R);
    const auto ld_a = static_cast<std::size_t>(in);
    for (lapack_int j = 0; j < t.ka; ++j) {
        for (lapack_int i = 0; i < t.kb; ++i) {
            double sum = 0;
            for (lapack_int k = std::max(i, j); k < t.R; ++k)
                sum += static_cast<double>(L[k + i * ld_b]) * static_cast<double>(Ra[j + k * ld_a]);
            core[i + static_cast<std::size_t>(j) * t.kb] = sum;
        }
    }
    for (std::size_t i = 0; i < static_cast<std::size_t>(t.kb) * t.ka; ++i)
        if (!std::isfinite(core[i])) fail(ErrorCode::bad_input, "the factors hold NaN or infinite values");
}

// SVD of the kb x ka core (in w.core); values into w.s; with vectors, U (kb x m) and Vᵀ (m x ka).
lapack_int core_svd(const Triangles& t, bool vectors, Workspace::Impl& w) {
    const lapack_int m = std::min(t.kb, t.ka);
    double* s = sized(w.s, static_cast<std::size_t>(m));
    const char job = vectors ? 'S' : 'N';
    double* u = vectors ? sized(w.u, static_cast<std::size_t>(t.kb) * m) : nullptr;
    double* vt = vectors ? sized(w.vt, static_cast<std::size_t>(m) * t.ka) : nullptr;
    // gesdd destroys its input; keep a copy for the gesvd fallback.
    std::vector<double> backup(w.core.begin(), w.core.begin() + static_cast<std::ptrdiff_t>(t.kb) * t.ka);
    double query = 0;
    lapack_int* iwork = sized(w.iwork, static_cast<std::size_t>(8 * std::max<lapack_int>(m, 1)));
    lapack_int info = LAPACKE_dgesdd_work(LAPACK_COL_MAJOR, job, t.kb, t.ka, w.core.data(), t.kb, s, u, t.kb, vt, m,
                                          &query, -1, iwork);
    check_lapack(info, "dgesdd");
    const auto lwork = static_cast<lapack_int>(query);
    info = LAPACKE_dgesdd_work(LAPACK_COL_MAJOR, job, t.kb, t.ka, w.core.data(), t.kb, s, u, t.kb, vt, m,
                               sized(w.dwork, static_cast<std::size_t>(std::max<lapack_int>(lwork, 1))), lwork, iwork);
    if (info > 0) {
        // Divide and conquer occasionally fails to converge; the QR-iteration driver is the fallback.
        std::copy(backup.begin(), backup.end(), w.core.begin());
        std::vector<double> superb(static_cast<std::size_t>(std::max<lapack_int>(m, 2)));
        info = LAPACKE_dgesvd(LAPACK_COL_MAJOR, job, job, t.kb, t.ka, w.core.data(), t.kb, s, u, t.kb, vt, m,
                              superb.data());
        check_lapack(info, "dgesvd");
    } else {
        check_lapack(info, "dgesdd");
    }
    return m;
}

}  // namespace

std::vector<double> factored_singular_values_householder(std::span<const LowRankTerm> terms, Workspace& workspace) {
    auto& w = workspace.impl();
    const Stacked s = stack_terms(terms, w);
    const Triangles t = factorise(s, w);
    form_core(t, s.in, w);
    const lapack_int m = core_svd(t, false, w);
    return std::vector<double>(w.s.begin(), w.s.begin() + m);
}

FactoredSvd factored_svd_householder(std::span<const LowRankTerm> terms, std::int64_t keep, Workspace& workspace) {
    auto& w = workspace.impl();
    const Stacked s = stack_terms(terms, w);
    const Triangles t = factorise(s, w);
    form_core(t, s.in, w);
    const lapack_int m = core_svd(t, true, w);
    FactoredSvd result;
    result.out = s.out;
    result.in = s.in;
    result.singular_values.assign(w.s.begin(), w.s.begin() + m);
    const lapack_int k = keep <= 0 ? m : static_cast<lapack_int>(std::min<std::int64_t>(keep, m));
    result.kept = k;
    const lapack_int out = static_cast<lapack_int>(s.out), in = static_cast<lapack_int>(s.in);

    // Q of the LQ factorisation (kb x out, rows orthonormal) and Q_a (in x ka), in place.
    float* work = w.work.data();
    const auto lwork = static_cast<lapack_int>(w.work.size());
    float query = 0;
    check_lapack(LAPACKE_sorglq_work(LAPACK_COL_MAJOR, t.kb, out, t.kb, w.b.data(), t.R, w.tau_b.data(), &query, -1),
                 "sorglq");
    lapack_int need = static_cast<lapack_int>(query);
    check_lapack(LAPACKE_sorgqr_work(LAPACK_COL_MAJOR, in, t.ka, t.ka, w.a.data(), in, w.tau_a.data(), &query, -1),
                 "sorgqr");
    need = std::max(need, static_cast<lapack_int>(query));
    if (need > lwork) work = sized(w.work, static_cast<std::size_t>(need));
    check_lapack(LAPACKE_sorglq_work(LAPACK_COL_MAJOR, t.kb, out, t.kb, w.b.data(), t.R, w.tau_b.data(), work,
                                     std::max(need, lwork)),
                 "sorglq");
    check_lapack(LAPACKE_sorgqr_work(LAPACK_COL_MAJOR, in, t.ka, t.ka, w.a.data(), in, w.tau_a.data(), work,
                                     std::max(need, lwork)),
                 "sorgqr");

    // U (out x k, row-major = column-major k x out) = U_cᵀ(k x kb) · Q(kb x out).
    float* uc = sized(w.small, static_cast<std::size_t>(t.kb) * k + static_cast<std::size_t>(t.ka) * k);
    for (lapack_int j = 0; j < k; ++j)
        for (lapack_int i = 0; i < t.kb; ++i)
            uc[i + static_cast<std::size_t>(j) * t.kb] = static_cast<float>(w.u[i + static_cast<std::size_t>(j) * t.kb]);
    // V_c (ka x k) = (Vᵀ)ᵀ rows 0..k.
    float* vc = uc + static_cast<std::size_t>(t.kb) * k;
    for (lapack_int j = 0; j < k; ++j)
        for (lapack_int i = 0; i < t.ka; ++i)
            vc[i + static_cast<std::size_t>(j) * t.ka] = static_cast<float>(w.vt[j + static_cast<std::size_t>(i) * m]);
    result.u.resize(static_cast<std::size_t>(out) * k);
    result.v.resize(static_cast<std::size_t>(in) * k);
    cblas_sgemm(cblas_col_major, cblas_trans, cblas_no_trans, k, out, t.kb, 1.0f, uc, t.kb, w.b.data(), t.R, 0.0f,
                result.u.data(), k);
    // V (in x k, row-major = column-major k x in) = V_cᵀ(k x ka) · Q_aᵀ(ka x in).
    cblas_sgemm(cblas_col_major, cblas_trans, cblas_trans, k, in, t.ka, 1.0f, vc, t.ka, w.a.data(), in, 0.0f,
                result.v.data(), k);
    return result;
}

void symmetric_eigen(std::vector<double>& vectors, std::int64_t size, std::vector<double>& values) {
    const lapack_int n = to_lapack(size, "matrix size");
    values.resize(static_cast<std::size_t>(n));
    if (n == 0) return;
    const auto& small = detail::small_eigen_kernels();
    if (static_cast<std::size_t>(n) <= small.max_order) {
        // Small problems are latency-bound: LAPACKE_dsyevd allocates and checks per call, and
        // Eigen's solver runs two doubles at a time in the portable build. lorakit's own
        // (small_eigen.h) took 47-59 us at n = 32 with AVX-512 against Eigen's 90-130 and
        // dsyevd's 150, and 1027 against dsyevd's 1314 at n = 96. It wants both triangles:
        // mirror the upper one (what dsyevd reads) into the lower.
        const auto size = static_cast<std::size_t>(n);
        double* a = vectors.data();
        for (std::size_t j = 0; j < size; ++j)
            for (std::size_t i = 0; i < j; ++i) a[j + i * size] = a[i + j * size];
        thread_local std::vector<double> scratch;
        if (scratch.size() < detail::small_eigen_scratch(size)) scratch.resize(detail::small_eigen_scratch(size));
        if (!small.eigen(a, size, values.data(), true, scratch.data()))
            fail(ErrorCode::internal, "symmetric eigensolver did not converge (n = {})", n);
        return;  // descending already
    }
    check_lapack(LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'U', n, vectors.data(), n, values.data()), "dsyevd");
    // dsyevd sorts ascending; reverse columns and values.
    std::reverse(values.begin(), values.end());
    for (lapack_int j = 0; j < n / 2; ++j)
        std::swap_ranges(vectors.begin() + static_cast<std::ptrdiff_t>(j) * n, vectors.begin() + static_cast<std::ptrdiff_t>(j + 1) * n,
                         vectors.begin() + static_cast<std::ptrdiff_t>(n - 1 - j) * n);
}

void stacked_grams(std::span<const LowRankTerm> terms, Workspace& workspace, std::vector<double>& gram_b,
                   std::vector<double>& gram_a) {
    // In f32 (each chunk's sums; the chunks add up in double): these Grams feed reports (norms,
    // cosines, spectral norms), where that accuracy (~1e-7 relative) is ample and twice the
    // speed of double matters (lora-stack spends most of its time here). A cache-sized chunk of
    // stacked rows at a time, converted from the factors as stored straight into the kernel's
    // row layout: no full-size stacks, and no second pass over them (OpenBLAS's ssyrk packed a
    // copy of each: 10% of a report, and the conversion into the stacks 15%). B is stacked
    // without its coefficients; they scale G_b in double.
    auto& w = workspace.impl();
    const Stacked s = check_terms(terms);
    const lapack_int R = to_lapack(s.total_rank, "total rank");
    to_lapack(s.out, "output size");
    to_lapack(s.in, "input size");
    const auto RR = static_cast<std::size_t>(R);
    const auto out = static_cast<std::size_t>(s.out), in = static_cast<std::size_t>(s.in);
    const auto& kernels = detail::gram_kernels();
    const std::size_t ld = kernels.stride_f32(RR), chunk = kernels.chunk_f32(ld);
    double* gb = sized(w.grams, 2 * ld * ld);
    double* ga = gb + ld * ld;
    std::fill_n(gb, 2 * ld * ld, 0.0);
    float* scratch = sized(w.small, ld * ld);
    // The kernels' rows: written on [0, R) only, so the pad stays zero.
    float* rows = sized(w.b, chunk * ld);
    std::fill_n(rows, chunk * ld, 0.0f);
    // G_b: rows o of [B_1 ... B_k], each term's block of rows converted at once and spread out.
    for (std::size_t o0 = 0; o0 < out; o0 += chunk) {
        const std::size_t count = std::min(chunk, out - o0);
        std::size_t column = 0;
        for (const auto& t : terms) {
            const auto r = static_cast<std::size_t>(t.rank);
            float* block = sized(w.rows, count * r);
            widen(t.b_type, t.b, o0 * r, count * r, block);
            for (std::size_t o = 0; o < count; ++o) std::copy_n(block + o * r, r, rows + o * ld + column);
            column += r;
        }
        kernels.accumulate_rows_f32(rows, count, RR, ld, gb, scratch);
    }
    // G_a: columns j of [A_1; ...; A_k], converted as R x count row-major blocks.
    float* block = sized(w.a, RR * chunk);
    for (std::size_t j0 = 0; j0 < in; j0 += chunk) {
        const std::size_t count = std::min(chunk, in - j0);
        std::size_t row = 0;
        for (const auto& t : terms)
            for (std::int64_t k = 0; k < t.rank; ++k, ++row)
                widen(t.a_type, t.a, static_cast<std::size_t>(k) * in + j0, count, block + row * chunk);
        kernels.accumulate_columns_f32(block, chunk, RR, count, ld, ga, rows, scratch);
    }
    double* coefficient = sized(w.coefficients, RR);
    std::size_t column = 0;
    for (const auto& t : terms)
        for (std::int64_t k = 0; k < t.rank; ++k) coefficient[column++] = t.coefficient;
    // Every entry is written below (both triangles): no zero-fill first.
    gram_b.resize(RR * RR);
    gram_a.resize(RR * RR);
    for (std::size_t j = 0; j < RR; ++j)
        for (std::size_t i = 0; i <= j; ++i) {
            const std::size_t upper = i + j * RR, lower = j + i * RR, at = i + j * ld;
            if (!std::isfinite(gb[at]) || !std::isfinite(ga[at]))
                fail(ErrorCode::bad_input, "the factors hold NaN or infinite values");
            gram_b[upper] = gram_b[lower] = coefficient[i] * coefficient[j] * gb[at];
            gram_a[upper] = gram_a[lower] = ga[at];
        }
}

Stacks stack_factors(std::span<const LowRankTerm> terms, Workspace& workspace) {
    auto& w = workspace.impl();
    const Stacked s = stack_terms(terms, w, false);
    return {w.b.data(), w.a.data(), s.total_rank, s.out, s.in};
}

namespace {

// Chunk of stacked rows (or input columns) widened to double at a time: 256 KiB, so that the
// widened copy stays in cache between being written and being read by the Gram kernel.
std::size_t gram_chunk(lapack_int R) { return std::clamp<std::size_t>(32768 / static_cast<std::size_t>(R), 16, 4096); }

// Stacks the terms in f32 (as stack_terms) and accumulates the Gram matrices of the stacks in
// double on the way, chunk by chunk: G_b = BᵀB into w.gb and G_a = AAᵀ into w.ga, both R x R
// column-major with both triangles filled. One pass over the factors; no full-size double copy.
Stacked stack_with_grams(std::span<const LowRankTerm> terms, Workspace::Impl& w) {
    Stacked s = check_terms(terms);
    const lapack_int R = to_lapack(s.total_rank, "total rank");
    to_lapack(s.out, "output size");
    to_lapack(s.in, "input size");
    const auto RR = static_cast<std::size_t>(R);
    const auto out = static_cast<std::size_t>(s.out), in = static_cast<std::size_t>(s.in);
    // A lone f32 term with coefficient 1 (lora-resize) is its own stack: B (out x r row-major)
    // is the R x out array and A (r x in row-major) the in x R one, so it is read in place
    // instead of copied (a 7B-shaped f32 LoRA is 1.3 GB).
    const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % alignof(float) == 0; };
    const bool in_place = terms.size() == 1 && terms[0].coefficient == 1.0 && terms[0].b_type == DType::F32 &&
                          terms[0].a_type == DType::F32 && aligned(terms[0].b) && aligned(terms[0].a);
    float* b = in_place ? nullptr : sized(w.b, RR * out);
    float* a = in_place ? nullptr : sized(w.a, RR * in);
    s.b = in_place ? static_cast<const float*>(terms[0].b) : b;
    s.a = in_place ? static_cast<const float*>(terms[0].a) : a;
    // The Grams accumulate in ld x ld arrays (ld: the kernels' padded row length), compacted to
    // R x R at the end.
    const auto& kernels = detail::gram_kernels();
    const std::size_t ld = kernels.stride(RR);
    double* gb = sized(w.gb, ld * ld);
    double* ga = sized(w.ga, ld * ld);
    std::fill_n(gb, ld * ld, 0.0);
    std::fill_n(ga, ld * ld, 0.0);
    const std::size_t chunk = gram_chunk(R);
    double* wide = sized(w.wide, ld * chunk);
    // stack_rows leaves the pad columns of `wide` alone: zero.
    if (ld > RR && !in_place) std::fill_n(wide, ld * chunk, 0.0);
    // B: the R x out array (column o = row o of the stacked B), chunk of columns at a time,
    // widened into rows of ld doubles.
    for (std::size_t o0 = 0; o0 < out; o0 += chunk) {
        const std::size_t o1 = std::min(out, o0 + chunk);
        if (in_place) {
            kernels.widen_rows(s.b + o0 * RR, RR, o1 - o0, wide, ld);
        } else {
            std::size_t column = 0;
            for (const auto& t : terms) {
                stack_rows(t, o0, o1, column, RR, b, wide, ld, w.rows);
                column += static_cast<std::size_t>(t.rank);
            }
        }
        kernels.accumulate_rows(wide, o1 - o0, RR, ld, gb);
    }
    // A: the in x R array (column q = row q of the stacked A), chunk of rows at a time.
    for (std::size_t j0 = 0; j0 < in; j0 += chunk) {
        const std::size_t j1 = std::min(in, j0 + chunk), n = j1 - j0;
        if (!in_place) {
            std::size_t column = 0;
            for (const auto& t : terms)
                for (std::size_t k = 0; k < static_cast<std::size_t>(t.rank); ++k, ++column)
                    widen(t.a_type, t.a, k * in + j0, n, a + column * in + j0);
        }
        kernels.accumulate_columns(s.a + j0, in, RR, n, wide, ga);
    }
    if (ld > RR)
        for (std::size_t j = 0; j < RR; ++j) {
            std::memmove(gb + j * RR, gb + j * ld, RR * sizeof(double));
            std::memmove(ga + j * RR, ga + j * ld, RR * sizeof(double));
        }
    for (std::size_t j = 0; j < RR; ++j)
        for (std::size_t i = 0; i <= j; ++i) {
            const std::size_t upper = i + j * RR, lower = j + i * RR;
            if (!std::isfinite(gb[upper]) || !std::isfinite(ga[upper]))
                fail(ErrorCode::bad_input, "the factors hold NaN or infinite values");
            gb[lower] = gb[upper];
            ga[lower] = ga[upper];
        }
    return s;
}

// R such that RᵀR = G (R x R, column-major, upper triangle read): pivoted Cholesky (dpstrf)
// stopping at pivots below `relative_tolerance` times the largest diagonal entry (LAPACK's
// default, R·eps, when negative), so numerically rank-deficient Grams give fewer rows. `r`
// receives rank x R, column-major, columns in the original order; dpstrf's triangle stays in
// `g` (ld R) and its pivots in w.piv, for solves. Returns the rank.
lapack_int cholesky_r(double* g, lapack_int R, Workspace::Impl& w, std::vector<double>& r,
                      double relative_tolerance = -1.0) {
    lapack_int* piv = sized(w.piv, static_cast<std::size_t>(R));
    lapack_int rank = 0;
    double* work = sized(w.dwork, static_cast<std::size_t>(2 * R));
    double tolerance = -1.0;
    if (relative_tolerance >= 0) {
        double top = 0;
        for (lapack_int i = 0; i < R; ++i) top = std::max(top, g[static_cast<std::size_t>(i) * (R + 1)]);
        tolerance = relative_tolerance * top;
    }
    const lapack_int info = LAPACKE_dpstrf_work(LAPACK_COL_MAJOR, 'U', R, g, R, piv, &rank, tolerance, work);
    if (info < 0) check_lapack(info, "dpstrf");
    if (info == 0) rank = R;
    // Pᵀ G P = UᵀU, so G = (U Pᵀ)ᵀ (U Pᵀ): R factor = U with its columns put back in place.
    double* out = sized(r, static_cast<std::size_t>(rank) * R);
    std::fill(out, out + static_cast<std::size_t>(rank) * R, 0.0);
    for (lapack_int j = 0; j < R; ++j) {
        const std::size_t column = static_cast<std::size_t>(piv[j] - 1);
        for (lapack_int i = 0; i <= std::min(j, rank - 1); ++i) out[i + column * rank] = g[i + static_cast<std::size_t>(j) * R];
    }
    return rank;
}

// The decomposition behind factored_svd and factored_lora, from the Grams of stack_with_grams.
// With B P = Q_b [U11 U12] (pivoted Cholesky of G_b, rank t) and R_b = [U11 U12] Pᵀ, the sum is
// Q_b K with K = R_b A, whose Gram K Kᵀ = R_b G_a R_bᵀ = U_K Σ² U_Kᵀ gives the spectrum. Then
// U_k = B · X with X = P₁ U11⁻¹ U_K[:, :k] and V_k = Aᵀ · Y with Y = R_bᵀ U_K[:, :k] Σ_k⁻¹.
// Column j of X is scaled by x_scale(σ_j) and of Y by y_scale(σ_j); both are left in w.x and
// w.y (R x k each, column-major, double). Directions past the rank or below 1e-7 σ_1 are zero.
// Reads the Grams in w.gb (overwritten by the Cholesky factor) and w.ga. Everything here is
// R x R and in double; `expected` is the number of singular values the sum can have.
struct Solved {
    lapack_int R = 0, k = 0;
    std::int64_t wanted = 0;
    std::vector<double> values;
};

using Scale = double (*)(double sigma);

Solved solve_core(lapack_int R, std::size_t expected, const std::function<std::int64_t(const std::vector<double>&)>& keep,
                  Workspace::Impl& w, Scale x_scale, Scale y_scale, double relative_tolerance = -1.0) {
    Solved result;
    result.R = R;
    result.values.assign(expected, 0.0);
    const lapack_int t = cholesky_r(w.gb.data(), R, w, w.rb, relative_tolerance);
    const double* rb = w.rb.data();
    if (t > 0) {
        // H = G_a R_bᵀ (R x t), then K Kᵀ = R_b H (t x t).
        double* h = sized(w.gz, static_cast<std::size_t>(R) * t);
        cblas_dgemm(cblas_col_major, cblas_no_trans, cblas_trans, R, t, R, 1.0, w.ga.data(), R, rb, t, 0.0, h, R);
        w.kgram.resize(static_cast<std::size_t>(t) * t);
        cblas_dgemm(cblas_col_major, cblas_no_trans, cblas_no_trans, t, t, R, 1.0, rb, t, h, R, 0.0, w.kgram.data(), t);
        symmetric_eigen(w.kgram, t, w.mu);  // kgram now holds U_K
        for (lapack_int j = 0; j < t && static_cast<std::size_t>(j) < expected; ++j)
            result.values[static_cast<std::size_t>(j)] = std::sqrt(std::max(w.mu[static_cast<std::size_t>(j)], 0.0));
    }
    result.wanted = std::max<std::int64_t>(0, keep(result.values));
    const lapack_int k = static_cast<lapack_int>(std::min<std::int64_t>(result.wanted, static_cast<std::int64_t>(expected)));
    result.k = k;
    const lapack_int usable = std::min<lapack_int>(k, t);
    const auto Rk = static_cast<std::size_t>(R) * static_cast<std::size_t>(k);
    double* x = sized(w.x, Rk);
    double* y = sized(w.y, Rk);
    std::fill(x, x + Rk, 0.0);
    std::fill(y, y + Rk, 0.0);
    if (usable <= 0) return result;
    const double sigma_floor = result.values.front() * 1e-7;
    // C (t x k): U_K's first k columns, zero for numerically zero σ; Cy = C Σ⁻¹ scaled.
    double* cx = sized(w.z, 2 * static_cast<std::size_t>(t) * k);
    double* cy = cx + static_cast<std::size_t>(t) * k;
    const double* uk = w.kgram.data();
    for (lapack_int j = 0; j < k; ++j) {
        const double sigma = j < usable ? result.values[static_cast<std::size_t>(j)] : 0.0;
        const bool live = j < usable && sigma > sigma_floor;
        const double sx = live ? x_scale(sigma) : 0.0, sy = live ? y_scale(sigma) / sigma : 0.0;
        for (lapack_int c = 0; c < t; ++c) {
            // U_K has t columns; past them (k > t: a rank-deficient stack) the direction is empty.
            const double u = live ? uk[c + static_cast<std::size_t>(j) * t] : 0.0;
            cx[c + static_cast<std::size_t>(j) * t] = u * sx;
            cy[c + static_cast<std::size_t>(j) * t] = u * sy;
        }
    }
    // X = P₁ U11⁻¹ Cx: a triangular solve with dpstrf's U11 (still in w.gb, ld R), rows
    // scattered to their pivots.
    cblas_dtrsm(cblas_col_major, cblas_left, cblas_upper, cblas_no_trans, cblas_non_unit, t, k, 1.0, w.gb.data(), R, cx,
                t);
    const lapack_int* piv = w.piv.data();
    for (lapack_int j = 0; j < k; ++j)
        for (lapack_int i = 0; i < t; ++i)
            x[static_cast<std::size_t>(piv[i] - 1) + static_cast<std::size_t>(j) * R] = cx[i + static_cast<std::size_t>(j) * t];
    // Y = R_bᵀ Cy (R x k).
    cblas_dgemm(cblas_col_major, cblas_trans, cblas_no_trans, R, k, t, 1.0, rb, t, cy, t, 0.0, y, R);
    return result;
}

// The column-major rows x cols array m, row-major (into `buffer`).
const float* transposed(const float* m, std::size_t rows, std::size_t cols, std::vector<float>& buffer) {
    float* t = sized(buffer, rows * cols);
    for (std::size_t j = 0; j < cols; ++j)
        for (std::size_t i = 0; i < rows; ++i) t[i * cols + j] = m[i + j * rows];
    return t;
}

// solve_core on the Grams of stack_with_grams, with X and Y then in f32 (w.small: X then Y, R x k
// each) for the sgemms on the f32 stacks.
Solved solve_stack(const Stacked& s, const std::function<std::int64_t(const std::vector<double>&)>& keep,
                   Workspace::Impl& w, Scale x_scale, Scale y_scale) {
    const Solved solved = solve_core(static_cast<lapack_int>(s.total_rank),
                                     static_cast<std::size_t>(std::min({s.out, s.in, s.total_rank})), keep, w, x_scale,
                                     y_scale);
    const auto Rk = static_cast<std::size_t>(solved.R) * static_cast<std::size_t>(solved.k);
    float* xf = sized(w.small, 2 * Rk);
    for (std::size_t i = 0; i < Rk; ++i) {
        xf[i] = static_cast<float>(w.x[i]);
        xf[Rk + i] = static_cast<float>(w.y[i]);
    }
    return solved;
}

}  // namespace

GramSvd gram_svd(std::span<const double> gram_b, std::span<const double> gram_a, std::int64_t R,
                 const std::function<std::int64_t(const std::vector<double>&)>& keep, double relative_tolerance,
                 Workspace& workspace) {
    const auto n = static_cast<std::size_t>(R);
    if (gram_b.size() != n * n || gram_a.size() != n * n)
        fail(ErrorCode::internal, "gram_svd: Grams of {} and {} values for R = {}", gram_b.size(), gram_a.size(), R);
    GramSvd result;
    if (R == 0) return result;
    auto& w = workspace.impl();
    w.gb.assign(gram_b.begin(), gram_b.end());
    w.ga.assign(gram_a.begin(), gram_a.end());
    const Scale one = [](double) { return 1.0; };
    const Solved solved = solve_core(to_lapack(R, "rank"), n, keep, w, one, one, relative_tolerance);
    result.singular_values = solved.values;
    result.k = solved.k;
    const auto Rk = n * static_cast<std::size_t>(solved.k);
    result.x.assign(w.x.begin(), w.x.begin() + static_cast<std::ptrdiff_t>(Rk));
    result.y.assign(w.y.begin(), w.y.begin() + static_cast<std::ptrdiff_t>(Rk));
    return result;
}

std::vector<double> factored_singular_values(std::span<const LowRankTerm> terms, Workspace& workspace) {
    // Values only: the R factors come from Gram matrices in double (+ pivoted Cholesky).
    // For f32 factors this is at least as accurate as Householder QR in f32 (the squared
    // condition number costs ~1e-16 relative, below the inputs' own rounding) and it runs at
    // BLAS-3 speed, several times faster than sgeqrf on tall-skinny factors.
    auto& w = workspace.impl();
    const Stacked s = stack_with_grams(terms, w);
    const lapack_int R = static_cast<lapack_int>(s.total_rank);
    const lapack_int rank_b = cholesky_r(w.gb.data(), R, w, w.rb);
    const lapack_int rank_a = cholesky_r(w.ga.data(), R, w, w.ra);
    const auto expected = static_cast<std::size_t>(std::min({s.out, s.in, s.total_rank}));
    std::vector<double> values(expected, 0.0);
    if (rank_b == 0 || rank_a == 0) return values;
    // core = R_b R_aᵀ (rank_b x rank_a).
    double* core = sized(w.core, static_cast<std::size_t>(rank_b) * rank_a);
    cblas_dgemm(cblas_col_major, cblas_no_trans, cblas_trans, rank_b, rank_a, R, 1.0, w.rb.data(), rank_b, w.ra.data(),
                rank_a, 0.0, core, rank_b);
    Triangles t;
    t.kb = rank_b;
    t.ka = rank_a;
    t.R = R;
    const lapack_int m = core_svd(t, false, w);
    for (lapack_int i = 0; i < m && static_cast<std::size_t>(i) < expected; ++i) values[i] = w.s[i];
    return values;
}

FactoredSvd factored_svd(std::span<const LowRankTerm> terms, const std::function<std::int64_t(const std::vector<double>&)>& keep,
                         Workspace& workspace) {
    auto& w = workspace.impl();
    const Stacked s = stack_with_grams(terms, w);
    const Scale one = [](double) { return 1.0; };
    const Solved solved = solve_stack(s, keep, w, one, one);
    FactoredSvd result;
    result.out = s.out;
    result.in = s.in;
    result.kept = solved.k;
    result.singular_values = solved.values;
    const lapack_int R = solved.R, k = solved.k;
    const auto out = static_cast<int>(s.out), in = static_cast<int>(s.in);
    result.u.resize(static_cast<std::size_t>(out) * k);
    result.v.resize(static_cast<std::size_t>(in) * k);
    if (k == 0) return result;
    const float* xf = w.small.data();
    const float* yf = xf + static_cast<std::size_t>(R) * k;
    // U (out x k, row-major = column-major k x out) = Xᵀ · B; V (in x k) = Yᵀ · Aᵀ. In f32 on the
    // f32 stacks: the result is f32 anyway, and X, Y carry the double-precision accuracy.
    cblas_sgemm(cblas_col_major, cblas_trans, cblas_no_trans, k, out, R, 1.0f, xf, R, s.b, R, 0.0f,
                result.u.data(), k);
    cblas_sgemm(cblas_col_major, cblas_trans, cblas_trans, k, in, R, 1.0f, yf, R, s.a, in, 0.0f, result.v.data(),
                k);
    return result;
}

FactoredSvd factored_svd(std::span<const LowRankTerm> terms, std::int64_t keep, Workspace& workspace) {
    return factored_svd(
        terms, [keep](const std::vector<double>& values) {
            const auto all = static_cast<std::int64_t>(values.size());
            return keep <= 0 ? all : std::min(keep, all);
        },
        workspace);
}

FactoredLora factored_lora(std::span<const LowRankTerm> terms,
                           const std::function<std::int64_t(const std::vector<double>&)>& keep, bool balanced,
                           Workspace& workspace, std::vector<float>& up, std::vector<float>& down) {
    auto& w = workspace.impl();
    const Stacked s = stack_with_grams(terms, w);
    // up = U·Σ and down = Vᵀ, or √Σ on each side.
    const Scale root = [](double sigma) { return std::sqrt(sigma); }, same = [](double sigma) { return sigma; },
                one = [](double) { return 1.0; };
    const Solved solved = balanced ? solve_stack(s, keep, w, root, root) : solve_stack(s, keep, w, same, one);
    FactoredLora result;
    result.out = s.out;
    result.in = s.in;
    result.kept = solved.k;
    result.rank = solved.wanted;
    result.singular_values = solved.values;
    const lapack_int R = solved.R, k = solved.k;
    const auto out = static_cast<std::size_t>(s.out), in = static_cast<std::size_t>(s.in);
    const auto width = static_cast<std::size_t>(solved.wanted);
    // Resized, not cleared: every value is written below (a reused buffer keeps its capacity).
    up.resize(out * width);
    down.resize(width * in);
    if (width == 0) return result;
    const float* xf = w.small.data();
    const float* yf = xf + static_cast<std::size_t>(R) * k;
    if (k > 0) {
        const auto& kernels = detail::gram_kernels();
        const auto RR = static_cast<std::size_t>(R), kk = static_cast<std::size_t>(k);
        float* scratch = sized(w.panel, RR * 64);
        // up (out x width, row-major): its first k columns = B · X.
        kernels.product(out, kk, RR, s.b, RR, 1, transposed(xf, RR, kk, w.transposed), kk, up.data(), width, scratch);
        // down (width x in, row-major): its first k rows = Yᵀ · A.
        kernels.product(kk, in, RR, yf, RR, 1, s.a, in, down.data(), in, scratch);
    }
    if (width > static_cast<std::size_t>(k)) {
        for (std::size_t o = 0; o < out; ++o) std::fill(up.data() + o * width + k, up.data() + (o + 1) * width, 0.0f);
        std::fill(down.data() + static_cast<std::size_t>(k) * in, down.data() + width * in, 0.0f);
    }
    return result;
}

void split_factors(const std::vector<float>& u, const std::vector<double>& singular_values, const std::vector<float>& v,
                   std::int64_t out, std::int64_t in, std::int64_t kept, std::int64_t k, bool balanced,
                   std::vector<float>& up, std::vector<float>& down) {
    const std::int64_t n = std::min(k, kept);
    up.assign(static_cast<std::size_t>(out * k), 0.0f);
    down.assign(static_cast<std::size_t>(k * in), 0.0f);
    std::vector<float> up_scale(static_cast<std::size_t>(n)), down_scale(static_cast<std::size_t>(n));
    for (std::int64_t j = 0; j < n; ++j) {
        const double sv = singular_values[static_cast<std::size_t>(j)];
        up_scale[static_cast<std::size_t>(j)] = static_cast<float>(balanced ? std::sqrt(sv) : sv);
        down_scale[static_cast<std::size_t>(j)] = static_cast<float>(balanced ? std::sqrt(sv) : 1.0);
    }
    for (std::int64_t o = 0; o < out; ++o) {
        const float* from = u.data() + o * kept;
        float* to = up.data() + o * k;
        for (std::int64_t j = 0; j < n; ++j) to[j] = from[j] * up_scale[static_cast<std::size_t>(j)];
    }
    // V is in x kept: transpose it in blocks of rows so that reads and writes stay in cache.
    constexpr std::int64_t block = 64;
    for (std::int64_t i0 = 0; i0 < in; i0 += block) {
        const std::int64_t i1 = std::min(in, i0 + block);
        for (std::int64_t j = 0; j < n; ++j) {
            float* to = down.data() + j * in;
            const float scale = down_scale[static_cast<std::size_t>(j)];
            for (std::int64_t i = i0; i < i1; ++i) to[i] = v[static_cast<std::size_t>(i * kept + j)] * scale;
        }
    }
}

std::vector<double> dense_singular_values(const float* matrix, std::int64_t rows, std::int64_t cols) {
    // Row-major rows x cols is column-major cols x rows: the same singular values.
    const lapack_int m = to_lapack(cols, "columns"), n = to_lapack(rows, "rows");
    std::vector<double> a(static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols));
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = matrix[i];
    std::vector<double> s(static_cast<std::size_t>(std::min(m, n)));
    check_lapack(LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'N', m, n, a.data(), m, s.data(), nullptr, 1, nullptr, 1), "dgesdd");
    return s;
}

// OpenBLAS starts its worker threads when it is loaded and whenever its thread count is set;
// lorakit calls BLAS single-threaded from its own workers almost everywhere, and a spinning idle
// worker competed with them (and, after parallel_for restored the count, with a merge's writing
// and hashing: 5952 sched_yield calls in a 3-LoRA merge, 238 with the pool stopped).
void stop_blas_pool() noexcept {
    if (blas_thread_shutdown_) blas_thread_shutdown_();
}

void set_blas_threads(int threads) noexcept {
    openblas_set_num_threads(static_cast<int>(detail::worker_count(threads)));
    stop_blas_pool();
}
int blas_threads() noexcept { return openblas_get_num_threads(); }

}  // namespace lorakit::linalg
