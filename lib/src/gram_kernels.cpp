#include "gram_kernels.h"

#include "cpu_features.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);
extern "C" void cblas_dgemv(int layout, int trans, int m, int n, double alpha, const double* a, int lda,
                            const double* x, int incx, double beta, double* y, int incy);
extern "C" double cblas_ddot(int n, const double* x, int incx, const double* y, int incy);
extern "C" void cblas_daxpy(int n, double alpha, const double* x, int incx, double* y, int incy);
extern "C" void cblas_ssyrk(int layout, int uplo, int trans, int n, int k, float alpha, const float* a, int lda,
                            float beta, float* c, int ldc);
extern "C" void cblas_dsyrk(int layout, int uplo, int trans, int n, int k, double alpha, const double* a, int lda,
                            double beta, double* c, int ldc);

namespace lorakit::detail {

#if defined(__x86_64__)
extern const GramKernels avx512_gram;
#endif

namespace {

constexpr int col_major = 102, no_trans = 111, trans = 112, upper = 121;

std::size_t portable_stride(std::size_t R) noexcept { return R; }

void portable_widen_rows(const float* src, std::size_t R, std::size_t rows, double* dst, std::size_t ld) noexcept {
    for (std::size_t o = 0; o < rows; ++o) {
        const float* s = src + o * R;
        double* d = dst + o * ld;
        for (std::size_t k = 0; k < R; ++k) d[k] = s[k];
        for (std::size_t k = R; k < ld; ++k) d[k] = 0.0;
    }
}

// The callers bound R and the chunk sizes far below 2^31 (to_lapack in linalg.cpp).
void portable_accumulate_rows(const double* w, std::size_t rows, std::size_t R, std::size_t ld, double* g) noexcept {
    cblas_dsyrk(col_major, upper, no_trans, static_cast<int>(R), static_cast<int>(rows), 1.0, w, static_cast<int>(ld), 1.0,
                g, static_cast<int>(ld));
}

void portable_accumulate_columns(const float* src, std::size_t src_ld, std::size_t R, std::size_t n, double* scratch,
                                 double* g) noexcept {
    // Widened into an n x R column-major block (each column a contiguous copy), then G += BᵀB.
    for (std::size_t k = 0; k < R; ++k) {
        const float* s = src + k * src_ld;
        double* d = scratch + k * n;
        for (std::size_t j = 0; j < n; ++j) d[j] = s[j];
    }
    cblas_dsyrk(col_major, upper, trans, static_cast<int>(R), static_cast<int>(n), 1.0, scratch, static_cast<int>(n), 1.0,
                g, static_cast<int>(R));
}

// Cᵀ (cols x rows, column-major, ld c_ld) = Mᵀ (column-major cols x inner, ld m_ld) · Lᵀ, where
// Lᵀ is column-major inner x rows (ld l_i) when l_r = 1, and the transpose of a column-major
// rows x inner array (ld l_r) when l_i = 1.
void portable_product(std::size_t rows, std::size_t cols, std::size_t inner, const float* l, std::size_t l_i,
                      std::size_t l_r, const float* m, std::size_t m_ld, float* c, std::size_t c_ld, float*) noexcept {
    const bool l_rows = l_r == 1;
    cblas_sgemm(col_major, no_trans, l_rows ? no_trans : trans, static_cast<int>(cols), static_cast<int>(rows),
                static_cast<int>(inner), 1.0f, m, static_cast<int>(m_ld), l, static_cast<int>(l_rows ? l_i : l_r), 0.0f, c,
                static_cast<int>(c_ld));
}

std::size_t portable_chunk_f32(std::size_t) noexcept { return 512; }  // ssyrk packs anyway: few, long calls

// One chunk's Gram by ssyrk into `scratch` (f32, upper triangle), added to g in double.
void ssyrk_into(int transposed, const float* a, std::size_t a_ld, std::size_t R, std::size_t count, std::size_t ld,
                double* g, float* scratch) noexcept {
    cblas_ssyrk(col_major, upper, transposed, static_cast<int>(R), static_cast<int>(count), 1.0f, a, static_cast<int>(a_ld),
                0.0f, scratch, static_cast<int>(ld));
    for (std::size_t j = 0; j < R; ++j)
        for (std::size_t i = 0; i <= j; ++i) g[i + j * ld] += scratch[i + j * ld];
}

void portable_accumulate_rows_f32(const float* w, std::size_t rows, std::size_t R, std::size_t ld, double* g,
                                  float* scratch) noexcept {
    ssyrk_into(no_trans, w, ld, R, rows, ld, g, scratch);
}

// ssyrk straight on the block (its columns are what it multiplies): no transpose.
void portable_accumulate_columns_f32(const float* block, std::size_t block_ld, std::size_t R, std::size_t n,
                                     std::size_t ld, double* g, float*, float* scratch) noexcept {
    ssyrk_into(trans, block, block_ld, R, n, ld, g, scratch);
}

void portable_matvec(const double* g, std::size_t n, const double* x, double* y) noexcept {
    cblas_dgemv(col_major, no_trans, static_cast<int>(n), static_cast<int>(n), 1.0, g, static_cast<int>(n), x, 1, 0.0, y,
                1);
}

double portable_dot(const double* a, const double* b, std::size_t n) noexcept {
    return cblas_ddot(static_cast<int>(n), a, 1, b, 1);
}

void portable_axpy(std::size_t n, double alpha, const double* x, double* y) noexcept {
    cblas_daxpy(static_cast<int>(n), alpha, x, 1, y, 1);
}

// Rows per panel: 128 KiB of f32 values (at least 8 rows).
std::size_t portable_normal_panel(std::size_t cols) noexcept { return std::max<std::size_t>(8, 32768 / std::max<std::size_t>(cols, 1)); }

std::size_t portable_normal_scratch(std::size_t cols, std::size_t l) noexcept {
    const std::size_t panel = portable_normal_panel(cols);
    return panel * cols + panel * l;
}

// Each panel as f32 (read in place when it is aligned f32, converted into scratch otherwise),
// then two sgemm calls on it: t = P z, out += Pᵀ t.
void portable_normal_apply(const std::byte* m, DType dtype, std::size_t rows, std::size_t cols, const float* z,
                           std::size_t l, float* out, float* scratch) noexcept {
    const std::size_t panel = portable_normal_panel(cols), size = dtype_size(dtype);
    float* t = scratch + panel * cols;
    const int n = static_cast<int>(cols), width = static_cast<int>(l);
    if (rows == 0) std::fill(out, out + cols * l, 0.0f);
    for (std::size_t r0 = 0; r0 < rows; r0 += panel) {
        const std::size_t p = std::min(panel, rows - r0), count = p * cols;
        const std::byte* src = m + r0 * cols * size;
        const float* block = scratch;
        if (dtype == DType::F32 && reinterpret_cast<std::uintptr_t>(src) % alignof(float) == 0)
            block = reinterpret_cast<const float*>(src);
        else
            convert_to_f32(dtype, src, scratch, count);
        cblas_sgemm(col_major, trans, no_trans, static_cast<int>(p), width, n, 1.0f, block, n, z, n, 0.0f, t,
                    static_cast<int>(p));
        cblas_sgemm(col_major, no_trans, no_trans, n, width, static_cast<int>(p), 1.0f, block, n, t, static_cast<int>(p),
                    r0 == 0 ? 0.0f : 1.0f, out, n);
    }
}

// |x| as bits: for non-negative floats the integer order is the float order, and NaN and Inf
// (exponent all ones) compare above every finite value; f16 and bf16 alike on their 16 bits.
float portable_max_abs(const std::byte* values, DType dtype, std::size_t n) noexcept {
    if (dtype == DType::F16 || dtype == DType::BF16) {
        std::int16_t max_bits = 0;  // magnitudes below 0x8000: signed compares (SSE2 has pmaxsw)
        for (std::size_t i = 0; i < n; ++i) {
            std::int16_t bits;
            std::memcpy(&bits, values + 2 * i, sizeof bits);
            bits = static_cast<std::int16_t>(bits & 0x7fff);
            max_bits = bits > max_bits ? bits : max_bits;
        }
        if (max_bits >= (dtype == DType::F16 ? 0x7c00 : 0x7f80)) return std::numeric_limits<float>::infinity();
        float result;
        convert_to_f32(dtype, reinterpret_cast<const std::byte*>(&max_bits), &result, 1);
        return result;
    }
    std::uint32_t max_bits = 0;
    for (std::size_t i = 0; i < n; ++i) {
        std::uint32_t bits;
        std::memcpy(&bits, values + 4 * i, sizeof bits);
        bits &= 0x7fffffffu;
        max_bits = bits > max_bits ? bits : max_bits;
    }
    if (max_bits >= 0x7f800000u) return std::numeric_limits<float>::infinity();
    float result;
    std::memcpy(&result, &max_bits, sizeof result);
    return result;
}

constexpr GramKernels portable{"dsyrk",
                               portable_stride,
                               portable_widen_rows,
                               portable_accumulate_rows,
                               portable_accumulate_columns,
                               portable_product,
                               portable_stride,
                               portable_chunk_f32,
                               portable_accumulate_rows_f32,
                               portable_accumulate_columns_f32,
                               portable_matvec,
                               portable_dot,
                               portable_axpy,
                               false,
                               portable_normal_scratch,
                               portable_normal_apply,
                               portable_max_abs};

const std::vector<const GramKernels*>& runnable() {
    static const std::vector<const GramKernels*> list = [] {
        std::vector<const GramKernels*> v{&portable};
#if defined(__x86_64__)
        if (cpu_has_avx512f()) v.push_back(&avx512_gram);
#endif
        return v;
    }();
    return list;
}

}  // namespace

const GramKernels& portable_gram_kernels() noexcept { return portable; }

const GramKernels& gram_kernels() noexcept {
    static const GramKernels* chosen = [] {
        return force_scalar() ? &portable : runnable().back();
    }();
    return *chosen;
}

std::size_t available_gram_kernel_count() noexcept { return runnable().size(); }

const GramKernels& available_gram_kernel(std::size_t index) noexcept { return *runnable().at(index); }

}  // namespace lorakit::detail
