// A small deterministic random generator (splitmix64). Its output is the same on every
// platform and standard library, which std::*_distribution does not guarantee, so seeded
// operations give identical bytes everywhere.
#pragma once

#include <cstdint>

namespace lorakit {

class SplitMix64 {
public:
    explicit SplitMix64(std::uint64_t seed) : state_(seed) {}
    std::uint64_t next() {
        std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }
    // Uniform in [-1, 1), on a 2^-23 grid (exactly representable in f32).
    float uniform() { return static_cast<float>(static_cast<std::int64_t>(next() >> 40) - (1 << 23)) * 0x1p-23f; }

private:
    std::uint64_t state_;
};

}  // namespace lorakit
