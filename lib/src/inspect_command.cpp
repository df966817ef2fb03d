#include <fmt/format.h>

#include "lorakit/inspect.h"

namespace lorakit {

ToolResult run_inspect(const Registry& registry, const InspectRequest& request, Progress& progress) {
    ToolResult result;
    nlohmann::ordered_json reports = nlohmann::ordered_json::array();
    bool first_text = true;
    for (const auto& input : request.inputs) {
        try {
            nlohmann::ordered_json json;
            std::string text;
            if (request.raw) {
                const auto file = registry.open_tensor_file(input);
                const RawReport report = inspect_raw(*file);
                if (request.json) json = to_json(report);
                else text = render_text(report);
            } else {
                const Adapter adapter = registry.load_adapter(input);
                const InspectReport report = inspect_adapter(adapter, request.options, progress);
                if (request.json) json = to_json(report);
                else text = render_text(report, request.modules);
                if (request.check && !report.check_passes()) {
                    std::vector<std::string> reasons;
                    if (report.nonfinite) reasons.push_back(fmt::format("{} NaN/Inf values", report.nonfinite));
                    for (const auto& w : report.warnings) reasons.push_back(w);
                    result.error(fmt::format("{}: check failed: {}", quote(input), fmt::join(reasons, "; ")),
                                 exit_codes::check_failed);
                }
            }
            if (request.json) {
                reports.push_back(std::move(json));
            } else {
                if (!first_text) result.out += "\n";
                result.out += text;
                first_text = false;
            }
        } catch (const Error& e) {
            result.error(e.what(), exit_code_for(e.code()));
            if (request.json && request.inputs.size() > 1) {
                nlohmann::ordered_json failed;
                failed["path"] = input;
                failed["error"] = {{"code", error_code_name(e.code())}, {"message", e.what()}};
                reports.push_back(std::move(failed));
            }
        }
    }
    if (request.json) {
        if (request.inputs.size() == 1) {
            if (!reports.empty()) result.out = reports.front().dump(2) + "\n";
        } else {
            result.out = reports.dump(2) + "\n";
        }
    }
    return result;
}

}  // namespace lorakit
