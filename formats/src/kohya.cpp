// kohya-ss/sd-scripts LoRA (the A1111 / ComfyUI / Civitai format) and LyCORIS files that
// use its naming: <name>.lora_down.weight [r, in(, kh, kw)], <name>.lora_up.weight
// [out, r(, 1, 1)], <name>.alpha (scalar of any dtype; missing means alpha = r), optional
// <name>.dora_scale, and LyCORIS tensors (hada_*, lokr_*, lora_mid, diff, ...). Names are
// flattened module paths with a component prefix (lora_unet_, lora_te1_, lora_transformer_,
// ...), or dotted paths in some trainers' files. Source: research/formats.md §3 and §7.
#include <set>

#include <fmt/format.h>

#include "convention_common.h"
#include "conventions.h"
#include "writers.h"
#include "lorakit/base_model.h"
#include "lorakit/error.h"
#include "lorakit/names.h"

namespace lorakit::formats {

namespace {

struct KohyaSuffix {
    std::string_view text;
    Role role;
    std::string_view lycoris_role;
};

// Longest suffixes first where one ends another (".hada_w1_a" vs ".a").
constexpr KohyaSuffix kohya_suffixes[] = {
    {".lora_down.weight", Role::down, {}},
    {".lora_up.weight", Role::up, {}},
    {".lora_mid.weight", Role::mid, {}},
    {".alpha", Role::alpha, {}},
    {".dora_scale", Role::magnitude, {}},
    {".hada_w1_a", Role::lycoris, "hada_w1_a"},
    {".hada_w1_b", Role::lycoris, "hada_w1_b"},
    {".hada_w2_a", Role::lycoris, "hada_w2_a"},
    {".hada_w2_b", Role::lycoris, "hada_w2_b"},
    {".hada_t1", Role::lycoris, "hada_t1"},
    {".hada_t2", Role::lycoris, "hada_t2"},
    {".lokr_w1_a", Role::lycoris, "lokr_w1_a"},
    {".lokr_w1_b", Role::lycoris, "lokr_w1_b"},
    {".lokr_w2_a", Role::lycoris, "lokr_w2_a"},
    {".lokr_w2_b", Role::lycoris, "lokr_w2_b"},
    {".lokr_w1", Role::lycoris, "lokr_w1"},
    {".lokr_w2", Role::lycoris, "lokr_w2"},
    {".lokr_t2", Role::lycoris, "lokr_t2"},
    {".diff_b", Role::lycoris, "diff_b"},
    {".diff", Role::lycoris, "diff"},
    {".on_input", Role::lycoris, "on_input"},
    {".a1.weight", Role::lycoris, "a1.weight"},
    {".a2.weight", Role::lycoris, "a2.weight"},
    {".b1.weight", Role::lycoris, "b1.weight"},
    {".b2.weight", Role::lycoris, "b2.weight"},
    {".bm.weight", Role::lycoris, "bm.weight"},
    {".w_norm", Role::lycoris, "w_norm"},
    {".b_norm", Role::lycoris, "b_norm"},
};

std::optional<std::pair<std::string, const KohyaSuffix*>> classify_kohya_key(std::string_view key) {
    for (const auto& s : kohya_suffixes)
        if (key.size() > s.text.size() && ends_with(key, s.text))
            return std::pair{std::string(key.substr(0, key.size() - s.text.size())), &s};
    return std::nullopt;
}

struct Prefix {
    std::string_view text;
    std::string_view component;  // "" = decide from the path
};

constexpr Prefix kohya_prefixes[] = {
    {"lora_prior_unet_", "prior"},
    {"lora_prior_te_", "prior_text_encoder"},
    {"lora_unet_", ""},
    {"lora_transformer_", "transformer"},
    {"lora_te1_", "text_encoder"},
    {"lora_te2_", "text_encoder_2"},
    {"lora_te3_", "text_encoder_3"},
    {"lora_te_", "text_encoder"},
    {"lycoris_", ""},
};

bool has_kohya_prefix(std::string_view stem) {
    for (const auto& p : kohya_prefixes)
        if (starts_with(stem, p.text)) return true;
    return false;
}

// Facts about the whole file that decide how some names map.
struct FileShape {
    bool flux = false;  // Flux names: the T5 encoder is diffusers' text_encoder_2
    bool dit = false;   // lora_unet_ names a transformer backbone, not a UNet
};

std::string canonical_name(std::string_view stem, const FileShape& shape) {
    for (const auto& p : kohya_prefixes) {
        if (!starts_with(stem, p.text)) continue;
        const std::string path = unflatten_module_path(stem.substr(p.text.size()));
        std::string component(p.component);
        if (component.empty()) {
            const auto inferred = infer_component(path);
            if (!inferred.empty()) component = std::string(inferred);
            else if (p.text == "lycoris_") component = "lycoris";
            else component = shape.dit ? "transformer" : "unet";
        }
        if (p.text == "lora_te3_" && shape.flux) component = "text_encoder_2";
        return component + "." + path;
    }
    // Dotted names (some trainers keep the module path as is).
    std::string_view path = stem;
    if (starts_with(path, "diffusion_model.")) {
        path.remove_prefix(16);
        const auto inferred = infer_component(path);
        return std::string(inferred.empty() ? "transformer" : inferred) + "." + std::string(path);
    }
    for (std::string_view component : {"unet.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "transformer."})
        if (starts_with(path, component)) return std::string(path);
    if (path.find('.') == std::string_view::npos) {
        const std::string unflattened = unflatten_module_path(path);
        const auto inferred = infer_component(unflattened);
        return inferred.empty() ? unflattened : std::string(inferred) + "." + unflattened;
    }
    const auto inferred = infer_component(path);
    return inferred.empty() ? std::string(path) : std::string(inferred) + "." + std::string(path);
}

std::optional<double> metadata_number(const std::map<std::string, std::string>& metadata, const char* key) {
    auto it = metadata.find(key);
    if (it == metadata.end()) return std::nullopt;
    return json_number(OrderedJson(it->second));
}

class KohyaDriver final : public ConventionDriver {
public:
    void write(const Adapter& adapter, const std::filesystem::path& target, const WriteOptions& options,
               std::vector<std::string>& notes) const override {
        write_kohya(adapter, target, options, notes);
    }
    std::string_view name() const override { return "kohya"; }
    std::string_view description() const override {
        return "kohya-ss/sd-scripts and LyCORIS (lora_unet_*.lora_down.weight / .lora_up.weight / .alpha)";
    }

    Detection detect(const AdapterInput& input) const override {
        std::size_t matched = 0, prefixed = 0, lycoris = 0;
        for (const auto& entry : input.tensors.entries()) {
            auto key = classify_kohya_key(entry.name);
            if (!key || key->second->role == Role::alpha) continue;
            ++matched;
            if (has_kohya_prefix(key->first)) ++prefixed;
            if (key->second->role == Role::lycoris || key->second->role == Role::mid) ++lycoris;
        }
        if (matched == 0) return {};
        const std::string kind = lycoris ? "LyCORIS" : "LoRA";
        if (prefixed) return {80, fmt::format("kohya-style {}", kind)};
        return {60, fmt::format("kohya-style {} with dotted module names", kind)};
    }

    Adapter read(const AdapterInput& input) const override {
        Adapter adapter;
        ModuleCollector collector;
        FileShape shape;
        for (const auto& entry : input.tensors.entries()) {
            auto key = classify_kohya_key(entry.name);
            if (!key) continue;
            collector.add(key->first, key->second->role, entry, key->second->lycoris_role);
            const std::string& stem = key->first;
            if (stem.find("double_blocks") != std::string::npos || stem.find("single_blocks") != std::string::npos ||
                stem.find("single_transformer_blocks") != std::string::npos)
                shape.flux = true;
            if (starts_with(stem, "lora_unet_") && infer_component(unflatten_module_path(stem.substr(10))) == "transformer")
                shape.dit = true;
        }
        // IA3 stores its vector as "<name>.weight": only meaningful next to "<name>.on_input".
        std::vector<const TensorEntry*> leftovers;
        for (const auto& entry : input.tensors.entries()) {
            if (classify_kohya_key(entry.name)) continue;
            if (ends_with(entry.name, ".weight")) {
                const std::string stem = entry.name.substr(0, entry.name.size() - 7);
                auto& parts = collector.parts(stem);
                bool ia3 = false;
                for (const auto& [role, t] : parts.lycoris) ia3 |= role == "on_input";
                if (ia3) {
                    collector.add(stem, Role::lycoris, entry, "weight");
                    continue;
                }
            }
            leftovers.push_back(&entry);
        }
        for (const TensorEntry* entry : leftovers) {
            if (!entry->supported())
                fail(ErrorCode::unsupported, "tensor {} has unsupported dtype {}", quote(entry->name), entry->dtype_name);
            adapter.other_tensors.push_back({entry->name, entry->tensor});
            adapter.warnings.push_back(
                fmt::format("tensor {} is not part of any LoRA module (loaders ignore it)", quote(entry->name)));
        }

        std::size_t without_alpha = 0;
        for (auto& parts : collector.all()) {
            if (!parts.down && !parts.up && !parts.alpha && !parts.magnitude && parts.lycoris.empty() && !parts.mid)
                continue;  // a stem created only by the IA3 probe above
            std::string name = canonical_name(parts.stem, shape);
            // A LoRA with a LyCORIS diff_b beside it (lorakit writes a LoRA bias so): the bias,
            // applied with the strength alone, becomes the module's bias on B (divided by its scale).
            const TensorEntry* diff_b = nullptr;
            if (parts.down && parts.up && !parts.mid && parts.lycoris.size() == 1 && parts.lycoris.front().first == "diff_b") {
                diff_b = parts.lycoris.front().second;
                parts.lycoris.clear();
            }
            if (is_lycoris(parts)) {
                adapter.lycoris_modules.push_back(assemble_lycoris_module(parts, std::move(name)));
                continue;
            }
            LoraModule m = assemble_lora_module(parts, std::move(name));
            m.scale_rule = ScaleRule::alpha_over_rank;
            if (!m.alpha) ++without_alpha;
            if (m.magnitude) m.magnitude_axis = magnitude_axis_for(m.magnitude->shape(), m.out_features(), m.in_features());
            if (diff_b) {
                auto b = diff_b->to_f32();
                const double s = m.scale();
                if (s == 0) fail(ErrorCode::bad_input, "module {} has a diff_b but a scale of 0", quote(m.name));
                for (auto& x : b) x = static_cast<float>(x / s);
                m.bias = Tensor::from_f32(diff_b->tensor.dtype(), diff_b->shape, b);
            }
            adapter.modules.push_back(std::move(m));
        }
        if (adapter.modules.empty() && adapter.lycoris_modules.empty())
            fail(ErrorCode::bad_input, "no LoRA modules found");
        if (without_alpha)
            adapter.notes.push_back(fmt::format(
                "{} module(s) have no alpha: scale 1 (alpha = rank), as kohya and ComfyUI load them", without_alpha));
        describe(adapter, input.tensors.metadata());
        return adapter;
    }

private:
    static void describe(Adapter& adapter, const std::map<std::string, std::string>& metadata) {
        std::set<std::string> algorithms;
        for (const auto& m : adapter.lycoris_modules) algorithms.insert(m.algorithm);
        bool dora = false;
        for (const auto& m : adapter.modules) dora |= m.magnitude.has_value();
        adapter.convention_detail = algorithms.empty() ? "kohya LoRA" : "LyCORIS";
        if (!algorithms.empty()) {
            std::vector<std::string_view> names(algorithms.begin(), algorithms.end());
            adapter.convention_detail += fmt::format(" ({})", fmt::join(names, ", "));
            if (!adapter.modules.empty()) adapter.convention_detail += " with plain LoRA modules";
            adapter.convention = "lycoris";
        }
        if (dora) adapter.convention_detail += ", DoRA (dora_scale)";
        if (auto it = metadata.find("ss_network_module"); it != metadata.end())
            adapter.convention_detail += fmt::format(", {}", it->second);

        // Base model: kohya writes the family into ss_base_model_version and modelspec.
        for (const char* key : {"ss_base_model_version", "modelspec.architecture"}) {
            auto it = metadata.find(key);
            if (it == metadata.end()) continue;
            if (auto family = family_from_model_name(it->second); !family.empty()) {
                adapter.base_model.family = family;
                adapter.base_model.evidence = fmt::format("metadata {}", key);
                break;
            }
        }
        if (auto it = metadata.find("ss_sd_model_name"); it != metadata.end()) adapter.base_model.name = it->second;

        // Consistency of the training metadata with the tensors.
        if (auto dim = metadata_number(metadata, "ss_network_dim"); dim && !adapter.modules.empty()) {
            bool any = false;
            for (const auto& m : adapter.modules) any |= static_cast<double>(m.rank()) == *dim;
            if (!any)
                adapter.warnings.push_back(fmt::format("metadata ss_network_dim is {} but no module has that rank", *dim));
        }
        if (auto alpha = metadata_number(metadata, "ss_network_alpha"); alpha && !adapter.modules.empty()) {
            bool any = false, any_alpha = false;
            for (const auto& m : adapter.modules) {
                if (!m.alpha || m.kind == ModuleKind::conv) continue;
                any_alpha = true;
                any |= *m.alpha == *alpha;
            }
            if (any_alpha && !any)
                adapter.warnings.push_back(
                    fmt::format("metadata ss_network_alpha is {} but no linear module has that alpha", *alpha));
        }
    }
};

}  // namespace

std::unique_ptr<ConventionDriver> make_kohya_driver() { return std::make_unique<KohyaDriver>(); }

}  // namespace lorakit::formats
