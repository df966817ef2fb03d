// The lora-merge command: load every input, merge, write, report.
#include <cmath>
#include <filesystem>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "lorakit/atomic_file.h"
#include "lorakit/merge.h"

namespace lorakit {

ToolResult run_merge(const Registry& registry, const MergeRequest& request, Progress& progress) {
    using Json = nlohmann::ordered_json;
    return guarded([&](ToolResult& result) {
        if (request.inputs.size() < 2 && request.options.method != MergeMethod::svd)
            fail(ErrorCode::usage, "give at least two adapters to merge (or one with --method svd to re-factor it)");
        std::vector<Adapter> inputs = load_adapters(registry, request.inputs);
        const std::string convention = registry.output_convention(request.to, inputs[0].convention, request.output);
        if (!request.output.empty()) {
            registry.check_output(convention, request.output, request.force);  // before any work
        }
        std::vector<std::string> write_notes;
        auto write = [&](const Adapter& merged) {
            Adapter out = merged;
            if (out.metadata.count("ss_network_dim") || convention == "kohya")
                out.metadata["ss_training_comment"] = fmt::format(
                    "merged by lorakit ({}) from {} adapters", merge_method_name(request.options.method), inputs.size());
            registry.write_adapter(out, convention, request.output, write_options(request.force), write_notes);
        };
        // Written while computed when the merged ranks are known in advance (concat, svd --rank N).
        std::optional<MergeResult> streamed;
        if (!request.output.empty()) streamed = merge_adapters_streamed(inputs, request.options, progress, write);
        MergeResult merged = streamed ? std::move(*streamed) : merge_adapters(inputs, request.options, progress);
        if (!streamed && !request.output.empty()) write(merged.adapter);
        std::vector<std::string> notes = merged.notes;
        notes.insert(notes.end(), write_notes.begin(), write_notes.end());
        if (request.json) {
            Json j;
            j["inputs"] = request.inputs;
            j["output"] = request.output.empty() ? Json(nullptr) : Json(request.output);
            j["convention"] = convention;
            j["method"] = merge_method_name(request.options.method);
            j["module_count"] = merged.modules.size();
            Json modules = Json::array();
            for (const auto& m : merged.modules) {
                Json present = Json::array();
                for (auto i : m.inputs) present.push_back(i + 1);
                modules.push_back({{"name", m.name},
                                   {"inputs", present},
                                   {"rank", m.rank},
                                   {"fro_retained", m.fro_retained},
                                   {"relative_error", m.relative_error}});
            }
            j["modules"] = modules;
            j["notes"] = notes;
            result.out = j.dump(2) + "\n";
        } else {
            std::size_t width = 6;
            for (const auto& m : merged.modules) width = std::max(width, m.name.size());
            result.out += fmt::format("{:<{}}  {:<10} {:>6} {:>10} {:>10}\n", "module", width, "inputs", "rank",
                                      "fro kept", "rel error");
            double error_sum = 0;
            for (const auto& m : merged.modules) {
                std::vector<std::string> present;
                for (auto i : m.inputs) present.push_back(std::to_string(i + 1));
                result.out += fmt::format("{:<{}}  {:<10} {:>6} {:>9.2f}% {:>10.3g}\n", m.name, width,
                                          fmt::format("{}", fmt::join(present, ",")), m.rank, 100 * m.fro_retained,
                                          m.relative_error);
                error_sum += m.relative_error;
            }
            result.out += fmt::format("{} modules merged with {} from {} adapters; mean relative truncation error {:.3g}\n",
                                      merged.modules.size(), merge_method_name(request.options.method), inputs.size(),
                                      merged.modules.empty() ? 0.0 : error_sum / static_cast<double>(merged.modules.size()));
        }
        for (const auto& note : notes) result.note(note);
    });
}

}  // namespace lorakit
