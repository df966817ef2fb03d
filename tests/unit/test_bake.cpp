// lora-bake: the baked tensors against W + Σ c·s·B·A computed here, untouched tensors copied
// byte for byte, determinism, subtract, sharding, DoRA, and the refusals.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <random>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "lorakit/bake.h"
#include "lorakit/checkpoint.h"
#include "lorakit/extract.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/formats/gguf.h"
#include "lorakit/formats/safetensors.h"
#include "lora_helpers.h"
#include "support.h"

using namespace lorakit;
using namespace lorakit::test;

namespace {

const std::string sample = std::string(LORAKIT_SOURCE_DIR) + "/samples/peft-llama";

// A base for the PEFT sample: a weight for every module it targets plus tensors it does not touch.
void write_base(const std::filesystem::path& path, DType type, float amplitude = 1.0f) {
    const Adapter in = formats::builtin_registry().load_adapter(sample);
    std::vector<Tensor> keep;
    std::vector<formats::TensorToWrite> tensors;
    std::mt19937 g(1);
    std::normal_distribution<float> d;
    auto add = [&](const std::string& name, Shape shape) {
        std::vector<float> w(static_cast<std::size_t>(checked_element_count(shape)));
        for (auto& x : w) x = amplitude * d(g);
        keep.push_back(Tensor::from_f32(type, shape, w));
        tensors.push_back({name, keep.back().view()});
    };
    for (const auto& m : in.modules) add(m.name + ".weight", {m.out_features(), m.in_features()});
    add("model.norm.weight", {64});
    add("model.embed_tokens.weight", {100, 64});
    formats::write_safetensors(path, tensors, {{"format", "pt"}}, false);
}

}  // namespace

TEST_CASE("lora-bake: W + sum of weighted deltas, rounded once; the rest byte for byte", "[bake]") {
    ScratchDir dir;
    const auto& registry = formats::builtin_registry();
    for (DType type : {DType::F32, DType::F16}) {
        const auto base = dir / fmt::format("base-{}.safetensors", dtype_name(type));
        write_base(base, type);
        const auto out = dir / fmt::format("baked-{}.safetensors", dtype_name(type));
        auto r = run_tool("lora-bake", {base.string(), sample + ":0.7", sample + ":-0.2", "-o", out.string()});
        REQUIRE(r.exit_code == 0);
        CHECK_THAT(r.out, Catch::Contains("baked 28 module(s) from 2 adapter(s) into 14 tensor(s)"));
        const auto in = registry.open_tensor_file(base), baked = registry.open_tensor_file(out);
        CHECK(baked->metadata() == in->metadata());
        REQUIRE(baked->entries().size() == in->entries().size());
        const Adapter adapter = registry.load_adapter(sample);
        double worst = 0;
        for (const auto& m : adapter.modules) {
            const auto w = in->tensor(m.name + ".weight").to_f32();
            const auto got = baked->tensor(m.name + ".weight");
            CHECK(got.dtype() == type);
            const auto d = dense_delta(m, 0.5);
            // Expected: the exact sum rounded once to the dtype.
            std::vector<float> expected(w.size());
            for (std::size_t i = 0; i < w.size(); ++i) expected[i] = static_cast<float>(w[i] + d[i]);
            const auto rounded = Tensor::from_f32(type, got.shape(), expected).to_f32(), values = got.to_f32();
            for (std::size_t i = 0; i < values.size(); ++i) {
                const double ulp = type == DType::F16 ? std::abs(rounded[i]) * 1e-3 + 1e-7 : std::abs(rounded[i]) * 2e-7 + 1e-9;
                worst = std::max(worst, std::abs(values[i] - rounded[i]) / ulp);
            }
        }
        CHECK(worst <= 1.0);  // at most one unit of rounding from the reference
        for (const char* untouched : {"model.norm.weight", "model.embed_tokens.weight"}) {
            const auto a = in->tensor(untouched).bytes(), b = baked->tensor(untouched).bytes();
            CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));
        }
        // Same inputs, same bytes.
        const auto again = dir / "again.safetensors";
        REQUIRE(run_tool("lora-bake", {base.string(), sample + ":0.7", sample + ":-0.2", "-o", again.string()}).exit_code == 0);
        CHECK(read_file(again) == read_file(out));
        std::filesystem::remove(again);
        // Produced on the writer's thread (-j 1) or one tensor ahead on a helper (-j 2, -j 3): the
        // same bytes.
        for (const char* jobs : {"1", "2", "3"}) {
            REQUIRE(run_tool("lora-bake", {base.string(), sample + ":0.7", sample + ":-0.2", "-o", again.string(), "-j", jobs})
                        .exit_code == 0);
            CHECK(read_file(again) == read_file(out));
            std::filesystem::remove(again);
        }
        if (type == DType::F32) {
            // --subtract undoes the bake (to f32 rounding).
            const auto undone = dir / "undone.safetensors";
            REQUIRE(run_tool("lora-bake", {out.string(), sample + ":0.5", "--subtract", "-o", undone.string()}).exit_code == 0);
            const auto u = registry.open_tensor_file(undone);
            for (const auto& m : adapter.modules) {
                const auto w = in->tensor(m.name + ".weight").to_f32(), back = u->tensor(m.name + ".weight").to_f32();
                for (std::size_t i = 0; i < w.size(); ++i) REQUIRE(back[i] == Approx(w[i]).margin(1e-5));
            }
        }
    }
}

TEST_CASE("lora-bake: sharded output, --dtype, JSON", "[bake]") {
    ScratchDir dir;
    const auto base = dir / "base.safetensors";
    write_base(base, DType::F32);
    const auto single = dir / "single.safetensors", sharded = dir / "sharded";
    REQUIRE(run_tool("lora-bake", {base.string(), sample, "-o", single.string(), "--dtype", "bf16"}).exit_code == 0);
    auto r = run_tool("lora-bake", {base.string(), sample, "-o", sharded.string(), "--dtype", "bf16", "--shard-size", "40KB", "--json"});
    REQUIRE(r.exit_code == 0);
    const auto j = nlohmann::json::parse(r.out);
    CHECK(j["modules_baked"] == 14);
    CHECK(j["tensors"].size() == 14);
    const auto index = nlohmann::json::parse(read_file(sharded / "model.safetensors.index.json"));
    CHECK(index["weight_map"].size() == 16);
    const auto& registry = formats::builtin_registry();
    const auto c = registry.open_checkpoint(sharded);
    CHECK(c->files().size() > 1);
    std::uint64_t total = 0;
    for (const auto& f : c->files())
        for (const auto& e : f->entries()) total += e.size;
    CHECK(index["metadata"]["total_size"] == total);
    const auto one = registry.open_tensor_file(single);
    for (const auto& e : one->entries()) {
        CHECK(e.tensor.dtype() == DType::BF16);
        bool found = false;
        for (const auto& f : c->files())
            if (const auto* other = f->find(e.name)) {
                found = true;
                CHECK(std::equal(e.tensor.bytes().begin(), e.tensor.bytes().end(), other->tensor.bytes().begin(), other->tensor.bytes().end()));
            }
        CHECK(found);
    }
    // No output may replace one of the base's shards.
    const auto shard = c->files()[0]->name();
    const std::string before = read_file(shard);
    r = run_tool("lora-bake", {sharded.string(), sample, "-o", shard, "--force"});
    CHECK(r.exit_code == 2);
    CHECK(read_file(shard) == before);
    // Baking into the sharded checkpoint keeps its shard names.
    const auto twice = dir / "twice";
    REQUIRE(run_tool("lora-bake", {sharded.string(), sample, "-o", twice.string()}).exit_code == 0);
    CHECK(std::filesystem::exists(twice / "model-00001-of-00002.safetensors") == std::filesystem::exists(sharded / "model-00001-of-00002.safetensors"));
    CHECK(std::filesystem::exists(twice / "model.safetensors.index.json"));
}

TEST_CASE("lora-bake: a model folder bakes into a folder with its config and tokenizer files", "[bake]") {
    ScratchDir dir;
    const auto folder = dir / "model";
    std::filesystem::create_directories(folder / ".cache");
    write_base(folder / "model.safetensors", DType::F32);
    lorakit::test::write_file(folder / "config.json", R"({"model_type": "llama"})");
    lorakit::test::write_file(folder / "tokenizer.json", "{}");
    lorakit::test::write_file(folder / "generation_config.json", "{}");
    lorakit::test::write_file(folder / "pytorch_model.bin", "stale weights");  // another weights file: not copied
    lorakit::test::write_file(folder / ".cache" / "x", "x");
    auto listing = [](const std::filesystem::path& p) {
        std::vector<std::string> names;
        for (const auto& e : std::filesystem::directory_iterator(p)) names.push_back(e.path().filename().string());
        std::sort(names.begin(), names.end());
        return names;
    };
    // Folder in, folder out (same weights name, configs and tokenizer copied, nothing hidden).
    const auto out = dir / "baked";
    REQUIRE(run_tool("lora-bake", {folder.string(), sample, "-o", out.string()}).exit_code == 0);
    CHECK(listing(out) == std::vector<std::string>{"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"});
    CHECK(read_file(out / "config.json") == read_file(folder / "config.json"));
    // The weights are what a single-file output holds.
    const auto file = dir / "baked.safetensors";
    REQUIRE(run_tool("lora-bake", {folder.string(), sample, "-o", file.string()}).exit_code == 0);
    CHECK(std::filesystem::is_regular_file(file));
    CHECK(read_file(file) == read_file(out / "model.safetensors"));
    // Sharded: the shards, the index, and the same files around them; a sharded folder bakes
    // into one with its own index name.
    const auto sharded = dir / "sharded";
    REQUIRE(run_tool("lora-bake", {folder.string(), sample, "-o", sharded.string(), "--shard-size", "40KB"}).exit_code == 0);
    CHECK(std::filesystem::exists(sharded / "tokenizer.json"));
    CHECK(std::filesystem::exists(sharded / "model.safetensors.index.json"));
    std::filesystem::rename(sharded / "model.safetensors.index.json", sharded / "other.safetensors.index.json");
    const auto again = dir / "again";
    REQUIRE(run_tool("lora-bake", {sharded.string(), sample, "-o", again.string()}).exit_code == 0);
    CHECK(std::filesystem::exists(again / "other.safetensors.index.json"));
    CHECK(std::filesystem::exists(again / "tokenizer.json"));
    // An output inside the folder would copy itself: refused.
    auto r = run_tool("lora-bake", {folder.string(), sample, "-o", (folder / "baked").string()});
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.err, Catch::Contains("inside the model folder"));
    CHECK_FALSE(std::filesystem::exists(folder / "baked"));
}

TEST_CASE("lora-bake refuses clearly and leaves nothing behind", "[bake]") {
    ScratchDir dir;
    const auto base = dir / "base.safetensors";
    write_base(base, DType::F16);
    const auto out = dir / "out.safetensors";
    SECTION("a module with no tensor") {
        // A base without one of the module's tensors.
        const auto& registry = formats::builtin_registry();
        const auto full = registry.open_tensor_file(base);
        std::vector<formats::TensorToWrite> t;
        for (const auto& e : full->entries())
            if (e.name != "model.layers.1.mlp.up_proj.weight") t.push_back({e.name, e.tensor.view()});
        formats::write_safetensors(dir / "partial.safetensors", t, {}, false);
        auto r = run_tool("lora-bake", {(dir / "partial.safetensors").string(), sample, "-o", out.string()});
        CHECK(r.exit_code == 3);
        CHECK_THAT(r.err, Catch::Contains("1 module(s) have no tensor") && Catch::Contains("model.layers.1.mlp.up_proj"));
        CHECK_FALSE(std::filesystem::exists(out));
        r = run_tool("lora-bake", {(dir / "partial.safetensors").string(), sample, "-o", out.string(), "--allow-unmatched"});
        CHECK(r.exit_code == 0);
        CHECK_THAT(r.err, Catch::Contains("skipped"));
    }
    SECTION("a result beyond the f16 range") {
        auto r = run_tool("lora-bake", {base.string(), sample + ":1e8", "-o", out.string()});
        CHECK(r.exit_code == 3);
        CHECK_THAT(r.err, Catch::Contains("exceeds the largest finite F16") && Catch::Contains("tensor"));
        CHECK(dir.list() == std::vector<std::string>{"base.safetensors"});
        r = run_tool("lora-bake", {base.string(), sample + ":1e8", "-o", (dir / "sharded").string(), "--shard-size", "30KB"});
        CHECK(r.exit_code == 3);
        CHECK(dir.list() == std::vector<std::string>{"base.safetensors"});
    }
    SECTION("shape mismatch, existing output, the base itself, GGUF bases") {
        const auto other = dir / "other.safetensors";
        const Tensor wrong = Tensor::from_f32(DType::F32, {8, 8}, std::vector<float>(64, 0.0f));
        formats::write_safetensors(other, {{"model.layers.0.self_attn.q_proj.weight", wrong.view()}}, {}, false);
        auto r = run_tool("lora-bake", {other.string(), sample, "-o", out.string(), "--allow-unmatched"});
        CHECK(r.exit_code == 3);
        CHECK_THAT(r.err, Catch::Contains("does not fit base tensor"));
        write_file(out, "x");
        r = run_tool("lora-bake", {base.string(), sample, "-o", out.string()});
        CHECK(r.exit_code == 2);
        CHECK(read_file(out) == "x");
        r = run_tool("lora-bake", {base.string(), sample, "-o", base.string(), "--force"});
        CHECK(r.exit_code == 2);
        CHECK_THAT(r.err, Catch::Contains("would replace the base"));
        if (!real_testdata_dir().empty()) {
            // An adapter that fits the real tiny llama GGUF: matched (llama.cpp names) and baked.
            Adapter tiny = formats::builtin_registry().load_adapter(sample);
            tiny.modules.resize(1);
            auto& m = tiny.modules[0];
            m.name = m.source_name = "model.layers.0.self_attn.v_proj";
            m.down = Tensor::from_f32(DType::F32, {2, 8}, std::vector<float>(16, 0.1f));
            m.up = Tensor::from_f32(DType::F32, {8, 2}, std::vector<float>(16, 0.1f));
            std::vector<std::string> notes;
            formats::builtin_registry().write_adapter(tiny, "peft", dir / "tiny", write_options(false), notes);
            r = run_tool("lora-bake", {(real_testdata_dir() / "ollama" / "llama-2-tiny-random.gguf").string(),
                                       (dir / "tiny").string(), "-o", (dir / "x.gguf").string()});
            INFO(r.err);
            CHECK(r.exit_code == 0);
            const auto in = formats::read_gguf(MappedFile::open(real_testdata_dir() / "ollama" / "llama-2-tiny-random.gguf"));
            const auto out = formats::read_gguf(MappedFile::open(dir / "x.gguf"));
            CHECK(out->kv() == in->kv());
            REQUIRE(out->entries().size() == in->entries().size());
            std::size_t changed = 0;
            for (std::size_t i = 0; i < in->entries().size(); ++i) {
                CHECK(out->ggml_type(i) == in->ggml_type(i));
                const auto x = in->raw(i), y = out->raw(i);
                changed += std::equal(x.begin(), x.end(), y.begin(), y.end()) ? 0 : 1;
            }
            CHECK(changed == 1);  // blk.0.attn_v.weight
        }
    }
}

TEST_CASE("lora-bake merges DoRA as PEFT does", "[bake]") {
    ScratchDir dir;
    const auto& registry = formats::builtin_registry();
    Adapter a = registry.load_adapter(sample);
    std::mt19937 g(3);
    std::uniform_real_distribution<float> u(0.5f, 2.0f);
    a.modules.resize(2);
    for (auto& m : a.modules) {
        std::vector<float> mag(static_cast<std::size_t>(m.out_features()));
        for (auto& x : mag) x = u(g);
        m.magnitude = Tensor::from_f32(DType::F32, {m.out_features()}, mag);
    }
    std::vector<std::string> notes;
    registry.write_adapter(a, "peft", dir / "dora", write_options(false), notes);
    const auto base = dir / "base.safetensors";
    write_base(base, DType::F32);
    REQUIRE(run_tool("lora-bake", {base.string(), (dir / "dora").string(), "-o", (dir / "out.safetensors").string()}).exit_code == 0);
    const Adapter dora = registry.load_adapter(dir / "dora");
    const auto in = registry.open_tensor_file(base), out = registry.open_tensor_file(dir / "out.safetensors");
    for (const auto& m : dora.modules) {
        REQUIRE(m.magnitude);
        const auto w = in->tensor(m.name + ".weight").to_f32(), got = out->tensor(m.name + ".weight").to_f32();
        const auto d = dense_delta(m, 1.0);
        const auto mag = m.magnitude->to_f32();
        const std::int64_t rows = m.out_features(), cols = m.in_features();
        for (std::int64_t p = 0; p < rows; ++p) {
            double norm = 0;
            for (std::int64_t q = 0; q < cols; ++q) norm += std::pow(w[p * cols + q] + d[p * cols + q], 2);
            norm = std::sqrt(norm);
            for (std::int64_t q = 0; q < cols; ++q)
                REQUIRE(got[p * cols + q] == Approx(mag[p] / norm * (w[p * cols + q] + d[p * cols + q])).epsilon(1e-5).margin(1e-6));
        }
    }
}

TEST_CASE("lora-bake into a GGUF model: q/k rows in llama.cpp's order, Q8_0 requantized, the rest as stored", "[bake][gguf]") {
    ScratchDir dir;
    const auto& registry = formats::builtin_registry();
    // A GGUF twin of samples/base-llama's first layer (4 heads, 2 KV heads), with mixed types.
    std::mt19937 g(3);
    std::normal_distribution<float> d;
    auto random = [&](Shape shape) {
        std::vector<float> v(static_cast<std::size_t>(checked_element_count(shape)));
        for (auto& x : v) x = 0.2f * d(g);
        return Tensor::from_f32(DType::F32, shape, v);
    };
    const Tensor q = random({64, 64}), k = random({16, 64}), up = random({172, 64}), norm = random({64}), embd = random({100, 64}),
                 output = random({8, 40});
    std::vector<formats::GgufTensorToWrite> tensors;
    tensors.push_back(formats::gguf_tensor("token_embd.weight", embd.view(), formats::ggml_q8_0));
    tensors.push_back(formats::gguf_tensor("blk.0.attn_norm.weight", norm.view(), formats::ggml_f32));
    tensors.push_back(formats::gguf_tensor("blk.0.attn_q.weight", q.view(), formats::ggml_q8_0));
    tensors.push_back(formats::gguf_tensor("blk.0.attn_k.weight", k.view(), formats::ggml_f16));
    tensors.push_back(formats::gguf_tensor("blk.0.ffn_up.weight", up.view(), formats::ggml_bf16));
    tensors.push_back(formats::gguf_tensor("output.weight", output.view(), formats::ggml_f32));  // rows of 40
    const std::vector<std::pair<std::string, formats::GgufValue>> kv = {
        {"general.architecture", formats::GgufValue::string("llama")},
        {"general.name", formats::GgufValue::string("tiny")},
        {"llama.attention.head_count", formats::GgufValue::u32(8)},
        {"llama.attention.head_count_kv", formats::GgufValue::u32(2)},
        {"general.file_type", formats::GgufValue::u32(1)},
    };
    formats::write_gguf(dir / "base.gguf", kv, tensors, false);

    // An adapter on q, k and up (Hugging Face names and row order).
    std::mt19937 ga(8);
    Adapter a = test::adapter_of({test::random_module(ga, 64, 64, 4, 4, "model.layers.0.self_attn.q_proj"),
                                  test::random_module(ga, 16, 64, 2, 2, "model.layers.0.self_attn.k_proj"),
                                  test::random_module(ga, 172, 64, 4, 4, "model.layers.0.mlp.up_proj")});
    for (auto& m : a.modules) m.up = Tensor::from_f32(DType::F32, m.up.shape(), [&] {
        auto v = m.up.to_f32();
        for (auto& x : v) x *= 0.01f;
        return v;
    }());
    std::vector<std::string> notes;
    registry.write_adapter(a, "peft", dir / "lora", write_options(false), notes);

    auto r = test::run_tool("lora-bake", {(dir / "base.gguf").string(), (dir / "lora").string(), "-o", (dir / "out.gguf").string()});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    // Produced on the writer's thread (-j 1) or ahead of it: the same bytes.
    r = test::run_tool("lora-bake", {(dir / "base.gguf").string(), (dir / "lora").string(), "-o", (dir / "out-j1.gguf").string(),
                                     "-j", "1"});
    REQUIRE(r.exit_code == 0);
    CHECK(test::read_file(dir / "out-j1.gguf") == test::read_file(dir / "out.gguf"));
    const auto base = registry.open_checkpoint(dir / "base.gguf");
    const auto out = registry.open_checkpoint(dir / "out.gguf");
    const auto& in_file = dynamic_cast<const formats::GgufFile&>(*base->files()[0]);
    const auto& out_file = dynamic_cast<const formats::GgufFile&>(*out->files()[0]);
    CHECK(out_file.kv() == in_file.kv());
    REQUIRE(out_file.entries().size() == 6);
    for (std::size_t i = 0; i < 6; ++i) CHECK(out_file.ggml_type(i) == in_file.ggml_type(i));  // types kept
    // Untouched: the stored bytes, Q8_0 blocks included.
    for (std::size_t i : {0u, 1u, 5u}) {
        const auto x = in_file.raw(i), y = out_file.raw(i);
        CHECK(std::equal(x.begin(), x.end(), y.begin(), y.end()));
    }
    // Changed: W + ΔW with ΔW's rows where locate() puts them, rounded once to the tensor's type.
    for (const auto& m : a.modules) {
        const auto where = base->locate(m);
        REQUIRE(where);
        const auto w = gather_weight(*where, m);
        const auto delta = test::dense_delta(m);
        const auto got = gather_weight(*out->locate(m), m);
        const bool q8 = m.name.ends_with("q_proj"), f16 = m.name.ends_with("k_proj");
        double worst = 0;
        for (std::size_t i = 0; i < w.size(); ++i) {
            const double exact = double(w[i]) + delta[i];
            const double err = std::abs(got[i] - exact);
            // Q8_0: half a step of the element's block (32 consecutive values of a row; rows move
            // whole under the q/k permutation, so blocks are the same in either order), plus the
            // f16 rounding of the block scale; f16 and bf16: half an ulp.
            double bound = 0;
            if (q8) {
                const std::size_t first = i / 32 * 32;
                double block_max = 0;
                for (std::size_t j = first; j < first + 32; ++j) block_max = std::max(block_max, std::abs(double(w[j]) + delta[j]));
                // |q·fp16(d) - x| <= d/2 + 127·|fp16(d) - d| <= d/2 + 127·d·2^-11
                bound = block_max / 127 * (0.5 + 127.0 / 2048) + 1e-6;
            } else {
                bound = std::abs(exact) * (f16 ? 4.9e-4 : 3.9e-3) + 1e-7;
            }
            worst = std::max(worst, err / bound);
        }
        INFO(m.name << ": worst error / bound " << worst);
        CHECK(worst <= 1.0);
    }
    auto file_type = [](const formats::GgufFile& f) {
        for (const auto& [key, value] : f.kv())
            if (key == "general.file_type") {
                std::uint32_t v = 0;
                std::memcpy(&v, value.data.data(), sizeof v);
                return v;
            }
        return ~0u;
    };
    // --dtype f16 turns every float tensor (Q8_0 included) into F16, except the norm, which
    // llama.cpp keeps in F32; general.file_type says MOSTLY_F16 (1).
    r = test::run_tool("lora-bake", {(dir / "base.gguf").string(), (dir / "lora").string(), "-o", (dir / "f16.gguf").string(),
                                     "--dtype", "f16"});
    REQUIRE(r.exit_code == 0);
    const auto f16 = formats::read_gguf(MappedFile::open(dir / "f16.gguf"));
    for (std::size_t i = 0; i < 6; ++i) CHECK(f16->ggml_type(i) == (i == 1 ? formats::ggml_f32 : formats::ggml_f16));
    CHECK(std::ranges::equal(f16->raw(1), in_file.raw(1)));
    CHECK(file_type(*f16) == 1);
    r = test::run_tool("lora-bake", {(dir / "base.gguf").string(), (dir / "lora").string(), "-o", (dir / "bf16.gguf").string(),
                                     "--dtype", "bf16"});
    REQUIRE(r.exit_code == 0);
    CHECK(file_type(*formats::read_gguf(MappedFile::open(dir / "bf16.gguf"))) == 32);
    // --dtype q8_0: matrices to Q8_0 (untouched Q8_0 blocks copied, changed ones requantized as
    // without --dtype), rows of 40 to F16 as gguf-py falls back, the norm F32; MOSTLY_Q8_0 (7).
    r = test::run_tool("lora-bake", {(dir / "base.gguf").string(), (dir / "lora").string(), "-o", (dir / "q8.gguf").string(),
                                     "--dtype", "q8_0"});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    const auto q8 = formats::read_gguf(MappedFile::open(dir / "q8.gguf"));
    const std::uint32_t q8_types[] = {formats::ggml_q8_0, formats::ggml_f32, formats::ggml_q8_0,
                                      formats::ggml_q8_0, formats::ggml_q8_0, formats::ggml_f16};
    for (std::size_t i = 0; i < 6; ++i) CHECK(q8->ggml_type(i) == q8_types[i]);
    for (std::size_t i : {0u, 1u, 2u}) CHECK(std::ranges::equal(q8->raw(i), out_file.raw(i)));
    CHECK(file_type(*q8) == 7);
    {
        // The converted tensors hold what the F32 route holds, quantized once: k and up within
        // half a Q8_0 step (plus the scale's f16 rounding) of the --dtype f32 output.
        r = test::run_tool("lora-bake", {(dir / "base.gguf").string(), (dir / "lora").string(), "-o",
                                         (dir / "f32.gguf").string(), "--dtype", "f32"});
        REQUIRE(r.exit_code == 0);
        const auto f32 = formats::read_gguf(MappedFile::open(dir / "f32.gguf"));
        CHECK(file_type(*f32) == 0);
        for (std::size_t i : {3u, 4u}) {
            const auto exact = f32->entries()[i].to_f32(), got = q8->entries()[i].to_f32();
            REQUIRE(exact.size() == got.size());
            double worst = 0;
            for (std::size_t j = 0; j < exact.size(); ++j) {
                double block_max = 0;
                for (std::size_t t = j / 32 * 32; t < j / 32 * 32 + 32; ++t) block_max = std::max(block_max, double(std::abs(exact[t])));
                worst = std::max(worst, std::abs(got[j] - exact[j]) / (block_max / 127 * (0.5 + 127.0 / 2048) + 1e-7));
            }
            INFO(f32->entries()[i].name);
            CHECK(worst <= 1.0);
        }
    }
    // q8_0 is a GGUF type: refused for a safetensors base before anything is written.
    {
        formats::write_safetensors(dir / "base.safetensors", {{"model.layers.0.self_attn.q_proj.weight", q.view()}}, {}, false);
        r = test::run_tool("lora-bake", {(dir / "base.safetensors").string(), (dir / "lora").string(), "-o",
                                         (dir / "q8.safetensors").string(), "--dtype", "q8_0", "--allow-unmatched"});
        CHECK(r.exit_code == 2);
        CHECK_THAT(r.err, Catch::Contains("q8_0 is a GGUF type"));
        CHECK_FALSE(std::filesystem::exists(dir / "q8.safetensors"));
    }
    // --shard-size has no meaning for one GGUF file.
    r = test::run_tool("lora-bake", {(dir / "base.gguf").string(), (dir / "lora").string(), "-o", (dir / "s.gguf").string(),
                                     "--shard-size", "1MB"});
    CHECK(r.exit_code == 2);
    CHECK_FALSE(std::filesystem::exists(dir / "s.gguf"));
}

namespace {

// Calls ready() once `after` items of a stage are done, then waits to be killed mid-write.
class SignallingProgress final : public Progress {
public:
    SignallingProgress(const std::function<void()>& ready, std::uint64_t after) : ready_(ready), after_(after) {}
    void begin(std::string_view, std::uint64_t, std::uint64_t) override {}
    void advance(std::uint64_t items, std::uint64_t) override {
        if (items == after_) {
            ready_();
            for (;;) ::pause();  // mid-write: the output is open and partly written
        }
    }
    void end() override {}

private:
    const std::function<void()>& ready_;
    std::uint64_t after_;
};

// Runs `command` (a lora-bake or lora-extract request) in a child and SIGKILLs it once it has
// streamed `after` tensors; returns how the child ended (128 + signal, or its exit status).
template <typename Command>
int kill_after(std::uint64_t after, Command command) {
    return test::kill_when_ready(
        [&](const std::function<void()>& ready) {
            SignallingProgress progress(ready, after);
            command(progress);
        },
        SIGKILL);
}

}  // namespace

TEST_CASE("lora-bake and lora-extract killed with SIGKILL mid-write leave nothing behind", "[bake][extract][atomic]") {
    ScratchDir dir;
    const auto& registry = formats::builtin_registry();
    const std::string base = std::string(LORAKIT_SOURCE_DIR) + "/samples/base-llama";
    std::filesystem::create_directory(dir / "out");
    SECTION("bake, a single output file") {
        const int ended = kill_after(5, [&](Progress& progress) {
            BakeRequest request;
            request.base = base;
            request.adapters = {sample};
            request.output = (dir / "out" / "baked.safetensors").string();
            run_bake(registry, request, progress);
        });
        CHECK(ended == 128 + SIGKILL);
        CHECK(std::filesystem::is_empty(dir / "out"));
    }
    SECTION("bake, a sharded output directory (regression: it left a hidden temporary directory)") {
        const int ended = kill_after(5, [&](Progress& progress) {
            BakeRequest request;
            request.base = base;
            request.adapters = {sample};
            request.output = (dir / "out" / "sharded").string();
            request.shard_size = 20000;
            run_bake(registry, request, progress);
        });
        CHECK(ended == 128 + SIGKILL);
        CHECK(std::filesystem::is_empty(dir / "out"));
    }
    SECTION("extract, killed mid-run (its output is written at the end)") {
        auto r = run_tool("lora-bake", {base, sample, "-o", (dir / "tuned.safetensors").string()});
        REQUIRE(r.exit_code == 0);
        const int ended = kill_after(5, [&](Progress& progress) {
            ExtractRequest request;
            request.base = base;
            request.tuned = (dir / "tuned.safetensors").string();
            request.output = (dir / "out" / "x").string();
            request.to = "peft";
            request.fit.rank.rank = 4;
            run_extract(registry, request, progress);
        });
        CHECK(ended == 128 + SIGKILL);
        CHECK(std::filesystem::is_empty(dir / "out"));
    }
}

TEST_CASE("lora-bake into a diffusers folder: a folder back, configs copied, variants left out, shards re-indexed",
          "[bake][diffusers]") {
    ScratchDir dir;
    const auto& registry = formats::builtin_registry();
    const auto pipe = dir / "pipe";
    std::mt19937 g(5);
    std::normal_distribution<float> d;
    std::vector<Tensor> keep;
    auto random = [&](Shape shape) {
        std::vector<float> v(static_cast<std::size_t>(checked_element_count(shape)));
        for (auto& x : v) x = d(g);
        keep.push_back(Tensor::from_f32(DType::F16, shape, v));
        return keep.back().view();
    };
    for (const char* sub : {"unet", "text_encoder_2", "scheduler", "tokenizer", ".cache"}) std::filesystem::create_directories(pipe / sub);
    write_file(pipe / "model_index.json", R"({"_class_name": "StableDiffusionXLPipeline"})");
    write_file(pipe / "unet" / "config.json", R"({"sample_size": 128})");
    write_file(pipe / "scheduler" / "scheduler_config.json", R"({"beta_start": 0.00085})");
    write_file(pipe / "tokenizer" / "vocab.json", R"({"a": 0})");
    write_file(pipe / ".cache" / "download.lock", "x");
    formats::write_safetensors(pipe / "unet" / "diffusion_pytorch_model.safetensors",
                               {{"down_blocks.1.attentions.0.proj_in.weight", random({32, 32})},
                                {"conv_in.weight", random({32, 4, 3, 3})}},
                               {{"format", "pt"}}, false);
    formats::write_safetensors(pipe / "unet" / "diffusion_pytorch_model.fp16.safetensors",
                               {{"conv_in.weight", random({32, 4, 3, 3})}}, {}, false);
    // A sharded component: two shards and its index.
    formats::write_safetensors(pipe / "text_encoder_2" / "model-00001-of-00002.safetensors",
                               {{"text_model.encoder.layers.0.self_attn.q_proj.weight", random({16, 16})}}, {{"format", "pt"}}, false);
    formats::write_safetensors(pipe / "text_encoder_2" / "model-00002-of-00002.safetensors",
                               {{"text_model.encoder.layers.0.mlp.fc1.weight", random({64, 16})}}, {{"format", "pt"}}, false);
    const std::string index = R"({"metadata": {"total_size": 2560}, "weight_map": {
        "text_model.encoder.layers.0.mlp.fc1.weight": "model-00002-of-00002.safetensors",
        "text_model.encoder.layers.0.self_attn.q_proj.weight": "model-00001-of-00002.safetensors"}})";
    write_file(pipe / "text_encoder_2" / "model.safetensors.index.json", index);

    std::mt19937 ga(6);
    Adapter a = test::adapter_of({test::random_module(ga, 32, 32, 4, 4, "unet.down_blocks.1.attentions.0.proj_in"),
                                  test::random_module(ga, 64, 16, 2, 2, "text_encoder_2.text_model.encoder.layers.0.mlp.fc1")});
    std::vector<std::string> notes;
    registry.write_adapter(a, "diffusers", dir / "lora", write_options(false), notes);

    auto r = run_tool("lora-bake", {pipe.string(), (dir / "lora").string(), "-o", (dir / "out").string()});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    // The same files at the same places, without the un-baked variant and the hidden folder.
    std::vector<std::string> files;
    for (const auto& e : std::filesystem::recursive_directory_iterator(dir / "out"))
        if (e.is_regular_file()) files.push_back(e.path().lexically_relative(dir / "out").generic_string());
    std::sort(files.begin(), files.end());
    CHECK(files == std::vector<std::string>{"model_index.json", "scheduler/scheduler_config.json",
                                            "text_encoder_2/model-00001-of-00002.safetensors",
                                            "text_encoder_2/model-00002-of-00002.safetensors",
                                            "text_encoder_2/model.safetensors.index.json", "tokenizer/vocab.json",
                                            "unet/config.json", "unet/diffusion_pytorch_model.safetensors"});
    for (const char* same : {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json"})
        CHECK(read_file(dir / "out" / same) == read_file(pipe / same));
    CHECK(nlohmann::json::parse(read_file(dir / "out" / "text_encoder_2" / "model.safetensors.index.json")) ==
          nlohmann::json::parse(index));
    // It opens as the same layout, with the deltas baked and the rest byte for byte.
    const auto base = registry.open_checkpoint(pipe);
    const auto out = registry.open_checkpoint(dir / "out");
    CHECK(out->layout() == "diffusers");
    for (const auto& m : a.modules) {
        const auto w = gather_weight(*base->locate(m), m);
        const auto got = gather_weight(*out->locate(m), m);
        const auto delta = dense_delta(m);
        double worst = 0;
        for (std::size_t i = 0; i < w.size(); ++i) {
            const double exact = double(w[i]) + delta[i];
            worst = std::max(worst, std::abs(got[i] - exact) / (std::abs(exact) * 4.9e-4 + 1e-7));
        }
        INFO(m.name);
        CHECK(worst <= 1.0);
    }
    REQUIRE(out->files().size() == 3);  // text_encoder_2's shards, then unet
    const auto* conv_in = out->files()[2]->find("conv_in.weight");
    REQUIRE(conv_in);
    CHECK(std::ranges::equal(conv_in->tensor.bytes(), base->files()[2]->find("conv_in.weight")->tensor.bytes()));
    // Determinism, refusals: an output inside the folder; --shard-size; an existing output.
    r = run_tool("lora-bake", {pipe.string(), (dir / "lora").string(), "-o", (dir / "out2").string()});
    REQUIRE(r.exit_code == 0);
    for (const auto& f : files) CHECK(read_file(dir / "out" / f) == read_file(dir / "out2" / f));
    r = run_tool("lora-bake", {pipe.string(), (dir / "lora").string(), "-o", (pipe / "baked").string()});
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.err, Catch::Contains("inside the diffusers folder"));
    CHECK_FALSE(std::filesystem::exists(pipe / "baked"));
    r = run_tool("lora-bake", {pipe.string(), (dir / "lora").string(), "-o", (dir / "out3").string(), "--shard-size", "1MB"});
    CHECK(r.exit_code == 2);
    r = run_tool("lora-bake", {pipe.string(), (dir / "lora").string(), "-o", (dir / "out").string()});
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.err, Catch::Contains("exists"));
}
