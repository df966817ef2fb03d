// Small LoRA modules and their dense deltas, for tests that check operations against a dense
// computation done independently here.
#pragma once

#include <random>
#include <string>
#include <vector>

#include "lorakit/adapter.h"

namespace lorakit::test {

// A module with the given f32 factors B [out, r] and A [r, in] and alpha (scale alpha / r).
inline LoraModule module_of(const std::vector<float>& b, const std::vector<float>& a, std::int64_t out, std::int64_t r,
                            std::int64_t in, double alpha, const std::string& name = "model.layers.0.self_attn.q_proj") {
    LoraModule m;
    m.name = name;
    m.source_name = name;
    m.down = Tensor::from_f32(DType::F32, {r, in}, a);
    m.up = Tensor::from_f32(DType::F32, {out, r}, b);
    m.alpha = alpha;
    return m;
}

// The same with N(0, 1) factors.
inline LoraModule random_module(std::mt19937& g, std::int64_t out, std::int64_t in, std::int64_t r, double alpha,
                                const std::string& name = "model.layers.0.self_attn.q_proj") {
    std::normal_distribution<float> d;
    std::vector<float> a(static_cast<std::size_t>(r * in)), b(static_cast<std::size_t>(out * r));
    for (auto& x : a) x = d(g);
    for (auto& x : b) x = d(g);
    return module_of(b, a, out, r, in, alpha, name);
}

inline Adapter adapter_of(std::vector<LoraModule> modules, const std::string& source = "memory") {
    Adapter a;
    a.source = source;
    a.convention = "peft";
    a.modules = std::move(modules);
    return a;
}

// weight · scale · B·A, row-major out x flat_in, in double.
inline std::vector<double> dense_delta(const LoraModule& m, double weight = 1.0) {
    const auto a = m.down.to_f32(), b = m.up.to_f32();
    const std::int64_t out = m.out_features(), in = m.flat_in_features(), r = m.rank();
    std::vector<double> d(static_cast<std::size_t>(out * in), 0.0);
    const double c = weight * m.scale();
    for (std::int64_t o = 0; o < out; ++o)
        for (std::int64_t k = 0; k < r; ++k) {
            const double bk = c * b[static_cast<std::size_t>(o * r + k)];
            for (std::int64_t i = 0; i < in; ++i) d[static_cast<std::size_t>(o * in + i)] += bk * a[static_cast<std::size_t>(k * in + i)];
        }
    return d;
}

}  // namespace lorakit::test
