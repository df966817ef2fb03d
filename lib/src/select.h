// Selection of an order statistic of magnitudes (internal).
#pragma once
#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace lorakit {

// The keep-th largest |value| (what nth_element at position size - keep of the magnitudes gives),
// 1 <= keep <= size. Non-negative floats order as their bit patterns (NaN above Inf), so the work
// is on integers. A strided subsample of 256 brackets the wanted rank; one pass counts the values
// below the bracket and gathers those inside it (a tenth or so), and nth_element runs on those
// alone. When the bracket misses (an input arranged against the stride), the whole set is used:
// the answer is exact either way. This replaced a 12-bit radix count whose histogram increments
// serialised on repeated buckets (3% of a lora-stack report).
inline float kth_largest_magnitude(const std::vector<float>& values, std::size_t keep) {
    const std::size_t n = values.size(), rank = n - keep;  // 0-based, ascending
    auto magnitude = [](float v) { return std::bit_cast<std::uint32_t>(v) & 0x7fffffffu; };
    std::vector<std::uint32_t> inside;
    constexpr std::size_t m = 256, margin = 24;  // the subsample's rank has a spread of at most 8
    if (n >= 4 * m) {
        std::array<std::uint32_t, m> sample;
        for (std::size_t i = 0; i < m; ++i) sample[i] = magnitude(values[i * n / m]);
        std::sort(sample.begin(), sample.end());
        const std::size_t at = rank * m / n;
        const std::uint32_t lo = at >= margin ? sample[at - margin] : 0u;
        const std::uint32_t hi = at + margin < m ? sample[at + margin] : 0xffffffffu;
        std::size_t below = 0;
        inside.reserve(n / 4);
        for (float v : values) {
            const std::uint32_t x = magnitude(v);
            below += x < lo;
            if (x >= lo && x <= hi) inside.push_back(x);
        }
        if (below <= rank && rank - below < inside.size()) {
            const auto nth = inside.begin() + static_cast<std::ptrdiff_t>(rank - below);
            std::nth_element(inside.begin(), nth, inside.end());
            return std::bit_cast<float>(*nth);
        }
        inside.clear();
    }
    inside.reserve(n);
    for (float v : values) inside.push_back(magnitude(v));
    const auto nth = inside.begin() + static_cast<std::ptrdiff_t>(rank);
    std::nth_element(inside.begin(), nth, inside.end());
    return std::bit_cast<float>(*nth);
}

}  // namespace lorakit
