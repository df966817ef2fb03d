// Writing mlx-lm adapters: a directory with adapters.safetensors (<path>.lora_a = Aᵀ [in, r],
// <path>.lora_b = Bᵀ [r, out], DoRA <path>.m) and adapter_config.json. mlx-lm builds every
// LoRA layer from one rank and one scale in the config, so modules of a lower rank are padded
// with zero directions and differing scales are folded into lora_b (both exact), with notes.
#include <cmath>
#include <regex>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "convention_common.h"
#include "lorakit/atomic_file.h"
#include "lorakit/error.h"
#include "writers.h"

namespace lorakit::formats {

namespace {

using Json = nlohmann::json;

// A [r, in] -> [r_max, in] and B [out, r] -> [out, r_max] with zeros: the same B·A.
std::pair<Tensor, Tensor> pad_rank(const LoraModule& m, std::int64_t rank) {
    if (m.rank() == rank) return {m.down, m.up};
    const std::int64_t in = m.in_features(), out = m.out_features(), r = m.rank();
    std::vector<float> a = m.down.to_f32(), b = m.up.to_f32();
    a.resize(static_cast<std::size_t>(rank * in), 0.0f);
    std::vector<float> b_padded(static_cast<std::size_t>(out * rank), 0.0f);
    for (std::int64_t o = 0; o < out; ++o)
        for (std::int64_t k = 0; k < r; ++k)
            b_padded[static_cast<std::size_t>(o * rank + k)] = b[static_cast<std::size_t>(o * r + k)];
    return {Tensor::from_f32(m.down.dtype(), {rank, in}, a), Tensor::from_f32(m.up.dtype(), {out, rank}, b_padded)};
}

}  // namespace

void write_mlx(const Adapter& a, const std::filesystem::path& target, const WriteOptions& options,
               std::vector<std::string>& notes) {
    const bool same = a.convention == "mlx";
    refuse_lycoris(a, "mlx-lm");
    refuse_llama_cpp_names(a, "mlx-lm");
    refuse_bias(a, "mlx-lm");
    if (!same) refuse_other_tensors(a, "mlx-lm");
    if (a.modules.empty()) fail(ErrorCode::bad_input, "no LoRA modules to write");
    std::vector<double> scales;
    std::int64_t rank = 0;
    bool any_dora = false;
    for (const auto& m : a.modules) {
        if (!component_of(m.name).empty() || m.name.find(':') != std::string::npos)
            fail(ErrorCode::unsupported,
                 "module {} has no mlx-lm path: lorakit writes mlx-lm adapters for Hugging Face LLM paths "
                 "(model.layers.N...), not for diffusion models or 'transformer.h.N' models (GPT-2, GPT-Neo)",
                 quote(m.name));
        if (m.kind == ModuleKind::conv)
            fail(ErrorCode::unsupported, "module {} is a convolution, which mlx-lm LoRA layers do not cover", quote(m.name));
        scales.push_back(m.scale());
        rank = std::max(rank, m.rank());
        any_dora |= m.magnitude.has_value();
    }
    const double scale = most_common(scales);
    OutputTensors out;
    std::size_t padded = 0, folded = 0;
    std::set<std::int64_t> layers;
    std::set<std::string> keys;
    static const std::regex layer_path(R"(^(.*\.layers)\.(\d+)\.(.+)$)");
    for (const auto& m : a.modules) {
        auto [down, up] = pad_rank(m, rank);
        padded += m.rank() != rank;
        const double factor = m.scale() / scale;
        folded += factor != 1.0;
        out.add(m.name + ".lora_a", down.transposed_2d());
        const Tensor& b = up;  // a lambda cannot capture a structured binding in C++20 (clang)
        out.add(m.name + ".lora_b",
                with_context(fmt::format("module {}", quote(m.name)), [&] { return scaled(b, factor); }).transposed_2d());
        if (m.magnitude) {
            const MagnitudeAxis want =
                m.kind == ModuleKind::embedding ? MagnitudeAxis::input_columns : MagnitudeAxis::output_rows;
            if (m.magnitude_axis != want)
                fail_lossy(Loss::dora_magnitudes, {}, "module {}: its DoRA magnitude normalises the other axis than mlx-lm's",
                           quote(m.name));
            out.add(m.name + ".m", m.magnitude->reshaped({m.magnitude->element_count()}));
        }
        std::smatch match;
        if (std::regex_match(m.name, match, layer_path)) {
            layers.insert(std::stoll(match[2]));
            keys.insert(match[3]);
        }
    }
    for (const auto& t : a.other_tensors) out.add(t.name, t.tensor);

    Json config = Json::object();
    if (same && !a.config_json.empty()) config = Json::parse(parse_json_text(a.config_json, "config").dump());
    Json params = config.value("lora_parameters", Json::object());
    if (!params.is_object()) params = Json::object();
    if (params.contains("alpha")) {
        params.erase("alpha");
        notes.push_back("lora_parameters.alpha dropped: the written scale is the effective one");
    }
    params["rank"] = rank;
    params["scale"] = scale;
    if (!params.contains("dropout")) params["dropout"] = 0.0;
    if (!same) {
        Json key_list = Json::array();
        for (const auto& k : keys) key_list.push_back(k);
        params["keys"] = key_list;
        config["num_layers"] = static_cast<std::int64_t>(layers.size());
        if (!a.base_model.name.empty()) config["model"] = a.base_model.name;
        notes.push_back(fmt::format("mlx-lm applies LoRA to the last num_layers ({}) blocks: layers {}..{} must be "
                                    "the model's last ones",
                                    layers.size(), layers.empty() ? 0 : *layers.begin(), layers.empty() ? 0 : *layers.rbegin()));
    }
    config["lora_parameters"] = params;
    config.erase("use_dora");
    config.erase("lora_layers");
    if (same && a.config_json.find("\"lora_layers\"") != std::string::npos && !config.contains("num_layers"))
        config["num_layers"] = static_cast<std::int64_t>(layers.size());
    config["fine_tune_type"] = any_dora ? "dora" : "lora";
    if (padded) notes.push_back(fmt::format("{} module(s) padded with zero directions to rank {}", padded, rank));
    if (folded) notes.push_back(fmt::format("{} module(s) had another scale than {}: folded into lora_b", folded, scale));
    const std::string config_text = config.dump(4) + "\n";
    AtomicDirectory dir(target, options.overwrite);
    AtomicFile& weights = dir.add("adapters.safetensors");
    write_safetensors(weights, out.views(), {});
    weights.commit();
    AtomicFile& config_file = dir.add("adapter_config.json");
    config_file.write(config_text);
    config_file.commit();
    dir.commit();
}

}  // namespace lorakit::formats
