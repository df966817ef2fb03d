#include "lorakit/base_model.h"

#include <algorithm>
#include <cctype>
#include <set>

#include "lorakit/names.h"

namespace lorakit {
namespace {

std::string lower(std::string_view text) {
    std::string out(text);
    std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return std::tolower(c); });
    return out;
}

bool contains(std::string_view haystack, std::string_view needle) {
    return haystack.find(needle) != std::string_view::npos;
}

// The in_features of cross-attention key projections ("attn2.to_k") tell the text encoder
// width of a Stable Diffusion UNet: 768 for SD1.x, 1024 for SD2.x, 2048 for SDXL.
std::set<std::int64_t> cross_attention_widths(const Adapter& adapter) {
    std::set<std::int64_t> widths;
    for (const auto& m : adapter.modules)
        if (starts_with(m.name, "unet.") && (ends_with(m.name, "attn2.to_k") || ends_with(m.name, "attn2.to_v")))
            widths.insert(m.in_features());
    return widths;
}

std::string family_from_keys(const Adapter& adapter) {
    bool unet = false, te1 = false, te2 = false, te3 = false, double_blocks = false, joint_blocks = false;
    bool clip = false;
    bool llm_layers = false, gpt2 = false, gpt_neo = false, cloneofsimo = false;
    std::int64_t hidden = 0;
    auto scan = [&](const std::string& name, std::int64_t in_features) {
        if (starts_with(name, "unet")) unet = true;
        if (starts_with(name, "text_encoder.") || starts_with(name, "text_encoder:")) te1 = true;
        if (starts_with(name, "text_encoder") && contains(name, ".text_model.")) clip = true;
        if (starts_with(name, "text_encoder_2.")) te2 = true;
        if (starts_with(name, "text_encoder_3.")) te3 = true;
        if (contains(name, ":")) cloneofsimo = true;
        if (contains(name, "double_blocks.") || contains(name, "single_blocks.") ||
            contains(name, "single_transformer_blocks.") || contains(name, ".add_q_proj")) {
            double_blocks = true;
            hidden = std::max(hidden, in_features);
        }
        if (contains(name, "joint_blocks.")) joint_blocks = true;
        // transformers LLM paths; text encoders inside diffusion pipelines are not LLMs here.
        if ((starts_with(name, "model.layers.") || starts_with(name, "model.language_model.layers.") ||
             starts_with(name, "gpt_neox.layers.") || starts_with(name, "model.decoder.layers.")) &&
            (contains(name, "attn") || contains(name, "mlp.")))
            llm_layers = true;
        if (contains(name, "attn.c_attn") || contains(name, "mlp.c_fc")) gpt2 = true;
        if (contains(name, "attn.attention.q_proj")) gpt_neo = true;
    };
    for (const auto& m : adapter.modules) scan(m.name, m.in_features());
    for (const auto& m : adapter.lycoris_modules) scan(m.name, 0);

    if (joint_blocks || te3) return "SD3";
    if (double_blocks) return "Flux";
    if (unet || (te1 && (clip || cloneofsimo)) || (te2 && clip)) {
        const auto widths = cross_attention_widths(adapter);
        if (te2 || widths.count(2048)) return "SDXL";
        if (widths.count(1024)) return "SD2";
        if (widths.count(768)) return "SD1.5";
        if (cloneofsimo || clip) return "SD1.5";
        return "Stable Diffusion";
    }
    if (gpt2) return "GPT-2";
    if (gpt_neo) return "GPT-Neo";
    if (llm_layers) return "Llama-family";
    return "";
}

}  // namespace

std::string family_from_model_name(std::string_view name) {
    const std::string n = lower(name);
    if (n.empty()) return "";
    struct Rule {
        std::string_view needle;
        std::string_view family;
    };
    // Order matters: more specific names first.
    static constexpr Rule rules[] = {
        {"flux", "Flux"},
        {"stable-diffusion-xl", "SDXL"},
        {"sdxl", "SDXL"},
        {"sd_xl", "SDXL"},
        {"stable-diffusion-3", "SD3"},
        {"sd3", "SD3"},
        {"stable-diffusion-v2", "SD2"},
        {"stable-diffusion-2", "SD2"},
        {"sd_v2", "SD2"},
        {"stable-diffusion-v1", "SD1.5"},
        {"sd_v1", "SD1.5"},
        {"v1-5", "SD1.5"},
        {"sd15", "SD1.5"},
        {"qwen", "Qwen"},
        {"mixtral", "Mixtral"},
        {"mistral", "Mistral"},
        {"llama", "Llama"},
        {"gemma", "Gemma"},
        {"gpt-oss", "GPT-OSS"},
        {"gpt-neox", "GPT-NeoX"},
        {"gpt-neo", "GPT-Neo"},
        {"gpt2", "GPT-2"},
        {"gpt-2", "GPT-2"},
        {"phi", "Phi"},
        {"minicpm", "MiniCPM"},
        {"chatglm", "ChatGLM"},
        {"falcon", "Falcon"},
        {"bloom", "BLOOM"},
        {"opt-", "OPT"},
        {"t5", "T5"},
    };
    for (const auto& rule : rules)
        if (contains(n, rule.needle)) return std::string(rule.family);
    return "";
}

void infer_base_model(Adapter& adapter) {
    auto& hint = adapter.base_model;
    if (!hint.family.empty()) return;
    if (auto family = family_from_model_name(hint.name); !family.empty()) {
        hint.family = family;
        if (hint.evidence.empty()) hint.evidence = "model name";
        return;
    }
    if (auto family = family_from_keys(adapter); !family.empty()) {
        hint.family = family;
        hint.evidence = "module names and shapes";
        return;
    }
    hint.family = "unknown";
}

}  // namespace lorakit
