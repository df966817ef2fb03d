// lora-inspect as a library function: a report on an adapter (or, raw, on any tensor file),
// its JSON form (the schema documented in README.md) and its human-readable form.
//
// Per-module numbers come from the factors alone (thin QR of B and Aᵀ and an r x r SVD, see
// linalg.h): the dense out x in delta is never formed.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "lorakit/adapter.h"
#include "lorakit/progress.h"
#include "lorakit/registry.h"
#include "lorakit/tool_result.h"

namespace lorakit {

struct InspectOptions {
    bool spectra = true;  // compute norms and singular values (false: shapes and counts only)
    int threads = 0;      // worker threads for the per-module numbers; 0 = all cores
};

struct ModuleReport {
    std::string name;
    std::string source_name;
    ModuleKind kind = ModuleKind::linear;
    std::int64_t rank = 0;
    std::optional<double> alpha;
    double scale = 1.0;
    ScaleRule scale_rule = ScaleRule::alpha_over_rank;
    std::int64_t in_features = 0;
    std::int64_t out_features = 0;
    Shape kernel_size;
    std::string dtype;  // the factors' dtype ("F16", or "F16/F32" when A and B differ)
    bool dora = false;
    bool lora_bias = false;
    std::int64_t parameter_count = 0;
    std::int64_t nonfinite = 0;
    // Filled when spectra were computed and every value is finite.
    std::optional<double> fro_norm;
    std::optional<double> spectral_norm;
    std::vector<double> singular_values;
    std::optional<std::int64_t> effective_rank_90;
    std::optional<std::int64_t> effective_rank_99;
};

struct LycorisReport {
    std::string name;
    std::string algorithm;
    std::optional<double> alpha;
    std::vector<std::pair<std::string, TensorView>> tensors;
    std::int64_t parameter_count = 0;
    std::int64_t nonfinite = 0;
};

struct TensorSummary {
    std::string name;
    std::string dtype;
    Shape shape;
    std::int64_t nonfinite = 0;
};

struct InspectReport {
    std::string path;
    std::string container;
    std::string convention;
    std::string convention_detail;
    BaseModelHint base_model;
    std::int64_t parameter_count = 0;
    std::uint64_t tensor_bytes = 0;
    std::map<std::string, std::int64_t> dtypes;  // dtype name -> number of tensors
    std::map<std::string, std::string> metadata;
    std::string config_json;
    std::string config_path;
    std::vector<std::string> warnings;
    std::vector<std::string> notes;
    std::vector<TensorSummary> other_tensors;
    std::vector<ModuleReport> modules;
    std::vector<LycorisReport> lycoris_modules;
    std::int64_t nonfinite = 0;  // NaN/Inf values anywhere in the adapter
    bool spectra = false;

    // False when any value is NaN/Inf or the adapter has inconsistencies (warnings).
    bool check_passes() const { return nonfinite == 0 && warnings.empty(); }
};

// Computes the report for an adapter already loaded.
InspectReport inspect_adapter(const Adapter& adapter, const InspectOptions& options, Progress& progress);

// The JSON object for one report. Field order is fixed; numbers are the exact doubles.
nlohmann::ordered_json to_json(const InspectReport& report);
// A summary a person reads at a glance; with `modules` a per-module table follows.
std::string render_text(const InspectReport& report, bool modules);

// --raw: the tensors of any tensor file, LoRA or not.
struct RawReport {
    std::string path;
    std::string container;
    std::map<std::string, std::string> metadata;
    struct Entry {
        std::string name;
        std::string dtype;
        Shape shape;
        std::uint64_t offset = 0;
        std::uint64_t size = 0;
    };
    std::vector<Entry> tensors;
};
RawReport inspect_raw(const TensorFile& file);
nlohmann::ordered_json to_json(const RawReport& report);
std::string render_text(const RawReport& report);

// The whole lora-inspect command: every input in turn (a failing input is reported and the
// others still run), output as text or JSON (an array when there are several inputs; a
// failed input then appears as {"path", "error": {"code", "message"}}).
struct InspectRequest {
    std::vector<std::string> inputs;
    bool raw = false;      // list the tensors of any tensor file instead
    bool modules = false;  // add the per-module table to the text output
    bool check = false;    // exit with the check-failed code on NaN/Inf or inconsistencies
    bool json = false;
    InspectOptions options;
};
ToolResult run_inspect(const Registry& registry, const InspectRequest& request, Progress& progress);

// The energy rule used for effective ranks: the smallest k with Σ_{i<=k} σ_i² >= fraction ·
// Σ σ_i² (0 for an all-zero spectrum).
std::int64_t rank_for_energy(const std::vector<double>& singular_values, double fraction);

}  // namespace lorakit
