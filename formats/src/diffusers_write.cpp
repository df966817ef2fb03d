// Writing diffusers LoRA files in the current layout (what load_lora_weights takes):
// <component>.<path>.lora_A.weight / .lora_B.weight, metadata {"format": "pt"}. The format has no
// alpha, so a scale other than 1 is folded into lora_B (and into a LoRA bias), with a note.
#include <fmt/format.h>

#include "lorakit/error.h"
#include "flux_names.h"
#include "sd_names.h"
#include "writers.h"

namespace lorakit::formats {

void write_diffusers(const Adapter& a, const std::filesystem::path& target, const WriteOptions& options,
                     std::vector<std::string>& notes) {
    const bool same = a.convention == "diffusers";
    // The older processor layout is rewritten in the current one, under canonical names.
    const bool keep_keys = same && a.convention_detail.find("processor") == std::string::npos &&
                           a.convention_detail.find("XLabs") == std::string::npos;
    refuse_lycoris(a, "diffusers");
    if (!same) refuse_other_tensors(a, "diffusers");
    OutputTensors out;
    std::size_t folded = 0, renamed = 0, flux_split = 0;
    // Flux modules named in the BFL tree become diffusers modules (fused ones split exactly).
    std::vector<LoraModule> modules;
    for (const auto& m : a.modules) {
        if (!keep_keys && m.name.starts_with("transformer.")) {
            if (auto parts = bfl_to_diffusers_flux(m)) {
                flux_split += parts->size() > 1 ? 1 : 0;
                ++renamed;
                for (auto& p : *parts) modules.push_back(std::move(p));
                continue;
            }
        }
        modules.push_back(m);
    }
    for (const auto& m : modules) {
        if (m.name.find(':') != std::string::npos)
            fail(ErrorCode::unsupported, "module {} has no module path (cloneofsimo numbering)", quote(m.name));
        if (!keep_keys && component_of(m.name).empty())
            fail(ErrorCode::unsupported,
                 "module {} belongs to no pipeline component (unet, text_encoder, transformer): diffusers files hold "
                 "diffusion pipelines",
                 quote(m.name));
        // diffusers names UNet and Flux modules in its own tree: kohya's SGM names (SDXL) are
        // mapped; BFL Flux names (double_blocks...) need the fused-qkv split, not implemented yet.
        std::string name = m.name;
        if (!keep_keys && name.starts_with("unet.")) {
            if (auto mapped = sgm_to_diffusers_unet(std::string_view(name).substr(5))) {
                name = "unet." + *mapped;
                ++renamed;
            }
        }
        const std::string stem = keep_keys && !m.source_name.empty() ? m.source_name : name;
        const double s = m.scale();
        if (s != 1.0) ++folded;
        if (m.kind == ModuleKind::embedding) {
            out.add(stem + ".lora_embedding_A", m.down);
            out.add(stem + ".lora_embedding_B", m.up, s);
        } else {
            out.add(stem + ".lora_A.weight", m.down);
            out.add(stem + ".lora_B.weight", m.up, s);
        }
        if (m.bias) out.add(stem + ".lora_B.bias", *m.bias, s);
        if (m.magnitude) out.add(stem + ".lora_magnitude_vector", magnitude_as_rows(m, "diffusers"));
    }
    for (const auto& t : a.other_tensors) out.add(t.name, t.tensor);
    std::map<std::string, std::string> metadata = same ? a.metadata : std::map<std::string, std::string>{};
    // Scales are folded now; a stale LoraConfig would apply them a second time.
    metadata.erase("lora_adapter_metadata");
    metadata["format"] = "pt";
    if (renamed)
        notes.push_back(fmt::format("{} module(s) renamed from the SGM/BFL trees to diffusers names{}", renamed,
                                    flux_split ? fmt::format(" ({} fused Flux module(s) split into q/k/v[/mlp])", flux_split)
                                               : std::string()));
    if (folded)
        notes.push_back(fmt::format("diffusers files carry no alpha: the scale of {} module(s) is folded into lora_B",
                                    folded));
    write_tensor_file(target, out, metadata, options.overwrite);
}

}  // namespace lorakit::formats
