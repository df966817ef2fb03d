// Choosing a rank from a singular spectrum, and the statistics every resize reports.
//
// lorakit's rules (the default) on σ_1 >= σ_2 >= ... of ΔW:
//   fixed N          k = N
//   sv_ratio X       k = #{ σ_i > σ_1 / X }                     (X > 1)
//   sv_cumulative X  smallest k with Σ_{i<=k} σ_i / Σ σ_i >= X    (0 < X <= 1)
//   sv_fro X         smallest k with sqrt(Σ_{i<=k} σ_i²) / ‖σ‖ >= X (0 < X <= 1)
//   energy X         smallest k with Σ_{i<=k} σ_i² / Σ σ_i² >= X   (0 < X <= 1; energy X = sv_fro √X)
// then clamped to [min_rank, max_rank] and never above the module's current rank.
//
// Compatibility with kohya-ss/sd-scripts networks/resize_lora.py (rank_resize and its
// index_* helpers), whose spectrum is the full SVD of the dense delta, len(S) = min(out, in)
// (lorakit pads the exact factored spectrum with zeros to that length):
//   kohya       the rules as released up to PR #2194 (main @48d368fa): cumulative/fro give
//               clamp(i + 1, 1, len-1) + 1 and sv_ratio clamp(count, 1, len-1) + 1 (i = the
//               searchsorted index, count = #{S > S_1/X}); a fixed rank is used as given, even
//               above the current rank;
//   kohya-2194  after PR #2194 (commit 41de9362): cumulative/fro clamp(i, 0, len-1) + 1, sv_ratio
//               clamp(count - 1, 0, len-1) + 1;
// both then: S_1 <= 1e-6 gives rank 1, and a dynamic rank above --rank is capped at it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lorakit {

enum class RankRule { fixed, sv_ratio, sv_cumulative, sv_fro, energy };
enum class RankCompat { lorakit, kohya, kohya_2194 };

struct RankSpec {
    RankRule rule = RankRule::fixed;
    double parameter = 0;     // X of the dynamic rules
    std::int64_t rank = 0;    // N for fixed; for dynamic rules a maximum when > 0 (kohya's --new_rank)
    std::int64_t conv_rank = 0;  // rank for convolutions (kohya: every 4-D module); 0 = same as rank
    std::int64_t min_rank = 1;
    std::int64_t max_rank = 0;   // 0 = none
    RankCompat compat = RankCompat::lorakit;
};

// Parses "sv_ratio=2", "sv_fro=0.9", "sv_cumulative=0.95", "energy=0.99" (usage error otherwise).
RankSpec parse_dynamic_rule(const std::string& text);
std::string describe(const RankSpec& spec);  // "rank 32", "sv_fro=0.9 (max 64)", ...
std::string_view rank_rule_name(RankRule rule) noexcept;

struct RankChoice {
    std::int64_t rank = 0;
    double fro_retained = 1;    // sqrt(Σ_{i<=k} σ²) / ‖σ‖ (kohya's "fro retained")
    double sum_retained = 1;    // Σ_{i<=k} σ / Σ σ     (kohya's "sum(S) retained")
    double max_ratio = 1;       // σ_1 / σ_k            (kohya's "max(S) ratio")
    double relative_error = 0;  // ‖ΔW - ΔW_k‖_F / ‖ΔW‖_F = sqrt(1 - fro_retained²)
};

// `values` is the exact spectrum (descending, possibly shorter than full_length, the rest being
// zero); `current_rank` the module's rank; `conv` selects conv_rank.
RankChoice choose_rank(const std::vector<double>& values, std::int64_t full_length, std::int64_t current_rank,
                       bool conv, const RankSpec& spec);

// The rank choose_rank gives whatever the spectrum, when the rule fixes it (a fixed rank under
// lorakit's rules, with the min/max clamps and never above current_rank): lora-resize and
// lora-merge then know their output's shapes before computing it. nullopt for the rules that
// read the spectrum (and for the compatibility modes: kohya's gives rank 1 to a zero matrix).
std::optional<std::int64_t> rank_without_spectrum(std::int64_t current_rank, bool conv, const RankSpec& spec);

// The statistics of keeping the top k values.
RankChoice rank_statistics(const std::vector<double>& values, std::int64_t k);

}  // namespace lorakit
