// The lora-resize command: load, resize, write, report.
#include <cmath>
#include <filesystem>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "lorakit/atomic_file.h"
#include "lorakit/resize.h"

namespace lorakit {

namespace {

using Json = nlohmann::ordered_json;

Json finite_or_null(double v) { return std::isfinite(v) ? Json(v) : Json(nullptr); }

}  // namespace

ToolResult run_resize(const Registry& registry, const ResizeRequest& request, Progress& progress) {
    return guarded([&](ToolResult& result) {
        const Adapter input = registry.load_adapter(request.input);
        const std::string convention = registry.output_convention(request.to, input.convention, request.output);
        if (!request.output.empty()) {
            registry.check_output(convention, request.output, request.force);  // before any work
        }
        std::int64_t old_max = 0;
        for (const auto& m : input.modules) old_max = std::max(old_max, m.rank());
        std::vector<std::string> write_notes;
        auto write = [&](const Adapter& resized) {
            Adapter out = resized;
            if (out.metadata.count("ss_network_dim") || convention == "kohya") {
                const std::string comment =
                    out.metadata.count("ss_training_comment") ? out.metadata["ss_training_comment"] : std::string();
                out.metadata["ss_training_comment"] = fmt::format("resized by lorakit from rank {} ({}); {}", old_max,
                                                                  describe(request.options.rank), comment);
            }
            registry.write_adapter(out, convention, request.output, write_options(request.force), write_notes);
        };
        // Written while computed when the ranks are known in advance (a fixed --rank).
        std::optional<ResizeResult> streamed;
        if (!request.output.empty()) streamed = resize_adapter_streamed(input, request.options, progress, write);
        ResizeResult resized = streamed ? std::move(*streamed) : resize_adapter(input, request.options, progress);
        if (!streamed && !request.output.empty()) write(resized.adapter);
        std::vector<std::string> notes = resized.notes;
        notes.insert(notes.end(), write_notes.begin(), write_notes.end());

        double fro_sum = 0, fro_sq = 0, error_sum = 0;
        std::size_t changed = 0;
        for (const auto& m : resized.modules) {
            fro_sum += m.choice.fro_retained;
            fro_sq += m.choice.fro_retained * m.choice.fro_retained;
            error_sum += m.choice.relative_error;
            changed += m.unchanged ? 0 : 1;
        }
        const double n = static_cast<double>(std::max<std::size_t>(resized.modules.size(), 1));
        const double mean_fro = fro_sum / n;
        const double std_fro = std::sqrt(std::max(0.0, fro_sq / n - mean_fro * mean_fro));
        const double mean_error = error_sum / n;

        if (request.json) {
            Json j;
            j["input"] = request.input;
            j["output"] = request.output.empty() ? Json(nullptr) : Json(request.output);
            j["convention"] = convention;
            j["rule"] = describe(request.options.rank);
            j["module_count"] = resized.modules.size();
            j["changed_count"] = changed;
            j["mean_fro_retained"] = mean_fro;
            j["std_fro_retained"] = std_fro;
            j["mean_relative_error"] = mean_error;
            Json modules = Json::array();
            for (const auto& m : resized.modules)
                modules.push_back({{"name", m.name},
                                   {"old_rank", m.old_rank},
                                   {"new_rank", m.unchanged ? m.old_rank : m.choice.rank},
                                   {"unchanged", m.unchanged},
                                   {"fro_retained", m.choice.fro_retained},
                                   {"sum_retained", m.choice.sum_retained},
                                   {"max_ratio", finite_or_null(m.choice.max_ratio)},
                                   {"relative_error", m.choice.relative_error}});
            j["modules"] = modules;
            j["notes"] = notes;
            result.out = j.dump(2) + "\n";
        } else {
            std::size_t width = 6;
            for (const auto& m : resized.modules) width = std::max(width, m.name.size());
            std::string& out = result.out;
            out += fmt::format("{:<{}}  {:>8} {:>8} {:>10} {:>10} {:>10} {:>10}\n", "module", width, "old rank",
                               "new rank", "fro kept", "rel error", "sum kept", "max ratio");
            for (const auto& m : resized.modules)
                out += fmt::format("{:<{}}  {:>8} {:>8} {:>9.2f}% {:>10.3g} {:>9.2f}% {:>10}\n", m.name, width,
                                   m.old_rank, m.unchanged ? m.old_rank : m.choice.rank, 100 * m.choice.fro_retained,
                                   m.choice.relative_error, 100 * m.choice.sum_retained,
                                   std::isfinite(m.choice.max_ratio) ? fmt::format("{:.1f}", m.choice.max_ratio) : "-");
            out += fmt::format("{} modules, {} resized ({}); Frobenius retained {:.2f}% on average (std {:.3f}), mean "
                               "relative error {:.3g}\n",
                               resized.modules.size(), changed, describe(request.options.rank), 100 * mean_fro, std_fro,
                               mean_error);
        }
        for (const auto& note : notes) result.note(note);
    });
}

}  // namespace lorakit
