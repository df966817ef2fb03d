// Apple mlx-lm adapters: adapters.safetensors + adapter_config.json. Keys are the model's
// module paths with .lora_a [in, r] and .lora_b [r, out] (the transposes of PEFT's A and B)
// and, for DoRA, .m. There is no alpha: lora_parameters.scale multiplies B·A.
//
// The meaning of `scale` changed over mlx-lm's history (ml-explore/mlx-examples, see
// docs/conventions.md): from e56d9015 (2024-03-12) to c457a3f8 (2024-06-02) LoRALinear
// applied scale · alpha / rank when lora_parameters held an "alpha"; later versions apply
// `scale` alone. Configs from before use_dora existed (added 42458914, 2024-05-16) can only
// come from the first period; configs with fine_tune_type / num_layers (50e5ca81,
// 2024-09-29) only from the second. Source: research/formats.md §6.
#include <cmath>
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

constexpr std::string_view config_name = "adapter_config.json";
constexpr double mlx_default_scale = 20.0;

bool is_mlx_config(const OrderedJson& config) {
    return config.is_object() && !config.contains("peft_type") &&
           (config.contains("lora_parameters") || config.contains("fine_tune_type"));
}

struct KeyRoleMlx {
    std::string stem;
    Role role;
};

std::optional<KeyRoleMlx> classify_mlx_key(std::string_view key) {
    if (key.size() > 7 && ends_with(key, ".lora_a")) return KeyRoleMlx{std::string(key.substr(0, key.size() - 7)), Role::down};
    if (key.size() > 7 && ends_with(key, ".lora_b")) return KeyRoleMlx{std::string(key.substr(0, key.size() - 7)), Role::up};
    if (key.size() > 2 && ends_with(key, ".m")) return KeyRoleMlx{std::string(key.substr(0, key.size() - 2)), Role::magnitude};
    return std::nullopt;
}

bool is_embedding_path(std::string_view stem) {
    return ends_with(stem, "embed_tokens") || ends_with(stem, "wte") || ends_with(stem, "tok_embeddings") ||
           ends_with(stem, "word_embeddings");
}

struct ScaleChoice {
    double scale = mlx_default_scale;
    std::optional<double> alpha;  // set only in the "scale * alpha / rank" era
    std::string note;
};

ScaleChoice choose_scale(const OrderedJson& config, bool has_config) {
    ScaleChoice choice;
    if (!has_config) {
        choice.note = fmt::format("no adapter_config.json: mlx-lm's default scale {} is assumed", mlx_default_scale);
        return choice;
    }
    const OrderedJson params = config.value("lora_parameters", OrderedJson::object());
    if (params.is_object() && params.contains("scale")) {
        auto scale = json_number(params["scale"]);
        if (!scale) fail(ErrorCode::bad_input, "lora_parameters.scale is not a number ({})", params["scale"].dump());
        choice.scale = *scale;
    }
    if (!params.is_object() || !params.contains("alpha")) return choice;
    auto alpha = json_number(params["alpha"]);
    if (!alpha) fail(ErrorCode::bad_input, "lora_parameters.alpha is not a number ({})", params["alpha"].dump());
    const bool newer_schema = config.contains("fine_tune_type") || config.contains("num_layers");
    const bool has_use_dora = config.contains("use_dora");
    if (newer_schema) {
        choice.note = "lora_parameters.alpha is ignored: mlx-lm versions that write fine_tune_type apply `scale` alone";
    } else if (!has_use_dora) {
        choice.alpha = *alpha;
        choice.note = fmt::format(
            "config predates mlx-lm's use_dora (2024-05-16): the writing version applied scale * alpha / rank "
            "= {} * {} / rank",
            choice.scale, *alpha);
    } else {
        choice.note = fmt::format(
            "config from mlx-lm 2024-05-16..2024-09-29: versions before 2024-06-02 applied scale * alpha / rank "
            "(alpha {}), later ones scale alone; scale {} is used",
            *alpha, choice.scale);
    }
    return choice;
}

class MlxDriver final : public ConventionDriver {
public:
    bool writes_directory() const override { return true; }
    void write(const Adapter& adapter, const std::filesystem::path& target, const WriteOptions& options,
               std::vector<std::string>& notes) const override {
        write_mlx(adapter, target, options, notes);
    }
    std::string_view name() const override { return "mlx"; }
    std::string_view description() const override { return "Apple mlx-lm (adapters.safetensors + adapter_config.json)"; }

    std::vector<std::string> sidecar_config_names() const override { return {std::string(config_name)}; }

    std::optional<LocatedAdapter> locate(const fs::path& dir) const override {
        std::error_code ec;
        const fs::path weights = dir / "adapters.safetensors";
        if (!fs::is_regular_file(weights, ec)) return std::nullopt;
        const fs::path config = dir / config_name;
        if (fs::is_regular_file(config, ec)) return LocatedAdapter{weights, config};
        return LocatedAdapter{weights, std::nullopt};
    }

    void precheck(const SidecarConfig& config) const override {
        const OrderedJson json = parse_config_json(config);
        if (!is_mlx_config(json)) return;
        if (auto it = json.find("fine_tune_type"); it != json.end() && it->is_string() && *it == "full")
            fail(ErrorCode::unsupported,
                 "mlx-lm fine_tune_type \"full\": the file holds full weights, not a LoRA adapter");
    }

    Detection detect(const AdapterInput& input) const override {
        std::size_t lora_keys = 0;
        for (const auto& entry : input.tensors.entries()) {
            auto role = classify_mlx_key(entry.name);
            if (role && role->role != Role::magnitude) ++lora_keys;
        }
        if (lora_keys == 0) return {};
        if (input.config && is_mlx_config(parse_config_json(*input.config)))
            return {90, "mlx-lm LoRA with adapter_config.json"};
        return {70, "mlx-lm LoRA keys, no config"};
    }

    Adapter read(const AdapterInput& input) const override {
        Adapter adapter;
        bool has_config = false;
        const OrderedJson config = owned_config(input, is_mlx_config, has_config);
        with_context(input.config ? quote(input.config->path.string()) : std::string("config"),
                     [&] { read_into(adapter, input, config, has_config); });
        return adapter;
    }

private:
    void read_into(Adapter& adapter, const AdapterInput& input, const OrderedJson& config, bool has_config) const {
        const ScaleChoice scale = choose_scale(config, has_config);
        if (!scale.note.empty()) (has_config ? adapter.notes : adapter.warnings).push_back(scale.note);
        if (has_config) {
            if (auto it = config.find("model"); it != config.end() && it->is_string())
                adapter.base_model.name = it->get<std::string>();
        }
        std::optional<double> config_rank;
        if (has_config) {
            const OrderedJson params = config.value("lora_parameters", OrderedJson::object());
            if (params.is_object() && params.contains("rank")) config_rank = json_number(params["rank"]);
        }
        bool dora = false;
        if (has_config) {
            if (auto it = config.find("fine_tune_type"); it != config.end() && it->is_string() && *it == "dora")
                dora = true;
            if (auto it = config.find("use_dora"); it != config.end() && it->is_boolean() && it->get<bool>()) dora = true;
        }

        ModuleCollector collector;
        for (const auto& entry : input.tensors.entries()) {
            if (auto role = classify_mlx_key(entry.name)) {
                collector.add(role->stem, role->role, entry);
                continue;
            }
            if (!entry.supported())
                fail(ErrorCode::unsupported, "tensor {} has unsupported dtype {}", quote(entry.name), entry.dtype_name);
            adapter.other_tensors.push_back({entry.name, entry.tensor});
            adapter.warnings.push_back(
                fmt::format("tensor {} is not a LoRA factor (mlx-lm loads only lora_a, lora_b and m)", quote(entry.name)));
        }
        for (auto& parts : collector.all()) {
            if (parts.down && parts.up && (parts.down->shape.size() != 2 || parts.up->shape.size() != 2))
                fail(ErrorCode::unsupported,
                     "module {}: mlx-lm factors of shapes {} and {} (MoE SwitchLinear adapters) are not supported",
                     quote(parts.stem), format_shape(parts.down->shape), format_shape(parts.up->shape));
            parts.embedding = is_embedding_path(parts.stem);
            LoraModule stored = assemble_lora_module(parts, parts.stem);
            // mlx stores lora_a = Aᵀ [in, r] and lora_b = Bᵀ [r, out].
            LoraModule m = stored;
            m.down = stored.down.transposed_2d();
            m.up = stored.up.transposed_2d();
            m.alpha = std::nullopt;
            if (scale.alpha) {
                m.scale_rule = ScaleRule::fixed;
                m.fixed_scale = scale.scale * *scale.alpha / static_cast<double>(m.rank());
            } else {
                m.scale_rule = ScaleRule::fixed;
                m.fixed_scale = scale.scale;
            }
            if (m.magnitude) {
                // mlx's embedding DoRA normalises per embedding row, i.e. per column of the
                // canonical [dim, vocab] delta; its linear DoRA per output row, as PEFT.
                m.magnitude_axis = m.kind == ModuleKind::embedding ? MagnitudeAxis::input_columns
                                                                   : MagnitudeAxis::output_rows;
                if (has_config && !dora)
                    adapter.warnings.push_back(
                        fmt::format("module {} has a DoRA magnitude but the config does not select DoRA", quote(m.name)));
            } else if (dora) {
                adapter.warnings.push_back(fmt::format("config selects DoRA but module {} has no `m`", quote(m.name)));
            }
            if (config_rank && static_cast<double>(m.rank()) != *config_rank)
                adapter.warnings.push_back(fmt::format("module {} has rank {} but lora_parameters.rank is {}",
                                                       quote(m.name), m.rank(), *config_rank));
            adapter.modules.push_back(std::move(m));
        }
        if (adapter.modules.empty()) fail(ErrorCode::bad_input, "no LoRA modules found");
        adapter.convention_detail = has_config ? "mlx-lm LoRA" : "mlx-lm LoRA keys, no config";
        if (dora) adapter.convention_detail += ", DoRA";
        if (has_config && config.contains("lora_layers")) adapter.convention_detail += " (2024 config schema)";
    }
};

}  // namespace

std::unique_ptr<ConventionDriver> make_mlx_driver() { return std::make_unique<MlxDriver>(); }

}  // namespace lorakit::formats
