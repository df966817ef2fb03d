// Benchmark of lora-bake and lora-extract on a TinyLlama-shaped checkpoint (1.1B parameters,
// bf16, 2.2 GB: hidden 2048, MLP 5632, 22 layers, 4 KV heads, vocabulary 32000) and a tuned
// copy whose linear weights differ by a rank-16 delta plus noise:
//   bake of a rank-64 PEFT LoRA (f16) next to `cp` (and `cp` + fsync) of the checkpoint;
//   the same bake into a GGUF Q8_0 twin of the base (llama.cpp names, 1.2 GB), whose changed
//   tensors are decoded one at a time and requantized, next to `cp` of that file;
//   extract at rank 64 next to the dense route (full LAPACK sgesdd of each delta, as
//   kohya's extract_lora_from_models.py does with torch.linalg.svd) timed on one weight of
//   each shape and multiplied by the number of weights of that shape.
// Wall time and peak RSS of each command (median of REPEATS after a warm-up).
//
// Usage: bench-bake_extract [DIR] [REPEATS]   (DIR default /tmp/lorakit-bench; REPEATS default 1)
#include <lapacke.h>

#include <cstdio>

#include <fmt/format.h>

#include "common.h"
#include "lorakit/formats/gguf.h"
#include "synthetic.h"

extern "C" void cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);

namespace fs = std::filesystem;
using namespace lorakit;
using namespace lorakit::bench;

namespace {

struct Weight {
    std::string name;
    std::int64_t out, in;
    bool linear;  // a LoRA target (the tuned copy changes it)
};

std::vector<Weight> tinyllama_weights() {
    const std::int64_t hidden = 2048, mlp = 5632, kv = 256, vocab = 32000;
    std::vector<Weight> w = {{"model.embed_tokens.weight", vocab, hidden, false}};
    for (int l = 0; l < 22; ++l) {
        const std::string p = fmt::format("model.layers.{}.", l);
        w.push_back({p + "input_layernorm.weight", hidden, 0, false});
        w.push_back({p + "self_attn.q_proj.weight", hidden, hidden, true});
        w.push_back({p + "self_attn.k_proj.weight", kv, hidden, true});
        w.push_back({p + "self_attn.v_proj.weight", kv, hidden, true});
        w.push_back({p + "self_attn.o_proj.weight", hidden, hidden, true});
        w.push_back({p + "post_attention_layernorm.weight", hidden, 0, false});
        w.push_back({p + "mlp.gate_proj.weight", mlp, hidden, true});
        w.push_back({p + "mlp.up_proj.weight", mlp, hidden, true});
        w.push_back({p + "mlp.down_proj.weight", hidden, mlp, true});
    }
    w.push_back({"model.norm.weight", hidden, 0, false});
    w.push_back({"lm_head.weight", vocab, hidden, false});
    return w;
}

// The base (tuned = false) or the tuned copy: W + rank-16 delta (|ΔW| ~ 1e-3) + noise (1e-5).
void make_checkpoint(const fs::path& dir, bool tuned) {
    fs::create_directories(dir);
    SplitMix64 base_random(7), delta_random(11);
    std::vector<Tensor> tensors;
    std::vector<formats::TensorToWrite> list;
    for (const auto& w : tinyllama_weights()) {
        const Shape shape = w.in ? Shape{w.out, w.in} : Shape{w.out};
        std::vector<float> v(static_cast<std::size_t>(w.in ? w.out * w.in : w.out));
        for (auto& x : v) x = w.in ? 0.02f * base_random.uniform() : 1.0f;
        if (tuned && w.linear) {
            const std::int64_t r = 16;
            std::vector<float> b(static_cast<std::size_t>(w.out * r)), a(static_cast<std::size_t>(r * w.in));
            for (auto& x : b) x = 0.03f * delta_random.uniform();
            for (auto& x : a) x = 0.03f * delta_random.uniform();
            cblas_sgemm(101, 111, 111, int(w.out), int(w.in), int(r), 1.0f, b.data(), int(r), a.data(), int(w.in), 1.0f,
                        v.data(), int(w.in));
            for (auto& x : v) x += 1e-5f * delta_random.uniform();
        }
        tensors.push_back(Tensor::from_f32(DType::BF16, shape, v));
    }
    const auto weights = tinyllama_weights();
    for (std::size_t i = 0; i < weights.size(); ++i) list.push_back({weights[i].name, tensors[i].view()});
    formats::write_safetensors(dir / "model.safetensors", std::move(list), {{"format", "pt"}}, true);
    write_text_file(dir / "config.json",
                    R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
  "intermediate_size": 5632, "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
  "vocab_size": 32000, "torch_dtype": "bfloat16"}
)");
}

// llama.cpp's name of a Hugging Face Llama weight.
std::string gguf_name(const std::string& hf) {
    if (hf == "model.embed_tokens.weight") return "token_embd.weight";
    if (hf == "model.norm.weight") return "output_norm.weight";
    if (hf == "lm_head.weight") return "output.weight";
    static const std::pair<const char*, const char*> parts[] = {
        {"input_layernorm", "attn_norm"}, {"self_attn.q_proj", "attn_q"}, {"self_attn.k_proj", "attn_k"},
        {"self_attn.v_proj", "attn_v"},   {"self_attn.o_proj", "attn_output"}, {"post_attention_layernorm", "ffn_norm"},
        {"mlp.gate_proj", "ffn_gate"},    {"mlp.up_proj", "ffn_up"},          {"mlp.down_proj", "ffn_down"}};
    const auto layer_end = hf.find('.', 13);  // "model.layers.N."
    const std::string layer = hf.substr(13, layer_end - 13), rest = hf.substr(layer_end + 1, hf.size() - layer_end - 8);
    for (const auto& [from, to] : parts)
        if (rest == from) return fmt::format("blk.{}.{}.weight", layer, to);
    return hf;
}

// The base as llama.cpp's converter writes it with --outtype q8_0: matrices Q8_0, norms F32.
void make_gguf_q8(const fs::path& path) {
    std::vector<formats::GgufTensorToWrite> infos;
    const auto weights = tinyllama_weights();
    for (const auto& w : weights) {
        formats::GgufTensorToWrite t;
        t.name = gguf_name(w.name);
        t.shape = w.in ? Shape{w.out, w.in} : Shape{w.out};
        t.type = w.in ? formats::ggml_q8_0 : formats::ggml_f32;
        t.streamed_size = static_cast<std::uint64_t>(w.in ? w.out * w.in / 32 * 34 : w.out * 4);
        infos.push_back(std::move(t));
    }
    const std::vector<std::pair<std::string, formats::GgufValue>> kv = {
        {"general.architecture", formats::GgufValue::string("llama")},
        {"general.name", formats::GgufValue::string("tinyllama-shaped")},
        {"general.file_type", formats::GgufValue::u32(7)},
        {"llama.attention.head_count", formats::GgufValue::u32(32)},
        {"llama.attention.head_count_kv", formats::GgufValue::u32(4)},
    };
    SplitMix64 random(7);
    AtomicFile out(path, true);
    formats::write_gguf_streamed(out, kv, infos, [&](std::size_t i, AtomicFile& file) {
        const auto& w = weights[i];
        std::vector<float> v(static_cast<std::size_t>(w.in ? w.out * w.in : w.out));
        for (auto& x : v) x = w.in ? 0.02f * random.uniform() : 1.0f;
        if (w.in) file.write(formats::quantize_q8_0(v.data(), v.size()));
        else file.write(std::as_bytes(std::span(v)));
    });
    out.commit();
}

// A rank-64 PEFT LoRA (f16) on every linear weight of the layers.
void make_lora(const fs::path& dir) {
    fs::create_directories(dir);
    SyntheticAdapter a;
    for (const auto& w : tinyllama_weights()) {
        if (!w.linear) continue;
        const std::string stem = "base_model.model." + w.name.substr(0, w.name.size() - 7);
        a.pair(stem + ".lora_A.weight", stem + ".lora_B.weight", DType::F16, 64, w.in, w.out);
    }
    a.metadata["format"] = "pt";
    a.write(dir / "adapter_model.safetensors");
    write_text_file(dir / "adapter_config.json",
                    R"({"base_model_name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "peft_type": "LORA", "r": 64,
  "lora_alpha": 128, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
  "task_type": "CAUSAL_LM"}
)");
}

// Seconds of a dense SVD (sgesdd) of an out x in matrix: thin U and V (jobz 'S', the cheapest
// dense route) or full ones (jobz 'A': torch.linalg.svd's default full_matrices=True, which
// kohya's extract and LyCORIS's extract_locon call).
double dense_svd_seconds(std::int64_t out, std::int64_t in, char jobz) {
    SplitMix64 random(3);
    std::vector<float> m(static_cast<std::size_t>(out * in));
    for (auto& x : m) x = random.uniform();
    const std::int64_t k = std::min(out, in);
    const std::int64_t ucols = jobz == 'A' ? out : k, vrows = jobz == 'A' ? in : k;
    std::vector<float> s(static_cast<std::size_t>(k)), u(static_cast<std::size_t>(out * ucols)),
        vt(static_cast<std::size_t>(vrows * in));
    return seconds_of([&] {
        LAPACKE_sgesdd(LAPACK_ROW_MAJOR, jobz, int(out), int(in), m.data(), int(in), s.data(), u.data(), int(ucols),
                       vt.data(), int(in));
    });
}

}  // namespace

int main(int argc, char** argv) {
    auto args = bench_arguments(argc, argv);
    if (argc <= 2) args.repeats = 1;
    const fs::path base = args.dir / "tinyllama-base", tuned = args.dir / "tinyllama-tuned", lora = args.dir / "tinyllama-r64-peft";
    generate_once(base / "config.json", base, [&] { make_checkpoint(base, false); });
    generate_once(tuned / "config.json", tuned, [&] { make_checkpoint(tuned, true); });
    generate_once(lora / "adapter_config.json", lora, [&] { make_lora(lora); });
    const fs::path model = base / "model.safetensors";
    const double gb = static_cast<double>(fs::file_size(model)) / 1e9;
    const fs::path out = args.dir / "tinyllama-out";
    auto clean = [&] { fs::remove_all(out); };

    std::printf("TinyLlama-shaped checkpoint: %.2f GB bf16 (%s)\n\n", gb, model.c_str());
    const std::vector<Run> timed =
        interleaved_medians({{{"cp", model.string(), out.string()}, clean},
                             {{"sh", "-c", "cp \"$0\" \"$1\" && sync \"$1\"", model.string(), out.string()}, clean},
                             {{tool(argv[0], "lora-bake"), base.string(), lora.string(), "-o", out.string()}, clean}},
                            args.repeats);
    const Run &cp = timed[0], &cp_sync = timed[1], &bake = timed[2];
    std::printf("%-44s %9s %11s %12s\n", "command", "seconds", "peak RSS", "ratio");
    std::printf("%-44s %9.2f %8.0f MB %12s\n", "cp of the checkpoint", cp.seconds, cp.peak_rss_mb, "");
    std::printf("%-44s %9.2f %8.0f MB %12s\n", "cp + fsync", cp_sync.seconds, cp_sync.peak_rss_mb, "");
    std::printf("%-44s %9.2f %8.0f MB %5.2fx cp, %4.2fx cp+fsync%s\n", "lora-bake (rank-64 PEFT LoRA, 154 modules)",
                bake.seconds, bake.peak_rss_mb, bake.seconds / cp.seconds, bake.seconds / cp_sync.seconds,
                bake.status ? " FAILED" : "");
    clean();

    const fs::path gguf = args.dir / "tinyllama-q8_0.gguf", gguf_out = args.dir / "tinyllama-q8_0-out.gguf";
    generate_once(gguf, gguf, [&] { make_gguf_q8(gguf); });
    auto clean_gguf = [&] { fs::remove(gguf_out); };
    const std::vector<Run> timed_gguf =
        interleaved_medians({{{"cp", gguf.string(), gguf_out.string()}, clean_gguf},
                             {{tool(argv[0], "lora-bake"), gguf.string(), lora.string(), "-o", gguf_out.string()}, clean_gguf}},
                            args.repeats);
    const Run &cp_gguf = timed_gguf[0], &bake_gguf = timed_gguf[1];
    std::printf("%-44s %9.2f %8.0f MB %12s\n", "cp of the GGUF Q8_0 twin", cp_gguf.seconds, cp_gguf.peak_rss_mb, "");
    std::printf("%-44s %9.2f %8.0f MB %5.2fx cp%s\n", "lora-bake into GGUF Q8_0 (requantized)", bake_gguf.seconds,
                bake_gguf.peak_rss_mb, bake_gguf.seconds / cp_gguf.seconds, bake_gguf.status ? " FAILED" : "");
    clean_gguf();

    const fs::path extracted = args.dir / "tinyllama-extracted";
    const Run extract = median_of({tool(argv[0], "lora-extract"), base.string(), tuned.string(), "-o", extracted.string(),
                                   "--rank", "64", "--force"},
                                  args.repeats);
    // The dense route on the same 154 weights: one of each shape timed, scaled by its count.
    std::printf("%-44s %9.2f %8.0f MB%s\n", "lora-extract --rank 64 (154 weights)", extract.seconds, extract.peak_rss_mb,
                extract.status ? " FAILED" : "");
    for (const char jobz : {'S', 'A'}) {
        const double attention = dense_svd_seconds(2048, 2048, jobz), kv = dense_svd_seconds(256, 2048, jobz),
                     mlp = dense_svd_seconds(5632, 2048, jobz), down = dense_svd_seconds(2048, 5632, jobz);
        const double dense = 22 * (2 * attention + 2 * kv + 2 * mlp + down);
        std::printf("%-44s %9.0f %11s %5.1fx lora-extract   (%.2f s 2048x2048, %.2f s 256x2048, %.2f s 5632x2048, "
                    "%.2f s 2048x5632)\n",
                    jobz == 'S' ? "dense route, sgesdd thin U,V (extrapolated)" : "dense route, sgesdd full U,V (kohya's)",
                    dense, "", dense / extract.seconds, attention, kv, mlp, down);
    }
    return bake.status || bake_gguf.status || extract.status ? 1 : 0;
}
