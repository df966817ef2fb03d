// Option parsing shared by several tools: dtypes, conventions, rank rules.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "lorakit/dtype.h"
#include "lorakit/rank_rules.h"

namespace lorakit::cli {

// "0.8,1,-0.5" -> {0.8, 1, -0.5}; usage error naming the item that is not a finite number.
std::vector<double> parse_weights(const std::string& text);

// "f32" / "f16" / "bf16" (or the safetensors names) -> DType; usage error otherwise.
DType parse_output_dtype(const std::string& text);

// --rank N | --dynamic RULE, --conv-rank, --min-rank, --max-rank, --compat; finish() validates
// and returns the spec.
struct RankOptions {
    std::int64_t rank = 0;
    std::string dynamic;
    std::int64_t conv_rank = 0;
    std::int64_t min_rank = 1;
    std::int64_t max_rank = 0;
    std::string compat = "lorakit";

    void add_to(CLI::App& app, bool rank_required, bool with_compat = true);
    RankSpec finish() const;
};

}  // namespace lorakit::cli
