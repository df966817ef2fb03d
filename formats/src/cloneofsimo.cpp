// cloneofsimo/lora files (the first Stable Diffusion LoRA trainer, 2022-2023): keys
// "unet:<i>:down" / "unet:<i>:up" and "text_encoder:<i>:down" / ":up", where <i> is the
// module's position in the order the trainer injected LoRA layers; ranks are repeated in the
// metadata ("unet:<i>:rank"), and pivotal-tuning token embeddings ("<s1>") may ride along
// (metadata value "<embed>"). There is no alpha: the trainer applies scale 1 by default.
#include <fmt/format.h>

#include "convention_common.h"
#include "conventions.h"
#include "writers.h"
#include "lorakit/error.h"
#include "lorakit/names.h"

namespace lorakit::formats {

namespace {

struct CloneKey {
    std::string stem;  // "unet:12"
    Role role;
};

std::optional<CloneKey> classify_clone_key(std::string_view key) {
    const auto parts = split(key, ':');
    if (parts.size() != 3) return std::nullopt;
    if (parts[0] != "unet" && parts[0] != "text_encoder") return std::nullopt;
    if (!is_number(parts[1])) return std::nullopt;
    Role role;
    if (parts[2] == "down") role = Role::down;
    else if (parts[2] == "up") role = Role::up;
    else return std::nullopt;
    return CloneKey{fmt::format("{}:{}", parts[0], parts[1]), role};
}

class CloneofsimoDriver final : public ConventionDriver {
public:
    void write(const Adapter& adapter, const std::filesystem::path& target, const WriteOptions& options,
               std::vector<std::string>& notes) const override {
        write_cloneofsimo(adapter, target, options, notes);
    }
    std::string_view name() const override { return "cloneofsimo"; }
    std::string_view description() const override { return "cloneofsimo/lora (unet:<i>:down / unet:<i>:up)"; }

    Detection detect(const AdapterInput& input) const override {
        for (const auto& entry : input.tensors.entries())
            if (classify_clone_key(entry.name)) return {90, "cloneofsimo/lora"};
        return {};
    }

    Adapter read(const AdapterInput& input) const override {
        Adapter adapter;
        const auto& metadata = input.tensors.metadata();
        ModuleCollector collector;
        std::vector<std::string> embeddings;
        for (const auto& entry : input.tensors.entries()) {
            if (auto key = classify_clone_key(entry.name)) {
                collector.add(key->stem, key->role, entry);
                continue;
            }
            if (!entry.supported())
                fail(ErrorCode::unsupported, "tensor {} has unsupported dtype {}", quote(entry.name), entry.dtype_name);
            adapter.other_tensors.push_back({entry.name, entry.tensor});
            auto it = metadata.find(entry.name);
            if (it != metadata.end() && it->second == "<embed>") embeddings.push_back(quote(entry.name));
            else
                adapter.warnings.push_back(
                    fmt::format("tensor {} is neither a LoRA factor nor a token embedding", quote(entry.name)));
        }
        for (const auto& parts : collector.all()) {
            LoraModule m = assemble_lora_module(parts, parts.stem);
            m.scale_rule = ScaleRule::fixed;
            m.fixed_scale = 1.0;
            auto it = metadata.find(parts.stem + ":rank");
            if (it != metadata.end() && it->second != std::to_string(m.rank()))
                adapter.warnings.push_back(fmt::format("module {} has rank {} but the metadata says {}", quote(m.name),
                                                       m.rank(), it->second));
            adapter.modules.push_back(std::move(m));
        }
        if (adapter.modules.empty()) fail(ErrorCode::bad_input, "no LoRA modules found");
        adapter.convention_detail = "cloneofsimo/lora (modules numbered in injection order)";
        if (!embeddings.empty())
            adapter.notes.push_back(
                fmt::format("{} learned token embedding(s): {}", embeddings.size(), fmt::join(embeddings, ", ")));
        return adapter;
    }
};

}  // namespace

void write_cloneofsimo(const Adapter& a, const std::filesystem::path& target, const WriteOptions& options,
                       std::vector<std::string>& notes) {
    // Module identities are positions in the trainer's injection order: only a cloneofsimo
    // file can supply them.
    if (a.convention != "cloneofsimo")
        fail(ErrorCode::unsupported, "cloneofsimo modules are numbered in the trainer's injection order, which a {} "
                                     "adapter cannot supply",
             a.convention);
    refuse_lycoris(a, "cloneofsimo");
    refuse_bias(a, "cloneofsimo");
    OutputTensors out;
    std::map<std::string, std::string> metadata = a.metadata;
    std::size_t folded = 0;
    for (const auto& m : a.modules) {
        if (m.magnitude)
            fail_lossy(Loss::dora_magnitudes, {}, "module {} has a DoRA magnitude, which cloneofsimo files cannot hold",
                       quote(m.name));
        const double s = m.scale();
        folded += s != 1.0;
        out.add(m.source_name + ":down", m.down);
        out.add(m.source_name + ":up", with_context(fmt::format("module {}", quote(m.name)), [&] { return scaled(m.up, s); }));
        metadata[m.source_name + ":rank"] = std::to_string(m.rank());
    }
    for (const auto& t : a.other_tensors) out.add(t.name, t.tensor);
    if (folded) notes.push_back(fmt::format("cloneofsimo files carry no alpha: the scale of {} module(s) is folded into up", folded));
    write_tensor_file(target, out, metadata, options.overwrite);
}

std::unique_ptr<ConventionDriver> make_cloneofsimo_driver() { return std::make_unique<CloneofsimoDriver>(); }

}  // namespace lorakit::formats
