// Stability metrics of a stack of adapters, from the Gram matrices of their factors (see stack.h).
#include "lorakit/stack.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <span>

#include <fmt/format.h>

#include "lorakit/error.h"
#include "lorakit/linalg.h"
#include "lorakit/random.h"
#include "module_groups.h"
#include "select.h"
#include "gram_kernels.h"
#include "small_eigen.h"
#include "parallel.h"

extern "C" {
void cblas_dgemm(int layout, int trans_a, int trans_b, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc);
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
}

namespace lorakit {

namespace {

constexpr int col_major = 102, no_trans = 111, trans = 112;

using Matrix = std::vector<double>;  // column-major

using Member = detail::ModuleRef;

// `count` entries of a factor stored as `type`, from element `first` on, as f32.
void read_f32(DType type, const void* factor, std::size_t first, std::size_t count, float* dst) {
    convert_to_f32(type, static_cast<const std::byte*>(factor) + first * dtype_size(type), dst, count);
}

// Entries first + index[j] (j < count) of a factor stored as `type`, as f32: one element at a
// time, so the common types are converted inline (convert_to_f32 per element cost 6% of a report).
void gather_f32(DType type, const void* factor, std::size_t first, const std::int64_t* index, std::size_t count,
                float* dst) {
    const auto* bytes = static_cast<const std::byte*>(factor);
    auto at = [&](std::size_t j) { return first + static_cast<std::size_t>(index[j]); };
    switch (type) {
    case DType::F32:
        for (std::size_t j = 0; j < count; ++j) std::memcpy(dst + j, bytes + at(j) * 4, 4);
        return;
    case DType::F16:
    case DType::BF16:
        for (std::size_t j = 0; j < count; ++j) {
            std::uint16_t bits;
            std::memcpy(&bits, bytes + at(j) * 2, 2);
            dst[j] = type == DType::F16 ? f16_to_f32(bits) : bf16_to_f32(bits);
        }
        return;
    default:
        for (std::size_t j = 0; j < count; ++j) read_f32(type, factor, at(j), 1, dst + j);
    }
}

// Column-major block of an R x R matrix: rows [r0, r0 + m), columns [c0, c0 + n).
Matrix block(const Matrix& g, std::int64_t R, std::int64_t r0, std::int64_t m, std::int64_t c0, std::int64_t n) {
    Matrix b(static_cast<std::size_t>(m * n));
    for (std::int64_t j = 0; j < n; ++j)
        for (std::int64_t i = 0; i < m; ++i)
            b[static_cast<std::size_t>(i + j * m)] = g[static_cast<std::size_t>((r0 + i) + (c0 + j) * R)];
    return b;
}

// C = Aᵀ · G · B for column-major A (n x p), G (n x m), B (m x q): p x q.
Matrix sandwich(const Matrix& a, std::int64_t n, std::int64_t p, const Matrix& g, std::int64_t m, const Matrix& b,
                std::int64_t q) {
    Matrix gb(static_cast<std::size_t>(n * q)), c(static_cast<std::size_t>(p * q));
    if (n == 0 || p == 0 || q == 0) return c;
    const int ni = static_cast<int>(n), pi = static_cast<int>(p), mi = static_cast<int>(m), qi = static_cast<int>(q);
    cblas_dgemm(col_major, no_trans, no_trans, ni, qi, mi, 1.0, g.data(), ni, b.data(), mi, 0.0, gb.data(), ni);
    cblas_dgemm(col_major, trans, no_trans, pi, qi, ni, 1.0, a.data(), ni, gb.data(), ni, 0.0, c.data(), pi);
    return c;
}

// The SVD of one adapter's D = B·A from its Gram blocks (linalg::gram_svd): σ (descending) and
// the coefficient matrices X, Y (r x k) with U_k = B·X and V_k = Aᵀ·Y of its top singular
// subspaces, k the fewest directions holding `energy` of Σσ² (numerically zero ones dropped).
linalg::GramSvd adapter_spectrum(const Matrix& gb, const Matrix& ga, std::int64_t r, double energy) {
    thread_local linalg::Workspace workspace;
    const auto keep = [energy](const std::vector<double>& sigma) -> std::int64_t {
        double total = 0;
        for (double v : sigma) total += v * v;
        if (!(total > 0)) return 0;
        std::int64_t k = 0;
        double sum = 0;
        const auto size = static_cast<std::int64_t>(sigma.size());
        for (; k < size && sum < energy * total; ++k) sum += sigma[static_cast<std::size_t>(k)] * sigma[static_cast<std::size_t>(k)];
        while (k > 1 && sigma[static_cast<std::size_t>(k - 1)] <= sigma.front() * 1e-7) --k;
        return k;
    };
    // Pivots below 1e-13 of the largest count as rank deficiency (the Grams are accumulated in f32).
    return linalg::gram_svd(gb, ga, r, keep, 1e-13, workspace);
}

// The largest eigenvalue of the symmetric tridiagonal matrix (diagonal, off): Newton's method on
// det(T - λI) from the Gershgorin bound, which for a polynomial with real roots descends
// monotonically onto the largest one: a few O(n) steps instead of the whole spectrum.
double largest_tridiagonal_eigenvalue(const std::vector<double>& diagonal, const std::vector<double>& off) {
    const std::size_t n = diagonal.size();
    auto e2 = [&](std::size_t i) { return i < off.size() ? off[i] * off[i] : 0.0; };
    double lambda = -std::numeric_limits<double>::infinity();
    for (std::size_t i = 0; i < n; ++i)
        lambda = std::max(lambda, diagonal[i] + (i > 0 && i - 1 < off.size() ? std::abs(off[i - 1]) : 0.0) +
                                      (i < off.size() ? std::abs(off[i]) : 0.0));
    for (int iteration = 0; iteration < 500; ++iteration) {
        // q_i = d_i - λ - e_{i-1}² / q_{i-1} (all negative above the spectrum) and the
        // derivative of log|det| = Σ q_i' / q_i, with q_i' = -1 + e_{i-1}² q_{i-1}' / q_{i-1}².
        double q = 0, dq = 0, ratio = 0;
        bool singular = false;
        for (std::size_t i = 0; i < n; ++i) {
            const double e = i > 0 ? e2(i - 1) : 0.0;
            const double next = diagonal[i] - lambda - (i > 0 ? e / q : 0.0);
            const double dnext = -1.0 + (i > 0 ? e * dq / (q * q) : 0.0);
            q = next;
            dq = dnext;
            if (q == 0) {
                singular = true;
                break;
            }
            ratio += dq / q;
        }
        if (singular || !(ratio > 0)) break;  // λ is (numerically) the top eigenvalue
        const double step = 1.0 / ratio;
        lambda -= step;
        if (step <= 1e-15 * std::abs(lambda)) break;
    }
    return lambda;
}

// The largest singular value of a small column-major rows x cols matrix: the square root of
// the top eigenvalue of its smaller Gram (tridiagonalised, then the top root alone).
double top_singular_value(const Matrix& m, std::int64_t rows, std::int64_t cols) {
    if (cols == 0 || rows == 0) return 0.0;
    const bool wide = cols > rows;
    const auto size = static_cast<int>(wide ? rows : cols);
    Matrix g(static_cast<std::size_t>(size) * size);  // mᵀm, or m mᵀ when that is smaller
    if (wide)
        cblas_dgemm(col_major, no_trans, trans, size, size, static_cast<int>(cols), 1.0, m.data(), static_cast<int>(rows),
                    m.data(), static_cast<int>(rows), 0.0, g.data(), size);
    else
        cblas_dgemm(col_major, trans, no_trans, size, size, static_cast<int>(rows), 1.0, m.data(), static_cast<int>(rows),
                    m.data(), static_cast<int>(rows), 0.0, g.data(), size);
    // Householder tridiagonalisation (small_eigen.h: 8-12 us at n = 32 with AVX-512 against
    // LAPACKE_dsytrd's 34 and Eigen's 17), then the top root alone.
    thread_local std::vector<double> scratch;
    if (scratch.size() < detail::small_eigen_scratch(static_cast<std::size_t>(size)))
        scratch.resize(detail::small_eigen_scratch(static_cast<std::size_t>(size)));
    std::vector<double> diagonal(static_cast<std::size_t>(size)), off(static_cast<std::size_t>(size - 1));
    detail::small_eigen_kernels().tridiagonalize(g.data(), static_cast<std::size_t>(size), diagonal.data(), off.data(),
                                                 scratch.data());
    return std::sqrt(std::max(largest_tridiagonal_eigenvalue(diagonal, off), 0.0));
}

// λ_max(G_bw · G_a): the operator is self-adjoint in the inner product ⟨x, y⟩ = xᵀ G_a y, so
// Lanczos in that inner product (full reorthogonalisation) converges to it fast; with R <= 64
// steps it is exact. Returns ‖M‖_2² for M = Bw·A.
double top_eigenvalue(const Matrix& gbw, const Matrix& ga, std::int64_t R, std::uint64_t seed) {
    const std::int64_t steps = std::min<std::int64_t>(R, 64);
    // The matrix-vector products, dots and axpys on lorakit's kernels where the CPU has AVX-512
    // (OpenBLAS's otherwise): OpenBLAS's dgemv took 5.9-6.6 us for R = 160 against 3.7-3.8, and
    // the ~2j dots and axpys per step below paid its per-call overhead.
    const auto& kernels = detail::gram_kernels();
    const auto size = static_cast<std::size_t>(R);
    auto mul = [&](const Matrix& g, const double* x, double* y) { kernels.matvec(g.data(), size, x, y); };
    // The largest eigenvalue of the tridiagonal matrix built so far.
    auto ritz = [](const std::vector<double>& diagonal, const std::vector<double>& off) {
        return largest_tridiagonal_eigenvalue(diagonal, off);
    };
    double previous = -1;
    // Vectorised dot and axpy: the reorthogonalisation below makes ~2j of each per step, and
    // plain loops (two doubles at a time in the portable build) were several times slower.
    auto dot = [&](const double* a, const double* b) { return kernels.dot(a, b, size); };
    Matrix q(static_cast<std::size_t>(R * (steps + 1))), g(static_cast<std::size_t>(R * (steps + 1)));
    std::vector<double> v(static_cast<std::size_t>(R)), alpha, beta;
    SplitMix64 random(seed);
    for (std::int64_t i = 0; i < R; ++i) q[static_cast<std::size_t>(i)] = random.uniform() + 1e-3;
    mul(ga, q.data(), g.data());
    double norm = std::sqrt(std::max(dot(q.data(), g.data()), 0.0));
    if (norm == 0) return 0;
    for (std::int64_t i = 0; i < R; ++i) {
        q[static_cast<std::size_t>(i)] /= norm;
        g[static_cast<std::size_t>(i)] /= norm;
    }
    double scale = 0;
    for (std::int64_t j = 0; j < steps; ++j) {
        const double* gj = g.data() + j * R;
        mul(gbw, gj, v.data());
        double a = 0;
        for (int pass = 0; pass < 2; ++pass)
            for (std::int64_t i = 0; i <= j; ++i) {
                const double h = dot(g.data() + i * R, v.data());
                if (i == j) a += h;
                kernels.axpy(size, -h, q.data() + i * R, v.data());
            }
        alpha.push_back(a);
        scale = std::max(scale, std::abs(a));
        if (j + 1 == steps) break;
        if (j >= 11 && j % 4 == 3) {
            // The top Ritz value converges long before the Krylov space fills up (it only grows
            // towards λ_max). 1e-9 relative is far below what the report prints and below the
            // f32-accumulated Grams' own accuracy (~1e-7); 1e-12 took ~10% more steps.
            const double top = ritz(alpha, beta);
            if (previous >= 0 && top - previous <= 1e-9 * std::abs(top)) break;
            previous = top;
        }
        double* qn = q.data() + (j + 1) * R;
        double* gn = g.data() + (j + 1) * R;
        mul(ga, v.data(), gn);
        const double b = std::sqrt(std::max(dot(v.data(), gn), 0.0));
        if (b <= 1e-13 * scale) break;
        beta.push_back(b);
        for (std::int64_t t = 0; t < R; ++t) {
            qn[t] = v[static_cast<std::size_t>(t)] / b;
            gn[t] /= b;
        }
    }
    return std::max(ritz(alpha, beta), 0.0);
}

// Comparisons with a relative tolerance, so that a stack scaled exactly to a threshold (by
// --auto-scale) is judged by the side it was scaled to.
bool above(double value, double threshold) { return value > threshold * (1 + 1e-9); }
bool at_least(double value, double threshold) { return value >= threshold * (1 - 1e-9); }

void judge(ModuleStack& m, const StackThresholds& th) {
    m.verdict = Verdict::ok;
    m.reasons.clear();
    auto raise = [&](Verdict v, std::string why) {
        m.verdict = std::max(m.verdict, v);
        m.reasons.push_back(std::move(why));
    };
    if (at_least(m.strength, th.strength_unstable))
        raise(Verdict::unstable, fmt::format("strength {:.3g} >= {}", m.strength, th.strength_unstable));
    else if (above(m.strength, th.strength_warn))
        raise(Verdict::warn, fmt::format("strength {:.3g} > {}", m.strength, th.strength_warn));
    if (m.base) {
        if (at_least(m.base->ratio, th.base_unstable))
            raise(Verdict::unstable, fmt::format("|dW|/|W| {:.3g} >= {}", m.base->ratio, th.base_unstable));
        else if (above(m.base->ratio, th.base_warn))
            raise(Verdict::warn, fmt::format("|dW|/|W| {:.3g} > {}", m.base->ratio, th.base_warn));
        if (m.base->overflow_count > 0)
            raise(Verdict::unstable, fmt::format("{} entries of W + dW exceed {} ({})", m.base->overflow_count,
                                                 m.base->limit, m.base->dtype));
    }
    double t = 1;
    if (m.strength > 0) t = std::min(t, th.strength_warn / m.strength);
    if (m.base) {
        if (m.base->ratio > 0) t = std::min(t, th.base_warn / m.base->ratio);
        t = std::min(t, m.base->overflow_factor);
    }
    m.ok_factor = t < 1 ? t * (1 - 1e-9) : 1.0;
}

// Row p of a base weight as f32: in place when it is aligned f32, widened into `buffer`
// (`in` values) otherwise.
const float* row_f32(const linalg::DenseView& w, std::int64_t p, std::vector<float>& buffer) {
    const auto in = static_cast<std::size_t>(w.cols);
    const std::byte* src = static_cast<const std::byte*>(w.data) + static_cast<std::size_t>(p) * in * dtype_size(w.dtype);
    if (w.dtype == DType::F32 && reinterpret_cast<std::uintptr_t>(src) % alignof(float) == 0)
        return reinterpret_cast<const float*>(src);
    convert_to_f32(w.dtype, src, buffer.data(), in);
    return buffer.data();
}

// The norms both overflow screens bound |ΔW_pq| with: ‖(Bw)_p‖² for each row p of Bw = [w_1 s_1
// B_1 ... w_n s_n B_n], and max_q ‖A_q‖² over the columns of the stacked A, from the factors as
// stored; |ΔW_pq| = |(Bw)_p · A_q| <= ‖(Bw)_p‖ ‖A_q‖ (Cauchy–Schwarz).
struct FactorNorms {
    const std::vector<double>& row_squares;  // thread-local: valid until the next call on this thread
    double column_max_squared = 0;
    double entry_bound() const {
        double row_max = 0;
        for (double v : row_squares) row_max = std::max(row_max, v);
        return std::sqrt(row_max) * std::sqrt(column_max_squared);
    }
};

FactorNorms factor_norms(const std::vector<linalg::LowRankTerm>& terms, const std::vector<Member>& members, std::int64_t out,
                         std::int64_t in) {
    thread_local std::vector<float> buffer;  // only grows
    thread_local std::vector<double> rows, columns;
    rows.assign(static_cast<std::size_t>(out), 0.0);
    columns.assign(static_cast<std::size_t>(in), 0.0);
    for (std::size_t i = 0; i < terms.size(); ++i) {
        const linalg::LowRankTerm& t = terms[i];
        const auto r = static_cast<std::size_t>(t.rank);
        const double c = members[i].weight * t.coefficient, c2 = c * c;
        const std::size_t b_count = static_cast<std::size_t>(out) * r, a_count = r * static_cast<std::size_t>(in);
        if (buffer.size() < std::max(b_count, a_count)) buffer.resize(std::max(b_count, a_count));
        convert_to_f32(t.b_type, static_cast<const std::byte*>(t.b), buffer.data(), b_count);
        for (std::size_t p = 0; p < static_cast<std::size_t>(out); ++p) {
            const float* x = buffer.data() + p * r;
            double sum[4] = {0, 0, 0, 0};  // four chains instead of one dependent sum
            std::size_t k = 0;
            for (; k + 4 <= r; k += 4)
                for (std::size_t u = 0; u < 4; ++u) sum[u] += static_cast<double>(x[k + u]) * x[k + u];
            for (; k < r; ++k) sum[0] += static_cast<double>(x[k]) * x[k];
            rows[p] += c2 * ((sum[0] + sum[1]) + (sum[2] + sum[3]));
        }
        convert_to_f32(t.a_type, static_cast<const std::byte*>(t.a), buffer.data(), a_count);
        for (std::size_t k = 0; k < r; ++k) {
            const float* x = buffer.data() + k * static_cast<std::size_t>(in);
            for (std::size_t q = 0; q < static_cast<std::size_t>(in); ++q) columns[q] += static_cast<double>(x[q]) * x[q];
        }
    }
    double column_max = 0;
    for (double v : columns) column_max = std::max(column_max, v);
    return {rows, column_max};
}

// W + ΣΔW against the dtype's limit: a row whose bound max|W_p| + ‖b_p‖·max_q‖a_q‖ stays in
// range cannot overflow for any factor t in [0, 1]; the others are computed exactly.
void check_overflow(BaseStats& stats, const linalg::DenseView& w, const FactorNorms& norms, const std::vector<double>& bw,
                    std::span<const float> a, std::int64_t out, std::int64_t R, std::int64_t in) {
    const double amax = std::sqrt(norms.column_max_squared);
    std::vector<double> row(static_cast<std::size_t>(in));
    std::vector<float> widened(static_cast<std::size_t>(in));
    for (std::int64_t p = 0; p < out; ++p) {
        // max |W_p| on the stored values (a vectorised integer max over the bits of |x|; that
        // loop, portable SSE2 code on f32, was a fifth of a --base run). A non-finite row takes
        // the exact path (spectral_norm refuses such bases before this runs).
        const std::byte* stored = static_cast<const std::byte*>(w.data) +
                                  static_cast<std::size_t>(p) * static_cast<std::size_t>(in) * dtype_size(w.dtype);
        const double wmax = detail::gram_kernels().max_abs(stored, w.dtype, static_cast<std::size_t>(in));
        const double bound = wmax + std::sqrt(norms.row_squares[static_cast<std::size_t>(p)]) * amax;
        if (bound <= stats.limit) {
            stats.max_abs = std::max(stats.max_abs, bound);
            continue;
        }
        const float* wp = row_f32(w, p, widened);
        std::fill(row.begin(), row.end(), 0.0);
        for (std::int64_t k = 0; k < R; ++k) {
            const double b = bw[static_cast<std::size_t>(p * R + k)];
            if (b == 0) continue;
            const float* ak = a.data() + k * in;
            for (std::int64_t q = 0; q < in; ++q) row[static_cast<std::size_t>(q)] += b * ak[q];
        }
        for (std::int64_t q = 0; q < in; ++q) {
            const double base = wp[q], d = row[static_cast<std::size_t>(q)], sum = base + d;
            stats.max_abs = std::max(stats.max_abs, std::abs(sum));
            if (std::abs(sum) > stats.limit) {
                ++stats.overflow_count;
                const double t = d > 0 ? (stats.limit - base) / d : (stats.limit + base) / -d;
                stats.overflow_factor = std::min(stats.overflow_factor, std::max(t, 0.0) * (1 - 1e-9));
            }
        }
    }
}

ModuleStack analyse_module(const std::vector<Member>& members, const StackOptions& o, const BaseWeights* base,
                           std::uint64_t seed) {
    detail::check_same_base(members, "its delta depends on the base weight, which stacking does not model");
    const LoraModule& first = *members[0].module;
    const std::int64_t out = first.out_features(), in = first.flat_in_features();
    const std::size_t n = members.size();
    // The factors as stored: stacking widens them straight from the mapped inputs.
    std::vector<linalg::LowRankTerm> terms;
    std::vector<std::int64_t> offset(n + 1, 0);
    for (std::size_t i = 0; i < n; ++i) {
        const LoraModule& mi = *members[i].module;
        const std::int64_t r = mi.rank();
        terms.push_back({mi.up.view().bytes().data(), mi.down.view().bytes().data(), out, r, in, mi.scale(), mi.up.dtype(),
                         mi.down.dtype()});
        offset[i + 1] = offset[i] + r;
    }
    const std::int64_t R = offset[n];
    thread_local linalg::Workspace workspace;
    thread_local Matrix gb, ga, gbw;  // reused across modules (R x R doubles each)
    linalg::stacked_grams(terms, workspace, gb, ga);

    ModuleStack m;
    m.name = first.name;
    std::vector<linalg::GramSvd> spectra(n);
    std::vector<double> unit_fro(n), unit_spectral(n);
    for (std::size_t i = 0; i < n; ++i) {
        m.inputs.push_back(members[i].adapter);
        const std::int64_t r = offset[i + 1] - offset[i];
        const Matrix gbi = block(gb, R, offset[i], r, offset[i], r), gai = block(ga, R, offset[i], r, offset[i], r);
        double fro2 = 0;
        for (std::size_t t = 0; t < gbi.size(); ++t) fro2 += gbi[t] * gai[t];
        unit_fro[i] = std::sqrt(std::max(fro2, 0.0));
        spectra[i] = adapter_spectrum(gbi, gai, r, o.subspace_energy);
        unit_spectral[i] = spectra[i].singular_values.empty() ? 0.0 : spectra[i].singular_values.front();
        const double w = std::abs(members[i].weight);
        m.fro.push_back(w * unit_fro[i]);
        m.spectral.push_back(w * unit_spectral[i]);
    }

    // Sampled entries for the sign-conflict estimate, the same positions for every adapter: a
    // seeded grid of P rows x Q columns (P·Q ≈ samples), so the sampled values are one small
    // product B[rows, :] · A[:, columns] per adapter instead of scattered dot products.
    thread_local std::vector<std::vector<float>> samples;  // reused like as/bs; cleared per module
    samples.resize(std::max(samples.size(), n));
    for (auto& v : samples) v.clear();
    if (n > 1 && o.samples > 0) {
        SplitMix64 random(seed ^ 0x9e3779b97f4a7c15ULL);
        const std::int64_t p_count = std::min<std::int64_t>(out, std::max<std::int64_t>(1, std::llround(std::sqrt(static_cast<double>(o.samples)))));
        const std::int64_t q_count = std::min<std::int64_t>(in, std::max<std::int64_t>(1, o.samples / p_count));
        auto pick = [&](std::int64_t count, std::int64_t size) {
            // `count` distinct indices in [0, size): a partial Fisher–Yates shuffle.
            std::vector<std::int64_t> all(static_cast<std::size_t>(size));
            for (std::int64_t i = 0; i < size; ++i) all[static_cast<std::size_t>(i)] = i;
            for (std::int64_t i = 0; i < count; ++i)
                std::swap(all[static_cast<std::size_t>(i)],
                          all[static_cast<std::size_t>(i + static_cast<std::int64_t>(random.next() % static_cast<std::uint64_t>(size - i)))]);
            all.resize(static_cast<std::size_t>(count));
            return all;
        };
        // In increasing order: each row of A, and B's rows, are then read forwards (the gathers
        // below were a tenth of this function's time); the statistics do not depend on the order.
        auto rows = pick(p_count, out), columns = pick(q_count, in);
        std::sort(rows.begin(), rows.end());
        std::sort(columns.begin(), columns.end());
        std::vector<float> a_columns, b_rows;
        for (std::size_t i = 0; i < n; ++i) {
            const std::int64_t r = offset[i + 1] - offset[i];
            const float c = static_cast<float>(members[i].weight * terms[i].coefficient);  // B_i as stored, unscaled
            // The sampled entries straight from the factors as stored (the Grams keep no stacks).
            const linalg::LowRankTerm& t = terms[i];
            a_columns.resize(static_cast<std::size_t>(r * q_count));
            for (std::int64_t k = 0; k < r; ++k)
                gather_f32(t.a_type, t.a, static_cast<std::size_t>(k * in), columns.data(), static_cast<std::size_t>(q_count),
                           a_columns.data() + k * q_count);
            b_rows.resize(static_cast<std::size_t>(p_count * r));
            for (std::int64_t pi = 0; pi < p_count; ++pi)
                read_f32(t.b_type, t.b, static_cast<std::size_t>(rows[static_cast<std::size_t>(pi)] * r),
                         static_cast<std::size_t>(r), b_rows.data() + pi * r);
            // samples (p x q, row-major = column-major q x p) = c · B[rows, :] · A[:, columns].
            samples[i].resize(static_cast<std::size_t>(p_count * q_count));
            cblas_sgemm(col_major, no_trans, no_trans, static_cast<int>(q_count), static_cast<int>(p_count),
                        static_cast<int>(r), c, a_columns.data(), static_cast<int>(q_count), b_rows.data(),
                        static_cast<int>(r), 0.0f, samples[i].data(), static_cast<int>(q_count));
        }
    }
    auto top_threshold = [&](const std::vector<float>& values) {
        const auto keep = static_cast<std::size_t>(std::ceil(o.top_fraction * static_cast<double>(values.size())));
        if (keep == 0 || values.empty()) return std::numeric_limits<float>::infinity();
        return std::max(kth_largest_magnitude(values, keep), std::numeric_limits<float>::min());
    };
    // Per adapter and sampled entry: in its top set by magnitude (1/0), and negative (1/0); the
    // pair counts below are then branch-free byte arithmetic.
    std::vector<std::vector<std::uint8_t>> top(n), negative(n);
    for (std::size_t i = 0; i < n; ++i) {
        if (samples[i].empty()) continue;
        const float threshold = top_threshold(samples[i]);
        const std::size_t count = samples[i].size();
        top[i].resize(count);
        negative[i].resize(count);
        // Plain pointers: through the thread_local vector the compiler reloaded its address
        // (a TLS lookup) on every entry, since the byte stores might alias it.
        const float* values = samples[i].data();
        std::uint8_t *in_top = top[i].data(), *is_negative = negative[i].data();
        for (std::size_t s = 0; s < count; ++s) {
            in_top[s] = !(std::abs(values[s]) < threshold);
            is_negative[s] = values[s] < 0;
        }
    }

    double sum_fro2 = 0;
    for (std::size_t i = 0; i < n; ++i) sum_fro2 += members[i].weight * members[i].weight * unit_fro[i] * unit_fro[i];
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t j = i + 1; j < n; ++j) {
            PairStats p;
            p.first = members[i].adapter;
            p.second = members[j].adapter;
            const std::int64_t ri = offset[i + 1] - offset[i], rj = offset[j + 1] - offset[j];
            const Matrix gbij = block(gb, R, offset[i], ri, offset[j], rj), gaij = block(ga, R, offset[i], ri, offset[j], rj);
            double inner = 0;
            for (std::size_t t = 0; t < gbij.size(); ++t) inner += gbij[t] * gaij[t];
            sum_fro2 += 2 * members[i].weight * members[j].weight * inner;
            const double sign = (members[i].weight < 0) != (members[j].weight < 0) ? -1.0 : 1.0;
            if (unit_fro[i] > 0 && unit_fro[j] > 0) p.cosine = std::clamp(sign * inner / (unit_fro[i] * unit_fro[j]), -1.0, 1.0);
            const linalg::GramSvd &si = spectra[i], &sj = spectra[j];
            if (si.k > 0 && sj.k > 0) {
                auto overlap = [&](const Matrix& xi, const Matrix& g, const Matrix& xj, double& max_cos, double& phi) {
                    const Matrix c = sandwich(xi, ri, si.k, g, rj, xj, sj.k);
                    double f2 = 0;
                    for (double x : c) f2 += x * x;
                    phi = std::min(1.0, f2 / static_cast<double>(std::min(si.k, sj.k)));
                    max_cos = std::min(1.0, top_singular_value(c, si.k, sj.k));
                };
                overlap(si.x, gbij, sj.x, p.out_max_cosine, p.out_phi);
                overlap(si.y, gaij, sj.y, p.in_max_cosine, p.in_phi);
            }
            if (!samples[i].empty()) {
                std::int64_t both = 0, conflicts = 0;
                const std::uint8_t *ti = top[i].data(), *tj = top[j].data(), *ni = negative[i].data(), *nj = negative[j].data();
                const std::size_t count = top[i].size();
                for (std::size_t s = 0; s < count; ++s) {
                    const unsigned in_both = ti[s] & tj[s];
                    both += in_both;
                    conflicts += in_both & (ni[s] ^ nj[s]);
                }
                p.sign_samples = both;
                p.sign_conflict = both ? static_cast<double>(conflicts) / static_cast<double>(both)
                                       : std::numeric_limits<double>::quiet_NaN();
            }
            m.pairs.push_back(p);
        }
    m.sum_fro = std::sqrt(std::max(sum_fro2, 0.0));
    double fro2_parts = 0, max_spectral = 0, max_unit = 0;
    for (std::size_t i = 0; i < n; ++i) {
        fro2_parts += m.fro[i] * m.fro[i];
        max_spectral = std::max(max_spectral, m.spectral[i]);
        max_unit = std::max(max_unit, unit_spectral[i]);
    }
    m.kappa = fro2_parts > 0 ? sum_fro2 / fro2_parts : 1.0;
    if (m.kappa < 0) m.kappa = 0;

    // ‖Σ ΔW‖_2 from the weighted Gram: G_bw = D G_b D, D = diag(w_i per column of block i).
    std::vector<double> d(static_cast<std::size_t>(R));
    for (std::size_t i = 0; i < n; ++i)
        for (std::int64_t c = offset[i]; c < offset[i + 1]; ++c) d[static_cast<std::size_t>(c)] = members[i].weight;
    gbw.assign(gb.begin(), gb.end());
    for (std::int64_t j = 0; j < R; ++j)
        for (std::int64_t i = 0; i < R; ++i) gbw[static_cast<std::size_t>(i + j * R)] *= d[static_cast<std::size_t>(i)] * d[static_cast<std::size_t>(j)];
    m.sum_spectral = n == 1 ? m.spectral[0] : std::sqrt(top_eigenvalue(gbw, ga, R, seed));
    m.growth = max_spectral > 0 ? m.sum_spectral / max_spectral : 1.0;
    m.strength = max_unit > 0 ? m.sum_spectral / max_unit : 0.0;

    if (base) {
        thread_local BaseWeight loaded;  // reused: its values are the size of the largest tensor
        loaded.stored = nullptr;
        loaded.release = nullptr;
        if (base->load(first, loaded)) {
            const BaseWeight* weight = &loaded;
            if (!weight->stored && static_cast<std::int64_t>(weight->values.size()) != out * in)
                fail(ErrorCode::bad_input, "the base tensor {} has {} values, the module needs {} x {}",
                     quote(weight->tensor), weight->values.size(), out, in);
            const linalg::DenseView values = weight->stored
                                                 ? linalg::DenseView{weight->stored, weight->stored_dtype, out, in}
                                                 : linalg::DenseView{weight->values.data(), DType::F32, out, in};
            BaseStats b;
            b.tensor = weight->tensor;
            b.dtype = weight->dtype;
            b.limit = weight->limit;
            b.spectral = linalg::spectral_norm(values, 6, seed);
            b.ratio = b.spectral > 0 ? m.sum_spectral / b.spectral : (m.sum_spectral > 0 ? INFINITY : 0.0);
            // The overflow screen, first for the whole tensor: max|W| + max|ΔW_pq| <= limit
            // clears every entry after one pass over W's stored values. max|ΔW_pq| is bounded by
            // factor_norms, and by ‖ΣΔW‖_F (an entry is at most ‖ΣΔW‖_2 <= ‖ΣΔW‖_F); that one
            // from the Grams loses digits when the adapters cancel (its square is a difference),
            // so it is taken with a margin of 1e-3 Σ‖ΔW_i‖_F, or as the triangle inequality's
            // Σ‖ΔW_i‖_F, whichever is smaller.
            if (b.limit > 0) {
                const FactorNorms norms = factor_norms(terms, members, out, in);
                double parts = 0;
                for (double f : m.fro) parts += f;
                const double wmax = detail::gram_kernels().max_abs(static_cast<const std::byte*>(values.data), values.dtype,
                                                                    static_cast<std::size_t>(out * in));
                const double delta = std::min({parts, m.sum_fro + 1e-3 * parts, norms.entry_bound()});
                b.max_abs = (wmax + delta) * (1 + 1e-9);
                if (!(b.max_abs <= b.limit)) {
                    // Row by row: |ΔW_pq| <= ‖(Bw)_p‖ max_q ‖A_q‖ screens the rows; the rows it
                    // leaves are computed exactly.
                    b.max_abs = 0;
                    // Bw = [w_1 s_1 B_1 ... w_n s_n B_n] in double; A is the stacked A as it is.
                    const linalg::Stacks stacks = linalg::stack_factors(terms, workspace);
                    std::vector<double> ds(static_cast<std::size_t>(R));
                    for (std::size_t i = 0; i < n; ++i)
                        for (std::int64_t c = offset[i]; c < offset[i + 1]; ++c)
                            ds[static_cast<std::size_t>(c)] = members[i].weight * terms[i].coefficient;
                    std::vector<double> bw(static_cast<std::size_t>(out * R));
                    for (std::int64_t p = 0; p < out; ++p)
                        for (std::int64_t c = 0; c < R; ++c)
                            bw[static_cast<std::size_t>(p * R + c)] = ds[static_cast<std::size_t>(c)] * stacks.b[p * R + c];
                    check_overflow(b, values, norms, bw, {stacks.a, static_cast<std::size_t>(R * in)}, out, R, in);
                }
            }
            m.base = std::move(b);
            if (weight->release) weight->release();
        }
    }
    judge(m, o.thresholds);
    return m;
}

StackReport analyse_once(const std::vector<Adapter>& adapters, const std::vector<double>& weights, const StackOptions& o,
                         const BaseWeights* base, Progress& progress) {
    const detail::ModuleGroups groups = detail::group_modules(adapters, weights);
    const auto& order = groups.order;
    const auto& by_name = groups.by_name;
    StackReport report;
    report.weights = weights;
    for (double w : weights) report.total_weight += std::abs(w);
    report.modules.assign(order.size(), ModuleStack{});
    progress.begin("stack", order.size(), 0);
    // The base tensors are read on a thread of their own ahead of the workers, so that a
    // checkpoint on the disk streams while earlier modules are computed (a hint 4 modules ahead,
    // madvise WILLNEED, left the disk idle for long stretches: 9.5-13.5 s from the disk against
    // 4.4-5.6 s with this, `cat` of the base taking 5.8-7.7 s).
    std::optional<detail::ReadAhead> ahead;
    if (base)
        ahead.emplace(order.size(), o.read_ahead_bytes,
                      [&](std::size_t i) { return base->prefetch(*by_name.at(order[i]).front().module); });
    detail::parallel_for(order.size(), o.threads, progress, [&](std::size_t i) -> std::uint64_t {
        if (ahead) ahead->started(i);
        report.modules[i] = with_context(fmt::format("module {}", quote(order[i])), [&] {
            return analyse_module(by_name.at(order[i]), o, base, o.seed + 0x632be59bd9b4e019ULL * (i + 1));
        });
        return 0;
    });
    for (const auto& m : report.modules) {
        report.verdict = std::max(report.verdict, m.verdict);
        ++report.counts[static_cast<int>(m.verdict)];
        report.suggested_factor = std::min(report.suggested_factor, m.ok_factor);
    }
    // Pair summaries over the modules both adapters have: RMS cosine, mean overlaps and conflict.
    for (std::size_t i = 0; i < adapters.size(); ++i)
        for (std::size_t j = i + 1; j < adapters.size(); ++j) {
            PairStats s;
            s.first = i;
            s.second = j;
            double cos2 = 0, conflict = 0;
            std::int64_t count = 0, conflict_count = 0;
            for (const auto& m : report.modules)
                for (const auto& p : m.pairs) {
                    if (p.first != i || p.second != j) continue;
                    ++count;
                    ++s.modules;
                    cos2 += p.cosine * p.cosine;
                    s.out_max_cosine += p.out_max_cosine;
                    s.out_phi += p.out_phi;
                    s.in_max_cosine += p.in_max_cosine;
                    s.in_phi += p.in_phi;
                    if (!std::isnan(p.sign_conflict)) {
                        conflict += p.sign_conflict;
                        ++conflict_count;
                        s.sign_samples += p.sign_samples;
                    }
                }
            if (count) {
                const auto c = static_cast<double>(count);
                s.cosine = std::sqrt(cos2 / c);
                s.out_max_cosine /= c;
                s.out_phi /= c;
                s.in_max_cosine /= c;
                s.in_phi /= c;
            }
            s.sign_conflict = conflict_count ? conflict / static_cast<double>(conflict_count)
                                             : std::numeric_limits<double>::quiet_NaN();
            report.pair_summary.push_back(s);
        }
    return report;
}

}  // namespace

std::string_view verdict_name(Verdict verdict) noexcept {
    switch (verdict) {
    case Verdict::ok: return "ok";
    case Verdict::warn: return "warn";
    case Verdict::unstable: return "unstable";
    }
    return "ok";
}

StackReport analyse_stack(const std::vector<Adapter>& adapters, const StackOptions& o, bool auto_scale,
                          const BaseWeights* base, Progress& progress) {
    if (adapters.empty()) fail(ErrorCode::usage, "nothing to stack");
    std::vector<double> weights = o.weights;
    if (weights.empty()) weights.assign(adapters.size(), 1.0);
    if (weights.size() != adapters.size()) fail(ErrorCode::usage, "{} weights for {} adapters", weights.size(), adapters.size());
    for (double w : weights)
        if (!std::isfinite(w)) fail(ErrorCode::usage, "a weight is not a finite number");
    if (!(o.subspace_energy > 0 && o.subspace_energy <= 1)) fail(ErrorCode::usage, "the subspace energy must be in (0, 1]");
    if (!(o.top_fraction > 0 && o.top_fraction <= 1)) fail(ErrorCode::usage, "the top fraction must be in (0, 1]");
    const auto& th = o.thresholds;
    if (!(th.strength_warn > 0 && th.strength_warn <= th.strength_unstable && th.base_warn > 0 &&
          th.base_warn <= th.base_unstable))
        fail(ErrorCode::usage, "thresholds must be positive, each warn level at most its unstable level");
    for (std::size_t i = 0; i < adapters.size(); ++i)
        if (!adapters[i].lycoris_modules.empty())
            fail(ErrorCode::unsupported,
                 "adapter {} holds LyCORIS modules; convert them to LoRA first (lora-convert --rank)", i + 1);
    StackReport report = analyse_once(adapters, weights, o, base, progress);
    if (auto_scale && report.suggested_factor < 1) {
        const double t = report.suggested_factor;
        for (double& w : weights) w *= t;
        report = analyse_once(adapters, weights, o, base, progress);
        report.applied_factor = t;
    }
    for (const auto& a : adapters) report.names.push_back(a.source);
    return report;
}

}  // namespace lorakit
