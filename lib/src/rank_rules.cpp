#include "lorakit/rank_rules.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#include <fmt/format.h>

#include "lorakit/error.h"

namespace lorakit {

namespace {

double value_at(const std::vector<double>& v, std::int64_t i) {
    return i < static_cast<std::int64_t>(v.size()) ? v[static_cast<std::size_t>(i)] : 0.0;
}

// Number of leading entries whose running sum of f(σ) stays below `target` of the total, i.e.
// the 0-based index searchsorted(cumsum/total, target) of torch (left side); `length` entries.
std::int64_t searchsorted_fraction(const std::vector<double>& v, std::int64_t length, double target, bool squares) {
    double total = 0;
    for (std::int64_t i = 0; i < length; ++i) total += squares ? value_at(v, i) * value_at(v, i) : value_at(v, i);
    double running = 0;
    for (std::int64_t i = 0; i < length; ++i) {
        const double x = value_at(v, i);
        running += squares ? x * x : x;
        if (running / total >= target) return i;
    }
    return length;
}

std::int64_t clamp_like_kohya(std::int64_t index, std::int64_t lo, std::int64_t hi) {
    return std::max(lo, std::min(index, hi));  // Python's max(lo, min(index, hi)), even when hi < lo
}

double parse_number(const std::string& text, const std::string& whole) {
    char* end = nullptr;
    const double v = std::strtod(text.c_str(), &end);
    if (text.empty() || !end || *end != '\0' || !std::isfinite(v))
        fail(ErrorCode::usage, "{}: {} is not a number", quote(whole), quote(text));
    return v;
}

}  // namespace

std::string_view rank_rule_name(RankRule rule) noexcept {
    switch (rule) {
    case RankRule::fixed: return "fixed";
    case RankRule::sv_ratio: return "sv_ratio";
    case RankRule::sv_cumulative: return "sv_cumulative";
    case RankRule::sv_fro: return "sv_fro";
    case RankRule::energy: return "energy";
    }
    return "fixed";
}

RankSpec parse_dynamic_rule(const std::string& text) {
    const auto eq = text.find('=');
    if (eq == std::string::npos)
        fail(ErrorCode::usage, "dynamic rule {} must look like sv_ratio=X, sv_fro=X, sv_cumulative=X or energy=X",
             quote(text));
    const std::string name = text.substr(0, eq);
    RankSpec spec;
    spec.parameter = parse_number(text.substr(eq + 1), text);
    if (name == "sv_ratio") spec.rule = RankRule::sv_ratio;
    else if (name == "sv_cumulative") spec.rule = RankRule::sv_cumulative;
    else if (name == "sv_fro") spec.rule = RankRule::sv_fro;
    else if (name == "energy") spec.rule = RankRule::energy;
    else fail(ErrorCode::usage, "unknown dynamic rule {} (sv_ratio, sv_fro, sv_cumulative, energy)", quote(name));
    if (spec.rule == RankRule::sv_ratio && spec.parameter <= 1)
        fail(ErrorCode::usage, "sv_ratio must be above 1 (the largest singular value over the smallest kept)");
    if (spec.rule != RankRule::sv_ratio && (spec.parameter <= 0 || spec.parameter > 1))
        fail(ErrorCode::usage, "{} must be in (0, 1]", name);
    return spec;
}

std::string describe(const RankSpec& spec) {
    std::string out = spec.rule == RankRule::fixed ? fmt::format("rank {}", spec.rank)
                                                   : fmt::format("{}={}", rank_rule_name(spec.rule), spec.parameter);
    if (spec.rule != RankRule::fixed && spec.rank > 0) out += fmt::format(" (at most {})", spec.rank);
    if (spec.conv_rank > 0) out += fmt::format(", conv rank {}", spec.conv_rank);
    if (spec.compat == RankCompat::kohya) out += ", kohya rules";
    if (spec.compat == RankCompat::kohya_2194) out += ", kohya rules after PR #2194";
    return out;
}

RankChoice rank_statistics(const std::vector<double>& values, std::int64_t k) {
    RankChoice c;
    c.rank = k;
    double total_sq = 0, total = 0, kept_sq = 0, kept = 0;
    for (std::size_t i = 0; i < values.size(); ++i) {
        total += std::abs(values[i]);
        total_sq += values[i] * values[i];
        if (static_cast<std::int64_t>(i) < k) {
            kept += std::abs(values[i]);
            kept_sq += values[i] * values[i];
        }
    }
    c.fro_retained = total_sq > 0 ? std::sqrt(kept_sq / total_sq) : 1.0;
    c.sum_retained = total > 0 ? kept / total : 1.0;
    const double last = k > 0 ? value_at(values, k - 1) : 0.0;
    c.max_ratio = last > 0 ? value_at(values, 0) / last : std::numeric_limits<double>::infinity();
    // Σ_{i>k} σ² summed directly: exact even when the retained fraction rounds to 1.
    double dropped_sq = 0;
    for (std::size_t i = static_cast<std::size_t>(std::max<std::int64_t>(k, 0)); i < values.size(); ++i)
        dropped_sq += values[i] * values[i];
    c.relative_error = total_sq > 0 ? std::sqrt(dropped_sq / total_sq) : 0.0;
    return c;
}

namespace {

// lorakit's clamps on a rule's rank k.
std::int64_t clamped(std::int64_t k, std::int64_t current_rank, const RankSpec& spec) {
    k = std::max(k, spec.min_rank);
    if (spec.max_rank > 0) k = std::min(k, spec.max_rank);
    return std::max<std::int64_t>(1, std::min(k, current_rank));  // never raise a rank
}

}  // namespace

std::optional<std::int64_t> rank_without_spectrum(std::int64_t current_rank, bool conv, const RankSpec& spec) {
    if (spec.compat != RankCompat::lorakit || spec.rule != RankRule::fixed) return std::nullopt;
    return clamped(conv && spec.conv_rank > 0 ? spec.conv_rank : spec.rank, current_rank, spec);
}

RankChoice choose_rank(const std::vector<double>& values, std::int64_t full_length, std::int64_t current_rank,
                       bool conv, const RankSpec& spec) {
    const std::int64_t limit = conv && spec.conv_rank > 0 ? spec.conv_rank : spec.rank;
    const std::int64_t length = std::max<std::int64_t>(full_length, static_cast<std::int64_t>(values.size()));
    const double top = value_at(values, 0);
    std::int64_t k = 0;
    if (spec.compat == RankCompat::lorakit) {
        switch (spec.rule) {
        case RankRule::fixed: k = limit; break;
        case RankRule::sv_ratio:
            for (double s : values) k += s > top / spec.parameter ? 1 : 0;
            break;
        case RankRule::sv_cumulative: k = searchsorted_fraction(values, length, spec.parameter * (1 - 1e-12), false) + 1; break;
        case RankRule::sv_fro:
            k = searchsorted_fraction(values, length, spec.parameter * spec.parameter * (1 - 1e-12), true) + 1;
            break;
        case RankRule::energy: k = searchsorted_fraction(values, length, spec.parameter * (1 - 1e-12), true) + 1; break;
        }
        if (spec.rule != RankRule::fixed && limit > 0) k = std::min(k, limit);
        k = clamped(k, current_rank, spec);
    } else {
        const bool legacy = spec.compat == RankCompat::kohya;
        const std::int64_t cap = limit > 0 ? limit : 4;  // kohya's --new_rank defaults to 4
        switch (spec.rule) {
        case RankRule::fixed: k = cap; break;
        case RankRule::sv_ratio: {
            std::int64_t count = 0;
            for (double s : values) count += s > top / spec.parameter ? 1 : 0;
            k = legacy ? clamp_like_kohya(count, 1, length - 1) + 1 : clamp_like_kohya(count - 1, 0, length - 1) + 1;
            break;
        }
        case RankRule::sv_cumulative:
        case RankRule::sv_fro:
        case RankRule::energy: {
            const bool squares = spec.rule != RankRule::sv_cumulative;
            const double target = spec.rule == RankRule::sv_fro ? spec.parameter * spec.parameter : spec.parameter;
            const std::int64_t i = searchsorted_fraction(values, length, target, squares);
            k = legacy ? clamp_like_kohya(i + 1, 1, length - 1) + 1 : clamp_like_kohya(i, 0, length - 1) + 1;
            break;
        }
        }
        if (top <= 1e-6) k = 1;  // kohya's MIN_SV: a zero matrix gets rank 1
        else if (k > cap) k = cap;
    }
    RankChoice c = rank_statistics(values, k);
    return c;
}

}  // namespace lorakit
