// The algorithms of small_eigen.h, written once and compiled once per instruction set: the
// including file defines LORAKIT_SMALL_EIGEN_TARGET (a target attribute, or nothing) and
// includes this inside an anonymous namespace, so each copy is its own (internal linkage).
// Only the functions defined here carry the attribute; what they call from the standard
// library is compiled for the portable ISA as usual.
//
// Textbook methods (Golub & Van Loan, Matrix Computations, §8.3): Householder tridiagonal
// reduction, Q accumulated backwards from the reflectors, and the implicit QL iteration with
// Wilkinson's shift; the matrix is first scaled by a power of two (exact) to largest entry < 1.

#ifndef LORAKIT_SMALL_EIGEN_TARGET
#error "define LORAKIT_SMALL_EIGEN_TARGET before including small_eigen_impl.h"
#endif

// Σ x[i]·y[i] and max |x[i]| over [begin, end), both multiples of 8: eight partial results, one
// per lane, so that the loop vectorises (and is not one chain of dependent adds), combined in a
// fixed order at the end.
LORAKIT_SMALL_EIGEN_TARGET inline double block_dot(const double* __restrict x, const double* __restrict y,
                                                   std::size_t begin, std::size_t end) noexcept {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (std::size_t i = begin; i < end; i += 8)
        for (std::size_t l = 0; l < 8; ++l) acc[l] += x[i + l] * y[i + l];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

LORAKIT_SMALL_EIGEN_TARGET inline double block_max_abs(const double* __restrict x, std::size_t begin,
                                                       std::size_t end) noexcept {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (std::size_t i = begin; i < end; i += 8)
        for (std::size_t l = 0; l < 8; ++l) {
            const double a = std::abs(x[i + l]);
            acc[l] = a > acc[l] ? a : acc[l];
        }
    double m = 0;
    for (double a : acc) m = a > m ? a : m;
    return m;
}

// T = Qᵀ·A·Q for the symmetric n x n A held in `w` with leading dimension N (n rounded up to a
// multiple of 8; rows and columns n..N zero), its entries at most 1 in magnitude (so that no τ
// overflows). Reflector k (Hₖ = I - τₖ v vᵀ) is left in column k below the subdiagonal and τₖ
// in tau[k]; v, p, u: N doubles each. The vector loops run over whole blocks of 8 rows, from
// the block holding row k + 1 to N: v and u are zero on the rows above k + 1 (and in the
// padding), so those rows are not changed, and no loop has a ragged tail.
LORAKIT_SMALL_EIGEN_TARGET void reduce_impl(double* w, std::size_t n, std::size_t N, double* diagonal, double* off,
                                            double* tau, double* __restrict v, double* __restrict p,
                                            double* __restrict u) noexcept {
    for (std::size_t k = 0; k + 2 < n; ++k) {
        double* x = w + k * N + k + 1;  // column k below the diagonal
        const std::size_t m = n - k - 1;
        const std::size_t first = (k + 1) / 8 * 8;  // the block holding row k + 1
        diagonal[k] = w[k * N + k];
        tau[k] = 0;
        for (std::size_t i = first; i < N; ++i) v[i] = 0;
        for (std::size_t i = 0; i < m; ++i) v[k + 1 + i] = x[i];
        const double amax = block_max_abs(v, first, N);
        if (amax == 0) {
            off[k] = 0;
            continue;
        }
        // ‖x‖ without overflow or underflow: scaled by the largest entry (into p for the sum).
        const double inv_max = 1.0 / amax;
        for (std::size_t i = first; i < N; ++i) p[i] = v[i] * inv_max;
        const double head = p[k + 1];
        p[k + 1] = 0;
        const double tail = block_dot(p, p, first, N);
        if (tail == 0) {  // the column is already reduced
            off[k] = x[0];
            continue;
        }
        const double norm = amax * std::sqrt(head * head + tail);
        // H x = β e₁ with β = -sign(x₀)‖x‖ (no cancellation in x₀ - β), v = x / (x₀ - β) with
        // v₀ = 1 and τ = (β - x₀)/β in [1, 2] (LAPACK's dlarfg normalisation: no entry of v
        // exceeds 1 and nothing overflows however small the column is).
        const double beta = x[0] >= 0 ? -norm : norm;
        const double t = (beta - x[0]) / beta, inverse = 1.0 / (x[0] - beta);
        off[k] = beta;
        tau[k] = t;
        x[0] = v[k + 1] = 1.0;
        for (std::size_t i = 1; i < m; ++i) x[i] = v[k + 1 + i] = x[i] * inverse;
        // A₂₂ ← H A₂₂ H = A₂₂ - v uᵀ - u vᵀ with p = τ A₂₂ v and u = p - (τ/2)(vᵀp) v, on
        // whole columns (both triangles).
        // p four columns at a time (a quarter of the loads and stores of p).
        for (std::size_t i = first; i < N; ++i) p[i] = 0;
        std::size_t j = k + 1;
        for (; j + 4 <= n; j += 4) {
            const double v0 = t * v[j], v1 = t * v[j + 1], v2 = t * v[j + 2], v3 = t * v[j + 3];
            const double* __restrict c0 = w + j * N;
            const double* __restrict c1 = c0 + N;
            const double* __restrict c2 = c1 + N;
            const double* __restrict c3 = c2 + N;
            for (std::size_t i = first; i < N; ++i) p[i] += (c0[i] * v0 + c1[i] * v1) + (c2[i] * v2 + c3[i] * v3);
        }
        for (; j < n; ++j) {
            const double vj = t * v[j];
            const double* __restrict column = w + j * N;
            for (std::size_t i = first; i < N; ++i) p[i] += column[i] * vj;
        }
        const double vp = block_dot(v, p, first, N);
        const double half = 0.5 * t * vp;
        for (std::size_t i = first; i < N; ++i) u[i] = p[i] - half * v[i];
        for (std::size_t i = first; i <= k; ++i) u[i] = 0;
        for (std::size_t j = k + 1; j < n; ++j) {
            double* __restrict column = w + j * N;
            const double uj = u[j], vj = v[j];
            for (std::size_t i = first; i < N; ++i) column[i] -= v[i] * uj + u[i] * vj;
        }
    }
    if (n >= 2) {
        diagonal[n - 2] = w[(n - 2) * N + n - 2];
        off[n - 2] = w[(n - 2) * N + n - 1];
        tau[n - 2] = 0;
    }
    if (n >= 1) {
        diagonal[n - 1] = w[(n - 1) * N + n - 1];
        tau[n - 1] = 0;
    }
}

// Copies the symmetric n x n column-major `a` into `w` (leading dimension N, zero padding),
// scaled by a power of two (exact) so that its largest entry is below 1; the exponent that
// undoes it goes to *exponent. False when an entry is not finite; *zero when all are 0.
LORAKIT_SMALL_EIGEN_TARGET bool load_impl(const double* a, std::size_t n, std::size_t N, double* w, int* exponent,
                                          bool* zero) noexcept {
    // Copied first (padded: whole blocks for the maximum), then scaled in place.
    for (std::size_t j = 0; j < n; ++j) {
        for (std::size_t i = 0; i < n; ++i) w[j * N + i] = a[j * n + i];
        for (std::size_t i = n; i < N; ++i) w[j * N + i] = 0;
    }
    for (std::size_t i = n * N; i < N * N; ++i) w[i] = 0;
    // Non-finite entries: x·0 is NaN for them (0 otherwise), which poisons the sum.
    double probe[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (std::size_t i = 0; i < N * N; i += 8)
        for (std::size_t l = 0; l < 8; ++l) probe[l] += w[i + l] * 0.0;
    double poison = 0;
    for (double x : probe) poison += x;
    *exponent = 0;
    *zero = false;
    if (poison != 0) return false;
    const double amax = block_max_abs(w, 0, N * N);
    *zero = amax == 0;
    if (amax == 0) return true;
    std::frexp(amax, exponent);
    const double scale = std::ldexp(1.0, -*exponent);
    for (std::size_t i = 0; i < N * N; ++i) w[i] *= scale;
    return true;
}

// Q = H₀ H₁ ... H_{n-3} (leading dimension N, zero padding) from the reflectors reduce_impl left
// in `w`, applied backwards so that each touches only its trailing block; v: N doubles.
LORAKIT_SMALL_EIGEN_TARGET void form_q_impl(const double* w, std::size_t n, std::size_t N, const double* tau, double* q,
                                            double* __restrict v) noexcept {
    for (std::size_t j = 0; j < N; ++j)
        for (std::size_t i = 0; i < N; ++i) q[j * N + i] = i == j && i < n ? 1.0 : 0.0;
    for (std::size_t k = n >= 3 ? n - 2 : 0; k-- > 0;) {
        if (tau[k] == 0) continue;
        const std::size_t first = (k + 1) / 8 * 8;
        for (std::size_t i = first; i < N; ++i) v[i] = 0;
        for (std::size_t i = k + 1; i < n; ++i) v[i] = w[k * N + i];
        for (std::size_t j = k + 1; j < n; ++j) {
            double* __restrict c = q + j * N;
            const double s = tau[k] * block_dot(v, c, first, N);
            for (std::size_t i = first; i < N; ++i) c[i] -= s * v[i];
        }
    }
}

// The eigenvalues of the symmetric tridiagonal (d, e) by implicit QL with Wilkinson's shift,
// into d (unordered); e[i] couples i and i + 1 and e[n - 1] is workspace. With z (column-major
// n x n, leading dimension N, zero rows past n), its columns are rotated along: z ← z·G for every rotation G. The entries are at most
// ~n in magnitude (the caller scaled the matrix), so f² + g² neither overflows nor underflows
// where it matters; a zero pair deflates.
LORAKIT_SMALL_EIGEN_TARGET bool ql_impl(double* d, double* e, std::size_t n, double* z, std::size_t N) noexcept {
    constexpr double epsilon = 2.220446049250313e-16, tiny = 1e-290;
    if (n == 0) return true;
    e[n - 1] = 0;
    for (std::size_t l = 0; l < n; ++l) {
        int sweeps = 0;
        for (;;) {
            std::size_t m = l;
            for (; m + 1 < n; ++m) {
                const double ae = std::abs(e[m]);
                if (ae <= epsilon * (std::abs(d[m]) + std::abs(d[m + 1])) || ae <= tiny) break;
            }
            if (m == l) break;
            if (++sweeps > 60) return false;
            // Wilkinson's shift from the leading 2 x 2 block, folded into the first g.
            double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            double r = std::abs(g) > 1e150 ? std::abs(g) : std::sqrt(g * g + 1.0);
            g = d[m] - d[l] + e[l] / (g + (g >= 0 ? r : -r));
            double s = 1, c = 1, p = 0;
            bool split = false;
            for (std::size_t i = m; i-- > l;) {
                const double f = s * e[i], b = c * e[i];
                // r = hypot(f, g) and 1/r: the reciprocal of f² + g² runs beside the square
                // root instead of dividing after it (this loop is one dependent chain).
                const double h = f * f + g * g;
                if (!(h > tiny)) {
                    // Tiny (or underflowing) f and g: the careful hypot; a zero pair splits.
                    r = std::hypot(f, g);
                    if (r == 0) {
                        d[i + 1] -= p;
                        e[m] = 0;
                        split = true;
                        break;
                    }
                    const double inv = 1.0 / r;
                    s = f * inv;
                    c = g * inv;
                } else {
                    const double root = std::sqrt(h), reciprocal = 1.0 / h;
                    r = root;
                    const double inv = root * reciprocal;
                    s = f * inv;
                    c = g * inv;
                }
                e[i + 1] = r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
                if (z) {
                    double* __restrict zi = z + i * N;
                    double* __restrict zj = zi + N;
                    for (std::size_t k = 0; k < N; ++k) {
                        const double t = zj[k];
                        zj[k] = s * zi[k] + c * t;
                        zi[k] = c * zi[k] - s * t;
                    }
                }
            }
            if (split) continue;
            d[l] -= p;
            e[l] = g;
            e[m] = 0;
        }
    }
    return true;
}

LORAKIT_SMALL_EIGEN_TARGET bool eigen_impl(double* a, std::size_t n, double* values, bool vectors,
                                           double* scratch) noexcept {
    if (n == 0) return true;
    const std::size_t N = padded_order(n);
    double* w = scratch;
    double* q = w + N * N;
    double* e = q + N * N;
    double* tau = e + N;
    int exponent = 0;
    bool zero = false;
    if (!load_impl(a, n, N, w, &exponent, &zero)) return false;
    if (zero) {
        for (std::size_t i = 0; i < n; ++i) values[i] = 0;
        if (vectors)
            for (std::size_t j = 0; j < n; ++j)
                for (std::size_t i = 0; i < n; ++i) a[j * n + i] = i == j ? 1.0 : 0.0;
        return true;
    }
    reduce_impl(w, n, N, values, e, tau, tau + N, tau + 2 * N, tau + 3 * N);
    if (vectors) form_q_impl(w, n, N, tau, q, tau + N);
    if (!ql_impl(values, e, n, vectors ? q : nullptr, N)) return false;
    // Descending order (selection: n is small), vectors along.
    for (std::size_t j = 0; j < n; ++j) {
        std::size_t best = j;
        for (std::size_t i = j + 1; i < n; ++i)
            if (values[i] > values[best]) best = i;
        if (best != j) {
            std::swap(values[j], values[best]);
            if (vectors)
                for (std::size_t i = 0; i < n; ++i) std::swap(q[j * N + i], q[best * N + i]);
        }
        values[j] = std::ldexp(values[j], exponent);
    }
    if (vectors)
        for (std::size_t j = 0; j < n; ++j)
            for (std::size_t i = 0; i < n; ++i) a[j * n + i] = q[j * N + i];
    return true;
}

LORAKIT_SMALL_EIGEN_TARGET void tridiagonalize_impl(const double* a, std::size_t n, double* diagonal, double* off,
                                                    double* scratch) noexcept {
    if (n == 0) return;
    const std::size_t N = padded_order(n);
    double* w = scratch;
    double* tau = w + N * N;
    int exponent = 0;
    bool zero = false;
    if (!load_impl(a, n, N, w, &exponent, &zero)) {
        for (std::size_t i = 0; i < n; ++i) diagonal[i] = std::numeric_limits<double>::quiet_NaN();
        for (std::size_t i = 0; i + 1 < n; ++i) off[i] = std::numeric_limits<double>::quiet_NaN();
        return;
    }
    if (zero) {
        for (std::size_t i = 0; i < n; ++i) diagonal[i] = 0;
        for (std::size_t i = 0; i + 1 < n; ++i) off[i] = 0;
        return;
    }
    reduce_impl(w, n, N, diagonal, off, tau, tau + N, tau + 2 * N, tau + 3 * N);
    for (std::size_t i = 0; i < n; ++i) diagonal[i] = std::ldexp(diagonal[i], exponent);
    for (std::size_t i = 0; i + 1 < n; ++i) off[i] = std::ldexp(off[i], exponent);
}
