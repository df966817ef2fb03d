// The long-dimension kernels of the factored SVD (linalg.cpp): Gram accumulation G += Σ w wᵀ
// over the rows w (length R) of a stacked factor, in double, a cache-sized chunk at a time
// (stack_with_grams), the f32 products that form the new factors (factored_lora), and the
// matrix-vector steps of lora-stack's Lanczos iteration, and the passes of its block Krylov
// iteration over a base tensor (MᵀM z, straight from the stored f16/bf16/f32 values). Chosen
// once per process by CPU features. Every variant gives the Grams to double rounding (products
// of f32 values are exact in double; only the summation order differs) and the products to f32
// rounding.
#pragma once

#include <cstddef>
#include <string_view>

#include "lorakit/dtype.h"

namespace lorakit::detail {

struct GramKernels {
    std::string_view name;
    // Row stride (in doubles) the variant wants for R values: R rounded up to its vector width.
    std::size_t (*stride)(std::size_t R) noexcept;
    // dst[o·ld + k] = src[o·R + k] widened to double for o < rows, k < R; the pad dst[o·ld + k]
    // for R <= k < ld is set to zero.
    void (*widen_rows)(const float* src, std::size_t R, std::size_t rows, double* dst, std::size_t ld) noexcept;
    // g (ld x ld, column-major, ld = stride(R)): its upper triangle += Σ_o w_o w_oᵀ over the
    // `rows` rows w_o = w + o·ld (length ld, zero beyond R). Entries below the diagonal may be
    // written too and mean nothing.
    void (*accumulate_rows)(const double* w, std::size_t rows, std::size_t R, std::size_t ld, double* g) noexcept;
    // The same for the columns of an f32 array: g's upper triangle += Σ_j c_j c_jᵀ for j < n,
    // c_j[k] = src[k·src_ld + j] (k < R). `scratch` holds stride(R)·n doubles.
    void (*accumulate_columns)(const float* src, std::size_t src_ld, std::size_t R, std::size_t n, double* scratch,
                               double* g) noexcept;
    // C = L·M in f32 (the new factors from the stacks): C[i·c_ld + j] = Σ_r L[i·l_i + r·l_r] ·
    // M[r·m_ld + j] for i < rows, j < cols, r < inner; one of l_i, l_r is 1. `scratch` holds
    // inner·64 floats.
    void (*product)(std::size_t rows, std::size_t cols, std::size_t inner, const float* l, std::size_t l_i,
                    std::size_t l_r, const float* m, std::size_t m_ld, float* c, std::size_t c_ld, float* scratch) noexcept;
    // f32 Grams (lora-stack's report), from rows of `stride_f32(R)` floats (zero past R) in
    // chunks of `chunk_f32(stride)` rows: g (ld x ld, column-major, double) upper triangle +=
    // Σ_o w_o w_oᵀ over the `rows` rows w_o = w + o·ld, summed in f32 within the chunk and added
    // to g in double (so the rounding grows with the chunk, not with the factor's length).
    // Entries below the diagonal may be written and mean nothing; `scratch`: ld·ld floats.
    std::size_t (*stride_f32)(std::size_t R) noexcept;
    std::size_t (*chunk_f32)(std::size_t ld) noexcept;
    void (*accumulate_rows_f32)(const float* w, std::size_t rows, std::size_t R, std::size_t ld, double* g,
                                float* scratch) noexcept;
    // The same for the n columns c_j[k] = block[k·block_ld + j] (k < R) of an R x n row-major
    // block (a chunk of a factor's columns). `rows` holds chunk_f32(ld) rows of ld floats, zero
    // past R (the AVX-512 variant transposes the block into it); `scratch`: ld·ld floats.
    void (*accumulate_columns_f32)(const float* block, std::size_t block_ld, std::size_t R, std::size_t n, std::size_t ld,
                                   double* g, float* rows, float* scratch) noexcept;
    // The small double-precision steps of a Lanczos iteration on R x R Grams (lora-stack's
    // ‖Σ ΔW‖₂): y = G·x for the column-major n x n G, Σ a·b, and y += alpha·x.
    void (*matvec)(const double* g, std::size_t n, const double* x, double* y) noexcept;
    double (*dot)(const double* a, const double* b, std::size_t n) noexcept;
    void (*axpy)(std::size_t n, double alpha, const double* x, double* y) noexcept;
    // out (cols x l, column-major, ld cols) = MᵀM z in f32, one pass over the row-major rows x
    // cols matrix M as stored (F32, F16 or BF16, `m` not necessarily aligned), z cols x l
    // column-major (lora-stack's ‖W‖₂ of a base tensor, l <= 4). A cache-sized panel P of rows
    // at a time: t = P z, then out += Pᵀ t while P is still in cache. `scratch` holds
    // normal_scratch(cols, l) floats.
    // Whether normal_apply widens f16/bf16 panels itself at no real cost (in registers). When
    // false (the portable variant converts each panel into memory on every pass), a caller
    // making several passes widens the matrix to f32 once instead.
    bool widens_in_registers;
    std::size_t (*normal_scratch)(std::size_t cols, std::size_t l) noexcept;
    void (*normal_apply)(const std::byte* m, DType dtype, std::size_t rows, std::size_t cols, const float* z,
                         std::size_t l, float* out, float* scratch) noexcept;
    // max |x| over n stored F32, F16 or BF16 values (not necessarily aligned), as f32; +inf when
    // one is NaN or infinite (lora-stack's overflow screen of a base tensor, row by row).
    float (*max_abs)(const std::byte* values, DType dtype, std::size_t n) noexcept;
};

// The kernels for this CPU (LORAKIT_FORCE_SCALAR=1 selects the portable ones).
const GramKernels& gram_kernels() noexcept;
// The portable kernels (OpenBLAS's dsyrk and sgemm), always available.
const GramKernels& portable_gram_kernels() noexcept;
// Every variant this build can run on this CPU, portable first (for tests).
std::size_t available_gram_kernel_count() noexcept;
const GramKernels& available_gram_kernel(std::size_t index) noexcept;

}  // namespace lorakit::detail
