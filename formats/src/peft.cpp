// Hugging Face PEFT LoRA adapters: a directory with adapter_config.json and
// adapter_model.safetensors (or a weights file of any name with the config beside it).
// Keys: [base_model.model.]<module path>.lora_A.weight / .lora_B.weight (+ .lora_B.bias,
// .lora_embedding_A/B, .lora_magnitude_vector). Alpha, rank patterns and rsLoRA live in the
// config. Source: research/formats.md §2.
#include <algorithm>
#include <filesystem>

#include <fmt/format.h>

#include "convention_common.h"
#include "conventions.h"
#include "writers.h"
#include "lorakit/error.h"
#include "lorakit/names.h"

namespace lorakit::formats {

namespace fs = std::filesystem;

namespace {

constexpr std::string_view peft_prefix = "base_model.model.";
constexpr std::string_view config_name = "adapter_config.json";

bool is_peft_config(const OrderedJson& config) { return config.is_object() && config.contains("peft_type"); }

std::string peft_type_of(const OrderedJson& config) {
    const auto& type = config["peft_type"];
    return type.is_string() ? type.get<std::string>() : type.dump();
}

template <typename T>
T value_or(const OrderedJson& config, const char* key, T fallback) {
    auto it = config.find(key);
    if (it == config.end() || it->is_null()) return fallback;
    try {
        return it->get<T>();
    } catch (const nlohmann::json::exception&) {
        fail(ErrorCode::bad_input, "config field {} has the wrong type ({})", quote(key), it->dump());
    }
}

double number_field(const OrderedJson& config, const char* key, double fallback) {
    auto it = config.find(key);
    if (it == config.end() || it->is_null()) return fallback;
    auto number = json_number(*it);
    if (!number) fail(ErrorCode::bad_input, "config field {} is not a number ({})", quote(key), it->dump());
    return *number;
}

double pattern_value(const OrderedJson& patterns, const std::string& key) {
    auto number = json_number(patterns[key]);
    if (!number) fail(ErrorCode::bad_input, "pattern {} has a non-numeric value {}", quote(key), patterns[key].dump());
    return *number;
}

// True when `tensor_name` (prefix removed) belongs to a module listed in modules_to_save.
bool in_modules_to_save(const OrderedJson& modules_to_save, std::string_view tensor_name) {
    if (!modules_to_save.is_array()) return false;
    for (const auto& m : modules_to_save) {
        if (!m.is_string()) continue;
        const std::string module = m.get<std::string>();
        if (starts_with(tensor_name, module + ".") || tensor_name.find("." + module + ".") != std::string_view::npos)
            return true;
    }
    return false;
}

class PeftDriver final : public ConventionDriver {
public:
    bool writes_directory() const override { return true; }
    void write(const Adapter& adapter, const std::filesystem::path& target, const WriteOptions& options,
               std::vector<std::string>& notes) const override {
        write_peft(adapter, target, options, notes);
    }
    std::string_view name() const override { return "peft"; }
    std::string_view description() const override {
        return "Hugging Face PEFT (adapter_config.json + adapter_model.safetensors)";
    }

    std::vector<std::string> sidecar_config_names() const override { return {std::string(config_name)}; }

    std::optional<LocatedAdapter> locate(const fs::path& dir) const override {
        const fs::path config = dir / config_name;
        std::error_code ec;
        if (!fs::is_regular_file(config, ec)) return std::nullopt;
        const OrderedJson json = parse_config_json(SidecarConfig{config, read_text_file(config)});
        if (!is_peft_config(json)) return std::nullopt;
        for (const char* name : {"adapter_model.safetensors", "adapter_model.bin"})
            if (fs::is_regular_file(dir / name, ec)) return LocatedAdapter{dir / name, config};
        // Some trainers save the weights under another name next to the config.
        std::vector<fs::path> candidates;
        for (const auto& item : fs::directory_iterator(dir, ec)) {
            const auto ext = item.path().extension();
            if (item.is_regular_file(ec) && (ext == ".safetensors" || ext == ".bin")) candidates.push_back(item.path());
        }
        if (candidates.size() == 1) return LocatedAdapter{candidates.front(), config};
        if (candidates.empty())
            fail(ErrorCode::bad_input, "directory has a PEFT adapter_config.json but no adapter_model.safetensors");
        fail(ErrorCode::bad_input,
             "directory has a PEFT adapter_config.json, no adapter_model.safetensors and {} other weight files; "
             "name the weights file instead",
             candidates.size());
    }

    void precheck(const SidecarConfig& config) const override {
        const OrderedJson json = parse_config_json(config);
        if (!is_peft_config(json)) return;
        const std::string type = peft_type_of(json);
        if (type != "LORA")
            fail(ErrorCode::unsupported, "unsupported adapter type {} (PEFT peft_type); lorakit reads LoRA adapters",
                 type);
    }

    Detection detect(const AdapterInput& input) const override {
        std::size_t lora_keys = 0, prefixed = 0;
        for (const auto& entry : input.tensors.entries()) {
            if (!classify_peft_key(entry.name)) continue;
            ++lora_keys;
            if (starts_with(entry.name, peft_prefix)) ++prefixed;
        }
        if (lora_keys == 0) return {};
        if (input.config && is_peft_config(parse_config_json(*input.config)))
            return {90, "PEFT LoRA with adapter_config.json"};
        if (prefixed > 0) return {60, "PEFT LoRA keys without adapter_config.json"};
        // Prefix-free keys of an injected adapter; the diffusers reader claims the
        // non-LLM ones with a higher score.
        return {40, "PEFT LoRA keys without prefix or adapter_config.json"};
    }

    Adapter read(const AdapterInput& input) const override {
        Adapter adapter;
        bool has_config = false;
        const OrderedJson config = owned_config(input, is_peft_config, has_config);
        with_context(input.config ? quote(input.config->path.string()) : std::string("config"),
                     [&] { read_into(adapter, input, config, has_config); });
        return adapter;
    }

private:
    void read_into(Adapter& adapter, const AdapterInput& input, const OrderedJson& config, bool has_config) const {
        const double default_rank = number_field(config, "r", 8);
        const double default_alpha = number_field(config, "lora_alpha", 8);
        const bool rslora = value_or<bool>(config, "use_rslora", false);
        const bool dora = value_or<bool>(config, "use_dora", false);
        const bool fan_in_fan_out = value_or<bool>(config, "fan_in_fan_out", false);
        const bool lora_bias = value_or<bool>(config, "lora_bias", false);
        const OrderedJson rank_pattern = config.value("rank_pattern", OrderedJson::object());
        const OrderedJson alpha_pattern = config.value("alpha_pattern", OrderedJson::object());
        const OrderedJson targets = config.value("target_modules", OrderedJson());
        const OrderedJson modules_to_save = config.value("modules_to_save", OrderedJson());
        if (has_config) {
            if (auto it = config.find("base_model_name_or_path"); it != config.end() && it->is_string())
                adapter.base_model.name = it->get<std::string>();
            if (auto it = config.find("target_parameters"); it != config.end() && !it->is_null() && !it->empty())
                fail(ErrorCode::unsupported,
                     "PEFT target_parameters (LoRA on MoE expert parameters) is not supported");
            if (auto it = config.find("layer_replication"); it != config.end() && !it->is_null())
                adapter.warnings.push_back("config uses layer_replication: module names refer to the replicated model");
        }

        ModuleCollector collector;
        std::size_t saved_full = 0;
        for (const auto& entry : input.tensors.entries()) {
            std::string_view key = entry.name;
            if (starts_with(key, peft_prefix)) key.remove_prefix(peft_prefix.size());
            if (auto role = classify_peft_key(key)) {
                collector.add(role->stem, role->role, entry);
                if (role->embedding) collector.parts(role->stem).embedding = true;
                continue;
            }
            if (!entry.supported())
                fail(ErrorCode::unsupported, "tensor {} has unsupported dtype {}", quote(entry.name), entry.dtype_name);
            adapter.other_tensors.push_back({entry.name, entry.tensor});
            if (in_modules_to_save(modules_to_save, key)) {
                const auto dot = key.rfind('.');
                const std::string module(key.substr(0, dot == std::string_view::npos ? 0 : dot));
                if (!module.empty() && std::find(adapter.modules_to_save.begin(), adapter.modules_to_save.end(), module) ==
                                           adapter.modules_to_save.end())
                    adapter.modules_to_save.push_back(module);
                continue;
            }
            if (ends_with(key, ".trainable_tokens_delta") || ends_with(key, ".base_layer.weight") ||
                ends_with(key, "embed_tokens.weight") || ends_with(key, "lm_head.weight")) {
                ++saved_full;
                continue;
            }
            adapter.warnings.push_back(fmt::format(
                "tensor {} is neither a LoRA factor nor part of a module in modules_to_save", quote(entry.name)));
        }
        if (saved_full)
            adapter.notes.push_back(
                fmt::format("{} full tensors (embeddings or trainable tokens) are carried with the adapter", saved_full));

        for (const auto& parts : collector.all()) {
            // A diffusion model wrapped in PeftModel keeps paths relative to the transformer or
            // UNet; the canonical name adds the component (LLM paths have none to add).
            const auto component = infer_component(parts.stem);
            LoraModule m = assemble_lora_module(
                parts, component.empty() ? parts.stem : fmt::format("{}.{}", component, parts.stem));
            with_context(fmt::format("module {}", quote(m.name)), [&] {
                double expected_rank = default_rank;
                // PEFT matches patterns against the module name relative to the wrapped model.
                const std::string& key_name = m.source_name;
                if (auto key = match_peft_pattern(rank_pattern, key_name)) expected_rank = pattern_value(rank_pattern, *key);
                double alpha = default_alpha;
                if (auto key = match_peft_pattern(alpha_pattern, key_name)) alpha = pattern_value(alpha_pattern, *key);
                if (has_config) {
                    m.alpha = alpha;
                    m.scale_rule = rslora ? ScaleRule::alpha_over_sqrt_rank : ScaleRule::alpha_over_rank;
                    if (static_cast<double>(m.rank()) != expected_rank)
                        adapter.warnings.push_back(fmt::format("module {} has rank {} but the config says r = {}",
                                                               quote(m.name), m.rank(), expected_rank));
                    if (!matches_peft_targets(targets, key_name))
                        adapter.warnings.push_back(
                            fmt::format("module {} does not match the config's target_modules", quote(m.name)));
                }
                m.fan_in_fan_out = fan_in_fan_out && m.kind == ModuleKind::linear;
                if (m.magnitude) {
                    m.magnitude_axis = MagnitudeAxis::output_rows;
                    if (has_config && !dora)
                        adapter.warnings.push_back(fmt::format(
                            "module {} has a DoRA magnitude but the config says use_dora = false", quote(m.name)));
                } else if (dora) {
                    adapter.warnings.push_back(
                        fmt::format("config says use_dora but module {} has no lora_magnitude_vector", quote(m.name)));
                }
                if (m.bias && has_config && !lora_bias)
                    adapter.warnings.push_back(
                        fmt::format("module {} has a lora_B.bias but the config says lora_bias = false", quote(m.name)));
            });
            adapter.modules.push_back(std::move(m));
        }
        if (adapter.modules.empty()) fail(ErrorCode::bad_input, "no LoRA modules found");

        if (!has_config)
            adapter.warnings.push_back(
                "no PEFT adapter_config.json beside the weights: alpha is unknown, so the scale is taken as 1 (alpha = r)");
        adapter.convention_detail = has_config ? "PEFT LoRA" : "PEFT LoRA keys, no config";
        if (rslora) adapter.convention_detail += ", rsLoRA (scale = alpha/sqrt(r))";
        if (dora) adapter.convention_detail += ", DoRA";
        if (has_config && config.contains("peft_version") && config["peft_version"].is_string())
            adapter.convention_detail += fmt::format(", peft {}", config["peft_version"].get<std::string>());
        if (rank_pattern.is_object() && !rank_pattern.empty())
            adapter.notes.push_back(fmt::format("rank_pattern sets {} pattern(s)", rank_pattern.size()));
        if (alpha_pattern.is_object() && !alpha_pattern.empty())
            adapter.notes.push_back(fmt::format("alpha_pattern sets {} pattern(s)", alpha_pattern.size()));
    }
};

}  // namespace

std::unique_ptr<ConventionDriver> make_peft_driver() { return std::make_unique<PeftDriver>(); }

}  // namespace lorakit::formats
