// Base checkpoints: opening each layout and finding where every kind of module lands.
#include <catch2/catch.hpp>

#include <fstream>

#include "conventions.h"
#include "lorakit/checkpoint.h"
#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/formats/safetensors.h"
#include "support.h"

using namespace lorakit;
using lorakit::test::ScratchDir;

namespace {

// A tensor whose row r holds the value r everywhere, so gathered rows show where they came from.
Tensor numbered_rows(std::int64_t rows, std::int64_t cols, DType type = DType::F32) {
    std::vector<float> v(static_cast<std::size_t>(rows * cols));
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < cols; ++c) v[static_cast<std::size_t>(r * cols + c)] = static_cast<float>(r);
    return Tensor::from_f32(type, {rows, cols}, v);
}

void write(const std::filesystem::path& path, const std::vector<std::pair<std::string, Tensor>>& tensors) {
    std::vector<formats::TensorToWrite> t;
    for (const auto& [name, tensor] : tensors) t.push_back({name, tensor.view()});
    formats::write_safetensors(path, t, {}, false);
}

LoraModule module(const std::string& name, std::int64_t out, std::int64_t in, std::int64_t r = 2) {
    LoraModule m;
    m.name = name;
    m.down = Tensor::from_f32(DType::F32, {r, in}, std::vector<float>(static_cast<std::size_t>(r * in), 0.0f));
    m.up = Tensor::from_f32(DType::F32, {out, r}, std::vector<float>(static_cast<std::size_t>(out * r), 0.0f));
    return m;
}

// The first value of each gathered row: the source row numbers.
std::vector<std::int64_t> source_rows(const Checkpoint& c, const LoraModule& m) {
    const auto where = c.locate(m);
    REQUIRE(where);
    const auto w = gather_weight(*where, m);
    std::vector<std::int64_t> rows;
    for (std::int64_t p = 0; p < m.out_features(); ++p) rows.push_back(static_cast<std::int64_t>(w[static_cast<std::size_t>(p * m.flat_in_features())]));
    return rows;
}

std::vector<std::int64_t> range(std::int64_t from, std::int64_t to) {
    std::vector<std::int64_t> v;
    for (auto i = from; i < to; ++i) v.push_back(i);
    return v;
}

}  // namespace

TEST_CASE("SD single-file checkpoints: UNet through the SGM map, both text encoders", "[checkpoint]") {
    ScratchDir dir;
    const auto& registry = formats::builtin_registry();
    SECTION("SD1.x") {
        write(dir / "sd15.safetensors",
              {{"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", numbered_rows(8, 8)},
               {"model.diffusion_model.output_blocks.11.1.proj_out.weight", numbered_rows(8, 8)},
               {"cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", numbered_rows(6, 6)}});
        const auto c = registry.open_checkpoint(dir / "sd15.safetensors");
        auto w = c->locate(module("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 8, 8));
        REQUIRE(w);
        CHECK(w->entry->name == "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight");
        w = c->locate(module("unet.up_blocks.3.attentions.2.proj_out", 8, 8));
        REQUIRE(w);
        CHECK(w->entry->name == "model.diffusion_model.output_blocks.11.1.proj_out.weight");
        w = c->locate(module("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 6, 6));
        REQUIRE(w);
        CHECK(w->entry->name == "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight");
        CHECK_FALSE(c->locate(module("unet.down_blocks.1.attentions.0.proj_in", 8, 8)));
        CHECK_THROWS_WITH(c->locate(module("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 8, 6)),
                          Catch::Contains("does not fit base tensor"));
    }
    SECTION("SDXL: OpenCLIP's fused in_proj for the second text encoder") {
        write(dir / "sdxl.safetensors",
              {{"model.diffusion_model.input_blocks.4.1.proj_in.weight", numbered_rows(8, 8)},
               {"conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", numbered_rows(12, 6)},
               {"conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight", numbered_rows(30, 10)},
               {"conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc.weight", numbered_rows(20, 10)}});
        const auto c = registry.open_checkpoint(dir / "sdxl.safetensors");
        CHECK(c->locate(module("unet.input_blocks.4.1.proj_in", 8, 8)));           // SGM canonical
        CHECK(c->locate(module("unet.down_blocks.1.attentions.0.proj_in", 8, 8)));  // diffusers canonical
        CHECK(c->locate(module("text_encoder.text_model.encoder.layers.0.mlp.fc1", 12, 6))->entry->name ==
              "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight");
        const std::string layer = "text_encoder_2.text_model.encoder.layers.3.";
        CHECK(source_rows(*c, module(layer + "self_attn.q_proj", 10, 10)) == range(0, 10));
        CHECK(source_rows(*c, module(layer + "self_attn.k_proj", 10, 10)) == range(10, 20));
        CHECK(source_rows(*c, module(layer + "self_attn.v_proj", 10, 10)) == range(20, 30));
        CHECK(source_rows(*c, module(layer + "mlp.fc1", 20, 10)) == range(0, 20));
    }
}

TEST_CASE("Flux BFL checkpoints: fused modules whole, diffusers parts into their rows", "[checkpoint]") {
    ScratchDir dir;
    const std::int64_t h = 8, mlp = 32;
    write(dir / "flux.safetensors", {{"double_blocks.0.img_attn.qkv.weight", numbered_rows(3 * h, h)},
                                     {"single_blocks.2.linear1.weight", numbered_rows(3 * h + mlp, h)},
                                     {"final_layer.adaLN_modulation.1.weight", numbered_rows(2 * h, h)}});
    const auto c = formats::builtin_registry().open_checkpoint(dir / "flux.safetensors");
    CHECK(source_rows(*c, module("transformer.double_blocks.0.img_attn.qkv", 3 * h, h)) == range(0, 3 * h));
    CHECK(source_rows(*c, module("transformer.transformer_blocks.0.attn.to_k", h, h)) == range(h, 2 * h));
    CHECK(source_rows(*c, module("transformer.single_transformer_blocks.2.attn.to_v", h, h)) == range(2 * h, 3 * h));
    CHECK(source_rows(*c, module("transformer.single_transformer_blocks.2.proj_mlp", mlp, h)) == range(3 * h, 3 * h + mlp));
    // diffusers' norm_out.linear is [scale; shift], BFL's [shift; scale].
    auto swapped = range(h, 2 * h);
    for (auto r : range(0, h)) swapped.push_back(r);
    CHECK(source_rows(*c, module("transformer.norm_out.linear", 2 * h, h)) == swapped);
}

TEST_CASE("weight_in_place: a module's rows as stored, without a copy, where they are a contiguous slice", "[checkpoint]") {
    ScratchDir dir;
    const std::int64_t h = 8;
    for (const DType type : {DType::F16, DType::BF16, DType::F32, DType::F64}) {
        CAPTURE(dtype_name(type));
        const auto folder = dir / std::string(dtype_name(type));
        std::filesystem::create_directory(folder);
        write(folder / "flux.safetensors", {{"double_blocks.0.img_attn.qkv.weight", numbered_rows(3 * h, h, type)},
                                            {"final_layer.adaLN_modulation.1.weight", numbered_rows(2 * h, h, type)}});
        write(folder / "gpt2.safetensors", {{"h.0.attn.c_attn.weight", numbered_rows(6, 18, type)}});  // [in, out]
        const auto flux = formats::builtin_registry().open_checkpoint(folder / "flux.safetensors"),
                   gpt2 = formats::builtin_registry().open_checkpoint(folder / "gpt2.safetensors");
        const auto check = [&](const Checkpoint& c, const LoraModule& m, bool in_place) {
            const auto where = c.locate(m);
            REQUIRE(where);
            const auto view = weight_in_place(*where, m);
            CHECK(view.has_value() == in_place);
            if (!view) return;
            CHECK(view->dtype() == type);
            CHECK(view->shape() == Shape{m.out_features(), m.flat_in_features()});
            CHECK(view->to_f32() == gather_weight(*where, m));  // the same values, read where they are
            // Inside the mapped tensor: no copy.
            const auto stored = where->entry->tensor.bytes();
            CHECK(view->bytes().data() >= stored.data());
            CHECK(view->bytes().data() + view->bytes().size() <= stored.data() + stored.size());
        };
        const bool computes = type != DType::F64;  // F64 is gathered into f32 instead
        check(*flux, module("transformer.double_blocks.0.img_attn.qkv", 3 * h, h), computes);
        check(*flux, module("transformer.transformer_blocks.0.attn.to_k", h, h), computes);  // rows h..2h
        check(*flux, module("transformer.norm_out.linear", 2 * h, h), false);                 // rows reordered
        auto conv1d = module("transformer.h.0.attn.c_attn", 18, 6);
        conv1d.fan_in_fan_out = true;
        check(*gpt2, conv1d, false);  // transposed
        // Shapes are checked as gather_weight checks them.
        const auto where = flux->locate(module("transformer.double_blocks.0.img_attn.qkv", 3 * h, h));
        REQUIRE(where);
        CHECK_THROWS_WITH(weight_in_place(*where, module("transformer.double_blocks.0.img_attn.qkv", 3 * h, h + 1)),
                          Catch::Contains("cannot take module"));
    }
}

TEST_CASE("Hugging Face checkpoints: sharded index, prefixes, GPT-2 Conv1D, diffusers folders", "[checkpoint]") {
    ScratchDir dir;
    const auto& registry = formats::builtin_registry();
    SECTION("sharded") {
        std::filesystem::create_directory(dir / "model");
        write(dir / "model" / "model-00001-of-00002.safetensors", {{"model.layers.0.self_attn.q_proj.weight", numbered_rows(8, 8)}});
        write(dir / "model" / "model-00002-of-00002.safetensors", {{"model.layers.1.mlp.down_proj.weight", numbered_rows(8, 16)}});
        lorakit::test::write_file(dir / "model" / "model.safetensors.index.json",
                                  R"({"metadata": {"total_size": 768}, "weight_map": {
                                      "model.layers.0.self_attn.q_proj.weight": "model-00001-of-00002.safetensors",
                                      "model.layers.1.mlp.down_proj.weight": "model-00002-of-00002.safetensors"}})");
        for (const auto& path : {dir / "model", dir / "model" / "model.safetensors.index.json"}) {
            const auto c = registry.open_checkpoint(path);
            CHECK(c->layout() == "sharded");
            CHECK(c->files().size() == 2);
            const auto w = c->locate(module("model.layers.1.mlp.down_proj", 8, 16));
            REQUIRE(w);
            CHECK(w->file == 1);
        }
        lorakit::test::write_file(dir / "model" / "model.safetensors.index.json",
                                  R"({"weight_map": {"x.weight": "../elsewhere.safetensors"}})");
        CHECK_THROWS_WITH(registry.open_checkpoint(dir / "model"), Catch::Contains("not a file beside the index"));
    }
    SECTION("GPT-2 stores Conv1D weights transposed, without the transformer. prefix") {
        write(dir / "gpt2.safetensors", {{"h.0.attn.c_attn.weight", numbered_rows(6, 18)}});  // [in, out]
        auto m = module("transformer.h.0.attn.c_attn", 18, 6);
        m.fan_in_fan_out = true;
        const auto c = registry.open_checkpoint(dir / "gpt2.safetensors");
        const auto where = c->locate(m);
        REQUIRE(where);
        CHECK(where->transposed);
        const auto w = gather_weight(*where, m);
        CHECK(w[static_cast<std::size_t>(0 * 6 + 5)] == 5.0f);  // ΔW[0, 5] adds to stored [5, 0]
    }
    SECTION("diffusers folder: one folder per component") {
        std::filesystem::create_directories(dir / "pipe" / "unet");
        std::filesystem::create_directories(dir / "pipe" / "text_encoder");
        lorakit::test::write_file(dir / "pipe" / "model_index.json", "{}");
        write(dir / "pipe" / "unet" / "diffusion_pytorch_model.safetensors", {{"mid_block.attentions.0.proj_in.weight", numbered_rows(4, 4)}});
        write(dir / "pipe" / "text_encoder" / "model.safetensors", {{"text_model.encoder.layers.0.mlp.fc2.weight", numbered_rows(4, 6)}});
        const auto c = registry.open_checkpoint(dir / "pipe");
        CHECK(c->layout() == "diffusers");
        CHECK(c->locate(module("unet.mid_block.attentions.0.proj_in", 4, 4)));
        CHECK(c->locate(module("text_encoder.text_model.encoder.layers.0.mlp.fc2", 4, 6))->entry->name ==
              "text_model.encoder.layers.0.mlp.fc2.weight");
        CHECK_FALSE(c->locate(module("text_encoder_2.text_model.encoder.layers.0.mlp.fc2", 4, 6)));
    }
    SECTION("errors name the path") {
        CHECK_THROWS_WITH(registry.open_checkpoint(dir / "absent"), Catch::Contains("absent") && Catch::Contains("no such file"));
        std::filesystem::create_directory(dir / "empty");
        CHECK_THROWS_WITH(registry.open_checkpoint(dir / "empty"), Catch::Contains("no model weights"));
    }
}

TEST_CASE("GGUF models: llama.cpp names and the rotary row order of q/k (real tiny llama)", "[checkpoint][real]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const auto c = formats::builtin_registry().open_checkpoint(lorakit::test::real_testdata_dir() / "ollama" /
                                                               "llama-2-tiny-random.gguf");
    CHECK(c->layout() == "gguf");
    // 2 heads of 4: HF row h*4 + s*2 + j sits at llama.cpp row h*4 + 2j + s.
    const auto q = c->locate(module("model.layers.0.self_attn.q_proj", 8, 8));
    REQUIRE(q);
    CHECK(q->entry->name == "blk.0.attn_q.weight");
    CHECK(q->rows == std::vector<std::int64_t>{0, 2, 1, 3, 4, 6, 5, 7});
    const auto v = c->locate(module("model.layers.0.self_attn.v_proj", 8, 8));
    REQUIRE(v);
    CHECK(v->rows.empty());
    CHECK(c->locate(module("model.layers.0.mlp.gate_proj", 32, 8))->entry->name == "blk.0.ffn_gate.weight");
    LoraModule embed = module("model.embed_tokens", 8, 32000);
    embed.kind = ModuleKind::embedding;
    const auto e = c->locate(embed);
    REQUIRE(e);
    CHECK(e->transposed);
    CHECK_FALSE(c->locate(module("model.layers.5.self_attn.q_proj", 8, 8)));
}

namespace {

// Every module a checkpoint reports for its tensors, as "tensor -> module [rows a..b] (kind)";
// each must map back to its tensor through locate().
std::vector<std::string> all_modules(const Checkpoint& c) {
    std::vector<std::string> found;
    for (std::size_t f = 0; f < c.files().size(); ++f)
        for (const auto& e : c.files()[f]->entries())
            for (const auto& m : c.modules_at(f, e)) {
                const auto where = c.locate(m);
                REQUIRE(where);
                CHECK(where->entry == &e);
                std::string line = e.name + " -> " + m.name;
                if (!where->rows.empty())
                    line += " " + where->describe().substr(e.name.size() + 1);
                if (m.kind != ModuleKind::linear) line += std::string(" (") + std::string(module_kind_name(m.kind)) + ")";
                if (m.fan_in_fan_out) line += " (fan_in_fan_out)";
                found.push_back(line);
            }
    return found;
}

}  // namespace

TEST_CASE("modules_at: the modules each checkpoint tensor holds, the reverse of locate", "[checkpoint]") {
    ScratchDir dir;
    const auto& registry = formats::builtin_registry();
    SECTION("SDXL single file") {
        write(dir / "sdxl.safetensors",
              {{"model.diffusion_model.input_blocks.4.1.proj_in.weight", numbered_rows(8, 8)},
               {"model.diffusion_model.input_blocks.4.1.norm.weight", Tensor::zeros(DType::F32, {8})},
               {"model.diffusion_model.input_blocks.1.0.in_layers.2.weight", Tensor::zeros(DType::F32, {4, 4, 3, 3})},
               {"conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", numbered_rows(12, 6)},
               {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", numbered_rows(50, 6)},
               {"conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight", numbered_rows(30, 10)},
               {"conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_bias", Tensor::zeros(DType::F32, {30})},
               {"conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_proj.weight", numbered_rows(10, 20)}});
        const auto c = registry.open_checkpoint(dir / "sdxl.safetensors");
        CHECK(c->model_hint().family == "SDXL");
        const std::vector<std::string> expected = {
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight -> "
            "text_encoder.text_model.embeddings.token_embedding (embedding)",
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight -> "
            "text_encoder.text_model.encoder.layers.0.mlp.fc1",
            "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight -> "
            "text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj rows 10..20",
            "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight -> "
            "text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj rows 0..10",
            "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight -> "
            "text_encoder_2.text_model.encoder.layers.3.self_attn.v_proj rows 20..30",
            "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_proj.weight -> "
            "text_encoder_2.text_model.encoder.layers.3.mlp.fc2",
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight -> unet.down_blocks.0.resnets.0.conv1 (conv)",
            "model.diffusion_model.input_blocks.4.1.proj_in.weight -> unet.down_blocks.1.attentions.0.proj_in",
        };
        auto got = all_modules(*c);
        std::sort(got.begin(), got.end());
        CHECK(got == expected);
    }
    SECTION("Flux BFL, transformers with GPT-2 Conv1D, a diffusers folder") {
        write(dir / "flux.safetensors", {{"double_blocks.0.img_attn.qkv.weight", numbered_rows(24, 8)}});
        CHECK(all_modules(*registry.open_checkpoint(dir / "flux.safetensors")) ==
              std::vector<std::string>{"double_blocks.0.img_attn.qkv.weight -> transformer.double_blocks.0.img_attn.qkv"});
        write(dir / "gpt2.safetensors", {{"h.0.attn.c_attn.weight", numbered_rows(8, 24)},
                                         {"h.0.mlp.c_fc.weight", numbered_rows(8, 32)},
                                         {"wte.weight", numbered_rows(50, 8)},
                                         {"lm_head.weight", numbered_rows(50, 8)}});
        CHECK(all_modules(*registry.open_checkpoint(dir / "gpt2.safetensors")) ==
              std::vector<std::string>{"h.0.attn.c_attn.weight -> h.0.attn.c_attn (fan_in_fan_out)",
                                       "h.0.mlp.c_fc.weight -> h.0.mlp.c_fc (fan_in_fan_out)",
                                       "lm_head.weight -> lm_head", "wte.weight -> wte (embedding)"});
        std::filesystem::create_directories(dir / "pipe" / "unet");
        test::write_file(dir / "pipe" / "model_index.json", "{}");
        write(dir / "pipe" / "unet" / "diffusion_pytorch_model.safetensors",
              {{"down_blocks.0.attentions.0.proj_in.weight", numbered_rows(8, 8)}});
        const auto folder = registry.open_checkpoint(dir / "pipe");
        CHECK(folder->model_hint().family == "SD1.5");
        CHECK(all_modules(*folder) ==
              std::vector<std::string>{"down_blocks.0.attentions.0.proj_in.weight -> unet.down_blocks.0.attentions.0.proj_in"});
    }
}

TEST_CASE("modules_at on a GGUF model: Hugging Face names, q/k in rotary order (real tiny llama)", "[checkpoint][real]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const auto c = formats::builtin_registry().open_checkpoint(lorakit::test::real_testdata_dir() / "ollama" /
                                                               "llama-2-tiny-random.gguf");
    CHECK(c->model_hint().family == "llama");
    const auto got = all_modules(*c);
    CHECK(std::find(got.begin(), got.end(), "blk.0.attn_q.weight -> model.layers.0.self_attn.q_proj (8 rows, permuted)") != got.end());
    CHECK(std::find(got.begin(), got.end(), "blk.0.ffn_down.weight -> model.layers.0.mlp.down_proj") != got.end());
    CHECK(std::find(got.begin(), got.end(), "token_embd.weight -> model.embed_tokens (embedding)") != got.end());
}

TEST_CASE("model.safetensors.index.json: shard names, each once; malformed indexes refused by name", "[checkpoint][malformed]") {
    using formats::parse_shard_index;
    CHECK(parse_shard_index(R"({"metadata": {"total_size": 8}, "weight_map": {"a": "s2.safetensors", "b": "s1.safetensors",
                                "c": "s2.safetensors"}})", "i.json") == std::vector<std::string>{"s2.safetensors", "s1.safetensors"});
    CHECK(parse_shard_index(R"({"weight_map": {}})", "i.json").empty());
    const std::pair<const char*, const char*> bad[] = {
        {"", "not JSON"},
        {"{\"weight_map\": ", "not JSON"},
        {"[]", "no \"weight_map\" object"},
        {R"({"metadata": {}})", "no \"weight_map\" object"},
        {R"({"weight_map": []})", "no \"weight_map\" object"},
        {R"({"weight_map": {"a": 3}})", "weight_map['a'] is not a file name"},
        {R"({"weight_map": {"a": "../up.safetensors"}})", "is not a file beside the index"},
        {R"({"weight_map": {"a": "sub/s.safetensors"}})", "is not a file beside the index"},
        {R"({"weight_map": {"a": "/etc/passwd"}})", "is not a file beside the index"},
        {R"({"weight_map": {"a": ""}})", "is not a file beside the index"},
        {R"({"weight_map": {"a": ".."}})", "is not a file beside the index"},
        {R"({"weight_map": {"a": "."}})", "is not a file beside the index"},
    };
    for (const auto& [text, message] : bad) {
        INFO(text);
        try {
            parse_shard_index(text, "dir/model.safetensors.index.json");
            FAIL("accepted");
        } catch (const Error& e) {
            CHECK(e.code() == ErrorCode::bad_input);
            CHECK_THAT(e.what(), Catch::Contains("dir/model.safetensors.index.json") && Catch::Contains(message));
        }
    }
}
