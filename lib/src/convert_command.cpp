// The lora-convert command: load (with base-model hints), convert dtypes, write in the target
// convention, report.
#include "lorakit/convert.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <utility>

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

namespace {

// `t` in `dtype`, refusing (or saturating) finite values the cast would make infinite.
Tensor narrowed(const Tensor& t, DType dtype, const std::string& what, bool saturate, std::size_t& saturated) {
    if (dtype == t.dtype()) return t;
    std::vector<float> values = t.to_f32();
    const Overflow overflow = find_overflow(dtype, values);
    if (overflow.count == 0) return Tensor::from_f32(dtype, t.shape(), values);
    const float limit = largest_finite(dtype);
    if (!saturate)
        fail(ErrorCode::unsupported,
             "{}: {} value(s) beyond {}'s range (largest magnitude {:.4g}) would become infinite; keep a wider --dtype, or "
             "--allow-lossy to saturate them at ±{:g}",
             what, overflow.count, dtype_name(dtype), overflow.largest, limit);
    const float threshold = overflow_threshold(dtype);
    for (float& v : values)
        if (std::isfinite(v) && std::abs(v) >= threshold) v = std::copysign(limit, v);
    saturated += overflow.count;
    return Tensor::from_f32(dtype, t.shape(), values);
}

}  // namespace

Adapter with_factor_dtype(Adapter adapter, DType dtype, bool saturate, std::size_t* saturated) {
    std::size_t count = 0;
    for (auto& m : adapter.modules) {
        m.down = narrowed(m.down, dtype, fmt::format("module {}, down factor", quote(m.name)), saturate, count);
        m.up = narrowed(m.up, dtype, fmt::format("module {}, up factor", quote(m.name)), saturate, count);
    }
    if (saturated) *saturated += count;
    return adapter;
}

std::string drop_refused(Adapter& adapter, const Error& refusal) {
    std::size_t count = 0;
    switch (refusal.loss()) {
    case Loss::none: return "";
    case Loss::dora_magnitudes:
        for (auto& m : adapter.modules) count += std::exchange(m.magnitude, std::nullopt).has_value();
        return count ? fmt::format("the DoRA magnitudes of {} module(s) (they apply as plain LoRAs)", count) : "";
    case Loss::lora_bias:
        for (auto& m : adapter.modules) count += std::exchange(m.bias, std::nullopt).has_value();
        return count ? fmt::format("the LoRA biases of {} module(s)", count) : "";
    case Loss::other_tensors: {
        const auto& names = refusal.lost_names();
        std::string first;
        std::erase_if(adapter.other_tensors, [&](const NamedTensor& t) {
            if (!names.empty() && std::find(names.begin(), names.end(), t.name) == names.end()) return false;
            if (count++ == 0) first = t.name;
            return true;
        });
        return count ? fmt::format("{} tensor(s) that are not LoRA factors ({}{})", count, quote(first), count > 1 ? ", ..." : "")
                     : "";
    }
    }
    return "";
}

namespace {

std::string lossy_hint(Loss loss) {
    switch (loss) {
    case Loss::none: return "";
    case Loss::dora_magnitudes: return "; --allow-lossy writes it without DoRA magnitudes";
    case Loss::lora_bias: return "; --allow-lossy writes it without LoRA biases";
    case Loss::other_tensors: return "; --allow-lossy writes it without those tensors";
    }
    return "";
}

// Writes `adapter`; when the writer refuses something the target cannot hold (an Error with a
// Loss), either drops it and writes again (--allow-lossy, with a note saying what was left out)
// or refuses saying how to accept the loss. A refusal of the adapter's content names the input,
// which holds it, rather than the output the writer was writing.
void write_allowing_loss(const Registry& registry, Adapter& adapter, const std::string& convention,
                         const ConvertRequest& request, const WriteOptions& options, std::vector<std::string>& notes) {
    for (;;) {
        std::vector<std::string> attempt = notes;  // a failed attempt's notes are not kept
        try {
            registry.write_adapter(adapter, convention, request.output, options, attempt);
            notes = std::move(attempt);
            return;
        } catch (const Error& e) {
            if (e.loss() != Loss::none && request.allow_lossy) {
                const std::string dropped = drop_refused(adapter, e);
                if (dropped.empty()) throw;
                notes.push_back(fmt::format("left out {}, which {} cannot hold (--allow-lossy)", dropped, convention));
                continue;
            }
            if (e.code() != ErrorCode::unsupported && e.code() != ErrorCode::bad_input) throw;
            Error refusal(e.code(), e.message() + lossy_hint(e.loss()));
            refusal.set_loss(e.loss(), e.lost_names());
            // The outermost layer is the output, named by write_adapter: the input replaces it.
            const auto& layers = e.context();
            for (auto layer = layers.rbegin(); layers.size() > 1 && layer != layers.rend() - 1; ++layer)
                refusal.add_context(*layer);
            throw refusal.add_context(quote(request.input));
        }
    }
}

}  // namespace

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
        if (!adapter.lycoris_modules.empty() && !request.rank && request.allow_lossy && convention != "kohya" &&
            convention != "lycoris") {
            adapter.notes.push_back(fmt::format("left out {} LyCORIS module(s) ({}, ...): --rank N re-factors them into LoRAs "
                                                "instead (--allow-lossy)",
                                                adapter.lycoris_modules.size(), quote(adapter.lycoris_modules.front().name)));
            adapter.lycoris_modules.clear();
        }
        if (!adapter.lycoris_modules.empty() && (request.rank || (convention != "kohya" && convention != "lycoris"))) {
            if (!request.rank)
                fail(ErrorCode::usage,
                     "{} LyCORIS module(s) (LoHa/LoKr/full) must be re-factored into LoRA for {}: give --rank N (or "
                     "--allow-lossy to leave them out)",
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
            std::size_t saturated = 0;
            adapter = with_context(quote(request.input),
                                   [&] { return with_factor_dtype(std::move(adapter), type, request.allow_lossy, &saturated); });
            if (saturated)
                adapter.notes.push_back(fmt::format("saturated {} value(s) beyond {}'s range at its largest finite value "
                                                    "(--allow-lossy)",
                                                    saturated, dtype_name(type)));
            if (convention == "gguf") options.tensor_type = d == "f32" || d == "F32" ? "f32" : d == "f16" || d == "F16" ? "f16" : "bf16";
        }
        std::vector<std::string> notes = adapter.notes;
        write_allowing_loss(registry, adapter, convention, request, options, notes);
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
