// lora-convert and the GGUF LoRA convention: every sample into every target convention keeps
// each module's ΔW (or is refused cleanly, leaving nothing behind); llama.cpp's layout (names,
// orientation, FLOAT32 alpha, rotary row order of q/k) is what its loader expects.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <random>
#include <set>

#include "lorakit/convert.h"
#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/formats/gguf.h"
#include "lorakit/formats/safetensors.h"
#include "lorakit/sha256.h"

#include <nlohmann/json.hpp>
#include "../../formats/src/sd_names.h"
#include "lorakit/random.h"
#include "lora_helpers.h"
#include "memory_tensor_file.h"
#include "support.h"

namespace fs = std::filesystem;
using namespace lorakit;

namespace {

const fs::path samples = fs::path(LORAKIT_SOURCE_DIR) / "samples";

// scale · B·A as a dense out x flat_in matrix, in double.
std::vector<double> delta(const LoraModule& m) {
    const auto a = m.down.to_f32(), b = m.up.to_f32();
    const std::int64_t out = m.out_features(), in = m.flat_in_features(), r = m.rank();
    std::vector<double> d(static_cast<std::size_t>(out * in), 0.0);
    for (std::int64_t o = 0; o < out; ++o)
        for (std::int64_t k = 0; k < r; ++k) {
            const double bk = m.scale() * b[static_cast<std::size_t>(o * r + k)];
            for (std::int64_t i = 0; i < in; ++i) d[static_cast<std::size_t>(o * in + i)] += bk * a[static_cast<std::size_t>(k * in + i)];
        }
    return d;
}

double relative_difference(const std::vector<double>& x, const std::vector<double>& y) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
        num += (x[i] - y[i]) * (x[i] - y[i]);
        den += x[i] * x[i];
    }
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// ΔW·x for a fixed pseudo-random x (O((out + in)·r), for modules too big to form densely):
// two modules with the same probe responses on a few seeds have the same ΔW with certainty
// for practical purposes.
std::vector<double> probe(const LoraModule& m, std::uint64_t seed) {
    const auto a = m.down.to_f32(), b = m.up.to_f32();
    const std::int64_t out = m.out_features(), in = m.flat_in_features(), r = m.rank();
    SplitMix64 random(seed);
    std::vector<double> x(static_cast<std::size_t>(in)), ax(static_cast<std::size_t>(r), 0.0), y(static_cast<std::size_t>(out), 0.0);
    for (auto& v : x) v = random.uniform();
    for (std::int64_t k = 0; k < r; ++k)
        for (std::int64_t i = 0; i < in; ++i) ax[static_cast<std::size_t>(k)] += a[static_cast<std::size_t>(k * in + i)] * x[static_cast<std::size_t>(i)];
    for (std::int64_t o = 0; o < out; ++o)
        for (std::int64_t k = 0; k < r; ++k)
            y[static_cast<std::size_t>(o)] += m.scale() * b[static_cast<std::size_t>(o * r + k)] * ax[static_cast<std::size_t>(k)];
    return y;
}

ToolResult convert(ConvertRequest request) { return run_convert(formats::builtin_registry(), request, no_progress()); }

std::string output_name(const std::string& to) { return to == "peft" || to == "mlx" ? "out" : "out." + to; }

}  // namespace

TEST_CASE("every sample converts to every convention that can hold it, keeping each module's delta", "[convert]") {
    const auto& registry = formats::builtin_registry();
    const std::vector<std::string> inputs{"peft-llama", "mlx-qwen", "kohya-sdxl.safetensors", "diffusers-sd15.safetensors",
                                          "cloneofsimo-sd15.safetensors"};
    const std::vector<std::string> targets{"peft", "mlx", "gguf", "kohya", "diffusers"};
    std::size_t converted = 0;
    for (const auto& input : inputs) {
        const Adapter original = registry.load_adapter(samples / input);
        std::map<std::string, const LoraModule*> by_name;
        for (const auto& m : original.modules) {
            by_name[m.name] = &m;
            // Written in diffusers' naming tree, SGM UNet names change (checked separately below).
            if (m.name.starts_with("unet."))
                if (auto mapped = formats::sgm_to_diffusers_unet(m.name.substr(5))) by_name["unet." + *mapped] = &m;
        }
        for (const auto& to : targets) {
            INFO(input << " -> " << to);
            test::ScratchDir dir;
            ConvertRequest request;
            request.input = (samples / input).string();
            request.output = (dir / output_name(to)).string();
            request.to = to;
            request.hints = {"", 8, 2};  // the llama sample's head counts (also fine for the others)
            const ToolResult r = convert(request);
            if (r.exit_code != 0) {
                // Refused: a clean error, and no output.
                CHECK((r.exit_code == 2 || r.exit_code == 3));
                CHECK_FALSE(fs::exists(request.output));
                continue;
            }
            ++converted;
            const Adapter back = registry.load_adapter(request.output, request.hints);
            CHECK(back.convention == to);
            REQUIRE(back.modules.size() == original.modules.size());
            for (const auto& m : back.modules) {
                INFO(m.name);
                REQUIRE(by_name.count(m.name));
                const LoraModule& o = *by_name[m.name];
                // mlx-lm has one rank per file: smaller modules are zero-padded to it.
                if (to == "mlx") CHECK(m.rank() >= o.rank());
                else CHECK(m.rank() == o.rank());
                CHECK(relative_difference(delta(o), delta(m)) < 2e-3);  // f16 samples: one rounding of a folded B
            }
        }
    }
    // peft <-> mlx <-> gguf for the LLM samples, kohya <-> diffusers for the diffusion ones.
    CHECK(converted >= 8);
}

TEST_CASE("GGUF LoRA output has llama.cpp's names, orientation, FLOAT32 alpha and rotary q/k rows", "[convert][gguf]") {
    const auto& registry = formats::builtin_registry();
    test::ScratchDir dir;
    ConvertRequest request;
    request.input = (samples / "peft-llama").string();
    request.output = (dir / "a.gguf").string();
    request.to = "gguf";
    request.hints = {"", 8, 2};
    REQUIRE(convert(request).exit_code == 0);
    const auto file = formats::read_gguf(MappedFile::open(dir / "a.gguf"));
    CHECK(file->find_kv("general.architecture")->as_string() == "llama");
    CHECK(file->find_kv("general.type")->as_string() == "adapter");
    CHECK(file->find_kv("adapter.type")->as_string() == "lora");
    CHECK(file->find_kv("adapter.lora.alpha")->type == formats::GgufType::f32);
    const Adapter peft = registry.load_adapter(samples / "peft-llama");
    for (const auto& m : peft.modules) {
        INFO(m.name);
        std::string base = m.name;
        const auto layer = base.substr(std::string("model.layers.").size(), 1);
        static const std::map<std::string, std::string> tails{
            {"self_attn.q_proj", "attn_q"}, {"self_attn.k_proj", "attn_k"}, {"self_attn.v_proj", "attn_v"},
            {"self_attn.o_proj", "attn_output"}, {"mlp.gate_proj", "ffn_gate"}, {"mlp.up_proj", "ffn_up"},
            {"mlp.down_proj", "ffn_down"}};
        const std::string tail = m.name.substr(std::string("model.layers.0.").size());
        const std::string gguf = "blk." + layer + "." + tails.at(tail);
        const TensorEntry* a = file->find(gguf + ".weight.lora_a");
        const TensorEntry* b = file->find(gguf + ".weight.lora_b");
        REQUIRE(a != nullptr);
        REQUIRE(b != nullptr);
        CHECK(a->shape == m.down.shape());  // NumPy [r, in]: ne = [in, r]
        CHECK(b->shape == m.up.shape());    // NumPy [out, r]
        CHECK(a->tensor.to_f32() == m.down.to_f32());
        // alpha / rank with the file's one alpha reproduces the module's scale.
        const double alpha = *file->find_kv("adapter.lora.alpha")->as_number();
        CHECK(alpha / static_cast<double>(m.rank()) == Approx(m.scale()).epsilon(1e-12));
        const auto theirs = b->tensor.to_f32(), ours = m.up.to_f32();
        const std::int64_t out = m.out_features(), r = m.rank();
        const bool q = tail == "self_attn.q_proj", k = tail == "self_attn.k_proj";
        if (!q && !k) {
            CHECK(theirs == ours);
            continue;
        }
        // LlamaModel.permute: gguf row h·hd + 2j + s holds hf row h·hd + s·hd/2 + j.
        const std::int64_t heads = q ? 8 : 2, hd = out / heads;
        std::size_t wrong = 0;
        for (std::int64_t h = 0; h < heads; ++h)
            for (std::int64_t j = 0; j < hd / 2; ++j)
                for (std::int64_t s = 0; s < 2; ++s)
                    for (std::int64_t c = 0; c < r; ++c)
                        wrong += theirs[static_cast<std::size_t>((h * hd + 2 * j + s) * r + c)] !=
                                 ours[static_cast<std::size_t>((h * hd + s * hd / 2 + j) * r + c)];
        CHECK(wrong == 0);
        CHECK(theirs != ours);
    }
}

TEST_CASE("llama q/k rows need head counts: without them conversion is refused, with --base they are found", "[convert][gguf]") {
    test::ScratchDir dir;
    ConvertRequest request;
    request.input = (samples / "peft-llama").string();
    request.output = (dir / "a.gguf").string();
    request.to = "gguf";
    ToolResult r = convert(request);
    CHECK(r.exit_code == 2);
    REQUIRE_FALSE(r.diagnostics.empty());
    CHECK_THAT(r.diagnostics.front().message, Catch::Contains("head counts"));
    CHECK_FALSE(fs::exists(request.output));

    // A base config.json gives them (and the arch).
    test::write_file(dir / "config.json",
                     R"({"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64})");
    request.base = (dir / "config.json").string();
    REQUIRE(convert(request).exit_code == 0);
    const ModelHints hints = hints_from_base(formats::builtin_registry(), (dir / "config.json").string(), {});
    CHECK(hints.arch == "llama");
    CHECK(hints.head_count == 8);
    CHECK(hints.head_count_kv == 2);

    // The file records the head counts (as ollama's files do), so reading it back needs no flags.
    const auto written = formats::read_gguf(MappedFile::open(request.output));
    CHECK(written->find_kv("llama.attention.head_count")->as_number() == 8.0);
    CHECK(written->find_kv("llama.attention.head_count_kv")->as_number() == 2.0);
    CHECK(written->find_kv("general.file_type")->as_number() == 0.0);  // ALL_F32
    ConvertRequest back;
    back.input = request.output;
    back.output = (dir / "peft").string();
    back.to = "peft";
    REQUIRE(convert(back).exit_code == 0);
    {
        const Adapter original = formats::builtin_registry().load_adapter(samples / "peft-llama");
        const Adapter again = formats::builtin_registry().load_adapter(back.output);
        REQUIRE(again.modules.size() == original.modules.size());
        for (std::size_t i = 0; i < again.modules.size(); ++i) {
            CHECK(again.modules[i].name == original.modules[i].name);
            CHECK(again.modules[i].up.to_f32() == original.modules[i].up.to_f32());
            CHECK(again.modules[i].down.to_f32() == original.modules[i].down.to_f32());
        }
    }

    // A GGUF without head counts (as convert_lora_to_gguf.py writes them) keeps llama.cpp names
    // and rows: PEFT output is refused, GGUF output gives the same tensors back.
    std::vector<std::pair<std::string, formats::GgufValue>> kv;
    for (const auto& [k, v] : written->kv())
        if (k.find("head_count") == std::string::npos) kv.emplace_back(k, v);
    std::vector<formats::GgufTensorToWrite> tensors;
    for (std::size_t i = 0; i < written->entries().size(); ++i) {
        formats::GgufTensorToWrite t;
        t.name = written->entries()[i].name;
        t.type = written->ggml_type(i);
        t.shape = written->entries()[i].shape;
        t.view = written->raw(i);
        tensors.push_back(std::move(t));
    }
    formats::write_gguf(dir / "bare.gguf", kv, tensors, false);
    back.input = (dir / "bare.gguf").string();
    back.output = (dir / "peft2").string();
    const ToolResult r2 = convert(back);
    CHECK(r2.exit_code == 2);
    CHECK_FALSE(fs::exists(back.output));
    back.output = (dir / "again.gguf").string();
    back.to = "gguf";
    REQUIRE(convert(back).exit_code == 0);
    const auto again = formats::read_gguf(MappedFile::open(back.output));
    REQUIRE(written->entries().size() == again->entries().size());
    for (const auto& e : written->entries()) {
        INFO(e.name);
        const TensorEntry* other = again->find(e.name);
        REQUIRE(other != nullptr);
        CHECK(e.tensor.to_f32() == other->tensor.to_f32());
    }
}

TEST_CASE("oracle: ollama's GGUF of the discollama mlx adapter", "[convert][gguf]") {
    // ../shared/testdata/real/ollama/discollama.expected-gguf-sha256.json: ollama's conversion
    // (F16; llama, 32 heads, 8 KV heads). Metadata and attn_v must match byte for byte. For
    // attn_q ollama permuted lora_A's input columns; llama.cpp's converter permutes lora_B's
    // rows (the q permutation reorders W_q's output rows), which lorakit follows: checked
    // numerically instead.
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const auto dir = test::real_testdata_dir() / "ollama";
    const auto expected = nlohmann::json::parse(test::read_file(dir / "discollama.expected-gguf-sha256.json"));
    test::ScratchDir out;
    ConvertRequest request;
    request.input = (dir / "discollama").string();
    request.output = (out / "d.gguf").string();
    request.to = "gguf";
    request.dtype = "f16";
    request.hints = {"llama", 32, 8};
    REQUIRE(convert(request).exit_code == 0);
    const auto file = formats::read_gguf(MappedFile::open(request.output));
    for (const std::string key : {"general.architecture", "general.type", "adapter.type"})
        CHECK(file->find_kv(key)->as_string() == expected[key].get<std::string>());
    for (const std::string key : {"adapter.lora.alpha", "general.file_type", "llama.attention.head_count",
                                  "llama.attention.head_count_kv"}) {
        INFO(key);
        REQUIRE(file->find_kv(key) != nullptr);
        CHECK(file->find_kv(key)->to_text() == expected[key].get<std::string>());  // the oracle stores text
    }
    CHECK(file->find_kv("adapter.lora.alpha")->type == formats::GgufType::f32);
    std::size_t v_checked = 0;
    const Adapter mlx = formats::builtin_registry().load_adapter(dir / "discollama");
    for (const auto& e : file->entries()) {
        INFO(e.name);
        REQUIRE(expected.contains(e.name));
        CHECK(e.dtype_name == "F16");
        if (e.name.find("attn_v") != std::string::npos) {
            CHECK(sha256_hex(e.tensor.bytes()) == expected[e.name].get<std::string>());
            ++v_checked;
            continue;
        }
        // attn_q: lora_a is A (as F16); lora_b is B (F16) with llama.cpp's row permutation, 32 heads.
        const std::string layer = e.name.substr(4, e.name.find('.', 4) - 4);
        const LoraModule* m = nullptr;
        for (const auto& x : mlx.modules)
            if (x.name == "model.layers." + layer + ".self_attn.q_proj") m = &x;
        REQUIRE(m != nullptr);
        if (e.name.ends_with("lora_a")) {
            CHECK(e.tensor.to_f32() == m->down.converted(DType::F16).to_f32());
        } else {
            const auto ours = e.tensor.to_f32();
            const auto b = m->up.converted(DType::F16).to_f32();
            const std::int64_t out_rows = m->out_features(), r = m->rank(), hd = out_rows / 32;
            std::size_t wrong = 0;
            for (std::int64_t h = 0; h < 32; ++h)
                for (std::int64_t j = 0; j < hd / 2; ++j)
                    for (std::int64_t s = 0; s < 2; ++s)
                        for (std::int64_t c = 0; c < r; ++c)
                            wrong += ours[static_cast<std::size_t>((h * hd + 2 * j + s) * r + c)] !=
                                     b[static_cast<std::size_t>((h * hd + s * hd / 2 + j) * r + c)];
            CHECK(wrong == 0);
        }
    }
    CHECK(v_checked == 4);
}

TEST_CASE("hints from a GGUF base model", "[convert][gguf]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const auto path = test::real_testdata_dir() / "ollama/llama-2-tiny-random.gguf";
    const auto file = formats::read_gguf(MappedFile::open(path));
    const ModelHints hints = hints_from_base(formats::builtin_registry(), path.string(), {});
    CHECK(hints.arch == "llama");
    CHECK(hints.head_count == static_cast<std::int64_t>(*file->find_kv("llama.attention.head_count")->as_number()));
    // Explicit values win over the base's.
    CHECK(hints_from_base(formats::builtin_registry(), path.string(), {"qwen2", 7, 1}).arch == "qwen2");
}

TEST_CASE("q8_0 GGUF output: rows of 32 quantized, shorter ones F16; deltas kept to quantization accuracy", "[convert][gguf]") {
    const auto& registry = formats::builtin_registry();
    test::ScratchDir dir;
    ConvertRequest request;
    request.input = (samples / "peft-llama").string();
    request.output = (dir / "q.gguf").string();
    request.to = "gguf";
    request.dtype = "q8_0";
    request.hints = {"", 8, 2};
    const ToolResult r = convert(request);
    REQUIRE(r.exit_code == 0);
    const auto file = formats::read_gguf(MappedFile::open(request.output));
    bool any_q8 = false, any_f16 = false;
    for (std::size_t i = 0; i < file->entries().size(); ++i) {
        const bool q8 = file->ggml_type(i) == formats::ggml_q8_0;
        CHECK(q8 == (file->entries()[i].shape.back() % 32 == 0));
        any_q8 |= q8;
        any_f16 |= file->ggml_type(i) == formats::ggml_f16;
    }
    CHECK(any_q8);
    CHECK(any_f16);
    const Adapter original = registry.load_adapter(samples / "peft-llama");
    const Adapter back = registry.load_adapter(request.output, request.hints);
    REQUIRE(back.modules.size() == original.modules.size());
    for (std::size_t i = 0; i < back.modules.size(); ++i) {
        INFO(back.modules[i].name);
        CHECK(back.modules[i].name == original.modules[i].name);
        CHECK(relative_difference(delta(original.modules[i]), delta(back.modules[i])) < 0.02);
    }
}

TEST_CASE("scales GGUF's one alpha cannot express are folded into lora_b, with a note", "[convert][gguf]") {
    const auto& registry = formats::builtin_registry();
    Adapter adapter = registry.load_adapter(samples / "mlx-qwen");
    adapter.modules[1].scale_rule = ScaleRule::alpha_over_sqrt_rank;  // rsLoRA on one module
    adapter.modules[1].alpha = 3.0;
    adapter.modules[2].fixed_scale = 0.5;
    test::ScratchDir dir;
    std::vector<std::string> notes;
    WriteOptions options;
    options.hints.arch = "qwen2";
    registry.write_adapter(adapter, "gguf", dir / "f.gguf", options, notes);
    bool noted = false;
    for (const auto& n : notes) noted |= n.find("folded into lora_b") != std::string::npos;
    CHECK(noted);
    const Adapter back = registry.load_adapter(dir / "f.gguf");
    REQUIRE(back.modules.size() == adapter.modules.size());
    for (std::size_t i = 0; i < back.modules.size(); ++i) {
        INFO(back.modules[i].name);
        CHECK(relative_difference(delta(adapter.modules[i]), delta(back.modules[i])) < 1e-6);
    }
}

TEST_CASE("SGM (kohya SDXL) UNet names map to diffusers names by diffusers' rules", "[convert]") {
    const std::pair<std::string, std::string> cases[] = {
        {"input_blocks.4.1.transformer_blocks.0.attn2.to_k", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"},
        {"input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"},
        {"input_blocks.5.0.skip_connection", "down_blocks.1.resnets.1.conv_shortcut"},
        {"input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"},
        {"input_blocks.0.0", "conv_in"},
        {"input_blocks.8.0.emb_layers.1", "down_blocks.2.resnets.1.time_emb_proj"},
        {"middle_block.0.out_layers.3", "mid_block.resnets.0.conv2"},
        {"middle_block.1.proj_in", "mid_block.attentions.0.proj_in"},
        {"middle_block.2.in_layers.2", "mid_block.resnets.1.conv1"},
        {"output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"},
        {"output_blocks.5.1.proj_out", "up_blocks.1.attentions.2.proj_out"},
        {"output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"},
        {"time_embed.0", "time_embedding.linear_1"},
        {"label_emb.0.2", "add_embedding.linear_2"},
        {"out.2", "conv_out"},
    };
    for (const auto& [sgm, diffusers] : cases) {
        INFO(sgm);
        CHECK(formats::sgm_to_diffusers_unet(sgm) == diffusers);
        CHECK(formats::diffusers_to_sgm_unet_sdxl(diffusers) == sgm);  // and back (SDXL layout)
    }
    CHECK_FALSE(formats::sgm_to_diffusers_unet("down_blocks.0.attentions.0.proj_in"));
    CHECK_FALSE(formats::sgm_to_diffusers_unet("input_blocks.x.1.proj_in"));

    // Through lora-convert: every UNet module gets its diffusers name and keeps its delta.
    test::ScratchDir dir;
    ConvertRequest request;
    request.input = (samples / "kohya-sdxl.safetensors").string();
    request.output = (dir / "d.safetensors").string();
    request.to = "diffusers";
    REQUIRE(convert(request).exit_code == 0);
    const Adapter back = formats::builtin_registry().load_adapter(request.output);
    for (const auto& m : back.modules) {
        INFO(m.name);
        CHECK(m.name.find("input_blocks") == std::string::npos);
        CHECK(m.name.find("middle_block") == std::string::npos);
        CHECK(m.name.find("output_blocks") == std::string::npos);
    }
}

TEST_CASE("Flux: kohya (BFL) names become diffusers names, fused qkv and linear1 split exactly", "[convert][keysets]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    // A file shaped exactly like a real kohya Flux LoRA (every key of the manifest), random values.
    const auto manifest = nlohmann::json::parse(test::read_file(test::real_testdata_dir() / "keysets/flux_lora_kohya.json"));
    test::MemoryTensorFile file("flux_lora_kohya");
    std::uint64_t seed = 1;
    for (const auto& [key, shape_json] : manifest["tensors"].items()) {
        const Shape shape = shape_json.get<Shape>();
        std::int64_t n = 1;
        for (auto d : shape) n *= d;
        std::vector<float> values(static_cast<std::size_t>(n));
        SplitMix64 random(seed++);
        for (auto& v : values) v = shape.empty() ? 8.0f : random.uniform() - 0.5f;
        file.add_f32(key, shape, values);
    }
    const auto& registry = formats::builtin_registry();
    const Adapter kohya = registry.read_adapter("flux_lora_kohya", file, std::nullopt);
    test::ScratchDir dir;
    std::vector<std::string> notes;
    registry.write_adapter(kohya, "diffusers", dir / "d.safetensors", {}, notes);
    const Adapter diffusers = registry.load_adapter(dir / "d.safetensors");
    // Every name is one diffusers' own Flux LoRAs use.
    const auto reference = nlohmann::json::parse(test::read_file(test::real_testdata_dir() / "keysets/flux_lora_diffusers.json"));
    std::set<std::string> known;
    for (const auto& [key, shape] : reference["tensors"].items()) known.insert(key.substr(0, key.find(".lora_")));
    std::map<std::string, const LoraModule*> by_name;
    for (const auto& m : diffusers.modules) {
        INFO(m.name);
        CHECK(known.count(m.name));
        by_name[m.name] = &m;
    }
    // Split modules stack back to the fused delta; the others keep theirs.
    auto stacked = [&](const std::vector<std::string>& names) {
        std::vector<double> d;
        for (const auto& n : names) {
            REQUIRE(by_name.count(n));
            const auto part = probe(*by_name.at(n), 7);
            d.insert(d.end(), part.begin(), part.end());
        }
        return d;
    };
    std::size_t split = 0;
    for (const auto& m : kohya.modules) {
        INFO(m.name);
        const std::string path = m.name.substr(std::string("transformer.").size());
        if (path.starts_with("double_blocks.") && path.ends_with("img_attn.qkv")) {
            const std::string b = "transformer.transformer_blocks." + path.substr(14, path.find('.', 14) - 14) + ".attn.";
            CHECK(relative_difference(probe(m, 7), stacked({b + "to_q", b + "to_k", b + "to_v"})) < 1e-6);
            ++split;
        } else if (path.starts_with("single_blocks.") && path.ends_with("linear1")) {
            const std::string b = "transformer.single_transformer_blocks." + path.substr(14, path.find('.', 14) - 14) + ".";
            CHECK(relative_difference(probe(m, 7), stacked({b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"})) <
                  1e-6);
            ++split;
        }
    }
    CHECK(split == 19 + 38);
    // 19 double blocks with two qkv each (3 parts), 38 single blocks with linear1 (4 parts): the
    // 494 modules of diffusers' own full Flux LoRA.
    CHECK(diffusers.modules.size() == kohya.modules.size() + 19 * 2 * 2 + 38 * 3);
    CHECK(diffusers.modules.size() == known.size());

    // And back to kohya: BFL names again, fused modules joined; the same delta for every module.
    registry.write_adapter(diffusers, "kohya", dir / "k.safetensors", {}, notes);
    const Adapter again = registry.load_adapter(dir / "k.safetensors");
    REQUIRE(again.modules.size() == kohya.modules.size());
    for (std::size_t i = 0; i < kohya.modules.size(); ++i) {
        INFO(kohya.modules[i].name);
        REQUIRE(again.modules[i].name == kohya.modules[i].name);
        for (std::uint64_t seed : {7, 8})
            CHECK(relative_difference(probe(kohya.modules[i], seed), probe(again.modules[i], seed)) < 1e-3);  // f16, scale folded
    }
}

TEST_CASE("round trips A -> B -> A", "[convert][roundtrip]") {
    const auto& registry = formats::builtin_registry();
    const std::vector<std::pair<std::string, std::string>> inputs{
        {"peft-llama", "peft"}, {"mlx-qwen", "mlx"}, {"kohya-sdxl.safetensors", "kohya"}, {"diffusers-sd15.safetensors", "diffusers"}};
    const std::vector<std::string> targets{"peft", "mlx", "gguf", "kohya", "diffusers"};
    std::size_t checked = 0;
    for (const auto& [input, own] : inputs) {
        const Adapter original = registry.load_adapter(samples / input);
        for (const auto& to : targets) {
            if (to == own) continue;
            INFO(input << " -> " << to << " -> " << own);
            test::ScratchDir dir;
            ConvertRequest there;
            there.input = (samples / input).string();
            there.output = (dir / output_name(to)).string();
            there.to = to;
            there.hints = {"qwen2", 8, 2};
            if (input == "peft-llama") there.hints.arch = "llama";
            if (convert(there).exit_code != 0) continue;  // refused: covered above
            ConvertRequest back = there;
            back.input = there.output;
            back.output = (dir / ("back-" + output_name(own))).string();
            back.to = own;
            const ToolResult r = convert(back);
            INFO((r.diagnostics.empty() ? std::string() : r.diagnostics.front().message));
            REQUIRE(r.exit_code == 0);
            const Adapter again = registry.load_adapter(back.output, back.hints);
            REQUIRE(again.modules.size() == original.modules.size());
            std::size_t exact = 0;
            for (std::size_t i = 0; i < again.modules.size(); ++i) {
                const LoraModule &a = original.modules[i], &b = again.modules[i];
                INFO(a.name);
                REQUIRE(a.name == b.name);
                CHECK(relative_difference(delta(a), delta(b)) < 2e-3);
                exact += a.down.dtype() == b.down.dtype() && a.up.dtype() == b.up.dtype() &&
                         a.down.shape() == b.down.shape() && a.up.shape() == b.up.shape() &&
                         std::equal(a.down.bytes().begin(), a.down.bytes().end(), b.down.bytes().begin()) &&
                         std::equal(a.up.bytes().begin(), a.up.bytes().end(), b.up.bytes().begin()) && a.scale() == b.scale();
            }
            // Bit for bit unless the middle format had to fold scales into B: mlx-lm (one scale and
            // rank per file: the llama sample mixes scales 1 and 2) and diffusers (no alpha: the
            // kohya sample's scales 0.25/0.5 are folded). Those keep ΔW (checked above).
            const bool folds = (input == "peft-llama" && to == "mlx") || (input == "kohya-sdxl.safetensors" && to == "diffusers");
            if (!folds) CHECK(exact == again.modules.size());
            ++checked;
        }
    }
    CHECK(checked >= 6);
}

TEST_CASE("GGUF: a PEFT embedding LoRA becomes token_embd with lora_a = Aᵀ, and reads back", "[convert][gguf]") {
    // convert_lora_to_gguf.py: token_embd.weight.lora_a = lora_embedding_A.T ([vocab, r]),
    // lora_b = lora_embedding_B ([dim, r]); llama.cpp checks model.ne[1] == a.ne[1] (vocab).
    const auto& registry = formats::builtin_registry();
    Adapter a = registry.load_adapter(samples / "mlx-qwen");
    a.modules.resize(1);
    LoraModule& m = a.modules[0];
    m.name = "model.embed_tokens";
    m.kind = ModuleKind::embedding;
    const std::int64_t vocab = 40, dim = 16, r = 4;
    std::vector<float> av(static_cast<std::size_t>(r * vocab)), bv(static_cast<std::size_t>(dim * r));
    for (std::size_t i = 0; i < av.size(); ++i) av[i] = static_cast<float>(i) * 0.01f;
    for (std::size_t i = 0; i < bv.size(); ++i) bv[i] = 1.0f - static_cast<float>(i) * 0.02f;
    m.down = Tensor::from_f32(DType::F32, {r, vocab}, av);
    m.up = Tensor::from_f32(DType::F32, {dim, r}, bv);
    m.scale_rule = ScaleRule::alpha_over_rank;
    m.alpha = 8.0;
    test::ScratchDir dir;
    std::vector<std::string> notes;
    WriteOptions options;
    options.hints.arch = "qwen2";
    registry.write_adapter(a, "gguf", dir / "e.gguf", options, notes);
    const auto file = formats::read_gguf(MappedFile::open(dir / "e.gguf"));
    const TensorEntry* la = file->find("token_embd.weight.lora_a");
    const TensorEntry* lb = file->find("token_embd.weight.lora_b");
    REQUIRE(la != nullptr);
    REQUIRE(lb != nullptr);
    CHECK(la->shape == Shape{vocab, r});
    CHECK(lb->shape == Shape{dim, r});
    const auto at = la->tensor.to_f32();
    for (std::int64_t v = 0; v < vocab; ++v)
        for (std::int64_t k = 0; k < r; ++k) CHECK(at[static_cast<std::size_t>(v * r + k)] == av[static_cast<std::size_t>(k * vocab + v)]);
    const Adapter back = registry.load_adapter(dir / "e.gguf");
    REQUIRE(back.modules.size() == 1);
    CHECK(back.modules[0].name == "model.embed_tokens");
    CHECK(back.modules[0].kind == ModuleKind::embedding);
    CHECK(back.modules[0].down.to_f32() == av);
    CHECK(back.modules[0].up.to_f32() == bv);
    CHECK(back.modules[0].scale() == 2.0);
}

TEST_CASE("PEFT output: pattern keys every PEFT version matches; lora_bias named only when used", "[convert][peft]") {
    test::ScratchDir dir;
    const Registry& registry = formats::builtin_registry();
    std::mt19937 g(31);
    // Ranks 4 (most common: r), 8 and 2. The key "layers.0.mlp.down_proj" would also match
    // model.visual.layers.0.mlp.down_proj, so model.layers.0.mlp.down_proj keeps its full path.
    Adapter a = test::adapter_of({test::random_module(g, 16, 16, 4, 4, "model.layers.0.self_attn.q_proj"),
                                  test::random_module(g, 16, 16, 4, 4, "model.layers.1.self_attn.q_proj"),
                                  test::random_module(g, 16, 32, 8, 8, "model.layers.0.mlp.down_proj"),
                                  test::random_module(g, 16, 32, 2, 2, "model.visual.layers.0.mlp.down_proj")});
    std::vector<std::string> notes;
    WriteOptions options;
    registry.write_adapter(a, "peft", dir / "p", options, notes);
    const auto config = nlohmann::json::parse(test::read_file(dir / "p" / "adapter_config.json"));
    CHECK(config["r"] == 4);
    CHECK(config["rank_pattern"] == nlohmann::json{{"model.layers.0.mlp.down_proj", 8}, {"visual.layers.0.mlp.down_proj", 2}});
    CHECK(config["alpha_pattern"] == nlohmann::json{{"model.layers.0.mlp.down_proj", 8}, {"visual.layers.0.mlp.down_proj", 2}});
    CHECK_FALSE(config.contains("lora_bias"));  // PEFT < 0.14 refuses the field
    bool noted = false;
    for (const auto& n : notes) noted |= n.find("1 rank/alpha pattern key(s) had to be full module paths") != std::string::npos;
    CHECK(noted);
    // Read back (PEFT >= 0.15's matching): every module keeps its rank and scale.
    const Adapter back = registry.load_adapter(dir / "p");
    REQUIRE(back.modules.size() == a.modules.size());
    for (const auto& m : a.modules) {
        const LoraModule* b = nullptr;
        for (const auto& x : back.modules)
            if (x.name == m.name) b = &x;
        REQUIRE(b != nullptr);
        CHECK(b->rank() == m.rank());
        CHECK(b->scale() == m.scale());
    }
    // A LoRA bias needs lora_bias: true (and PEFT >= 0.14).
    a.modules[0].bias = Tensor::from_f32(DType::F32, {16}, std::vector<float>(16, 0.5f));
    registry.write_adapter(a, "peft", dir / "q", options, notes);
    CHECK(nlohmann::json::parse(test::read_file(dir / "q" / "adapter_config.json"))["lora_bias"] == true);
}

TEST_CASE("GGUF output refuses head counts that give q and k different head sizes", "[convert][gguf]") {
    test::ScratchDir dir;
    ConvertRequest request;
    request.input = std::string(LORAKIT_SOURCE_DIR) + "/samples/peft-llama";  // q 64 rows, k 16 rows
    request.output = (dir / "out.gguf").string();
    request.to = "gguf";
    request.hints = {"llama", 4, 2};  // head sizes 16 and 8: not this model's counts
    const ToolResult r = convert(request);
    CHECK(r.exit_code == 2);
    REQUIRE_FALSE(r.diagnostics.empty());
    CHECK_THAT(r.diagnostics.front().message, Catch::Contains("do not fit this adapter") && Catch::Contains("head size 16") &&
                                                  Catch::Contains("head size 8"));
    CHECK_FALSE(fs::exists(request.output));
    request.hints = {"llama", 8, 2};
    CHECK(convert(request).exit_code == 0);
}

TEST_CASE("what a target cannot hold is refused naming the input, or with --allow-lossy left out and noted", "[convert][lossy]") {
    const auto& registry = formats::builtin_registry();
    test::ScratchDir dir;
    std::mt19937 g(7);
    auto has_note = [](const ToolResult& r, const std::string& text) {
        for (const auto& d : r.diagnostics)
            if (d.message.find(text) != std::string::npos) return true;
        return false;
    };
    // A PEFT adapter with a DoRA magnitude and a LoRA bias on a llama v_proj (no q/k row order).
    LoraModule m = test::random_module(g, 8, 6, 2, 4.0, "model.layers.0.self_attn.v_proj");
    m.magnitude = Tensor::from_f32(DType::F32, {8}, std::vector<float>(8, 1.5f));
    m.bias = Tensor::from_f32(DType::F32, {8}, std::vector<float>(8, 0.25f));
    std::vector<std::string> notes;
    registry.write_adapter(test::adapter_of({m}), "peft", dir / "dora", write_options(false), notes);

    ConvertRequest request;
    request.input = (dir / "dora").string();
    request.output = (dir / "out.gguf").string();
    request.hints.arch = "llama";
    ToolResult refused = convert(request);
    CHECK(refused.exit_code == exit_codes::bad_input);
    REQUIRE_FALSE(refused.diagnostics.empty());
    const std::string message = refused.diagnostics.front().message;
    CHECK_THAT(message, Catch::StartsWith(quote(request.input)) && Catch::Contains("LoRA bias") &&
                            Catch::Contains("--allow-lossy"));
    CHECK_FALSE(fs::exists(request.output));

    request.allow_lossy = true;
    const ToolResult written = convert(request);
    REQUIRE(written.exit_code == 0);
    CHECK(has_note(written, "the DoRA magnitudes of 1 module(s)"));
    CHECK(has_note(written, "the LoRA biases of 1 module(s)"));
    const Adapter back = registry.load_adapter(request.output);
    REQUIRE(back.modules.size() == 1);
    CHECK_FALSE(back.modules[0].magnitude);
    CHECK_FALSE(back.modules[0].bias);
    LoraModule plain = m;
    plain.magnitude.reset();
    plain.bias.reset();
    CHECK(relative_difference(delta(plain), delta(back.modules[0])) < 1e-6);

    // Tensors that are not LoRA factors (a kohya file with an embedding) into diffusers.
    Adapter with_embedding = test::adapter_of({test::random_module(g, 8, 6, 2, 2.0, "unet.mid_block.attentions.0.proj_in")});
    with_embedding.convention = "kohya";
    with_embedding.other_tensors.push_back({"emb_params", Tensor::from_f32(DType::F32, {2, 6}, std::vector<float>(12, 0.5f))});
    registry.write_adapter(with_embedding, "kohya", dir / "emb.safetensors", write_options(false), notes);
    ConvertRequest to_diffusers;
    to_diffusers.input = (dir / "emb.safetensors").string();
    to_diffusers.output = (dir / "out.safetensors").string();
    to_diffusers.to = "diffusers";
    refused = convert(to_diffusers);
    CHECK(refused.exit_code == exit_codes::bad_input);
    CHECK_THAT(refused.diagnostics.front().message, Catch::Contains("'emb_params'") && Catch::Contains("--allow-lossy"));
    CHECK_FALSE(fs::exists(to_diffusers.output));
    to_diffusers.allow_lossy = true;
    const ToolResult dropped = convert(to_diffusers);
    REQUIRE(dropped.exit_code == 0);
    CHECK(has_note(dropped, "1 tensor(s) that are not LoRA factors ('emb_params')"));
    const Adapter diffusers = registry.load_adapter(to_diffusers.output);
    CHECK(diffusers.modules.size() == 1);
    CHECK(diffusers.other_tensors.empty());
}

TEST_CASE("a --dtype cast that would overflow is refused, or saturated with --allow-lossy", "[convert][lossy]") {
    const auto& registry = formats::builtin_registry();
    test::ScratchDir dir;
    std::vector<float> b = {1.0f, -2.0f, 1e5f, -3e6f, 65519.0f, 0.5f}, a = {1.0f, 0.0f, 0.0f, 1.0f};
    std::vector<std::string> notes;
    registry.write_adapter(test::adapter_of({test::module_of(b, a, 3, 2, 2, 2.0)}), "peft", dir / "big", write_options(false),
                           notes);
    ConvertRequest request;
    request.input = (dir / "big").string();
    request.output = (dir / "f16").string();
    request.dtype = "f16";
    const ToolResult refused = convert(request);
    CHECK(refused.exit_code == exit_codes::bad_input);
    CHECK_THAT(refused.diagnostics.front().message, Catch::Contains("up factor") && Catch::Contains("2 value(s)") &&
                                                        Catch::Contains("3e+06") && Catch::Contains("--allow-lossy"));
    CHECK_FALSE(fs::exists(request.output));
    request.allow_lossy = true;
    const ToolResult saturated = convert(request);
    REQUIRE(saturated.exit_code == 0);
    const Adapter back = registry.load_adapter(request.output);
    REQUIRE(back.modules.size() == 1);
    CHECK(back.modules[0].up.dtype() == DType::F16);
    // 65519 rounds to 65504 (it fits); 1e5 and -3e6 saturate; the rest are exact.
    CHECK(back.modules[0].up.to_f32() == std::vector<float>{1.0f, -2.0f, 65504.0f, -65504.0f, 65504.0f, 0.5f});
    bool noted = false;
    for (const auto& d : saturated.diagnostics) noted |= d.message.find("saturated 2 value(s)") != std::string::npos;
    CHECK(noted);
    // bf16 holds them all: no refusal.
    request.allow_lossy = false;
    request.dtype = "bf16";
    request.output = (dir / "bf16").string();
    CHECK(convert(request).exit_code == 0);
}

TEST_CASE("a scale folded into f16 factors that would overflow is refused, not written as infinities", "[convert][lossy]") {
    const auto& registry = formats::builtin_registry();
    test::ScratchDir dir;
    // kohya, f16, alpha 2000 at rank 2 (scale 1000): B holds 100, which becomes 1e5 in diffusers.
    LoraModule m = test::module_of({1.0f, 100.0f, -3.0f, 0.5f}, {1.0f, 0.0f, 0.0f, 1.0f}, 2, 2, 2, 2000.0,
                                   "unet.mid_block.attentions.0.proj_in");
    m.down = m.down.converted(DType::F16);
    m.up = m.up.converted(DType::F16);
    Adapter adapter = test::adapter_of({m});
    std::vector<std::string> notes;
    registry.write_adapter(adapter, "kohya", dir / "k.safetensors", write_options(false), notes);
    ConvertRequest request;
    request.input = (dir / "k.safetensors").string();
    request.output = (dir / "d.safetensors").string();
    request.to = "diffusers";
    const ToolResult refused = convert(request);
    CHECK(refused.exit_code == exit_codes::bad_input);
    REQUIRE_FALSE(refused.diagnostics.empty());
    CHECK_THAT(refused.diagnostics.front().message,
               Catch::StartsWith(quote(request.input)) && Catch::Contains("tensor 'unet.mid_block.attentions.0.proj_in") &&
                   Catch::Contains("1 of its values beyond F16") &&
                   Catch::Contains("--dtype f32"));
    CHECK_FALSE(fs::exists(request.output));
    request.dtype = "f32";  // what the message says
    REQUIRE(convert(request).exit_code == 0);
    // GGUF's one alpha per file (the first module's): the others' scales are folded into their
    // lora_b, and a fold that overflows names the tensor.
    std::vector<LoraModule> modules;
    for (const char* name : {"model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.v_proj"}) {
        LoraModule f16 = test::module_of({1.0f, 100.0f, -3.0f, 0.5f}, {1.0f, 0.0f, 0.0f, 1.0f}, 2, 2, 2,
                                         std::string_view(name) == "model.layers.0.self_attn.o_proj" ? 2.0 : 2000.0, name);
        f16.down = f16.down.converted(DType::F16);
        f16.up = f16.up.converted(DType::F16);
        modules.push_back(f16);
    }
    registry.write_adapter(test::adapter_of(modules), "peft", dir / "p16", write_options(false), notes);
    ConvertRequest to_gguf;
    to_gguf.input = (dir / "p16").string();
    to_gguf.output = (dir / "p16.gguf").string();
    to_gguf.hints.arch = "llama";
    const ToolResult gguf_refused = convert(to_gguf);
    CHECK(gguf_refused.exit_code == exit_codes::bad_input);
    REQUIRE_FALSE(gguf_refused.diagnostics.empty());
    CHECK_THAT(gguf_refused.diagnostics.front().message,
               Catch::Contains("blk.0.attn_v.weight.lora_b") && Catch::Contains("beyond F16"));
    CHECK_FALSE(fs::exists(to_gguf.output));
    // scale_encoded itself: an infinity in the input stays one (not an overflow); a finite value
    // scaled past the range is refused, also when it is the last of a chunk beside an infinity.
    const Tensor with_inf = Tensor::from_f32(DType::F16, {3}, std::vector<float>{std::numeric_limits<float>::infinity(), 1.0f, -2.0f});
    std::vector<std::byte> scaled_bytes(with_inf.bytes().size());
    formats::scale_encoded(DType::F16, with_inf.bytes().data(), scaled_bytes.data(), 3, 2.0);
    CHECK(Tensor::own(DType::F16, {3}, std::move(scaled_bytes)).to_f32() ==
          std::vector<float>{std::numeric_limits<float>::infinity(), 2.0f, -4.0f});
    std::vector<float> many(5000, 1.0f);
    many[0] = std::numeric_limits<float>::infinity();
    many[4097] = 40000.0f;  // the second chunk
    const Tensor big = Tensor::from_f32(DType::F16, {5000}, many);
    std::vector<std::byte> sink(big.bytes().size());
    CHECK_THROWS_WITH(formats::scale_encoded(DType::F16, big.bytes().data(), sink.data(), 5000, 2.0),
                      Catch::Contains("1 of its values beyond F16"));
    const Adapter back = registry.load_adapter(request.output);
    REQUIRE(back.modules.size() == 1);
    CHECK(relative_difference(delta(m), delta(back.modules[0])) < 1e-6);
}

TEST_CASE("mlx-lm output refuses paths it cannot name, saying which paths it takes", "[convert]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    test::ScratchDir dir;
    ConvertRequest request;
    request.input = (test::real_testdata_dir() / "peft-gpt2-fmi-chatbot").string();  // transformer.h.N.attn.c_attn
    request.output = (dir / "mlx").string();
    request.to = "mlx";
    const ToolResult r = convert(request);
    CHECK(r.exit_code == exit_codes::bad_input);
    REQUIRE_FALSE(r.diagnostics.empty());
    CHECK_THAT(r.diagnostics.front().message, Catch::StartsWith(quote(request.input)) &&
                                                  Catch::Contains("has no mlx-lm path") && Catch::Contains("GPT-2"));
    CHECK_FALSE(fs::exists(request.output));
}
