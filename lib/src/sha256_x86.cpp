// SHA-256 with the x86 SHA extensions (SHA-NI), the standard sha256rnds2 / sha256msg1 /
// sha256msg2 schedule. Compiled through a target attribute; used only when CPUID reports SHA.
#include "cpu_features.h"
#include "sha256_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

namespace lorakit::detail {

namespace {

__attribute__((target("sha,sse4.1,ssse3"))) void shani_blocks(std::uint32_t state[8], const std::uint8_t* data,
                                                             std::size_t blocks) noexcept {
    const __m128i byteswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i tmp = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(state)), 0xB1);  // CDAB
    __m128i state1 = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(state + 4)), 0x1B);  // EFGH
    __m128i state0 = _mm_alignr_epi8(tmp, state1, 8);  // ABEF
    state1 = _mm_blend_epi16(state1, tmp, 0xF0);       // CDGH
    for (; blocks > 0; --blocks, data += 64) {
        const __m128i abef = state0, cdgh = state1;
        __m128i w[16];
        for (int i = 0; i < 16; ++i) {
            if (i < 4)
                w[i] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(data + 16 * i)), byteswap);
            else
                w[i] = _mm_sha256msg2_epu32(
                    _mm_add_epi32(_mm_sha256msg1_epu32(w[i - 4], w[i - 3]), _mm_alignr_epi8(w[i - 1], w[i - 2], 4)),
                    w[i - 1]);
            const auto* constants = reinterpret_cast<const __m128i*>(sha256_round_constants + 4 * i);
            __m128i message = _mm_add_epi32(w[i], _mm_load_si128(constants));
            state1 = _mm_sha256rnds2_epu32(state1, state0, message);
            message = _mm_shuffle_epi32(message, 0x0E);
            state0 = _mm_sha256rnds2_epu32(state0, state1, message);
        }
        state0 = _mm_add_epi32(state0, abef);
        state1 = _mm_add_epi32(state1, cdgh);
    }
    tmp = _mm_shuffle_epi32(state0, 0x1B);      // FEBA
    state1 = _mm_shuffle_epi32(state1, 0xB1);   // DCHG
    state0 = _mm_blend_epi16(tmp, state1, 0xF0);  // DCBA
    state1 = _mm_alignr_epi8(state1, tmp, 8);     // HGFE
    _mm_storeu_si128(reinterpret_cast<__m128i*>(state), state0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(state + 4), state1);
}

}  // namespace

Sha256Blocks sha256_blocks_accelerated() noexcept {
    return !force_scalar() && cpu_has_sha() ? shani_blocks : nullptr;
}

}  // namespace lorakit::detail

#else

namespace lorakit::detail {
Sha256Blocks sha256_blocks_accelerated() noexcept { return nullptr; }
}  // namespace lorakit::detail

#endif
