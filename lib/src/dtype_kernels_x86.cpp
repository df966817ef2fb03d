// AVX2 + F16C variants of the bulk 16-bit float conversions. Compiled for those instructions
// through target attributes, so the build stays portable: dtype_kernels.cpp calls them only
// when the CPU reports the features. Results are bit-identical to the scalar reference
// (tests/unit/test_dtype.cpp compares them over every 16-bit pattern and millions of f32s).
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include "dtype_kernels.h"

namespace lorakit::detail {

#define LORAKIT_AVX2 __attribute__((target("avx2,f16c")))

LORAKIT_AVX2 void avx2_f16_to_f32(const std::byte* src, float* dst, std::size_t count) noexcept {
    std::size_t i = 0;
    for (; i + 8 <= count; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    scalar_f16_to_f32(src + 2 * i, dst + i, count - i);
}

LORAKIT_AVX2 void avx2_bf16_to_f32(const std::byte* src, float* dst, std::size_t count) noexcept {
    std::size_t i = 0;
    for (; i + 8 <= count; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
        const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), wide);
    }
    scalar_bf16_to_f32(src + 2 * i, dst + i, count - i);
}

LORAKIT_AVX2 void avx2_f32_to_f16(const float* src, std::byte* dst, std::size_t count) noexcept {
    std::size_t i = 0;
    for (; i + 8 <= count; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), h);
    }
    scalar_f32_to_f16(src + i, dst + 2 * i, count - i);
}

namespace {

// Round-to-nearest-even of 8 f32 bit patterns to bf16, NaN -> quiet NaN with its sign and
// top payload bits, as the scalar f32_to_bf16.
LORAKIT_AVX2 inline __m256i bf16_round(__m256i x) {
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), odd), 16);
    const __m256i magnitude = _mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff));
    const __m256i is_nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(rounded, quiet, is_nan);
}

}  // namespace

LORAKIT_AVX2 void avx2_f32_to_bf16(const float* src, std::byte* dst, std::size_t count) noexcept {
    std::size_t i = 0;
    for (; i + 16 <= count; i += 16) {
        const __m256i lo = bf16_round(_mm256_castps_si256(_mm256_loadu_ps(src + i)));
        const __m256i hi = bf16_round(_mm256_castps_si256(_mm256_loadu_ps(src + i + 8)));
        // packus works within 128-bit lanes; the permute puts the four quarters back in order.
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i), packed);
    }
    scalar_f32_to_bf16(src + i, dst + 2 * i, count - i);
}

LORAKIT_AVX2 void avx2_scale_f32(float* values, std::size_t count, double factor) noexcept {
    const __m256d f = _mm256_set1_pd(factor);
    std::size_t i = 0;
    for (; i + 8 <= count; i += 8) {
        const __m256 x = _mm256_loadu_ps(values + i);
        const __m128 lo = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), f));
        const __m128 hi = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), f));
        _mm256_storeu_ps(values + i, _mm256_set_m128(hi, lo));
    }
    scalar_scale_f32(values + i, count - i, factor);
}

}  // namespace lorakit::detail

#endif
