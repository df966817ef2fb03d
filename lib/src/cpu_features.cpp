#include "cpu_features.h"

#include <cstdlib>
#include <string_view>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace lorakit::detail {

bool force_scalar() noexcept {
    const char* force = std::getenv("LORAKIT_FORCE_SCALAR");
    return force && std::string_view(force) == "1";
}

#if defined(__x86_64__) || defined(__i386__)

namespace {

struct Cpuid {
    unsigned a = 0, b = 0, c = 0, d = 0;
};

// Leaf 1 ECX and leaf 7 (sub-leaf 0) EBX; false when a leaf is missing.
bool read_cpuid(Cpuid& leaf1, Cpuid& leaf7) noexcept {
    return __get_cpuid(1, &leaf1.a, &leaf1.b, &leaf1.c, &leaf1.d) &&
           __get_cpuid_count(7, 0, &leaf7.a, &leaf7.b, &leaf7.c, &leaf7.d);
}

// The register states the OS saves (XCR0), all of `bits`; needs OSXSAVE (leaf 1 ECX bit 27).
bool os_saves(const Cpuid& leaf1, unsigned bits) noexcept {
    if (!(leaf1.c & (1u << 27))) return false;
    unsigned low = 0, high = 0;
    __asm__("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
    return (low & bits) == bits;
}

}  // namespace

bool cpu_has_avx2_f16c() noexcept {
    Cpuid leaf1, leaf7;
    if (!read_cpuid(leaf1, leaf7)) return false;
    const bool avx = leaf1.c & (1u << 28), f16c = leaf1.c & (1u << 29), avx2 = leaf7.b & (1u << 5);
    return avx && f16c && avx2 && os_saves(leaf1, 0x6u);  // XMM and YMM state
}

bool cpu_has_avx512f() noexcept {
    Cpuid leaf1, leaf7;
    if (!read_cpuid(leaf1, leaf7)) return false;
    // XMM, YMM, opmask, ZMM0-15 upper halves, ZMM16-31.
    return (leaf7.b & (1u << 16)) && os_saves(leaf1, 0xe6u);
}

bool cpu_has_sha() noexcept {
    Cpuid leaf1, leaf7;
    if (!read_cpuid(leaf1, leaf7)) return false;
    const bool sse41 = leaf1.c & (1u << 19), ssse3 = leaf1.c & (1u << 9), sha = leaf7.b & (1u << 29);
    return sse41 && ssse3 && sha;
}

#else

bool cpu_has_avx2_f16c() noexcept { return false; }
bool cpu_has_avx512f() noexcept { return false; }
bool cpu_has_sha() noexcept { return false; }

#endif

}  // namespace lorakit::detail
