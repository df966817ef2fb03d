// Generators of large synthetic adapters shaped like real ones, for the benchmarks.
//   - a Llama-7B-shaped PEFT LoRA: rank 128 on q, k, v, o, gate, up, down of 32 layers
//     (4096 hidden, 11008 MLP), f32 factors as PEFT saves them;
//   - an SDXL-shaped kohya LoRA: every module sd-scripts targets in the SDXL UNet (SGM names,
//     70 transformer blocks + proj_in/proj_out) and both text encoders, f16, with alphas.
// Values come from a fixed-seed generator so files are identical run to run.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "lorakit/atomic_file.h"
#include "lorakit/random.h"
#include "lorakit/formats/safetensors.h"

namespace lorakit::bench {


struct SyntheticAdapter {
    std::vector<std::pair<std::string, Tensor>> tensors;
    std::map<std::string, std::string> metadata;
    SplitMix64 random{42};

    Tensor random_tensor(DType type, Shape shape, float amplitude) {
        std::int64_t n = 1;
        for (auto d : shape) n *= d;
        std::vector<float> values(static_cast<std::size_t>(n));
        for (auto& v : values) v = random.uniform() * amplitude;
        return Tensor::from_f32(type, std::move(shape), values);
    }
    void pair(const std::string& down, const std::string& up, DType type, std::int64_t rank, std::int64_t in,
              std::int64_t out) {
        tensors.emplace_back(down, random_tensor(type, {rank, in}, 1.0f / std::sqrt(float(in))));
        tensors.emplace_back(up, random_tensor(type, {out, rank}, 0.01f));
    }
    void write(const std::filesystem::path& path) const {
        std::vector<formats::TensorToWrite> list;
        for (const auto& [name, t] : tensors) list.push_back({name, t.view()});
        formats::write_safetensors(path, std::move(list), metadata, true);
    }
};

inline void write_text_file(const std::filesystem::path& path, const std::string& text) {
    write_file_atomically(path, std::as_bytes(std::span(text.data(), text.size())), true);
}

// A PEFT directory: adapter_config.json + adapter_model.safetensors.
inline void make_llama7b_peft(const std::filesystem::path& dir, std::int64_t rank = 128, DType type = DType::F32) {
    std::filesystem::create_directories(dir);
    SyntheticAdapter a;
    struct Projection {
        const char* name;
        std::int64_t in, out;
    };
    const Projection projections[] = {
        {"self_attn.q_proj", 4096, 4096}, {"self_attn.k_proj", 4096, 4096}, {"self_attn.v_proj", 4096, 4096},
        {"self_attn.o_proj", 4096, 4096}, {"mlp.gate_proj", 4096, 11008},   {"mlp.up_proj", 4096, 11008},
        {"mlp.down_proj", 11008, 4096},
    };
    for (int layer = 0; layer < 32; ++layer)
        for (const auto& p : projections) {
            const std::string stem = fmt::format("base_model.model.model.layers.{}.{}", layer, p.name);
            a.pair(stem + ".lora_A.weight", stem + ".lora_B.weight", type, rank, p.in, p.out);
        }
    a.metadata["format"] = "pt";
    a.write(dir / "adapter_model.safetensors");
    write_text_file(dir / "adapter_config.json",
                    fmt::format(R"({{"base_model_name_or_path": "meta-llama/Llama-2-7b-hf", "peft_type": "LORA",
  "r": {}, "lora_alpha": {}, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
  "task_type": "CAUSAL_LM", "use_rslora": false, "use_dora": false}}
)",
                                rank, 2 * rank));
}

// A kohya SDXL LoRA with every module sd-scripts targets (network_dim = rank, alpha = rank / 2).
inline void make_sdxl_kohya(const std::filesystem::path& path, std::int64_t rank = 32, DType type = DType::F16,
                            std::uint64_t seed = 42) {
    SyntheticAdapter a;
    a.random = SplitMix64(seed);
    auto module = [&](const std::string& name, std::int64_t in, std::int64_t out) {
        a.pair(name + ".lora_down.weight", name + ".lora_up.weight", type, rank, in, out);
        const float alpha = static_cast<float>(rank) / 2;
        a.tensors.emplace_back(name + ".alpha", Tensor::from_f32(type, {}, {&alpha, 1}));
    };
    // SGM UNet: (block prefix, channels, transformer depth).
    struct Attention {
        std::string prefix;
        std::int64_t channels, depth;
    };
    std::vector<Attention> attentions = {{"input_blocks_4_1", 640, 2},   {"input_blocks_5_1", 640, 2},
                                         {"input_blocks_7_1", 1280, 10}, {"input_blocks_8_1", 1280, 10},
                                         {"middle_block_1", 1280, 10}};
    for (int i = 0; i < 3; ++i) attentions.push_back({fmt::format("output_blocks_{}_1", i), 1280, 10});
    for (int i = 3; i < 6; ++i) attentions.push_back({fmt::format("output_blocks_{}_1", i), 640, 2});
    for (const auto& att : attentions) {
        const std::string base = "lora_unet_" + att.prefix;
        const std::int64_t c = att.channels;
        module(base + "_proj_in", c, c);
        module(base + "_proj_out", c, c);
        for (std::int64_t b = 0; b < att.depth; ++b) {
            const std::string block = fmt::format("{}_transformer_blocks_{}_", base, b);
            for (const char* p : {"attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_out_0"})
                module(block + p, c, c);
            module(block + "attn2_to_k", 2048, c);
            module(block + "attn2_to_v", 2048, c);
            module(block + "ff_net_0_proj", c, 8 * c);  // GEGLU: two halves of 4c
            module(block + "ff_net_2", 4 * c, c);
        }
    }
    auto text_encoder = [&](const std::string& prefix, std::int64_t width, int layers) {
        for (int l = 0; l < layers; ++l) {
            const std::string base = fmt::format("{}text_model_encoder_layers_{}_", prefix, l);
            for (const char* p : {"self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"})
                module(base + p, width, width);
            module(base + "mlp_fc1", width, 4 * width);
            module(base + "mlp_fc2", 4 * width, width);
        }
    };
    text_encoder("lora_te1_", 768, 12);
    text_encoder("lora_te2_", 1280, 32);
    a.metadata = {{"ss_base_model_version", "sdxl_base_v1-0"},
                  {"ss_network_module", "networks.lora"},
                  {"ss_network_dim", std::to_string(rank)},
                  {"ss_network_alpha", fmt::format("{}", double(rank) / 2)}};
    a.write(path);
}

// The benchmarks' common arguments: [DIR] [REPEATS] (DIR default /tmp/lorakit-bench, created;
// REPEATS default 3).
struct BenchArguments {
    std::filesystem::path dir;
    int repeats = 3;
};
inline BenchArguments bench_arguments(int argc, char** argv) {
    BenchArguments a;
    a.dir = argc > 1 ? std::filesystem::path(argv[1]) : std::filesystem::path("/tmp/lorakit-bench");
    a.repeats = argc > 2 ? std::max(1, std::atoi(argv[2])) : 3;
    std::filesystem::create_directories(a.dir);
    return a;
}

// Runs `generate` unless `marker` exists (generated inputs are shared by the benchmarks).
// The generator runs in a child process, so that the memory it used never inflates the peak
// RSS the benchmark measures (a forked child starts with its parent's resident pages).
template <typename Generate>
void generate_once(const std::filesystem::path& marker, const std::filesystem::path& shown, Generate&& generate) {
    if (std::filesystem::exists(marker)) return;
    std::fprintf(stderr, "generating %s ...\n", shown.c_str());
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid == 0) {
        generate();
        std::fflush(nullptr);
        ::_exit(0);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        std::fprintf(stderr, "generating %s failed\n", shown.c_str());
        std::exit(1);
    }
}

// DIR/llama7b-r128-peft, generated on first use.
inline std::filesystem::path llama7b_peft_in(const std::filesystem::path& dir) {
    const auto path = dir / "llama7b-r128-peft";
    generate_once(path / "adapter_model.safetensors", path, [&] { make_llama7b_peft(path); });
    return path;
}

// DIR/sdxl-r32-kohya.safetensors (seed 42) or DIR/sdxl-r32-kohya-SEED.safetensors, generated on first use.
inline std::filesystem::path sdxl_kohya_in(const std::filesystem::path& dir, std::uint64_t seed = 42) {
    const auto path = seed == 42 ? dir / "sdxl-r32-kohya.safetensors" : dir / fmt::format("sdxl-r32-kohya-{}.safetensors", seed);
    generate_once(path, path, [&] { make_sdxl_kohya(path, 32, DType::F16, seed); });
    return path;
}

}  // namespace lorakit::bench
