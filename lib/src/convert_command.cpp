// The lora-convert command: load (with base-model hints), convert dtypes, write in the target
// convention, report.
#include "lorakit/convert.h"

#include <algorithm>
#include <filesystem>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "lorakit/atomic_file.h"
#include "lorakit/error.h"
#include "lorakit/lycoris.h"
#include "lorakit/names.h"

namespace lorakit {

namespace {

using Json = nlohmann::ordered_json;

// transformers model_type -> llama.cpp architecture, for the Llama family.
std::string arch_from_model_type(const std::string& type) {
    if (type == "llama" || type == "mistral") return "llama";
    if (type == "qwen2" || type == "qwen3" || type == "gemma" || type == "gemma2" || type == "gemma3" ||
        type == "gemma3_text" || type == "phi3" || type == "qwen2_moe" || type == "qwen3_moe")
        return type == "gemma3_text" ? "gemma3" : type == "qwen2_moe" ? "qwen2moe" : type == "qwen3_moe" ? "qwen3moe" : type;
    return "";
}

std::optional<std::int64_t> positive_integer(const std::string& text, const std::string& what) {
    try {
        std::size_t used = 0;
        const long long v = std::stoll(text, &used);
        if (used == text.size() && v > 0) return v;
    } catch (const std::exception&) {
    }
    fail(ErrorCode::bad_input, "{} is {}, not a positive integer", what, quote(text));
}

}  // namespace

ModelHints hints_from_base(const Registry& registry, const std::string& path, ModelHints hints) {
    return with_context(quote(path), [&] {
        namespace fs = std::filesystem;
        std::error_code ec;
        fs::path config = path;
        if (fs::is_directory(config, ec)) config /= "config.json";
        if (config.extension() == ".json") {
            Json j;
            try {
                j = Json::parse(read_text_file(config));
            } catch (const Json::exception& e) {
                fail(ErrorCode::bad_input, "not valid JSON: {}", e.what());
            }
            if (!j.is_object()) fail(ErrorCode::bad_input, "a model config must be a JSON object");
            // Multimodal configs keep the language model's numbers under text_config.
            const Json& c = j.contains("text_config") && j["text_config"].is_object() ? j["text_config"] : j;
            if (hints.arch.empty() && c.contains("model_type") && c["model_type"].is_string())
                hints.arch = arch_from_model_type(c["model_type"].get<std::string>());
            if (!hints.head_count && c.contains("num_attention_heads") && c["num_attention_heads"].is_number_integer())
                hints.head_count = c["num_attention_heads"].get<std::int64_t>();
            if (!hints.head_count_kv && c.contains("num_key_value_heads") && c["num_key_value_heads"].is_number_integer())
                hints.head_count_kv = c["num_key_value_heads"].get<std::int64_t>();
            return hints;
        }
        const auto file = registry.open_tensor_file(path);
        const auto& meta = file->metadata();
        auto arch = meta.find("general.architecture");
        if (arch == meta.end()) fail(ErrorCode::bad_input, "neither a config.json nor a GGUF model with general.architecture");
        if (hints.arch.empty()) hints.arch = arch->second;
        if (auto it = meta.find(arch->second + ".attention.head_count"); it != meta.end() && !hints.head_count)
            hints.head_count = positive_integer(it->second, it->first);
        if (auto it = meta.find(arch->second + ".attention.head_count_kv"); it != meta.end() && !hints.head_count_kv)
            hints.head_count_kv = positive_integer(it->second, it->first);
        return hints;
    });
}

Adapter with_factor_dtype(Adapter adapter, DType dtype) {
    for (auto& m : adapter.modules) {
        m.down = m.down.converted(dtype);
        m.up = m.up.converted(dtype);
    }
    return adapter;
}

ToolResult run_convert(const Registry& registry, const ConvertRequest& request, Progress& progress) {
    return guarded([&](ToolResult& result) {
        ModelHints hints = request.hints;
        if (hints.head_count && *hints.head_count <= 0) fail(ErrorCode::usage, "--head-count must be positive");
        if (!request.base.empty()) hints = hints_from_base(registry, request.base, hints);
        progress.begin("convert", 3, 0);
        Adapter adapter = registry.load_adapter(request.input, hints);
        progress.advance(1, 0);
        const std::string convention = registry.output_convention(request.to, adapter.convention, request.output);
        registry.check_output(convention, request.output, request.force);
        Json lycoris_report = Json::array();
        std::string lycoris_table;
        if (!adapter.lycoris_modules.empty() && (request.rank || (convention != "kohya" && convention != "lycoris"))) {
            if (!request.rank)
                fail(ErrorCode::usage,
                     "{} LyCORIS module(s) (LoHa/LoKr/full) must be re-factored into LoRA for {}: give --rank N",
                     adapter.lycoris_modules.size(), convention);
            progress.begin("LyCORIS to LoRA", adapter.lycoris_modules.size(), 0);
            double worst = 0, sum = 0;
            std::size_t width = 6, done = 0;
            for (const auto& m : adapter.lycoris_modules) width = std::max(width, m.name.size());
            lycoris_table = fmt::format("{:<{}}  {:<13} {:>5} {:>10}\n", "module", width, "algorithm", "rank", "rel error");
            for (const auto& m : adapter.lycoris_modules) {
                DType type = DType::F32;
                if (!m.tensors.empty()) type = m.tensors.front().tensor.dtype();
                if (type != DType::F16 && type != DType::BF16) type = DType::F32;
                LycorisConversion c = lycoris_to_lora(m, *request.rank, type);
                worst = std::max(worst, c.relative_error);
                sum += c.relative_error;
                lycoris_report.push_back({{"name", m.name},
                                          {"algorithm", m.algorithm},
                                          {"rank", c.module.rank()},
                                          {"relative_error", c.relative_error},
                                          {"randomized_svd", c.randomized}});
                lycoris_table += fmt::format("{:<{}}  {:<13} {:>5} {:>10.3g}\n", m.name, width, m.algorithm,
                                             c.module.rank(), c.relative_error);
                adapter.modules.push_back(std::move(c.module));
                progress.advance(++done, 0);
            }
            progress.end();
            adapter.notes.push_back(fmt::format(
                "{} LyCORIS module(s) re-factored into rank-{} LoRAs: relative error mean {:.3g}, max {:.3g}",
                adapter.lycoris_modules.size(), *request.rank, sum / static_cast<double>(adapter.lycoris_modules.size()),
                worst));
            adapter.lycoris_modules.clear();
            std::stable_sort(adapter.modules.begin(), adapter.modules.end(),
                             [](const LoraModule& a, const LoraModule& b) { return natural_less(a.name, b.name); });
        }
        WriteOptions options = write_options(request.force);
        options.hints = hints;
        if (request.dtype == "q8_0" || request.dtype == "Q8_0") {
            if (convention != "gguf") fail(ErrorCode::usage, "--dtype q8_0 is only for --to gguf");
            options.tensor_type = "q8_0";
        } else if (!request.dtype.empty()) {
            const std::string& d = request.dtype;
            const DType type = d == "f32" || d == "F32"   ? DType::F32
                               : d == "f16" || d == "F16" ? DType::F16
                               : d == "bf16" || d == "BF16"
                                   ? DType::BF16
                                   : (fail(ErrorCode::usage, "unsupported --dtype {} (f32, f16, bf16, q8_0)", quote(d)),
                                      DType::F32);
            adapter = with_factor_dtype(std::move(adapter), type);
            if (convention == "gguf") options.tensor_type = d == "f32" || d == "F32" ? "f32" : d == "f16" || d == "F16" ? "f16" : "bf16";
        }
        std::vector<std::string> notes = adapter.notes;
        registry.write_adapter(adapter, convention, request.output, options, notes);
        progress.advance(3, 0);
        progress.end();
        if (request.json) {
            Json j;
            j["input"] = request.input;
            j["output"] = request.output;
            j["from"] = adapter.convention;
            j["to"] = convention;
            j["module_count"] = adapter.modules.size();
            j["other_tensor_count"] = adapter.other_tensors.size();
            j["lycoris_converted"] = lycoris_report;
            j["notes"] = notes;
            result.out = j.dump(2) + "\n";
        }
        if (!request.json) result.out = lycoris_table;
        for (const auto& note : notes) result.note(note);
        if (!request.json)
            result.note(fmt::format("wrote {} module(s) from {} as {} to {}", adapter.modules.size(), adapter.convention,
                                    convention, quote(request.output)));
    });
}

}  // namespace lorakit
