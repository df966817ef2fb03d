#include "support/options.h"

#include <cmath>
#include <cstdlib>
#include <sstream>

#include "lorakit/error.h"

namespace lorakit::cli {

std::vector<double> parse_weights(const std::string& text) {
    std::vector<double> weights;
    std::stringstream stream(text);
    std::string item;
    while (std::getline(stream, item, ',')) {
        char* end = nullptr;
        const double w = std::strtod(item.c_str(), &end);
        if (item.empty() || *end != '\0' || !std::isfinite(w))
            fail(ErrorCode::usage, "--weights: {} is not a number", quote(item));
        weights.push_back(w);
    }
    return weights;
}

DType parse_output_dtype(const std::string& text) {
    if (text == "f32" || text == "F32" || text == "float") return DType::F32;
    if (text == "f16" || text == "F16" || text == "fp16") return DType::F16;
    if (text == "bf16" || text == "BF16") return DType::BF16;
    fail(ErrorCode::usage, "unsupported output dtype {} (f32, f16 or bf16)", quote(text));
}

void RankOptions::add_to(CLI::App& app, bool rank_required, bool with_compat) {
    auto* rank_option = app.add_option("--rank", rank, "the new rank (with --dynamic: the largest allowed)")
                            ->type_name("N")
                            ->check(CLI::PositiveNumber);
    auto* dynamic_option =
        app.add_option("--dynamic", dynamic,
                       "choose each module's rank from its spectrum: sv_ratio=X (keep σ > σ1/X), sv_fro=X (keep a\n"
                       "fraction X of the Frobenius norm), sv_cumulative=X (of Σσ), energy=X (of Σσ²)")
            ->type_name("RULE");
    if (rank_required) {
        auto* group = app.add_option_group("rank", "how to choose the new ranks");
        group->add_option(rank_option);
        group->add_option(dynamic_option);
        group->require_option(1, 2);
    }
    app.add_option("--conv-rank", conv_rank, "rank for convolution modules (default: --rank)")->type_name("N")->check(CLI::PositiveNumber);
    app.add_option("--min-rank", min_rank, "smallest rank a dynamic rule may choose (default 1)")->type_name("N")->check(CLI::PositiveNumber);
    app.add_option("--max-rank", max_rank, "largest rank any rule may choose")->type_name("N")->check(CLI::PositiveNumber);
    if (!with_compat) return;
    app.add_option("--compat", compat,
                   "rank rules: lorakit (default), kohya (sd-scripts resize_lora.py as released, with its off-by-one:\n"
                   "dynamic ranks come out 1-2 higher, at least 2), kohya-2194 (after sd-scripts PR #2194)")
        ->check(CLI::IsMember({"lorakit", "kohya", "kohya-2194"}));
}

RankSpec RankOptions::finish() const {
    RankSpec spec;
    if (!dynamic.empty()) spec = parse_dynamic_rule(dynamic);
    spec.rank = rank;
    spec.conv_rank = conv_rank;
    spec.min_rank = min_rank;
    spec.max_rank = max_rank;
    if (compat == "kohya") spec.compat = RankCompat::kohya;
    else if (compat == "kohya-2194") spec.compat = RankCompat::kohya_2194;
    if (spec.rule == RankRule::fixed && rank <= 0) fail(ErrorCode::usage, "give --rank N or --dynamic RULE");
    return spec;
}

}  // namespace lorakit::cli
