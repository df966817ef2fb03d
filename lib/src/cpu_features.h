// What this CPU and OS can run, for the kernels chosen at run time (dtype conversions, SHA-256,
// the factored SVD's Grams and products), and the switch that turns them all off.
#pragma once

namespace lorakit::detail {

// LORAKIT_FORCE_SCALAR=1 in the environment: every run-time-chosen kernel takes its portable
// variant (to rule SIMD out when debugging).
bool force_scalar() noexcept;

// CPUID and XGETBV read directly (compilers disagree on which feature names
// __builtin_cpu_supports knows); false on other architectures.
bool cpu_has_avx2_f16c() noexcept;  // AVX2 + F16C, YMM state saved by the OS
bool cpu_has_avx512f() noexcept;    // AVX-512F, opmask and all ZMM state saved by the OS
bool cpu_has_sha() noexcept;        // SHA extensions with SSE4.1 and SSSE3

}  // namespace lorakit::detail
