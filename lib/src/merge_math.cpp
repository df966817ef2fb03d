#include "merge_math.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "lorakit/error.h"
#include "lorakit/random.h"

namespace lorakit::detail {

void magnitude_prune_in_place(std::vector<float>& t, double density) {
    if (density >= 1) return;
    const auto keep = static_cast<std::size_t>(density * static_cast<double>(t.size()));
    std::vector<std::uint32_t> order(t.size());
    std::iota(order.begin(), order.end(), 0u);
    auto larger = [&](std::uint32_t a, std::uint32_t b) {
        const float x = std::abs(t[a]), y = std::abs(t[b]);
        return x > y || (x == y && a < b);
    };
    if (keep < order.size()) std::nth_element(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(keep), order.end(), larger);
    std::vector<char> kept(t.size(), 0);
    for (std::size_t i = 0; i < keep; ++i) kept[order[i]] = 1;
    for (std::size_t i = 0; i < t.size(); ++i)
        if (!kept[i]) t[i] = 0.0f;
}

void random_prune_in_place(std::vector<float>& t, double density, std::uint64_t seed) {
    if (density >= 1) return;
    SplitMix64 random(seed);
    for (auto& x : t) {
        const double u = static_cast<double>(random.next() >> 11) * 0x1p-53;
        x = u < density ? static_cast<float>(static_cast<double>(x) / density) : 0.0f;
    }
}

std::vector<float> merge_tensors(std::vector<std::vector<float>> tensors, const std::vector<double>& weights,
                                 MergeMethod method, double density, MajoritySign sign, std::uint64_t seed) {
    const std::size_t n = tensors.front().size();
    const bool magnitude = method == MergeMethod::ties || method == MergeMethod::magnitude_prune ||
                           method == MergeMethod::ties_svd || method == MergeMethod::magnitude_prune_svd;
    const bool random = method == MergeMethod::dare_linear || method == MergeMethod::dare_ties ||
                        method == MergeMethod::dare_linear_svd || method == MergeMethod::dare_ties_svd;
    const bool disjoint = method == MergeMethod::ties || method == MergeMethod::dare_ties ||
                          method == MergeMethod::ties_svd || method == MergeMethod::dare_ties_svd;
    if (density < 0) fail(ErrorCode::usage, "density must be >= 0, got {}", density);
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        if (magnitude) magnitude_prune_in_place(tensors[i], density);
        if (random) random_prune_in_place(tensors[i], density, seed + 0x9e3779b97f4a7c15ULL * (i + 1));
    }
    std::vector<float> out(n, 0.0f);
    if (!disjoint) {
        for (std::size_t j = 0; j < n; ++j) {
            double sum = 0;
            for (std::size_t i = 0; i < tensors.size(); ++i) sum += weights[i] * tensors[i][j];
            out[j] = static_cast<float>(sum);
        }
        return out;
    }
    // TIES: the sign is elected from the pruned, unweighted tensors; zeros never agree.
    for (std::size_t j = 0; j < n; ++j) {
        double election = 0;
        for (const auto& t : tensors) {
            const float x = t[j];
            election += sign == MajoritySign::total ? x : (x > 0 ? 1.0 : x < 0 ? -1.0 : 0.0);
        }
        const float majority = election >= 0 ? 1.0f : -1.0f;
        double sum = 0;
        int agreeing = 0;
        for (std::size_t i = 0; i < tensors.size(); ++i) {
            const float x = tensors[i][j];
            const float s = x > 0 ? 1.0f : x < 0 ? -1.0f : 0.0f;
            if (s == majority) {
                sum += weights[i] * x;
                ++agreeing;
            }
        }
        out[j] = static_cast<float>(sum / std::max(agreeing, 1));
    }
    return out;
}

double quantile(std::vector<float> values, double q) {
    if (values.empty()) return 0;
    std::sort(values.begin(), values.end());
    const double position = q * static_cast<double>(values.size() - 1);
    const auto lo = static_cast<std::size_t>(std::floor(position));
    const std::size_t hi = std::min(lo + 1, values.size() - 1);
    const double fraction = position - static_cast<double>(lo);
    return values[lo] + fraction * (static_cast<double>(values[hi]) - values[lo]);
}

}  // namespace lorakit::detail
