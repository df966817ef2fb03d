// Writing kohya / sd-scripts LoRA files (and LyCORIS files read in the same naming):
// <name>.lora_down.weight, <name>.lora_up.weight, <name>.alpha, optional <name>.dora_scale, and
// the ss_* metadata sd-scripts maintains, with sshs_model_hash recomputed over the data.
#include <cmath>

#include <fmt/format.h>

#include "lorakit/error.h"
#include "flux_names.h"
#include "sd_names.h"
#include "writers.h"

namespace lorakit::formats {

namespace {

bool mentions(const Adapter& a, std::string_view what) {
    for (const auto& m : a.modules)
        if (m.name.find(what) != std::string::npos) return true;
    return false;
}

// What kohya's prefixes depend on, from the whole adapter (computed once, not per module).
struct KohyaNaming {
    bool flux = false;                // kohya Flux files: CLIP-L is te1, T5 te3
    bool two_text_encoders = false;   // SDXL: te1 and te2
    bool sdxl = false;                // UNet names in the SGM tree
};

KohyaNaming kohya_naming(const Adapter& a) {
    KohyaNaming n;
    n.flux = a.base_model.family == "Flux" || mentions(a, "double_blocks") || mentions(a, "single_blocks") ||
             mentions(a, "single_transformer_blocks");
    n.two_text_encoders = components_of(a).count("text_encoder_2") > 0;
    n.sdxl = a.base_model.family == "SDXL";
    return n;
}

// kohya's flattened name for a canonical module name (SDXL UNet paths in the diffusers tree
// are mapped to the SGM tree sd-scripts uses; Flux is mapped by write_kohya beforehand).
std::string kohya_name(const KohyaNaming& naming, const LoraModule& m) {
    if (m.name.find(':') != std::string::npos)
        fail(ErrorCode::unsupported, "module {} has no module path (cloneofsimo numbering), so it has no kohya name",
             quote(m.name));
    const std::string component = component_of(m.name);
    const bool flux = naming.flux;
    std::string prefix;
    if (component == "unet" || component == "transformer") prefix = "lora_unet_";
    else if (component == "text_encoder") prefix = flux || naming.two_text_encoders ? "lora_te1_" : "lora_te_";
    else if (component == "text_encoder_2") prefix = flux ? "lora_te3_" : "lora_te2_";  // kohya Flux files keep T5 as te3
    else if (component == "text_encoder_3") prefix = "lora_te3_";
    else if (component == "prior") prefix = "lora_prior_unet_";
    else if (component == "prior_text_encoder") prefix = "lora_prior_te_";
    else if (component == "lycoris") prefix = "lycoris_";
    else
        fail(ErrorCode::unsupported,
             "module {} belongs to no diffusion-model component (unet, text_encoder, transformer): kohya names "
             "cover diffusion models only",
             quote(m.name));
    std::string path = m.name.substr(component.size() + 1);
    // sd-scripts trains SDXL on the SGM UNet: its files name UNet modules in that tree.
    if (component == "unet" && naming.sdxl)
        if (auto sgm = diffusers_to_sgm_unet_sdxl(path)) path = *sgm;
    for (char& c : path)
        if (c == '.') c = '_';
    return prefix + path;
}

double kohya_alpha(const LoraModule& m) {
    if (m.scale_rule == ScaleRule::alpha_over_rank && m.alpha) return *m.alpha;
    return m.scale() * static_cast<double>(m.rank());
}

// kohya and LyCORIS store DoRA magnitudes as [out, 1] (per output row) or [1, in] (per input
// column), 4-D for convolutions.
Tensor kohya_dora_scale(const LoraModule& m) {
    const std::int64_t n = m.magnitude->element_count();
    const bool conv = m.down.ndim() == 4;
    Shape shape = m.magnitude_axis == MagnitudeAxis::output_rows ? Shape{n, 1} : Shape{1, n};
    if (conv) shape.insert(shape.end(), {1, 1});
    return m.magnitude->reshaped(shape);
}

std::string uniform_or_dynamic(const std::vector<double>& values) {
    if (values.empty()) return "Dynamic";
    for (double v : values)
        if (v != values.front()) return "Dynamic";
    return fmt::format("{}", values.front());
}

std::string base_model_version(const std::string& family) {
    if (family == "SDXL") return "sdxl_base_v1-0";
    if (family == "SD1.5") return "sd_v1";
    if (family == "SD2") return "sd_v2";
    if (family == "Flux") return "flux1";
    return "";
}

}  // namespace

void write_kohya(const Adapter& a, const std::filesystem::path& target, const WriteOptions& options,
                 std::vector<std::string>& notes) {
    const bool same = a.convention == "kohya" || a.convention == "lycoris";
    if (!same) {
        refuse_other_tensors(a, "kohya");
        // LyCORIS full and norm diffs need no conversion: written under kohya names.
        Adapter others;
        for (const auto& m : a.lycoris_modules)
            if (m.algorithm != "full" && m.algorithm != "norm") others.lycoris_modules.push_back(m);
        refuse_lycoris(others, "kohya");
    }
    OutputTensors out;
    std::vector<double> ranks, alphas;
    // kohya names Flux modules in the BFL tree: diffusers-named ones are renamed and their
    // q/k/v (and proj_mlp) joined back into the fused modules.
    std::vector<LoraModule> flux_modules;
    const std::vector<LoraModule>* modules = &a.modules;
    // (Only for Flux: SD3's diffusers names look alike but map to kohya's joint_blocks.)
    if (!same && (a.base_model.family == "Flux" || mentions(a, "single_transformer_blocks"))) {
        std::size_t joined = 0;
        flux_modules = diffusers_to_bfl_flux(a.modules, joined);
        bool changed = joined > 0 || flux_modules.size() != a.modules.size();
        for (std::size_t i = 0; !changed && i < flux_modules.size(); ++i) changed = flux_modules[i].name != a.modules[i].name;
        if (changed) {
            modules = &flux_modules;
            notes.push_back(fmt::format("Flux modules renamed to BFL names for kohya ({} fused module(s) joined)", joined));
        }
    }
    const KohyaNaming naming = kohya_naming(a);
    for (const auto& m : *modules) {
        const std::string stem = same && !m.source_name.empty() ? m.source_name : kohya_name(naming, m);
        out.add(stem + ".lora_down.weight", m.down);
        out.add(stem + ".lora_up.weight", m.up);
        if (m.alpha || m.scale_rule != ScaleRule::alpha_over_rank) {
            const double alpha = kohya_alpha(m);
            out.add(stem + ".alpha", scalar_tensor(alpha, m.alpha_dtype));
            alphas.push_back(alpha);
        } else {
            alphas.push_back(static_cast<double>(m.rank()));
        }
        if (m.magnitude) out.add(stem + ".dora_scale", same ? *m.magnitude : kohya_dora_scale(m));
        if (m.bias) {
            // A LoRA bias as LyCORIS's diff_b (added with the strength alone, as ComfyUI does):
            // the module's scale folded in.
            auto b = m.bias->to_f32();
            const double s = m.scale();
            for (auto& x : b) x = static_cast<float>(x * s);
            out.add(stem + ".diff_b", Tensor::from_f32(m.bias->dtype(), m.bias->shape(), b));
        }
        ranks.push_back(static_cast<double>(m.rank()));
    }
    for (const auto& m : a.lycoris_modules) {
        LoraModule probe;
        probe.name = m.name;
        const std::string stem = same && !m.source_name.empty() ? m.source_name : kohya_name(naming, probe);
        for (const auto& t : m.tensors) {
            const bool locon = t.name == "lora_down" || t.name == "lora_up" || t.name == "lora_mid";
            out.add(fmt::format("{}.{}{}", stem, t.name, locon ? ".weight" : ""), t.tensor);
        }
        if (m.alpha) out.add(stem + ".alpha", scalar_tensor(*m.alpha, DType::F32));
        if (m.dora_scale) out.add(stem + ".dora_scale", *m.dora_scale);
    }
    for (const auto& t : a.other_tensors) out.add(t.name, t.tensor);

    std::map<std::string, std::string> metadata;
    if (same) metadata = a.metadata;
    if (!same) {
        metadata["ss_network_module"] = "networks.lora";
        if (auto version = base_model_version(a.base_model.family); !version.empty())
            metadata["ss_base_model_version"] = version;
    }
    if (!a.modules.empty()) {
        metadata["ss_network_dim"] = uniform_or_dynamic(ranks);
        metadata["ss_network_alpha"] = uniform_or_dynamic(alphas);
    }
    // sd-scripts' hashes: the data-section hash is reproducible, the legacy one depends on the
    // header (and the reference writer's random metadata order), so it is dropped.
    metadata.erase("sshs_legacy_hash");
    if (!same) notes.push_back("wrote kohya names (lora_unet_, lora_te*_) from the module paths");
    write_tensor_file(target, out, metadata, options.overwrite, "sshs_model_hash");
}

}  // namespace lorakit::formats
