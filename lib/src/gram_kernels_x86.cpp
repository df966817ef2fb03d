// AVX-512 kernels of the factored SVD: Grams and products (see gram_kernels.h). Built with
// function-level target attributes, so the library stays portable; gram_kernels.cpp calls them
// only when CPUID says AVX-512F runs.
#if defined(__x86_64__)

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "gram_kernels.h"

// GCC 12 warns inside avx512fintrin.h that the "undefined" pass-through operand of the unmasked
// intrinsics (_mm512_cvtps_pd, _mm512_shuffle_f64x2, ...) may be used uninitialised: it is not.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define LORAKIT_AVX512 __attribute__((target("avx512f")))

namespace lorakit::detail {

namespace {

std::size_t avx512_stride(std::size_t R) noexcept { return (R + 7) / 8 * 8; }

LORAKIT_AVX512 void avx512_widen_rows(const float* src, std::size_t R, std::size_t rows, double* dst,
                                      std::size_t ld) noexcept {
    for (std::size_t o = 0; o < rows; ++o) {
        const float* s = src + o * R;
        double* d = dst + o * ld;
        std::size_t k = 0;
        for (; k + 8 <= R; k += 8) _mm512_storeu_pd(d + k, _mm512_cvtps_pd(_mm256_loadu_ps(s + k)));
        for (; k < R; ++k) d[k] = s[k];
        for (; k < ld; ++k) d[k] = 0.0;
    }
}

// g[i0 .. i0 + 8·NI, j0 .. j0 + 8] (column-major, ld) += Σ_o w_o[i] w_o[j]: 8·NI x 8 accumulators
// in registers (3 x 8 uses 24 of the 32), one vector load per 8 rows of the tile and one
// broadcast per column per input row.
template <int NI>
LORAKIT_AVX512 inline __attribute__((always_inline)) void tile(const double* w, std::size_t rows, std::size_t ld,
                                                                std::size_t i0, std::size_t j0, double* g) noexcept {
    __m512d acc[NI][8];
    for (int a = 0; a < NI; ++a)
        for (int j = 0; j < 8; ++j) acc[a][j] = _mm512_loadu_pd(g + (j0 + j) * ld + i0 + 8 * a);
    for (std::size_t o = 0; o < rows; ++o) {
        const double* row = w + o * ld;
        __m512d v[NI];
        for (int a = 0; a < NI; ++a) v[a] = _mm512_loadu_pd(row + i0 + 8 * a);
        for (int j = 0; j < 8; ++j) {
            const __m512d b = _mm512_set1_pd(row[j0 + j]);
            for (int a = 0; a < NI; ++a) acc[a][j] = _mm512_fmadd_pd(v[a], b, acc[a][j]);
        }
    }
    for (int a = 0; a < NI; ++a)
        for (int j = 0; j < 8; ++j) _mm512_storeu_pd(g + (j0 + j) * ld + i0 + 8 * a, acc[a][j]);
}

LORAKIT_AVX512 void avx512_accumulate_rows(const double* w, std::size_t rows, std::size_t, std::size_t ld,
                                           double* g) noexcept {
    // Column blocks of 8; for each, the row blocks on and above the diagonal, three at a time.
    const std::size_t blocks = ld / 8;
    for (std::size_t jb = 0; jb < blocks; ++jb) {
        std::size_t ib = 0;
        for (; ib + 3 <= jb + 1; ib += 3) tile<3>(w, rows, ld, ib * 8, jb * 8, g);
        if (jb + 1 - ib == 2)
            tile<2>(w, rows, ld, ib * 8, jb * 8, g);
        else if (jb + 1 - ib == 1)
            tile<1>(w, rows, ld, ib * 8, jb * 8, g);
    }
}

// dst[j·ld + k0 + i] = src[(k0 + i)·src_ld + j0 + j] for an 8 x 8 block, widened: eight rows of
// eight floats, converted, transposed in registers.
LORAKIT_AVX512 inline __attribute__((always_inline)) void transpose_block(const float* src, std::size_t src_ld,
                                                                          double* dst, std::size_t ld) noexcept {
    __m512d r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm512_cvtps_pd(_mm256_loadu_ps(src + i * src_ld));
    __m512d t[8], u[8];
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {
        const int b = 4 * h;
        u[b + 0] = _mm512_shuffle_f64x2(t[b + 0], t[b + 2], 0x88);
        u[b + 1] = _mm512_shuffle_f64x2(t[b + 1], t[b + 3], 0x88);
        u[b + 2] = _mm512_shuffle_f64x2(t[b + 0], t[b + 2], 0xdd);
        u[b + 3] = _mm512_shuffle_f64x2(t[b + 1], t[b + 3], 0xdd);
    }
    for (int j = 0; j < 4; ++j) {
        _mm512_storeu_pd(dst + j * ld, _mm512_shuffle_f64x2(u[j], u[j + 4], 0x88));
        _mm512_storeu_pd(dst + (j + 4) * ld, _mm512_shuffle_f64x2(u[j], u[j + 4], 0xdd));
    }
}

LORAKIT_AVX512 void avx512_accumulate_columns(const float* src, std::size_t src_ld, std::size_t R, std::size_t n,
                                              double* scratch, double* g) noexcept {
    const std::size_t ld = avx512_stride(R);
    const std::size_t R8 = R / 8 * 8, n8 = n / 8 * 8;
    for (std::size_t k0 = 0; k0 < R8; k0 += 8) {
        for (std::size_t j0 = 0; j0 < n8; j0 += 8)
            transpose_block(src + k0 * src_ld + j0, src_ld, scratch + j0 * ld + k0, ld);
        for (std::size_t j = n8; j < n; ++j)
            for (std::size_t k = k0; k < k0 + 8; ++k) scratch[j * ld + k] = src[k * src_ld + j];
    }
    for (std::size_t j = 0; j < n; ++j) {
        for (std::size_t k = R8; k < R; ++k) scratch[j * ld + k] = src[k * src_ld + j];
        for (std::size_t k = R; k < ld; ++k) scratch[j * ld + k] = 0.0;
    }
    avx512_accumulate_rows(scratch, n, R, ld, g);
}

// C[i0 .. i0 + MR, j0 .. j0 + 16·NZ) of C = L·M (see GramKernels::product): MR x NZ vector
// accumulators, one broadcast of L per row and NZ loads of M per step of r. With `Masked`, the
// last vector of each row is masked by `tail` (cols not a multiple of 16). Six rows at most: with
// more, GCC spilled the accumulators (the row pointers of L take the general registers).
template <int MR, int NZ, bool Masked>
LORAKIT_AVX512 inline __attribute__((always_inline)) void product_tile(std::size_t inner, const float* l, std::size_t l_i,
                                                                        std::size_t l_r, const float* m, std::size_t m_ld,
                                                                        float* c, std::size_t c_ld, __mmask16 tail) noexcept {
    __m512 acc[MR][NZ];
    for (int i = 0; i < MR; ++i)
        for (int z = 0; z < NZ; ++z) acc[i][z] = _mm512_setzero_ps();
    for (std::size_t r = 0; r < inner; ++r) {
        const float* row = m + r * m_ld;
        const float* lr = l + r * l_r;
        __m512 v[NZ];
        for (int z = 0; z < NZ; ++z)
            v[z] = Masked && z == NZ - 1 ? _mm512_maskz_loadu_ps(tail, row + 16 * z) : _mm512_loadu_ps(row + 16 * z);
        for (int i = 0; i < MR; ++i) {
            const __m512 b = _mm512_set1_ps(lr[i * l_i]);
            for (int z = 0; z < NZ; ++z) acc[i][z] = _mm512_fmadd_ps(b, v[z], acc[i][z]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int z = 0; z < NZ; ++z) {
            if (Masked && z == NZ - 1)
                _mm512_mask_storeu_ps(c + i * c_ld + 16 * z, tail, acc[i][z]);
            else
                _mm512_storeu_ps(c + i * c_ld + 16 * z, acc[i][z]);
        }
}

// Rows i0 .. i0 + count (count <= MR) of one column block: the tile for the exact row count.
template <int MR, int NZ, bool Masked>
LORAKIT_AVX512 void product_rows(std::size_t count, std::size_t inner, const float* l, std::size_t l_i, std::size_t l_r,
                                 const float* m, std::size_t m_ld, float* c, std::size_t c_ld, __mmask16 tail) noexcept {
    if constexpr (MR > 1) {
        if (count < MR) return product_rows<MR - 1, NZ, Masked>(count, inner, l, l_i, l_r, m, m_ld, c, c_ld, tail);
    }
    product_tile<MR, NZ, Masked>(inner, l, l_i, l_r, m, m_ld, c, c_ld, tail);
}

template <int NZ, bool Masked>
LORAKIT_AVX512 void product_block(std::size_t rows, std::size_t inner, const float* l, std::size_t l_i, std::size_t l_r,
                                  const float* m, std::size_t m_ld, float* c, std::size_t c_ld, __mmask16 tail) noexcept {
    constexpr int MR = NZ <= 2 ? 8 : 6;
    for (std::size_t i0 = 0; i0 < rows; i0 += MR)
        product_rows<MR, NZ, Masked>(std::min<std::size_t>(MR, rows - i0), inner, l + i0 * l_i, l_i, l_r, m, m_ld,
                                     c + i0 * c_ld, c_ld, tail);
}

template <bool Masked>
LORAKIT_AVX512 void product_columns(std::size_t vectors, std::size_t rows, std::size_t inner, const float* l,
                                    std::size_t l_i, std::size_t l_r, const float* m, std::size_t m_ld, float* c,
                                    std::size_t c_ld, __mmask16 tail) noexcept {
    switch (vectors) {
        case 1: product_block<1, Masked>(rows, inner, l, l_i, l_r, m, m_ld, c, c_ld, tail); break;
        case 2: product_block<2, Masked>(rows, inner, l, l_i, l_r, m, m_ld, c, c_ld, tail); break;
        case 3: product_block<3, Masked>(rows, inner, l, l_i, l_r, m, m_ld, c, c_ld, tail); break;
        default: product_block<4, Masked>(rows, inner, l, l_i, l_r, m, m_ld, c, c_ld, tail); break;
    }
}

LORAKIT_AVX512 void avx512_product(std::size_t rows, std::size_t cols, std::size_t inner, const float* l, std::size_t l_i,
                                   std::size_t l_r, const float* m, std::size_t m_ld, float* c, std::size_t c_ld,
                                   float* scratch) noexcept {
    // Column blocks of 64: M's panel (inner x 64) is read by every row block. When M's rows are
    // far apart (a stack of A, rows of `in` floats: 16 KiB apart for in = 4096), the panel's rows
    // fall into a few L1 sets and evict each other, so a panel read more than once is first
    // copied into `scratch`, contiguous.
    const bool pack = rows > 6 && m_ld > 64;
    for (std::size_t j0 = 0; j0 < cols; j0 += 64) {
        const std::size_t width = std::min<std::size_t>(64, cols - j0);
        const std::size_t vectors = (width + 15) / 16, last = width - 16 * (vectors - 1);
        const float* panel = m + j0;
        std::size_t panel_ld = m_ld;
        if (pack) {
            for (std::size_t r = 0; r < inner; ++r) {
                const float* src = m + r * m_ld + j0;
                float* dst = scratch + r * 64;
                std::size_t j = 0;
                for (; j + 16 <= width; j += 16) _mm512_storeu_ps(dst + j, _mm512_loadu_ps(src + j));
                if (j < width) {
                    const auto mask = static_cast<__mmask16>((1u << (width - j)) - 1u);
                    _mm512_mask_storeu_ps(dst + j, mask, _mm512_maskz_loadu_ps(mask, src + j));
                }
            }
            panel = scratch;
            panel_ld = 64;
        }
        if (last == 16) {
            product_columns<false>(vectors, rows, inner, l, l_i, l_r, panel, panel_ld, c + j0, c_ld, 0xffff);
        } else {
            const auto tail = static_cast<__mmask16>((1u << last) - 1u);
            product_columns<true>(vectors, rows, inner, l, l_i, l_r, panel, panel_ld, c + j0, c_ld, tail);
        }
    }
}

std::size_t avx512_stride_f32(std::size_t R) noexcept { return (R + 15) / 16 * 16; }

// 64 rows of 160 floats: 40 KiB, in L1 beside the accumulators' stores (measured: 64 rows ran
// 73-80 GFLOP/s against 63-72 with 128); more rows for short ones, never fewer than 64 (each
// chunk reads and writes every tile's accumulators once).
std::size_t avx512_chunk_f32(std::size_t ld) noexcept {
    return std::max<std::size_t>(64, 10240 / std::max<std::size_t>(ld, 1));
}

// The f32 tile: g[i0 .. i0 + 16·NI, j0 .. j0 + 8] += Σ_o w_o[i] w_o[j], 16·NI x 8 accumulators
// in registers (3 x 8 uses 24 of the 32), one load per 16 rows of the tile and one broadcast
// per column per input row; the chunk's sums are added to g in double.
template <int NI>
LORAKIT_AVX512 inline __attribute__((always_inline)) void tile_f32(const float* w, std::size_t rows, std::size_t ld,
                                                                    std::size_t i0, std::size_t j0, double* g) noexcept {
    __m512 acc[NI][8];
    for (int a = 0; a < NI; ++a)
        for (int j = 0; j < 8; ++j) acc[a][j] = _mm512_setzero_ps();
    for (std::size_t o = 0; o < rows; ++o) {
        const float* row = w + o * ld;
        __m512 v[NI];
        for (int a = 0; a < NI; ++a) v[a] = _mm512_loadu_ps(row + i0 + 16 * a);
        for (int j = 0; j < 8; ++j) {
            const __m512 b = _mm512_set1_ps(row[j0 + j]);
            for (int a = 0; a < NI; ++a) acc[a][j] = _mm512_fmadd_ps(v[a], b, acc[a][j]);
        }
    }
    for (int a = 0; a < NI; ++a)
        for (int j = 0; j < 8; ++j) {
            double* at = g + (j0 + j) * ld + i0 + 16 * a;
            const __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(acc[a][j]));
            const __m512d high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[a][j]), 1)));
            _mm512_storeu_pd(at, _mm512_add_pd(_mm512_loadu_pd(at), low));
            _mm512_storeu_pd(at + 8, _mm512_add_pd(_mm512_loadu_pd(at + 8), high));
        }
}

LORAKIT_AVX512 void avx512_accumulate_rows_f32(const float* w, std::size_t rows, std::size_t, std::size_t ld, double* g,
                                               float*) noexcept {
    // Column blocks of 8; for each, the row blocks of 16 on and above the diagonal, three at a time.
    const std::size_t row_blocks = ld / 16;
    for (std::size_t j0 = 0; j0 < ld; j0 += 8) {
        const std::size_t need = std::min(row_blocks, (j0 + 8 + 15) / 16);
        std::size_t a = 0;
        for (; a + 3 <= need; a += 3) tile_f32<3>(w, rows, ld, 16 * a, j0, g);
        if (need - a == 2) tile_f32<2>(w, rows, ld, 16 * a, j0, g);
        else if (need - a == 1) tile_f32<1>(w, rows, ld, 16 * a, j0, g);
    }
}

// 16 x 16 floats transposed in registers: unpack pairs of rows, then 2 x 2 blocks of them, then
// 128-bit lanes twice.
LORAKIT_AVX512 inline __attribute__((always_inline)) void transpose_16x16(const float* src, std::size_t src_ld,
                                                                           float* dst, std::size_t dst_ld) noexcept {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_ld);
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // r[4i + m]: column 4L + m (L the 128-bit lane) of rows 4i .. 4i + 3.
    for (int i = 0; i < 4; ++i) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int m = 0; m < 4; ++m) {
        const __m512 even_low = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88);   // lanes 0, 2 of rows 0-3, 4-7
        const __m512 odd_low = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xdd);    // lanes 1, 3
        const __m512 even_high = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
        const __m512 odd_high = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xdd);
        _mm512_storeu_ps(dst + m * dst_ld, _mm512_shuffle_f32x4(even_low, even_high, 0x88));          // column m
        _mm512_storeu_ps(dst + (8 + m) * dst_ld, _mm512_shuffle_f32x4(even_low, even_high, 0xdd));    // column 8 + m
        _mm512_storeu_ps(dst + (4 + m) * dst_ld, _mm512_shuffle_f32x4(odd_low, odd_high, 0x88));      // column 4 + m
        _mm512_storeu_ps(dst + (12 + m) * dst_ld, _mm512_shuffle_f32x4(odd_low, odd_high, 0xdd));     // column 12 + m
    }
}

// dst[j·dst_ld + k] = src[k·src_ld + j] for k < R, j < n (dst's entries past R left alone): whole
// 16 x 16 blocks in registers, the ragged edges one by one.
LORAKIT_AVX512 void transpose_f32(const float* src, std::size_t src_ld, std::size_t R, std::size_t n, float* dst,
                                         std::size_t dst_ld) noexcept {
    std::size_t k0 = 0;
    for (; k0 + 16 <= R; k0 += 16) {
        std::size_t j0 = 0;
        for (; j0 + 16 <= n; j0 += 16) transpose_16x16(src + k0 * src_ld + j0, src_ld, dst + j0 * dst_ld + k0, dst_ld);
        for (std::size_t j = j0; j < n; ++j)
            for (std::size_t k = k0; k < k0 + 16; ++k) dst[j * dst_ld + k] = src[k * src_ld + j];
    }
    for (std::size_t k = k0; k < R; ++k)
        for (std::size_t j = 0; j < n; ++j) dst[j * dst_ld + k] = src[k * src_ld + j];
}

// The columns of the block as rows (16 x 16 register transposes), then the row kernel.
LORAKIT_AVX512 void avx512_accumulate_columns_f32(const float* block, std::size_t block_ld, std::size_t R, std::size_t n,
                                                  std::size_t ld, double* g, float* rows, float* scratch) noexcept {
    transpose_f32(block, block_ld, R, n, rows, ld);
    avx512_accumulate_rows_f32(rows, n, R, ld, g, scratch);
}

// y = G·x for the column-major n x n G: up to 192 rows of y in 24 zmm accumulators, one
// broadcast of x_j and one load per 8 rows of each column (the ragged last 8 masked).
LORAKIT_AVX512 void avx512_matvec(const double* g, std::size_t n, const double* x, double* y) noexcept {
    for (std::size_t i0 = 0; i0 < n; i0 += 192) {
        const std::size_t rows = std::min<std::size_t>(192, n - i0);
        const std::size_t blocks = (rows + 7) / 8;
        const auto tail = static_cast<__mmask8>(rows % 8 == 0 ? 0xff : (1u << (rows % 8)) - 1u);
        __m512d acc[24];
        for (std::size_t b = 0; b < 24; ++b) acc[b] = _mm512_setzero_pd();
        for (std::size_t j = 0; j < n; ++j) {
            const __m512d xj = _mm512_set1_pd(x[j]);
            const double* c = g + j * n + i0;
#pragma GCC unroll 24
            for (std::size_t b = 0; b < 24; ++b) {
                if (b + 1 < blocks) acc[b] = _mm512_fmadd_pd(_mm512_loadu_pd(c + 8 * b), xj, acc[b]);
                else if (b + 1 == blocks) acc[b] = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(tail, c + 8 * b), xj, acc[b]);
            }
        }
        for (std::size_t b = 0; b + 1 < blocks; ++b) _mm512_storeu_pd(y + i0 + 8 * b, acc[b]);
        _mm512_mask_storeu_pd(y + i0 + 8 * (blocks - 1), tail, acc[blocks - 1]);
    }
}

LORAKIT_AVX512 double avx512_dot(const double* a, const double* b, std::size_t n) noexcept {
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm512_fmadd_pd(_mm512_loadu_pd(a + i), _mm512_loadu_pd(b + i), s0);
        s1 = _mm512_fmadd_pd(_mm512_loadu_pd(a + i + 8), _mm512_loadu_pd(b + i + 8), s1);
    }
    for (; i < n; i += 8) {
        const auto mask = static_cast<__mmask8>(n - i >= 8 ? 0xff : (1u << (n - i)) - 1u);
        s0 = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(mask, a + i), _mm512_maskz_loadu_pd(mask, b + i), s0);
    }
    // The lanes summed in a fixed order by hand (GCC 12's _mm512_reduce_add_pd warns inside).
    alignas(64) double lanes[8];
    _mm512_store_pd(lanes, _mm512_add_pd(s0, s1));
    return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
}

LORAKIT_AVX512 void avx512_axpy(std::size_t n, double alpha, const double* x, double* y) noexcept {
    const __m512d a = _mm512_set1_pd(alpha);
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm512_storeu_pd(y + i, _mm512_fmadd_pd(a, _mm512_loadu_pd(x + i), _mm512_loadu_pd(y + i)));
    if (i < n) {
        const auto mask = static_cast<__mmask8>((1u << (n - i)) - 1u);
        _mm512_mask_storeu_pd(y + i, mask,
                              _mm512_fmadd_pd(a, _mm512_maskz_loadu_pd(mask, x + i), _mm512_maskz_loadu_pd(mask, y + i)));
    }
}

// ---- MᵀM z over a stored matrix (normal_apply) ----

// 16 values of a row as f32: F16 through vcvtph2ps, BF16 by a 16-bit shift (exact), F32 as is.
template <DType D>
LORAKIT_AVX512 inline __attribute__((always_inline)) __m512 load16(const std::byte* p) noexcept {
    if constexpr (D == DType::F32) {
        return _mm512_loadu_ps(p);
    } else if constexpr (D == DType::F16) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    } else {
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
}

template <DType D>
constexpr std::size_t element_size = D == DType::F32 ? 4 : 2;

// The last `count` (< 16) values of a row, zero beyond them (never reads past the row).
template <DType D>
LORAKIT_AVX512 inline __m512 load_tail(const std::byte* p, std::size_t count) noexcept {
    alignas(64) std::byte buffer[64] = {};
    std::memcpy(buffer, p, count * element_size<D>);
    return load16<D>(buffer);
}

// t[g·4 + k] = row g · z_k for G consecutive rows (row_bytes apart) and the L columns of z.
template <DType D, int G, int L>
LORAKIT_AVX512 inline __attribute__((always_inline)) void row_dots(const std::byte* w, std::size_t row_bytes,
                                                                    std::size_t cols, const float* z, float* t) noexcept {
    __m512 acc[G][L];
    for (int g = 0; g < G; ++g)
        for (int k = 0; k < L; ++k) acc[g][k] = _mm512_setzero_ps();
    std::size_t c = 0;
    for (; c + 16 <= cols; c += 16) {
        __m512 zk[L];
        for (int k = 0; k < L; ++k) zk[k] = _mm512_loadu_ps(z + k * cols + c);
        for (int g = 0; g < G; ++g) {
            const __m512 x = load16<D>(w + g * row_bytes + c * element_size<D>);
            for (int k = 0; k < L; ++k) acc[g][k] = _mm512_fmadd_ps(x, zk[k], acc[g][k]);
            // The same columns of the next rows: the hardware prefetchers follow these G
            // interleaved streams too late (measured: twice as fast with this on a 26 MB f16 tensor).
            _mm_prefetch(reinterpret_cast<const char*>(w + (g + G) * row_bytes + c * element_size<D>), _MM_HINT_T0);
        }
    }
    if (c < cols) {
        const auto mask = static_cast<__mmask16>((1u << (cols - c)) - 1u);
        __m512 zk[L];
        for (int k = 0; k < L; ++k) zk[k] = _mm512_maskz_loadu_ps(mask, z + k * cols + c);
        for (int g = 0; g < G; ++g) {
            const __m512 x = load_tail<D>(w + g * row_bytes + c * element_size<D>, cols - c);
            for (int k = 0; k < L; ++k) acc[g][k] = _mm512_fmadd_ps(x, zk[k], acc[g][k]);
        }
    }
    for (int g = 0; g < G; ++g)
        for (int k = 0; k < L; ++k) t[g * 4 + k] = _mm512_reduce_add_ps(acc[g][k]);
}

// out[k·cols + c] += Σ_r t[r·4 + k] · row_r[c] over the p rows of a panel, for the columns
// [c0, c0 + 16·V): V·L accumulators stay in registers while the rows stream past.
template <DType D, int L, int V>
LORAKIT_AVX512 inline __attribute__((always_inline)) void panel_update(const std::byte* w, std::size_t row_bytes,
                                                                        std::size_t p, std::size_t cols, std::size_t c0,
                                                                        const float* t, float* out) noexcept {
    __m512 acc[V][L];
    for (int v = 0; v < V; ++v)
        for (int k = 0; k < L; ++k) acc[v][k] = _mm512_loadu_ps(out + k * cols + c0 + 16 * v);
    for (std::size_t r = 0; r < p; ++r) {
        const std::byte* row = w + r * row_bytes + c0 * element_size<D>;
        __m512 x[V];
        for (int v = 0; v < V; ++v) x[v] = load16<D>(row + 16 * v * element_size<D>);
        for (int k = 0; k < L; ++k) {
            const __m512 tk = _mm512_set1_ps(t[r * 4 + k]);
            for (int v = 0; v < V; ++v) acc[v][k] = _mm512_fmadd_ps(x[v], tk, acc[v][k]);
        }
    }
    for (int v = 0; v < V; ++v)
        for (int k = 0; k < L; ++k) _mm512_storeu_ps(out + k * cols + c0 + 16 * v, acc[v][k]);
}

// The same for the last cols - c0 < 16 columns (masked).
template <DType D, int L>
LORAKIT_AVX512 void panel_update_tail(const std::byte* w, std::size_t row_bytes, std::size_t p, std::size_t cols,
                                      std::size_t c0, const float* t, float* out) noexcept {
    const std::size_t count = cols - c0;
    const auto mask = static_cast<__mmask16>((1u << count) - 1u);
    __m512 acc[L];
    for (int k = 0; k < L; ++k) acc[k] = _mm512_maskz_loadu_ps(mask, out + k * cols + c0);
    for (std::size_t r = 0; r < p; ++r) {
        const __m512 x = load_tail<D>(w + r * row_bytes + c0 * element_size<D>, count);
        for (int k = 0; k < L; ++k) acc[k] = _mm512_fmadd_ps(x, _mm512_set1_ps(t[r * 4 + k]), acc[k]);
    }
    for (int k = 0; k < L; ++k) _mm512_mask_storeu_ps(out + k * cols + c0, mask, acc[k]);
}

// Rows per panel: about 256 KiB of the stored values (a quarter of this core's L2 on the
// machines measured), so that the second sweep reads the panel from cache. At most 256 rows
// (t's size in the scratch).
std::size_t avx512_normal_panel(std::size_t row_bytes) noexcept {
    return std::clamp<std::size_t>(262144 / std::max<std::size_t>(row_bytes, 1), 4, 256);
}

std::size_t avx512_normal_scratch(std::size_t, std::size_t) noexcept { return 256 * 4; }

template <DType D, int L>
LORAKIT_AVX512 void normal_apply_block(const std::byte* m, std::size_t rows, std::size_t cols, const float* z,
                                       float* out, float* t) noexcept {
    const std::size_t row_bytes = cols * element_size<D>, panel = avx512_normal_panel(row_bytes);
    std::fill(out, out + cols * L, 0.0f);
    for (std::size_t r0 = 0; r0 < rows; r0 += panel) {
        const std::size_t p = std::min(panel, rows - r0);
        const std::byte* w = m + r0 * row_bytes;
        std::size_t r = 0;
        for (; r + 4 <= p; r += 4) row_dots<D, 4, L>(w + r * row_bytes, row_bytes, cols, z, t + r * 4);
        for (; r < p; ++r) row_dots<D, 1, L>(w + r * row_bytes, row_bytes, cols, z, t + r * 4);
        std::size_t c = 0;
        for (; c + 64 <= cols; c += 64) panel_update<D, L, 4>(w, row_bytes, p, cols, c, t, out);
        for (; c + 16 <= cols; c += 16) panel_update<D, L, 1>(w, row_bytes, p, cols, c, t, out);
        if (c < cols) panel_update_tail<D, L>(w, row_bytes, p, cols, c, t, out);
    }
}

template <DType D>
LORAKIT_AVX512 void normal_apply_typed(const std::byte* m, std::size_t rows, std::size_t cols, const float* z,
                                       std::size_t l, float* out, float* t) noexcept {
    for (std::size_t k0 = 0; k0 < l; k0 += 4) {  // four columns of z at a time
        const float* zk = z + k0 * cols;
        float* ok = out + k0 * cols;
        switch (std::min<std::size_t>(4, l - k0)) {
        case 1: normal_apply_block<D, 1>(m, rows, cols, zk, ok, t); break;
        case 2: normal_apply_block<D, 2>(m, rows, cols, zk, ok, t); break;
        case 3: normal_apply_block<D, 3>(m, rows, cols, zk, ok, t); break;
        default: normal_apply_block<D, 4>(m, rows, cols, zk, ok, t); break;
        }
    }
}

LORAKIT_AVX512 void avx512_normal_apply(const std::byte* m, DType dtype, std::size_t rows, std::size_t cols,
                                        const float* z, std::size_t l, float* out, float* scratch) noexcept {
    if (dtype == DType::F16)
        normal_apply_typed<DType::F16>(m, rows, cols, z, l, out, scratch);
    else if (dtype == DType::BF16)
        normal_apply_typed<DType::BF16>(m, rows, cols, z, l, out, scratch);
    else
        normal_apply_typed<DType::F32>(m, rows, cols, z, l, out, scratch);
}

template <DType D>
LORAKIT_AVX512 float max_abs_typed(const std::byte* values, std::size_t n) noexcept {
    // |x| as bits, integer max (see portable_max_abs): widened f16/bf16 keep NaN and Inf
    // above every finite value.
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
    std::size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        m0 = _mm512_max_epi32(m0, _mm512_and_si512(_mm512_castps_si512(load16<D>(values + i * element_size<D>)), magnitude));
        m1 = _mm512_max_epi32(m1, _mm512_and_si512(_mm512_castps_si512(load16<D>(values + (i + 16) * element_size<D>)),
                                                   magnitude));
    }
    for (; i + 16 <= n; i += 16)
        m0 = _mm512_max_epi32(m0, _mm512_and_si512(_mm512_castps_si512(load16<D>(values + i * element_size<D>)), magnitude));
    if (i < n)
        m1 = _mm512_max_epi32(m1, _mm512_and_si512(_mm512_castps_si512(load_tail<D>(values + i * element_size<D>, n - i)),
                                                   magnitude));
    const int max_bits = _mm512_reduce_max_epi32(_mm512_max_epi32(m0, m1));
    if (max_bits >= 0x7f800000) return __builtin_inff();
    float result;
    std::memcpy(&result, &max_bits, sizeof result);
    return result;
}

LORAKIT_AVX512 float avx512_max_abs(const std::byte* values, DType dtype, std::size_t n) noexcept {
    if (dtype == DType::F16) return max_abs_typed<DType::F16>(values, n);
    if (dtype == DType::BF16) return max_abs_typed<DType::BF16>(values, n);
    return max_abs_typed<DType::F32>(values, n);
}

}  // namespace

extern const GramKernels avx512_gram{"avx512",
                                     avx512_stride,
                                     avx512_widen_rows,
                                     avx512_accumulate_rows,
                                     avx512_accumulate_columns,
                                     avx512_product,
                                     avx512_stride_f32,
                                     avx512_chunk_f32,
                                     avx512_accumulate_rows_f32,
                                     avx512_accumulate_columns_f32,
                                     avx512_matvec,
                                     avx512_dot,
                                     avx512_axpy,
                                     true,
                                     avx512_normal_scratch,
                                     avx512_normal_apply,
                                     avx512_max_abs};

}  // namespace lorakit::detail

#endif
