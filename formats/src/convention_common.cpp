#include "convention_common.h"

#include <array>
#include <cstdlib>
#include <regex>
#include <set>
#include <unordered_set>

#include <fmt/format.h>

#include "lorakit/error.h"
#include "lorakit/names.h"

namespace lorakit::formats {

// ---- grouping -------------------------------------------------------------------------------

ModuleParts& ModuleCollector::parts(const std::string& stem) {
    auto it = index_.find(stem);
    if (it != index_.end()) return modules_[it->second];
    index_.emplace(stem, modules_.size());
    ModuleParts parts;
    parts.stem = stem;
    modules_.push_back(std::move(parts));
    return modules_.back();
}

void ModuleCollector::add(const std::string& stem, Role role, const TensorEntry& entry, std::string_view lycoris_role) {
    ModuleParts& p = parts(stem);
    auto set = [&](const TensorEntry*& slot, std::string_view what) {
        if (slot)
            fail(ErrorCode::bad_input, "module {}: two tensors give its {}: {} and {}", quote(stem), what,
                 quote(slot->name), quote(entry.name));
        slot = &entry;
    };
    switch (role) {
    case Role::down: set(p.down, "A (down) factor"); break;
    case Role::up: set(p.up, "B (up) factor"); break;
    case Role::alpha: set(p.alpha, "alpha"); break;
    case Role::magnitude: set(p.magnitude, "DoRA magnitude"); break;
    case Role::lora_bias: set(p.bias, "LoRA bias"); break;
    case Role::mid: set(p.mid, "Tucker mid factor"); break;
    case Role::lycoris:
        for (const auto& [existing_role, existing] : p.lycoris)
            if (existing_role == lycoris_role)
                fail(ErrorCode::bad_input, "module {}: two tensors give its {}: {} and {}", quote(stem), lycoris_role,
                     quote(existing->name), quote(entry.name));
        p.lycoris.emplace_back(std::string(lycoris_role), &entry);
        break;
    }
}

// ---- assembly -------------------------------------------------------------------------------

namespace {

const Tensor& supported_tensor(const TensorEntry& entry) {
    if (!entry.supported())
        fail(ErrorCode::unsupported, "tensor {} has unsupported dtype {}", quote(entry.name), entry.dtype_name);
    return entry.tensor;
}

std::optional<double> read_alpha(const TensorEntry* entry) {
    if (!entry) return std::nullopt;
    const Tensor& t = supported_tensor(*entry);
    if (t.element_count() != 1)
        fail(ErrorCode::bad_input, "alpha {} is not a scalar: shape {}", quote(entry->name), format_shape(t.shape()));
    return t.scalar_value();
}

}  // namespace

bool is_lycoris(const ModuleParts& parts) { return !parts.lycoris.empty() || parts.mid != nullptr; }

LoraModule assemble_lora_module(const ModuleParts& parts, std::string name) {
    return with_context(fmt::format("module {}", quote(name)), [&] {
        if (!parts.down && !parts.up) {
            if (parts.alpha) fail(ErrorCode::bad_input, "has an alpha ({}) but no factors", quote(parts.alpha->name));
            if (parts.magnitude)
                fail(ErrorCode::bad_input, "has a DoRA magnitude ({}) but no factors", quote(parts.magnitude->name));
            if (parts.bias) fail(ErrorCode::bad_input, "has a LoRA bias ({}) but no factors", quote(parts.bias->name));
            fail(ErrorCode::bad_input, "has no factors");
        }
        if (!parts.up)
            fail(ErrorCode::bad_input, "has an A (down) factor {} but no B (up) factor", quote(parts.down->name));
        if (!parts.down)
            fail(ErrorCode::bad_input, "has a B (up) factor {} but no A (down) factor", quote(parts.up->name));
        LoraModule m;
        m.name = std::move(name);
        m.source_name = parts.stem;
        m.down = supported_tensor(*parts.down);
        m.up = supported_tensor(*parts.up);
        m.alpha = read_alpha(parts.alpha);
        if (parts.alpha) m.alpha_dtype = parts.alpha->tensor.dtype();
        if (parts.embedding) m.kind = ModuleKind::embedding;
        else if (m.down.ndim() >= 3 || m.up.ndim() >= 3) m.kind = ModuleKind::conv;
        else m.kind = ModuleKind::linear;
        if (m.down.ndim() < 2 || m.up.ndim() < 2)
            fail(ErrorCode::bad_input, "factors must be at least 2-D, found A {} and B {}", format_shape(m.down.shape()),
                 format_shape(m.up.shape()));
        if (parts.magnitude) m.magnitude = supported_tensor(*parts.magnitude);
        if (parts.bias) m.bias = supported_tensor(*parts.bias);
        return m;
    });
}

LycorisModule assemble_lycoris_module(const ModuleParts& parts, std::string name) {
    return with_context(fmt::format("module {}", quote(name)), [&] {
        LycorisModule m;
        m.name = std::move(name);
        m.source_name = parts.stem;
        m.alpha = read_alpha(parts.alpha);
        std::set<std::string> roles;
        for (const auto& [role, entry] : parts.lycoris) {
            m.tensors.push_back({role, supported_tensor(*entry)});
            roles.insert(role);
        }
        auto has_prefix = [&](std::string_view prefix) {
            for (const auto& r : roles)
                if (starts_with(r, prefix)) return true;
            return false;
        };
        if (parts.mid) {
            if (!parts.down || !parts.up)
                fail(ErrorCode::bad_input, "has a Tucker mid factor {} but not both lora_down and lora_up",
                     quote(parts.mid->name));
            m.algorithm = "locon-tucker";
            m.tensors.push_back({"lora_down", supported_tensor(*parts.down)});
            m.tensors.push_back({"lora_up", supported_tensor(*parts.up)});
            m.tensors.push_back({"lora_mid", supported_tensor(*parts.mid)});
        } else if (has_prefix("hada_")) {
            m.algorithm = "loha";
            for (const char* required : {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
                if (!roles.count(required)) fail(ErrorCode::bad_input, "LoHa module lacks {}", required);
        } else if (has_prefix("lokr_")) {
            m.algorithm = "lokr";
            if (!roles.count("lokr_w1") && !(roles.count("lokr_w1_a") && roles.count("lokr_w1_b")))
                fail(ErrorCode::bad_input, "LoKr module lacks lokr_w1 (or lokr_w1_a and lokr_w1_b)");
            if (!roles.count("lokr_w2") && !(roles.count("lokr_w2_a") && roles.count("lokr_w2_b")))
                fail(ErrorCode::bad_input, "LoKr module lacks lokr_w2 (or lokr_w2_a and lokr_w2_b)");
        } else if (roles.count("diff") || roles.count("diff_b")) {
            m.algorithm = "full";
        } else if (roles.count("on_input")) {
            m.algorithm = "ia3";
        } else if (roles.count("w_norm") || roles.count("b_norm")) {
            m.algorithm = "norm";
        } else if (has_prefix("a1") || has_prefix("b1")) {
            m.algorithm = "glora";
        } else {
            m.algorithm = "unknown";
        }
        if (parts.magnitude) m.dora_scale = supported_tensor(*parts.magnitude);
        return m;
    });
}

MagnitudeAxis magnitude_axis_for(const Shape& shape, std::int64_t out, std::int64_t in) {
    if (shape.size() == 1) return (shape[0] == in && shape[0] != out) ? MagnitudeAxis::input_columns
                                                                      : MagnitudeAxis::output_rows;
    if (shape.size() >= 2 && shape[0] == 1 && shape[1] == in && in != 1) return MagnitudeAxis::input_columns;
    return MagnitudeAxis::output_rows;
}

// ---- key suffixes ---------------------------------------------------------------------------

std::optional<KeyRole> classify_peft_key(std::string_view key) {
    struct Suffix {
        std::string_view text;
        Role role;
        bool embedding;
    };
    static constexpr Suffix suffixes[] = {
        {".lora_A.weight", Role::down, false},
        {".lora_B.weight", Role::up, false},
        {".lora_B.bias", Role::lora_bias, false},
        {".lora_embedding_A", Role::down, true},
        {".lora_embedding_B", Role::up, true},
        {".lora_magnitude_vector", Role::magnitude, false},
        {".lora_magnitude_vector.weight", Role::magnitude, false},
        {".lora_A.default.weight", Role::down, false},
        {".lora_B.default.weight", Role::up, false},
        {".lora_B.default.bias", Role::lora_bias, false},
        {".lora_embedding_A.default", Role::down, true},
        {".lora_embedding_B.default", Role::up, true},
        {".lora_magnitude_vector.default.weight", Role::magnitude, false},
    };
    for (const auto& s : suffixes)
        if (key.size() > s.text.size() && ends_with(key, s.text))
            return KeyRole{std::string(key.substr(0, key.size() - s.text.size())), s.role, s.embedding};
    return std::nullopt;
}

// ---- JSON -----------------------------------------------------------------------------------

OrderedJson parse_json_text(std::string_view text, std::string_view what) {
    try {
        return OrderedJson::parse(text.begin(), text.end());
    } catch (const nlohmann::json::exception& e) {
        std::string message = e.what();
        for (char& c : message)
            if (c == '\n' || c == '\r') c = ' ';
        fail(ErrorCode::bad_input, "invalid JSON in {}: {}", what, message);
    }
}

OrderedJson parse_config_json(const SidecarConfig& config) {
    return with_context(quote(config.path.string()), [&] {
        OrderedJson json = parse_json_text(config.text, "config");
        if (!json.is_object()) fail(ErrorCode::bad_input, "config is not a JSON object");
        return json;
    });
}

OrderedJson owned_config(const AdapterInput& input, bool (*is_mine)(const OrderedJson&), bool& owned) {
    owned = false;
    if (!input.config) return OrderedJson::object();
    OrderedJson parsed = parse_config_json(*input.config);
    if (!is_mine(parsed)) return OrderedJson::object();
    owned = true;
    return parsed;
}

std::optional<double> json_number(const OrderedJson& value) {
    if (value.is_number()) return value.get<double>();
    if (value.is_string()) {
        const std::string text = value.get<std::string>();
        if (text.empty()) return std::nullopt;
        char* end = nullptr;
        const double parsed = std::strtod(text.c_str(), &end);
        if (end && *end == '\0') return parsed;
    }
    return std::nullopt;
}

namespace {

std::regex compile_pattern(const std::string& pattern, std::string_view where) {
    if (pattern.size() > 4096) fail(ErrorCode::bad_input, "a regular expression in {} is longer than 4096 characters", where);
    // Patterns come from the user's files. libstdc++'s default matcher backtracks (exponential
    // time on "(a*)*b", deep recursion on long names); its polynomial mode does neither.
#if defined(__GLIBCXX__)
    constexpr auto flags = std::regex::ECMAScript | std::regex_constants::__polynomial;
#else
    constexpr auto flags = std::regex::ECMAScript;
#endif
    try {
        return std::regex(pattern, flags);
    } catch (const std::regex_error&) {
        fail(ErrorCode::bad_input, "invalid regular expression {} in {}", quote(pattern), where);
    }
}

}  // namespace

std::optional<std::string> match_peft_pattern(const OrderedJson& patterns, std::string_view module_name) {
    if (!patterns.is_object()) return std::nullopt;
    const std::string name(module_name);
    for (const auto& [key, value] : patterns.items()) {
        (void)value;
        const std::regex re = compile_pattern("(.*\\.)?(" + key + ")", "a rank/alpha pattern");
        if (std::regex_match(name, re)) return key;
    }
    return std::nullopt;
}

bool matches_peft_targets(const OrderedJson& targets, std::string_view module_name) {
    if (targets.is_null()) return true;
    if (targets.is_string()) {
        const std::string pattern = targets.get<std::string>();
        if (pattern == "all-linear") return true;
        return std::regex_match(std::string(module_name), compile_pattern(pattern, "target_modules"));
    }
    if (targets.is_array()) {
        for (const auto& t : targets) {
            if (!t.is_string()) continue;
            const std::string target = t.get<std::string>();
            if (module_name == target || ends_with(module_name, "." + target)) return true;
        }
        return false;
    }
    return true;
}

// ---- names ----------------------------------------------------------------------------------

namespace {

// Identifiers that contain underscores in the module trees LoRAs are trained on.
const std::unordered_set<std::string_view>& compound_identifiers() {
    static const std::unordered_set<std::string_view> words = {
        // diffusers UNet
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
        "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
        "linear_1", "linear_2", "add_embedding", "norm_out", "class_embedding",
        // SGM / original Stable Diffusion UNet
        "input_blocks", "output_blocks", "middle_block", "in_layers", "out_layers", "emb_layers", "skip_connection",
        "time_embed", "label_emb",
        // CLIP
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1",
        "layer_norm2", "token_embedding", "position_embedding", "text_projection",
        // T5
        "wi_0", "wi_1", "relative_attention_bias",
        // LLMs
        "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head", "input_layernorm",
        "post_attention_layernorm", "gate_up_proj", "qkv_proj", "c_attn", "c_proj", "c_fc", "dense_h_to_4h",
        "dense_4h_to_h", "query_key_value",
        // Flux (BFL names)
        "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
        "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "in_layer", "out_layer", "final_layer",
        "adaLN_modulation", "key_norm", "query_norm",
        // Flux / SD3 (diffusers names)
        "single_transformer_blocks", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context",
        "norm1_context", "proj_mlp", "x_embedder", "context_embedder", "time_text_embed", "timestep_embedder",
        "text_embedder", "guidance_embedder", "norm_added_q", "norm_added_k", "norm_q", "norm_k",
        // SD3 MMDiT (original names)
        "joint_blocks", "x_block", "context_block", "pos_embed", "t_embedder", "y_embedder",
        // Cosmos / Anima, Wan, Qwen-Image and other DiTs
        "cross_attn", "output_proj", "adaln_modulation_cross_attn", "adaln_modulation_self_attn",
        "adaln_modulation_mlp", "layerwise_blocks", "refiner_blocks", "noise_refiner", "context_refiner",
    };
    return words;
}

}  // namespace

std::string unflatten_module_path(std::string_view flat) {
    // The tokens joined again by single underscores (empty tokens, from "__", dropped), so that
    // every run of tokens is a substring: candidates are looked up as views, without building
    // strings (this ran ~3 times per tensor while loading a kohya file, 13 ms of an SDXL load).
    const auto& words = compound_identifiers();
    std::string joined;
    joined.reserve(flat.size());
    std::vector<std::pair<std::size_t, std::size_t>> tokens;  // [begin, end) in joined
    for (auto token : split(flat, '_')) {
        if (token.empty()) continue;
        if (!joined.empty()) joined += '_';
        tokens.emplace_back(joined.size(), joined.size() + token.size());
        joined += token;
    }
    auto run = [&](std::size_t first, std::size_t count) {
        return std::string_view(joined).substr(tokens[first].first, tokens[first + count - 1].second - tokens[first].first);
    };
    std::string out;
    out.reserve(joined.size());
    std::size_t i = 0;
    while (i < tokens.size()) {
        std::size_t taken = 1;
        for (std::size_t length = std::min<std::size_t>(5, tokens.size() - i); length >= 2; --length)
            if (words.contains(run(i, length))) {
                taken = length;
                break;
            }
        if (!out.empty()) out += '.';
        out += run(i, taken);
        i += taken;
    }
    return out;
}

std::string_view infer_component(std::string_view path) {
    const std::string_view root = path.substr(0, path.find('.'));
    static constexpr std::array<std::string_view, 14> unet_roots = {
        "down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
        "add_embedding", "input_blocks", "output_blocks", "middle_block", "time_embed", "label_emb", "out",
    };
    static constexpr std::array<std::string_view, 24> transformer_roots = {
        "double_blocks", "single_blocks", "transformer_blocks", "single_transformer_blocks", "joint_blocks", "blocks",
        "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer", "x_embedder", "context_embedder",
        "time_text_embed", "proj_out", "norm_out", "pos_embed", "t_embedder", "y_embedder", "context_refiner",
        "noise_refiner", "txtfusion", "img_mlp",
    };
    for (auto r : unet_roots)
        if (root == r) return "unet";
    for (auto r : transformer_roots)
        if (root == r) return "transformer";
    if (root == "text_model") return "text_encoder";
    return "";
}

}  // namespace lorakit::formats
