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
#include <thread>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "lorakit/error.h"

extern "C" {
// OpenBLAS's thread control (declared here: the right cblas.h depends on the BLAS variant).
void openblas_set_num_threads(int threads);
int openblas_get_num_threads(void);
// CBLAS routines (from libopenblas).
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
void cblas_ssyrk(int layout, int uplo, int trans, int n, int k, float alpha, const float* a, int lda, float beta,
                 float* c, int ldc);
void cblas_dsyrk(int layout, int uplo, int trans, int n, int k, double alpha, const double* a, int lda, double beta,
                 double* c, int ldc);
void cblas_dgemm(int layout, int trans_a, int trans_b, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc);
}
#include <functional>

namespace lorakit::linalg {

namespace {
constexpr int cblas_col_major = 102;
constexpr int cblas_no_trans = 111;
constexpr int cblas_trans = 112;
constexpr int cblas_upper = 121;
}  // namespace

struct Workspace::Impl {
    std::vector<float> b;       // R x out, column-major (= stacked B, row-major)
    std::vector<float> a;       // in x R, column-major (= stacked A, row-major)
    std::vector<float> tau_b, tau_a, work;
    std::vector<double> core;   // k_b x k_a, column-major
    std::vector<double> u, vt, s, dwork;
    std::vector<lapack_int> iwork;
    std::vector<float> small;   // float copies of the core's singular vectors
    std::vector<double> wide;   // a stacked factor widened to double (Gram route)
    std::vector<double> gram_b, gram_a, rb, ra;
    std::vector<lapack_int> piv;
    // The eigen route of factored_svd: kept across calls so that their pages are touched once.
    std::vector<double> bd, ad, gb, ga, z, gz, kgram, x, y, lambda, mu;
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
};

// Fills the workspace with [c_1 B_1 ... c_k B_k] and [A_1; ...; A_k], checking shapes.
Stacked stack_terms(std::span<const LowRankTerm> terms, Workspace::Impl& w) {
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
    const auto R = static_cast<std::size_t>(s.total_rank);
    const auto out = static_cast<std::size_t>(s.out);
    const auto in = static_cast<std::size_t>(s.in);
    float* b = sized(w.b, R * out);
    float* a = sized(w.a, R * in);
    std::size_t column = 0;
    for (const auto& t : terms) {
        const auto r = static_cast<std::size_t>(t.rank);
        const auto c = static_cast<float>(t.coefficient);
        // Row o of B_i lands in column o of the R x out array, rows column..column+r.
        for (std::size_t o = 0; o < out; ++o) {
            const float* src = t.b + o * r;
            float* dst = b + o * R + column;
            for (std::size_t k = 0; k < r; ++k) dst[k] = c * src[k];
        }
        // A_i's rows are the next r columns of the in x R array: one contiguous block.
        std::memcpy(a + column * in, t.a, r * in * sizeof(float));
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

// R such that RᵀR = XᵀX for the n x R column-major matrix X (ld = n) or, with `transposed`,
// for X = Yᵀ where Y is R x n column-major (ld = R): the R factor of X's thin QR, obtained by
// pivoted Cholesky of the Gram matrix in double. Returns its rank; `r` receives rank x R,
// column-major (ld = rank), columns in the original order.
lapack_int gram_r_factor(const float* x, lapack_int n, lapack_int R, bool transposed, Workspace::Impl& w,
                         std::vector<double>& gram, std::vector<double>& r) {
    const std::size_t count = static_cast<std::size_t>(n) * static_cast<std::size_t>(R);
    double* wide = sized(w.wide, count);
    for (std::size_t i = 0; i < count; ++i) wide[i] = x[i];
    double* g = sized(gram, static_cast<std::size_t>(R) * R);
    if (transposed) cblas_dsyrk(cblas_col_major, cblas_upper, cblas_no_trans, R, n, 1.0, wide, R, 0.0, g, R);
    else cblas_dsyrk(cblas_col_major, cblas_upper, cblas_trans, R, n, 1.0, wide, n, 0.0, g, R);
    for (std::size_t i = 0; i < static_cast<std::size_t>(R) * R; ++i)
        if (!std::isfinite(g[i])) fail(ErrorCode::bad_input, "the factors hold NaN or infinite values");
    lapack_int* piv = sized(w.piv, static_cast<std::size_t>(R));
    lapack_int rank = 0;
    double* work = sized(w.dwork, static_cast<std::size_t>(2 * R));
    // tol < 0: LAPACK's default, R * eps * max pivot; smaller pivots count as rank deficiency.
    const lapack_int info = LAPACKE_dpstrf_work(LAPACK_COL_MAJOR, 'U', R, g, R, piv, &rank, -1.0, work);
    if (info < 0) check_lapack(info, "dpstrf");
    if (info == 0) rank = R;
    // Pᵀ G P = UᵀU, so G = (U Pᵀ)ᵀ (U Pᵀ): R factor = U with its columns put back in place.
    double* out = sized(r, static_cast<std::size_t>(rank) * R);
    std::fill(out, out + static_cast<std::size_t>(rank) * R, 0.0);
    for (lapack_int j = 0; j < R; ++j) {
        const std::size_t column = static_cast<std::size_t>(piv[j] - 1);
        for (lapack_int i = 0; i <= std::min(j, rank - 1); ++i)
            out[i + column * rank] = g[i + static_cast<std::size_t>(j) * R];
    }
    return rank;
}

}  // namespace

std::vector<double> factored_singular_values(std::span<const LowRankTerm> terms, Workspace& workspace) {
    // Values only: the R factors come from Gram matrices in double (dsyrk + pivoted Cholesky).
    // For f32 factors this is at least as accurate as Householder QR in f32 (the squared
    // condition number costs ~1e-16 relative, below the inputs' own rounding) and it runs at
    // BLAS-3 speed, several times faster than sgeqrf on tall-skinny factors.
    auto& w = workspace.impl();
    const Stacked s = stack_terms(terms, w);
    const lapack_int R = to_lapack(s.total_rank, "total rank");
    const lapack_int out = to_lapack(s.out, "output size"), in = to_lapack(s.in, "input size");
    const lapack_int rank_b = gram_r_factor(w.b.data(), out, R, true, w, w.gram_b, w.rb);
    const lapack_int rank_a = gram_r_factor(w.a.data(), in, R, false, w, w.gram_a, w.ra);
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
    check_lapack(LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'U', n, vectors.data(), n, values.data()), "dsyevd");
    // dsyevd sorts ascending; reverse columns and values.
    std::reverse(values.begin(), values.end());
    for (lapack_int j = 0; j < n / 2; ++j)
        std::swap_ranges(vectors.begin() + static_cast<std::ptrdiff_t>(j) * n, vectors.begin() + static_cast<std::ptrdiff_t>(j + 1) * n,
                         vectors.begin() + static_cast<std::ptrdiff_t>(n - 1 - j) * n);
}

void stacked_grams(std::span<const LowRankTerm> terms, Workspace& workspace, std::vector<double>& gram_b,
                   std::vector<double>& gram_a) {
    // In f32 (ssyrk on the stacks as they are, no widened copies): these Grams feed reports
    // (norms, cosines, spectral norms), where f32 accumulation (~1e-7 relative) is ample and
    // twice the speed of double matters (lora-stack spends most of its time here).
    auto& w = workspace.impl();
    const Stacked s = stack_terms(terms, w);
    const lapack_int R = to_lapack(s.total_rank, "total rank");
    const lapack_int out = to_lapack(s.out, "output size"), in = to_lapack(s.in, "input size");
    const auto rr = static_cast<std::size_t>(R) * R;
    float* gb = sized(w.small, 2 * rr);
    float* ga = gb + rr;
    cblas_ssyrk(cblas_col_major, cblas_upper, cblas_no_trans, R, out, 1.0f, w.b.data(), R, 0.0f, gb, R);
    cblas_ssyrk(cblas_col_major, cblas_upper, cblas_trans, R, in, 1.0f, w.a.data(), in, 0.0f, ga, R);
    gram_b.assign(rr, 0.0);
    gram_a.assign(rr, 0.0);
    for (lapack_int j = 0; j < R; ++j)
        for (lapack_int i = 0; i <= j; ++i) {
            const std::size_t upper = i + static_cast<std::size_t>(j) * R, lower = j + static_cast<std::size_t>(i) * R;
            if (!std::isfinite(gb[upper]) || !std::isfinite(ga[upper]))
                fail(ErrorCode::bad_input, "the factors hold NaN or infinite values");
            gram_b[upper] = gram_b[lower] = gb[upper];
            gram_a[upper] = gram_a[lower] = ga[upper];
        }
}

FactoredSvd factored_svd(std::span<const LowRankTerm> terms, const std::function<std::int64_t(const std::vector<double>&)>& keep,
                         Workspace& workspace) {
    // B = Q_b Λ^½ Wᵀ from the eigendecomposition BᵀB = W Λ Wᵀ; then M = Q_b K with
    // K = Λ^½ Wᵀ A, whose Gram K Kᵀ = Λ^½ Wᵀ (A Aᵀ) W Λ^½ = U_K Σ² U_Kᵀ gives the spectrum.
    // U = B · W Λ^-½ U_K and V = Aᵀ · W Λ^½ U_K Σ^-1. Everything but two thin products is
    // R x R; all of it runs in double, so the f32 inputs' rounding dominates the error.
    auto& w = workspace.impl();
    const Stacked s = stack_terms(terms, w);
    const lapack_int R = to_lapack(s.total_rank, "total rank");
    const lapack_int out = to_lapack(s.out, "output size"), in = to_lapack(s.in, "input size");
    const auto rr = static_cast<std::size_t>(R) * R;
    double* bd = sized(w.bd, static_cast<std::size_t>(out) * R);
    double* ad = sized(w.ad, static_cast<std::size_t>(in) * R);
    for (std::size_t i = 0, n = static_cast<std::size_t>(out) * R; i < n; ++i) bd[i] = w.b[i];
    for (std::size_t i = 0, n = static_cast<std::size_t>(in) * R; i < n; ++i) ad[i] = w.a[i];
    double* gb = sized(w.gb, rr);
    double* ga = sized(w.ga, rr);
    // bd is R x out column-major (= stacked B row-major): G_b = bd·bdᵀ. ad is in x R: G_a = adᵀ·ad.
    cblas_dsyrk(cblas_col_major, cblas_upper, cblas_no_trans, R, out, 1.0, bd, R, 0.0, gb, R);
    cblas_dsyrk(cblas_col_major, cblas_upper, cblas_trans, R, in, 1.0, ad, in, 0.0, ga, R);
    for (std::size_t i = 0; i < rr; ++i)
        if (!std::isfinite(gb[i]) || !std::isfinite(ga[i])) fail(ErrorCode::bad_input, "the factors hold NaN or infinite values");
    for (lapack_int j = 0; j < R; ++j)
        for (lapack_int i = j + 1; i < R; ++i) ga[i + static_cast<std::size_t>(j) * R] = ga[j + static_cast<std::size_t>(i) * R];
    std::vector<double>& lambda = w.lambda;
    symmetric_eigen(w.gb, R, lambda);  // gb now holds W
    gb = w.gb.data();
    const double floor = std::max(lambda.front(), 0.0) * 1e-13;
    lapack_int t = 0;
    while (t < R && lambda[t] > floor && lambda[t] > 0) ++t;

    FactoredSvd result;
    result.out = s.out;
    result.in = s.in;
    const auto expected = static_cast<std::size_t>(std::min({s.out, s.in, s.total_rank}));
    result.singular_values.assign(expected, 0.0);
    if (t > 0) {
        // Z = W_t Λ_t^½ (R x t); K Kᵀ = Zᵀ G_a Z.
        double* z = sized(w.z, static_cast<std::size_t>(R) * t);
        double* gz = sized(w.gz, static_cast<std::size_t>(R) * t);
        for (lapack_int j = 0; j < t; ++j)
            for (lapack_int i = 0; i < R; ++i) z[i + static_cast<std::size_t>(j) * R] = gb[i + static_cast<std::size_t>(j) * R] * std::sqrt(lambda[j]);
        cblas_dgemm(cblas_col_major, cblas_no_trans, cblas_no_trans, R, t, R, 1.0, ga, R, z, R, 0.0, gz, R);
        w.kgram.resize(static_cast<std::size_t>(t) * t);
        cblas_dgemm(cblas_col_major, cblas_trans, cblas_no_trans, t, t, R, 1.0, z, R, gz, R, 0.0, w.kgram.data(), t);
        symmetric_eigen(w.kgram, t, w.mu);  // kgram now holds U_K
        for (lapack_int j = 0; j < t && static_cast<std::size_t>(j) < expected; ++j)
            result.singular_values[j] = std::sqrt(std::max(w.mu[j], 0.0));
    }
    const std::int64_t wanted = keep(result.singular_values);
    const lapack_int k = static_cast<lapack_int>(std::clamp<std::int64_t>(wanted, 0, static_cast<std::int64_t>(expected)));
    result.kept = k;
    result.u.assign(static_cast<std::size_t>(out) * k, 0.0f);
    result.v.assign(static_cast<std::size_t>(in) * k, 0.0f);
    const double sigma_floor = result.singular_values.empty() ? 0.0 : result.singular_values.front() * 1e-7;
    const lapack_int usable = std::min<lapack_int>(k, t);
    if (usable > 0) {
        // X = W_t Λ^-½ U_K[:, :k] and Y = W_t Λ^½ U_K[:, :k] Σ^-1 (R x k, column-major).
        // Scaled copies of U_K's first k columns (t x k each, zero for numerically zero σ),
        // then X = W_t · that and Y likewise, as two small dgemms.
        double* cx = sized(w.z, 2 * static_cast<std::size_t>(t) * k);
        double* cy = cx + static_cast<std::size_t>(t) * k;
        const double* uk = w.kgram.data();
        for (lapack_int j = 0; j < k; ++j) {
            const double sigma = j < usable ? result.singular_values[j] : 0.0;
            const bool live = j < usable && sigma > sigma_floor;  // else leave the direction empty
            for (lapack_int c = 0; c < t; ++c) {
                const double coefficient = live ? uk[c + static_cast<std::size_t>(j) * t] : 0.0;
                const double root = std::sqrt(lambda[c]);
                cx[c + static_cast<std::size_t>(j) * t] = live ? coefficient / root : 0.0;
                cy[c + static_cast<std::size_t>(j) * t] = live ? coefficient * root / sigma : 0.0;
            }
        }
        double* x = sized(w.x, static_cast<std::size_t>(R) * k);
        double* y = sized(w.y, static_cast<std::size_t>(R) * k);
        cblas_dgemm(cblas_col_major, cblas_no_trans, cblas_no_trans, R, k, t, 1.0, gb, R, cx, t, 0.0, x, R);
        cblas_dgemm(cblas_col_major, cblas_no_trans, cblas_no_trans, R, k, t, 1.0, gb, R, cy, t, 0.0, y, R);
        // U (out x k, row-major = column-major k x out) = Xᵀ · B; V (in x k) = Yᵀ · Aᵀ. These
        // two thin products are half the work; they run in f32 on the f32 stacks (the result
        // is f32 anyway, and the R x k coefficients carry the double-precision accuracy).
        float* xf = sized(w.small, 2 * static_cast<std::size_t>(R) * k);
        float* yf = xf + static_cast<std::size_t>(R) * k;
        for (std::size_t i = 0, n = static_cast<std::size_t>(R) * k; i < n; ++i) {
            xf[i] = static_cast<float>(x[i]);
            yf[i] = static_cast<float>(y[i]);
        }
        cblas_sgemm(cblas_col_major, cblas_trans, cblas_no_trans, k, out, R, 1.0f, xf, R, w.b.data(), R, 0.0f,
                    result.u.data(), k);
        cblas_sgemm(cblas_col_major, cblas_trans, cblas_trans, k, in, R, 1.0f, yf, R, w.a.data(), in, 0.0f,
                    result.v.data(), k);
    }
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

void set_blas_threads(int threads) noexcept {
    openblas_set_num_threads(threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}
int blas_threads() noexcept { return openblas_get_num_threads(); }

}  // namespace lorakit::linalg
