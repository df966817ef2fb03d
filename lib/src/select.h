// Selection of an order statistic by radix counting (internal).
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace lorakit {

// The keep-th largest |value| (what nth_element at position size - keep of the magnitudes gives):
// non-negative floats order as their bit patterns, so a counting pass over the top 12 bits finds
// the bucket that holds it, and nth_element runs on that bucket alone. 1 <= keep <= size.
inline float kth_largest_magnitude(const std::vector<float>& values, std::size_t keep) {
    const std::size_t n = values.size(), rank = n - keep;  // 0-based, ascending
    constexpr int shift = 20;
    std::vector<std::uint32_t> count(std::size_t{1} << (32 - shift), 0);
    std::vector<std::uint32_t> bits(n);
    for (std::size_t s = 0; s < n; ++s) {
        bits[s] = std::bit_cast<std::uint32_t>(std::abs(values[s]));
        ++count[bits[s] >> shift];
    }
    std::size_t below = 0, bucket = 0;
    while (below + count[bucket] <= rank) below += count[bucket++];
    std::vector<std::uint32_t> inside;
    inside.reserve(count[bucket]);
    for (std::size_t s = 0; s < n; ++s)
        if ((bits[s] >> shift) == bucket) inside.push_back(bits[s]);
    const auto nth = inside.begin() + static_cast<std::ptrdiff_t>(rank - below);
    std::nth_element(inside.begin(), nth, inside.end());
    return std::bit_cast<float>(*nth);
}

}  // namespace lorakit
