// Writing PEFT LoRA adapters: a directory with adapter_model.safetensors
// (base_model.model.<path>.lora_A.weight / .lora_B.weight, metadata {"format": "pt"}) and
// adapter_config.json with PEFT's field names, written as PEFT writes it (sorted keys, indent 2).
// Per-module ranks and scales that differ from the most common ones go into rank_pattern and
// alpha_pattern with full module paths as keys (PEFT >= 0.15 matches them exactly).
#include <algorithm>
#include <cmath>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "convention_common.h"
#include "lorakit/atomic_file.h"
#include "lorakit/error.h"
#include "writers.h"

namespace lorakit::formats {

namespace {

using Json = nlohmann::json;

Json number(double v) {
    if (std::floor(v) == v && std::abs(v) < 9e15) return static_cast<std::int64_t>(v);
    return v;
}

bool looks_like_llm(const Adapter& a) {
    for (const auto& m : a.modules)
        if (m.name.rfind("model.layers.", 0) == 0 || m.name.rfind("transformer.h.", 0) == 0) return true;
    return false;
}

// The rank_pattern / alpha_pattern key for paths[i]: the path without its first component
// ("layers.0.mlp.down_proj" for "model.layers.0.mlp.down_proj"), which every PEFT version
// matches (up to 0.14 a key must follow a dot: `.*\.KEY$`; from 0.15 `(.*\.)?(KEY)$`), when
// it names no other targeted module; else the full path, which only PEFT >= 0.15 matches.
std::string pattern_key(const std::vector<std::string>& paths, std::size_t i) {
    const std::string& path = paths[i];
    const auto dot = path.find('.');
    if (dot == std::string::npos) return path;
    const std::string key = path.substr(dot + 1), dotted = "." + key;
    for (std::size_t j = 0; j < paths.size(); ++j)
        if (j != i && (paths[j] == key || paths[j].ends_with(dotted))) return path;
    return key;
}

}  // namespace

void write_peft(const Adapter& a, const std::filesystem::path& target, const WriteOptions& options,
                std::vector<std::string>& notes) {
    const bool same = a.convention == "peft";
    refuse_lycoris(a, "PEFT");
    refuse_llama_cpp_names(a, "PEFT");
    if (!same) {
        // Full parameters PEFT holds: those of modules_to_save, "base_model.model.<module>.<param>".
        Adapter rest;
        for (const auto& t : a.other_tensors)
            if (!t.name.starts_with("base_model.model.") || !saved_parameter(a, t.name)) rest.other_tensors.push_back(t);
        refuse_other_tensors(rest, "PEFT");
    }
    const auto components = components_of(a);
    if (components.size() > 1) {
        std::vector<std::string> named;  // "" is the component of LLM paths (model.layers...)
        for (const auto& c : components) named.push_back(c.empty() ? "an LLM's module paths" : quote(c));
        fail(ErrorCode::unsupported,
             "a PEFT adapter covers one model, but this adapter spans {} (adapters for different models merged? "
             "write diffusers or kohya instead)",
             fmt::join(named, ", "));
    }
    if (a.modules.empty()) fail(ErrorCode::bad_input, "no LoRA modules to write");

    bool rslora = true, any_dora = false, all_dora = true, any_bias = false;
    std::optional<bool> fan_in_fan_out;
    for (const auto& m : a.modules) {
        rslora &= m.scale_rule == ScaleRule::alpha_over_sqrt_rank;
        any_dora |= m.magnitude.has_value();
        all_dora &= m.magnitude.has_value();
        any_bias |= m.bias.has_value();
        if (m.kind == ModuleKind::embedding) continue;
        if (fan_in_fan_out && *fan_in_fan_out != m.fan_in_fan_out)
            fail(ErrorCode::unsupported, "modules disagree on fan_in_fan_out, which PEFT sets once per adapter");
        fan_in_fan_out = m.fan_in_fan_out;
    }
    if (any_dora && !all_dora)
        fail_lossy(Loss::dora_magnitudes, {}, "only some modules carry DoRA magnitudes; PEFT's use_dora applies to all");

    OutputTensors out;
    std::vector<std::string> paths;
    std::vector<std::int64_t> ranks;
    std::vector<double> alphas;
    for (const auto& m : a.modules) {
        if (m.name.find(':') != std::string::npos)
            fail(ErrorCode::unsupported, "module {} has no module path (cloneofsimo numbering)", quote(m.name));
        const std::string component = component_of(m.name);
        const std::string path = same && !m.source_name.empty() ? m.source_name
                                 : component.empty()           ? m.name
                                                               : m.name.substr(component.size() + 1);
        const std::string key = "base_model.model." + path;
        if (m.kind == ModuleKind::embedding) {
            out.add(key + ".lora_embedding_A", m.down);
            out.add(key + ".lora_embedding_B", m.up);
        } else {
            out.add(key + ".lora_A.weight", m.down);
            out.add(key + ".lora_B.weight", m.up);
        }
        if (m.bias) out.add(key + ".lora_B.bias", *m.bias);
        if (m.magnitude) out.add(key + ".lora_magnitude_vector", magnitude_as_rows(m, "PEFT"));
        const double r = static_cast<double>(m.rank());
        double alpha;
        if (m.alpha && m.scale_rule == (rslora ? ScaleRule::alpha_over_sqrt_rank : ScaleRule::alpha_over_rank))
            alpha = *m.alpha;  // exactly what the source stored
        else
            alpha = m.scale() * (rslora ? std::sqrt(r) : r);
        paths.push_back(path);
        ranks.push_back(m.rank());
        alphas.push_back(alpha);
    }
    for (const auto& t : a.other_tensors) out.add(t.name, t.tensor);

    const std::int64_t r = most_common(ranks);
    const double lora_alpha = most_common(alphas);
    Json rank_pattern = Json::object(), alpha_pattern = Json::object();
    std::size_t full_path_keys = 0;
    for (std::size_t i = 0; i < paths.size(); ++i) {
        if (ranks[i] == r && alphas[i] == lora_alpha) continue;
        const std::string key = pattern_key(paths, i);
        full_path_keys += key == paths[i];
        if (ranks[i] != r) rank_pattern[key] = ranks[i];
        if (alphas[i] != lora_alpha) alpha_pattern[key] = number(alphas[i]);
    }

    Json config = Json::object();
    if (same && !a.config_json.empty()) {
        const OrderedJson source = parse_json_text(a.config_json, "config");
        config = Json::parse(source.dump());
    }
    auto set_default = [&](const char* key, Json value) {
        if (!config.contains(key)) config[key] = std::move(value);
    };
    config["peft_type"] = "LORA";
    config["r"] = r;
    config["lora_alpha"] = number(lora_alpha);
    config["rank_pattern"] = rank_pattern;
    config["alpha_pattern"] = alpha_pattern;
    config["use_rslora"] = rslora;
    config["use_dora"] = any_dora;
    if (any_bias) config["lora_bias"] = true;  // PEFT < 0.14 refuses a config that names it at all
    config["fan_in_fan_out"] = fan_in_fan_out.value_or(false);
    if (!a.modules_to_save.empty() && (!same || !config.contains("modules_to_save")))
        config["modules_to_save"] = a.modules_to_save;
    if (!same || !config.contains("target_modules")) {
        Json targets = Json::array();
        for (const auto& p : paths) targets.push_back(p);
        config["target_modules"] = targets;
    }
    set_default("base_model_name_or_path", a.base_model.name.empty() ? Json(nullptr) : Json(a.base_model.name));
    set_default("task_type", looks_like_llm(a) ? Json("CAUSAL_LM") : Json(nullptr));
    set_default("bias", "none");
    set_default("inference_mode", true);
    set_default("init_lora_weights", true);
    set_default("lora_dropout", 0.0);
    set_default("modules_to_save", nullptr);
    set_default("layers_to_transform", nullptr);
    set_default("layers_pattern", nullptr);
    set_default("revision", nullptr);
    const std::string config_text = config.dump(2) + "\n";

    if (!rank_pattern.empty() || !alpha_pattern.empty())
        notes.push_back(fmt::format("per-module ranks/scales written as rank_pattern ({}) and alpha_pattern ({})",
                                    rank_pattern.size(), alpha_pattern.size()));
    if (full_path_keys)
        notes.push_back(fmt::format("{} rank/alpha pattern key(s) had to be full module paths, which PEFT < 0.15 "
                                    "does not match (it would use r and lora_alpha for them)",
                                    full_path_keys));
    AtomicDirectory dir(target, options.overwrite);
    AtomicFile& weights = dir.add("adapter_model.safetensors");
    write_safetensors(weights, out.views(), {{"format", "pt"}});
    weights.commit();
    AtomicFile& config_file = dir.add("adapter_config.json");
    config_file.write(config_text);
    config_file.commit();
    dir.commit();
}

}  // namespace lorakit::formats
