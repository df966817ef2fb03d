// Writes the small deterministic sample adapters in samples/, one per key convention.
// Usage: lorakit-make-samples OUTPUT_DIR
// The committed samples are this program's output; a test regenerates them and compares bytes.
//
// Shapes are miniatures of real models (hidden sizes divided down) so the files stay tiny,
// while the key names are exactly what each trainer writes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "lorakit/atomic_file.h"
#include "lorakit/random.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/formats/safetensors.h"

namespace fs = std::filesystem;
using namespace lorakit;

namespace {


struct Builder {
    std::vector<std::pair<std::string, Tensor>> tensors;
    std::map<std::string, std::string> metadata;
    SplitMix64 random{0};

    explicit Builder(std::uint64_t seed) : random(seed) {}

    Tensor random_tensor(DType type, Shape shape, float amplitude) {
        std::int64_t n = 1;
        for (auto d : shape) n *= d;
        std::vector<float> values(static_cast<std::size_t>(n));
        for (auto& v : values) v = random.uniform() * amplitude;
        return Tensor::from_f32(type, std::move(shape), values);
    }
    void add(std::string name, Tensor t) { tensors.emplace_back(std::move(name), std::move(t)); }
    // A LoRA pair with the given key names; B is small as after a short training run.
    void pair(const std::string& down, const std::string& up, DType type, std::int64_t rank, std::int64_t in,
              std::int64_t out, Shape kernel = {}) {
        Shape a{rank, in};
        Shape b{out, rank};
        for (auto k : kernel) a.push_back(k);
        if (!kernel.empty()) b.insert(b.end(), kernel.size(), 1);
        add(down, random_tensor(type, a, 1.0f / std::sqrt(static_cast<float>(in))));
        add(up, random_tensor(type, b, 0.02f));
    }
    void scalar(const std::string& name, DType type, float value) { add(name, Tensor::from_f32(type, {}, {&value, 1})); }

    void write(const fs::path& path) const {
        std::vector<formats::TensorToWrite> list;
        for (const auto& [name, t] : tensors) list.push_back({name, t.view()});
        formats::write_safetensors(path, std::move(list), metadata, true);
    }
};

void write_text(const fs::path& path, const std::string& text) {
    write_file_atomically(path, std::as_bytes(std::span(text.data(), text.size())), true);
}

// A Llama-shaped PEFT adapter (hidden 64, MLP 172, 2 layers), with one rank_pattern override.
void peft_llama(const fs::path& dir) {
    fs::create_directories(dir);
    Builder b(1);
    const char* projections[][3] = {{"self_attn.q_proj", "64", "64"},   {"self_attn.k_proj", "64", "16"},
                                    {"self_attn.v_proj", "64", "16"},   {"self_attn.o_proj", "64", "64"},
                                    {"mlp.gate_proj", "64", "172"},    {"mlp.up_proj", "64", "172"},
                                    {"mlp.down_proj", "172", "64"}};
    for (int layer = 0; layer < 2; ++layer)
        for (const auto& p : projections) {
            const std::string stem = fmt::format("base_model.model.model.layers.{}.{}", layer, p[0]);
            const std::int64_t rank = std::string(p[0]) == "mlp.down_proj" ? 8 : 4;
            b.pair(stem + ".lora_A.weight", stem + ".lora_B.weight", DType::F32, rank, std::stoll(p[1]), std::stoll(p[2]));
        }
    b.metadata["format"] = "pt";
    b.write(dir / "adapter_model.safetensors");
    write_text(dir / "adapter_config.json", R"({
  "alpha_pattern": {},
  "base_model_name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "lora_alpha": 8,
  "lora_dropout": 0.05,
  "modules_to_save": null,
  "peft_type": "LORA",
  "r": 4,
  "rank_pattern": {
    "down_proj": 8
  },
  "target_modules": [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj"
  ],
  "task_type": "CAUSAL_LM",
  "use_dora": false,
  "use_rslora": false
}
)");
}

// An SDXL-shaped kohya LoRA: SGM UNet names, both text encoders, a 3x3 conv (LoCon-style
// conv_dim), F16 factors and F16 alphas as sd-scripts writes with --save_precision fp16.
void kohya_sdxl(const fs::path& path) {
    Builder b(2);
    auto module = [&](const std::string& name, std::int64_t rank, std::int64_t in, std::int64_t out, float alpha,
                      Shape kernel = {}) {
        b.pair(name + ".lora_down.weight", name + ".lora_up.weight", DType::F16, rank, in, out, kernel);
        b.scalar(name + ".alpha", DType::F16, alpha);
    };
    for (int block : {4, 5}) {
        const std::string base = fmt::format("lora_unet_input_blocks_{}_1_transformer_blocks_0_", block);
        module(base + "attn1_to_q", 8, 64, 64, 4);
        module(base + "attn1_to_k", 8, 64, 64, 4);
        module(base + "attn2_to_k", 8, 2048, 64, 4);  // cross-attention reads the 2048-wide SDXL text embedding
        module(base + "attn2_to_v", 8, 2048, 64, 4);
        module(base + "ff_net_2", 8, 256, 64, 4);
    }
    module("lora_unet_input_blocks_4_0_in_layers_2", 4, 32, 64, 1, {3, 3});
    module("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 8, 48, 48, 4);
    module("lora_te2_text_model_encoder_layers_0_mlp_fc1", 8, 80, 320, 4);
    b.metadata = {{"ss_base_model_version", "sdxl_base_v1-0"},
                  {"ss_network_module", "networks.lora"},
                  {"ss_network_dim", "8"},
                  {"ss_network_alpha", "4.0"},
                  {"ss_network_args", R"({"conv_dim": "4", "conv_alpha": "1"})"},
                  {"ss_sd_model_name", "sd_xl_base_1.0.safetensors"},
                  {"modelspec.architecture", "stable-diffusion-xl-v1-base/lora"},
                  {"modelspec.sai_model_spec", "1.0.1"},
                  {"modelspec.title", "lorakit sample"}};
    b.write(path);
}

// A diffusers SD1.5 LoRA in the current PEFT-style layout (no alpha: scale 1).
void diffusers_sd15(const fs::path& path) {
    Builder b(3);
    for (const char* attn : {"attn1", "attn2"})
        for (const char* proj : {"to_q", "to_k", "to_v", "to_out.0"}) {
            const std::string stem =
                fmt::format("unet.down_blocks.0.attentions.0.transformer_blocks.0.{}.{}", attn, proj);
            const bool cross_kv = std::string(attn) == "attn2" && (std::string(proj) == "to_k" || std::string(proj) == "to_v");
            b.pair(stem + ".lora_A.weight", stem + ".lora_B.weight", DType::F32, 4, cross_kv ? 768 : 32, 32);
        }
    const std::string te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";
    b.pair(te + ".lora_A.weight", te + ".lora_B.weight", DType::F32, 4, 48, 48);
    b.metadata["format"] = "pt";
    b.write(path);
}

// An mlx-lm adapter for a Qwen2-shaped model: transposed factors, scale in the config.
void mlx_qwen(const fs::path& dir) {
    fs::create_directories(dir);
    Builder b(4);
    for (int layer = 22; layer < 24; ++layer)
        for (const char* proj : {"q_proj", "v_proj"}) {
            const std::string stem = fmt::format("model.layers.{}.self_attn.{}", layer, proj);
            const std::int64_t out = std::string(proj) == "q_proj" ? 56 : 8;
            b.add(stem + ".lora_a", b.random_tensor(DType::F32, {56, 8}, 0.13f));  // [in, r]
            b.add(stem + ".lora_b", b.random_tensor(DType::F32, {8, out}, 0.02f));  // [r, out]
        }
    b.write(dir / "adapters.safetensors");
    write_text(dir / "adapter_config.json", R"({
    "adapter_path": "adapters",
    "batch_size": 4,
    "data": "data",
    "fine_tune_type": "lora",
    "iters": 600,
    "learning_rate": 1e-05,
    "lora_parameters": {
        "rank": 8,
        "dropout": 0.0,
        "scale": 20.0
    },
    "model": "mlx-community/Qwen2.5-0.5B-Instruct-4bit",
    "num_layers": 2,
    "seed": 0
}
)");
}

// A cloneofsimo/lora file: numbered modules, ranks in metadata, one learned token embedding.
void cloneofsimo_sd15(const fs::path& path) {
    Builder b(5);
    for (int i = 0; i < 4; ++i) {
        b.pair(fmt::format("unet:{}:down", i), fmt::format("unet:{}:up", i), DType::F16, 2, 32, 32);
        b.metadata[fmt::format("unet:{}:rank", i)] = "2";
    }
    for (int i = 0; i < 2; ++i) {
        b.pair(fmt::format("text_encoder:{}:down", i), fmt::format("text_encoder:{}:up", i), DType::F16, 2, 768, 768);
        b.metadata[fmt::format("text_encoder:{}:rank", i)] = "2";
    }
    b.add("<s1>", b.random_tensor(DType::F32, {768}, 0.01f));
    b.metadata["<s1>"] = "<embed>";
    b.metadata["unet"] = R"(["CrossAttention", "Attention", "GEGLU"])";
    b.metadata["text_encoder"] = R"(["CLIPAttention"])";
    b.write(path);
}

// A tiny Llama-shaped base model for the PEFT sample (hidden 64, 8 heads of 8, 2 KV heads, MLP
// 172, 2 layers, vocabulary 100) in the Hugging Face transformers layout, F16 as published
// checkpoints are: model.safetensors + config.json. For lora-bake and lora-stack --base demos.
void base_llama(const fs::path& dir) {
    fs::create_directories(dir);
    Builder b(7);
    const std::int64_t hidden = 64, kv = 16, mlp = 172, vocab = 100;
    b.add("model.embed_tokens.weight", b.random_tensor(DType::F16, {vocab, hidden}, 0.1f));
    for (int layer = 0; layer < 2; ++layer) {
        const std::string p = fmt::format("model.layers.{}.", layer);
        b.add(p + "self_attn.q_proj.weight", b.random_tensor(DType::F16, {hidden, hidden}, 0.2f));
        b.add(p + "self_attn.k_proj.weight", b.random_tensor(DType::F16, {kv, hidden}, 0.2f));
        b.add(p + "self_attn.v_proj.weight", b.random_tensor(DType::F16, {kv, hidden}, 0.2f));
        b.add(p + "self_attn.o_proj.weight", b.random_tensor(DType::F16, {hidden, hidden}, 0.2f));
        b.add(p + "mlp.gate_proj.weight", b.random_tensor(DType::F16, {mlp, hidden}, 0.2f));
        b.add(p + "mlp.up_proj.weight", b.random_tensor(DType::F16, {mlp, hidden}, 0.2f));
        b.add(p + "mlp.down_proj.weight", b.random_tensor(DType::F16, {hidden, mlp}, 0.1f));
        b.add(p + "input_layernorm.weight", Tensor::from_f32(DType::F16, {hidden}, std::vector<float>(hidden, 1.0f)));
        b.add(p + "post_attention_layernorm.weight", Tensor::from_f32(DType::F16, {hidden}, std::vector<float>(hidden, 1.0f)));
    }
    b.add("model.norm.weight", Tensor::from_f32(DType::F16, {hidden}, std::vector<float>(hidden, 1.0f)));
    b.add("lm_head.weight", b.random_tensor(DType::F16, {vocab, hidden}, 0.1f));
    b.metadata["format"] = "pt";
    b.write(dir / "model.safetensors");
    write_text(dir / "config.json", R"({
  "architectures": ["LlamaForCausalLM"],
  "hidden_size": 64,
  "intermediate_size": 172,
  "model_type": "llama",
  "num_attention_heads": 8,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-05,
  "torch_dtype": "float16",
  "vocab_size": 100
}
)");
}

// Three adapters for the tiny Llama base, as three different tools would have left them, for the
// batch pipeline in samples/pipeline: "style" (PEFT, rank 4 on attention), "detail" (llama.cpp
// GGUF, rank 8 on the MLP) and "tone" (mlx-lm, rank 2 on q and v, with its own scale).
void pipeline_adapters(const fs::path& dir) {
    fs::create_directories(dir);
    struct Target {
        const char* name;
        std::int64_t in, out;
    };
    const Target targets[] = {{"self_attn.q_proj", 64, 64},  {"self_attn.k_proj", 64, 16}, {"self_attn.v_proj", 64, 16},
                              {"self_attn.o_proj", 64, 64},  {"mlp.gate_proj", 64, 172},  {"mlp.up_proj", 64, 172},
                              {"mlp.down_proj", 172, 64}};
    auto adapter = [&](std::uint64_t seed, std::int64_t rank, double alpha, const std::vector<std::string>& which) {
        Builder b(seed);
        Adapter a;
        a.source = "lorakit-make-samples";
        a.base_model = {"Llama", "samples/base-llama", "generated"};
        for (int layer = 0; layer < 2; ++layer)
            for (const auto& t : targets) {
                if (std::find(which.begin(), which.end(), std::string(t.name)) == which.end()) continue;
                LoraModule m;
                m.name = fmt::format("model.layers.{}.{}", layer, t.name);
                m.down = b.random_tensor(DType::F32, {rank, t.in}, 1.0f / std::sqrt(static_cast<float>(t.in)));
                m.up = b.random_tensor(DType::F32, {t.out, rank}, 0.05f);
                m.alpha = alpha;
                a.modules.push_back(std::move(m));
            }
        return a;
    };
    const Registry& registry = formats::builtin_registry();
    std::vector<std::string> notes;
    WriteOptions options = write_options(true);
    registry.write_adapter(adapter(21, 4, 8, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}),
                           "peft", dir / "style", options, notes);
    options.hints = {"llama", 8, 2};  // the base's head counts: llama.cpp's q/k row order
    registry.write_adapter(adapter(22, 8, 16, {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}), "gguf", dir / "detail.gguf",
                           options, notes);
    Adapter tone = adapter(23, 2, 0, {"self_attn.q_proj", "self_attn.v_proj"});
    for (auto& m : tone.modules) {
        m.alpha.reset();
        m.scale_rule = ScaleRule::fixed;
        m.fixed_scale = 4.0;  // mlx-lm's `scale`
    }
    registry.write_adapter(tone, "mlx", dir / "tone", write_options(true), notes);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: lorakit-make-samples OUTPUT_DIR\n");
        return 2;
    }
    try {
        const fs::path out = argv[1];
        fs::create_directories(out);
        peft_llama(out / "peft-llama");
        base_llama(out / "base-llama");
        kohya_sdxl(out / "kohya-sdxl.safetensors");
        diffusers_sd15(out / "diffusers-sd15.safetensors");
        mlx_qwen(out / "mlx-qwen");
        cloneofsimo_sd15(out / "cloneofsimo-sd15.safetensors");
        pipeline_adapters(out / "pipeline" / "adapters");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "lorakit-make-samples: error: %s\n", e.what());
        return 1;
    }
    return 0;
}
