// The adapter model: what every convention reader produces and every operation consumes.
//
// A LoRA module holds ΔW = scale · B·A for one weight of the base model, with
//   A ("down", lora_A):  [r, in]  or, for convolutions, [r, in, kh, kw]
//   B ("up",   lora_B):  [out, r] or, for convolutions, [out, r, 1, 1]
// always in this orientation, whatever the source stored (mlx-lm's transposed factors are
// transposed on read). Embedding LoRAs follow PEFT: A is [r, num_embeddings] and B is
// [embedding_dim, r], so in_features = num_embeddings and ΔW(embedding) = (scale·B·A)ᵀ.
//
// Module names use one canonical scheme, documented in docs/conventions.md: the dotted module
// path of the framework that owns the weights, with the component first when a model has
// several ("unet.down_blocks.0.attentions.0.proj_in", "text_encoder_2.text_model.encoder.
// layers.0.mlp.fc1", "transformer.single_blocks.0.linear1", "model.layers.0.self_attn.q_proj").
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <string_view>
#include <vector>

#include "lorakit/tensor.h"

namespace lorakit {

enum class ModuleKind { linear, conv, embedding };
std::string_view module_kind_name(ModuleKind kind) noexcept;

// How the stored alpha becomes the factor applied to B·A.
enum class ScaleRule {
    alpha_over_rank,       // alpha / r (PEFT, kohya, LyCORIS, llama.cpp); no alpha means 1
    alpha_over_sqrt_rank,  // alpha / sqrt(r) (PEFT use_rslora)
    fixed,                 // an explicit multiplier (mlx-lm `scale`, diffusers-style files: 1)
};
std::string_view scale_rule_name(ScaleRule rule) noexcept;

// Which axis a DoRA magnitude normalises (see research/formats.md §7.5).
enum class MagnitudeAxis {
    output_rows,    // PEFT lora_magnitude_vector [out], LyCORIS wd_on_out [out, 1], mlx `m`
    input_columns,  // older LyCORIS / OneTrainer dora_scale [1, in]
};

struct LoraModule {
    std::string name;         // canonical module path
    std::string source_name;  // the key stem in the file it came from
    ModuleKind kind = ModuleKind::linear;
    Tensor down;  // A
    Tensor up;    // B
    std::optional<double> alpha;
    DType alpha_dtype = DType::F32;  // the dtype the source stored alpha in (kohya: F16, I64, ...)
    ScaleRule scale_rule = ScaleRule::alpha_over_rank;
    double fixed_scale = 1.0;  // the scale when scale_rule == fixed
    std::optional<Tensor> magnitude;
    MagnitudeAxis magnitude_axis = MagnitudeAxis::output_rows;
    std::optional<Tensor> bias;  // a bias on B (PEFT lora_bias, BFL control LoRAs), [out]
    bool fan_in_fan_out = false;  // the base weight is stored [in, out] (GPT-2 Conv1D)

    std::int64_t rank() const { return down.dim(0); }
    std::int64_t in_features() const { return down.dim(1); }
    std::int64_t out_features() const { return up.dim(0); }
    // in_features times the kernel size: the column count of A flattened to 2-D.
    std::int64_t flat_in_features() const;
    Shape kernel_size() const;  // {} for linear and embedding, {kh, kw} for conv
    // The factor actually applied to B·A.
    double scale() const;
};

// A LyCORIS (or other non-LoRA) module, kept with its tensors by role until a conversion
// materialises it ("hada_w1_a", "lokr_w1", "diff", ...).
struct LycorisModule {
    std::string name;
    std::string source_name;
    std::string algorithm;  // "loha", "lokr", "full", "locon-tucker", "ia3", "glora", "norm"
    std::optional<double> alpha;
    std::vector<NamedTensor> tensors;  // role name -> tensor
    std::optional<Tensor> dora_scale;
};

struct BaseModelHint {
    std::string family;    // "SD1.5", "SDXL", "Flux", "Llama", "Qwen2", "GPT-2", ... or "unknown"
    std::string name;      // e.g. "Qwen/Qwen2.5-3B-Instruct" from a config; may be empty
    std::string evidence;  // why: "config base_model_name_or_path", "keys and shapes", ...
};

struct Adapter {
    std::string source;             // the path the user gave
    std::string container;          // "safetensors", ...
    std::string convention;         // the key convention ("peft", "kohya", "diffusers", "mlx", ...)
    std::string convention_detail;  // e.g. "attention-processor keys (diffusers <= 0.17)"
    BaseModelHint base_model;
    std::vector<LoraModule> modules;
    std::vector<LycorisModule> lycoris_modules;
    // Tensors that are not LoRA factors and are carried through unchanged: PEFT
    // modules_to_save, cloneofsimo token embeddings, full norm weights, ...
    std::vector<NamedTensor> other_tensors;
    // PEFT modules_to_save: module paths whose parameters are among other_tensors, saved whole
    // ("base_model.model.<path>.<param>") and loaded in place of the base's.
    std::vector<std::string> modules_to_save;
    std::map<std::string, std::string> metadata;  // the container's raw string metadata
    std::string config_json;                      // the sidecar config's text, "" if none
    std::string config_path;
    // Inconsistencies (a config that disagrees with the tensors, keys no loader would use,
    // ...): the adapter is readable, but `lora-inspect --check` fails on them.
    std::vector<std::string> warnings;
    // Facts worth knowing that are not problems (how a scale was derived, ...).
    std::vector<std::string> notes;
};

// Checks a module's factor shapes and alpha; throws ErrorCode::bad_input naming the module
// ("module 'x': rank of A (8) differs from rank of B (4)").
void validate_module(const LoraModule& module);

// The module and parameter a full tensor of `adapter` holds when its module is in
// modules_to_save: "[base_model.model.]<module>.<param>" -> {module, param}; nullopt otherwise.
std::optional<std::pair<std::string, std::string>> saved_parameter(const Adapter& adapter, std::string_view tensor_name);

}  // namespace lorakit
