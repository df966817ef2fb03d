// diffusers LoRA files (pytorch_lora_weights.safetensors), in both layouts:
//  - current, PEFT-style keys with a component prefix: unet.<path>.lora_A.weight,
//    text_encoder.<...>, transformer.<...>; no alpha tensors (scale 1) unless the file has
//    per-module .alpha tensors or "lora_adapter_metadata" (a JSON LoraConfig per component);
//  - the older attention-processor layout (diffusers <= 0.17): <path>.processor.to_q_lora.down
//    .weight, <path>.lora.down.weight, text encoder <path>.q_proj.lora_linear_layer.down.weight,
//    and XLabs' Flux variant (double_blocks.N.processor.qkv_lora1.down.weight).
// The same PEFT-style keys without any prefix (ai-toolkit's diffusion_model.*, BFL control
// LoRAs) are read here too. Source: research/formats.md §4.
#include <fmt/format.h>

#include "convention_common.h"
#include "conventions.h"
#include "writers.h"
#include "lorakit/error.h"
#include "lorakit/names.h"

namespace lorakit::formats {

namespace {

constexpr std::string_view components[] = {"unet.",         "text_encoder.", "text_encoder_2.", "text_encoder_3.",
                                           "transformer.",  "prior.",        "decoder.",        "controlnet."};

bool has_component_prefix(std::string_view name) {
    for (auto c : components)
        if (starts_with(name, c)) return true;
    return false;
}

// LLM module paths (transformers models) are PEFT's, not diffusers'.
bool looks_like_llm_path(std::string_view stem) {
    return starts_with(stem, "model.layers.") || starts_with(stem, "transformer.h.") ||
           starts_with(stem, "gpt_neox.layers.") || starts_with(stem, "model.decoder.layers.") ||
           starts_with(stem, "model.language_model.") || starts_with(stem, "language_model.");
}

std::string with_component(std::string_view stem) {
    if (has_component_prefix(stem)) return std::string(stem);
    if (starts_with(stem, "diffusion_model.")) {
        // ComfyUI-native names: the UNet for Stable Diffusion, the transformer for DiTs.
        stem.remove_prefix(16);
        const auto inferred = infer_component(stem);
        return std::string(inferred.empty() ? "transformer" : inferred) + "." + std::string(stem);
    }
    const auto inferred = infer_component(stem);
    return inferred.empty() ? std::string(stem) : std::string(inferred) + "." + std::string(stem);
}

// ---- the attention-processor layout ----------------------------------------------------------

struct LegacyKey {
    std::string stem;  // canonical module path
    Role role;
};

std::optional<LegacyKey> classify_legacy_key(std::string_view key) {
    Role role;
    std::string_view rest;
    if (ends_with(key, ".down.weight")) {
        role = Role::down;
        rest = key.substr(0, key.size() - 12);
    } else if (ends_with(key, ".up.weight")) {
        role = Role::up;
        rest = key.substr(0, key.size() - 10);
    } else if (ends_with(key, ".alpha") && (key.find("_lora") != std::string_view::npos ||
                                            key.find(".lora.") != std::string_view::npos ||
                                            key.find("lora_linear_layer") != std::string_view::npos)) {
        role = Role::alpha;
        rest = key.substr(0, key.size() - 6);
    } else {
        return std::nullopt;
    }
    // ".processor." only marks where the attention processor hung; the module is the block.
    std::string path;
    for (std::size_t pos; (pos = rest.find(".processor.")) != std::string_view::npos;) {
        path.append(rest.substr(0, pos + 1));
        rest.remove_prefix(pos + 11);
    }
    path.append(rest);
    auto strip_suffix = [&](std::string_view suffix) {
        if (!ends_with(path, suffix)) return false;
        path.resize(path.size() - suffix.size());
        return true;
    };
    const bool text_encoder = starts_with(path, "text_encoder");
    static constexpr std::pair<std::string_view, std::string_view> unet_projections[] = {
        {".to_q_lora", ".to_q"}, {".to_k_lora", ".to_k"}, {".to_v_lora", ".to_v"}, {".to_out_lora", ".to_out.0"}};
    static constexpr std::pair<std::string_view, std::string_view> te_projections[] = {
        {".to_q_lora", ".q_proj"}, {".to_k_lora", ".k_proj"}, {".to_v_lora", ".v_proj"}, {".to_out_lora", ".out_proj"}};
    // XLabs Flux processors: lora1 acts on the image stream, lora2 on the text stream.
    static constexpr std::pair<std::string_view, std::string_view> xlabs_projections[] = {
        {".qkv_lora1", ".img_attn.qkv"}, {".qkv_lora2", ".txt_attn.qkv"},
        {".proj_lora1", ".img_attn.proj"}, {".proj_lora2", ".txt_attn.proj"}};
    bool matched = false;
    for (const auto& [from, to] : text_encoder ? te_projections : unet_projections)
        if (!matched && strip_suffix(from)) {
            path += to;
            matched = true;
        }
    for (const auto& [from, to] : xlabs_projections)
        if (!matched && strip_suffix(from)) {
            path += to;
            matched = true;
        }
    if (!matched && !strip_suffix(".lora_linear_layer") && !strip_suffix(".lora")) return std::nullopt;
    return LegacyKey{with_component(path), role};
}

bool is_legacy_layout(const TensorFile& tensors) {
    for (const auto& entry : tensors.entries()) {
        const std::string_view key = entry.name;
        if (!ends_with(key, ".down.weight") && !ends_with(key, ".up.weight")) continue;
        if (classify_legacy_key(key)) return true;
    }
    return false;
}

// ---- lora_adapter_metadata -------------------------------------------------------------------

// The LoraConfig diffusers stores per component in the safetensors metadata.
struct ComponentConfig {
    double r = 8;
    double lora_alpha = 8;
    bool rslora = false;
    OrderedJson rank_pattern = OrderedJson::object();
    OrderedJson alpha_pattern = OrderedJson::object();
};

std::map<std::string, ComponentConfig> parse_adapter_metadata(const std::map<std::string, std::string>& metadata) {
    std::map<std::string, ComponentConfig> configs;
    auto it = metadata.find("lora_adapter_metadata");
    if (it == metadata.end()) return configs;
    const OrderedJson json = parse_json_text(it->second, "metadata lora_adapter_metadata");
    if (!json.is_object()) fail(ErrorCode::bad_input, "metadata lora_adapter_metadata is not a JSON object");
    for (const auto& [key, value] : json.items()) {
        const auto dot = key.rfind('.');
        if (dot == std::string::npos) continue;
        const std::string component = key.substr(0, dot);
        const std::string field = key.substr(dot + 1);
        ComponentConfig& config = configs[component];
        if (field == "r") {
            if (auto v = json_number(value)) config.r = *v;
        } else if (field == "lora_alpha") {
            if (auto v = json_number(value)) config.lora_alpha = *v;
        } else if (field == "use_rslora") {
            config.rslora = value.is_boolean() && value.get<bool>();
        } else if (field == "rank_pattern") {
            config.rank_pattern = value;
        } else if (field == "alpha_pattern") {
            config.alpha_pattern = value;
        }
    }
    return configs;
}

class DiffusersDriver final : public ConventionDriver {
public:
    void write(const Adapter& adapter, const std::filesystem::path& target, const WriteOptions& options,
               std::vector<std::string>& notes) const override {
        write_diffusers(adapter, target, options, notes);
    }
    std::string_view name() const override { return "diffusers"; }
    std::string_view description() const override {
        return "diffusers (unet./text_encoder./transformer. + lora_A/lora_B, or the older processor layout)";
    }

    std::optional<LocatedAdapter> locate(const std::filesystem::path& dir) const override {
        std::error_code ec;
        for (const char* name : {"pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"})
            if (std::filesystem::is_regular_file(dir / name, ec)) return LocatedAdapter{dir / name, std::nullopt};
        return std::nullopt;
    }

    Detection detect(const AdapterInput& input) const override {
        std::size_t peft_keys = 0, prefixed = 0, llm = 0;
        for (const auto& entry : input.tensors.entries()) {
            auto role = classify_peft_key(entry.name);
            if (!role) continue;
            ++peft_keys;
            if (has_component_prefix(entry.name) || starts_with(entry.name, "diffusion_model.")) ++prefixed;
            if (looks_like_llm_path(role->stem) || starts_with(entry.name, "base_model.model.")) ++llm;
        }
        if (peft_keys > 0 && llm == 0)
            return {prefixed ? 70 : 50, prefixed ? "diffusers PEFT-style keys" : "PEFT-style keys without a prefix"};
        if (is_legacy_layout(input.tensors)) return {70, "attention-processor keys (diffusers <= 0.17)"};
        return {};
    }

    Adapter read(const AdapterInput& input) const override {
        Adapter adapter;
        if (is_legacy_layout(input.tensors) && !has_peft_keys(input.tensors)) read_legacy(adapter, input);
        else read_current(adapter, input);
        if (adapter.modules.empty()) fail(ErrorCode::bad_input, "no LoRA modules found");
        return adapter;
    }

private:
    static bool has_peft_keys(const TensorFile& tensors) {
        for (const auto& entry : tensors.entries())
            if (classify_peft_key(entry.name)) return true;
        return false;
    }

    static void keep_other(Adapter& adapter, const TensorEntry& entry, std::size_t& norms) {
        if (!entry.supported())
            fail(ErrorCode::unsupported, "tensor {} has unsupported dtype {}", quote(entry.name), entry.dtype_name);
        adapter.other_tensors.push_back({entry.name, entry.tensor});
        // BFL's Flux control LoRAs carry replacement norm scales next to the factors.
        if (ends_with(entry.name, "norm.scale") || ends_with(entry.name, "_norm.scale")) {
            ++norms;
            return;
        }
        adapter.warnings.push_back(
            fmt::format("tensor {} is not part of any LoRA module (loaders ignore it)", quote(entry.name)));
    }

    static void read_current(Adapter& adapter, const AdapterInput& input) {
        const auto configs = parse_adapter_metadata(input.tensors.metadata());
        ModuleCollector collector;
        std::size_t norms = 0;
        for (const auto& entry : input.tensors.entries()) {
            if (auto role = classify_peft_key(entry.name)) {
                collector.add(role->stem, role->role, entry);
                if (role->embedding) collector.parts(role->stem).embedding = true;
            } else if (ends_with(entry.name, ".alpha")) {
                collector.add(entry.name.substr(0, entry.name.size() - 6), Role::alpha, entry);
            } else {
                keep_other(adapter, entry, norms);
            }
        }
        if (norms) adapter.notes.push_back(fmt::format("{} norm scale tensors are carried with the adapter", norms));
        bool any_alpha = false;
        for (const auto& parts : collector.all()) {
            LoraModule m = assemble_lora_module(parts, with_component(parts.stem));
            m.scale_rule = ScaleRule::alpha_over_rank;
            if (m.alpha) any_alpha = true;
            const auto dot = m.name.find('.');
            const std::string component = dot == std::string::npos ? "" : m.name.substr(0, dot);
            if (auto it = configs.find(component); it != configs.end() && !m.alpha) {
                const ComponentConfig& c = it->second;
                const std::string relative = m.name.substr(dot + 1);
                double alpha = c.lora_alpha;
                if (auto key = match_peft_pattern(c.alpha_pattern, relative)) {
                    if (auto v = json_number(c.alpha_pattern[*key])) alpha = *v;
                }
                m.alpha = alpha;
                if (c.rslora) m.scale_rule = ScaleRule::alpha_over_sqrt_rank;
                any_alpha = true;
            }
            if (m.magnitude) m.magnitude_axis = MagnitudeAxis::output_rows;
            adapter.modules.push_back(std::move(m));
        }
        adapter.convention_detail = "PEFT-style keys";
        if (!configs.empty()) adapter.convention_detail += ", lora_adapter_metadata";
        if (!any_alpha)
            adapter.notes.push_back("no alpha in the file: scale 1 for every module, as diffusers loads it");
    }

    static void read_legacy(Adapter& adapter, const AdapterInput& input) {
        ModuleCollector collector;
        std::size_t norms = 0;
        bool xlabs = false;
        for (const auto& entry : input.tensors.entries()) {
            if (auto key = classify_legacy_key(entry.name)) {
                collector.add(key->stem, key->role, entry);
                xlabs |= entry.name.find("_lora1.") != std::string::npos || entry.name.find("_lora2.") != std::string::npos;
            } else {
                keep_other(adapter, entry, norms);
            }
        }
        for (const auto& parts : collector.all()) {
            LoraModule m = assemble_lora_module(parts, parts.stem);
            m.source_name = parts.down ? parts.down->name.substr(0, parts.down->name.size() - 12) : parts.stem;
            m.scale_rule = ScaleRule::alpha_over_rank;
            adapter.modules.push_back(std::move(m));
        }
        adapter.convention_detail =
            xlabs ? "XLabs Flux processor keys" : "attention-processor keys (diffusers <= 0.17)";
        adapter.notes.push_back("no alpha in the file: scale 1 for every module");
    }
};

}  // namespace

std::unique_ptr<ConventionDriver> make_diffusers_driver() { return std::make_unique<DiffusersDriver>(); }

}  // namespace lorakit::formats
