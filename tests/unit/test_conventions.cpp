// The semantics of each key convention: scales, patterns, orientations, and every structural
// rejection, on small in-memory files.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <map>

#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "convention_common.h"
#include "memory_tensor_file.h"
#include "support.h"

using namespace lorakit;
using test::MemoryTensorFile;

namespace {

std::vector<float> iota(std::size_t n, float start = 1.0f) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = start + static_cast<float>(i);
    return v;
}

SidecarConfig config(std::string text, std::string name = "adapter_config.json") {
    return SidecarConfig{name, std::move(text)};
}

Adapter read(const MemoryTensorFile& file, std::optional<SidecarConfig> sidecar = std::nullopt) {
    return formats::builtin_registry().read_adapter("test", file, sidecar);
}

const LoraModule& module_named(const Adapter& a, const std::string& name) {
    for (const auto& m : a.modules)
        if (m.name == name) return m;
    FAIL("no module " << name);
    throw 0;
}

template <typename F>
Error error_of(F&& f) {
    try {
        f();
    } catch (const Error& e) {
        return e;
    }
    FAIL("expected a lorakit::Error");
    throw 0;
}

void add_peft_pair(MemoryTensorFile& f, const std::string& module, std::int64_t r, std::int64_t in, std::int64_t out) {
    f.add_f32("base_model.model." + module + ".lora_A.weight", {r, in}, iota(static_cast<std::size_t>(r * in)));
    f.add_f32("base_model.model." + module + ".lora_B.weight", {out, r}, iota(static_cast<std::size_t>(out * r)));
}

}  // namespace

TEST_CASE("PEFT: alpha/r, rank_pattern and alpha_pattern with PEFT's first-match rule", "[conventions][peft]") {
    MemoryTensorFile f;
    add_peft_pair(f, "model.layers.0.self_attn.q_proj", 8, 16, 16);
    add_peft_pair(f, "model.layers.1.self_attn.q_proj", 4, 16, 16);
    add_peft_pair(f, "model.layers.0.mlp.down_proj", 8, 32, 16);
    const Adapter a = read(f, config(R"({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
        "rank_pattern": {"model.layers.1.self_attn.q_proj": 4},
        "alpha_pattern": {"down_proj": 32, "mlp.down_proj": 64},
        "target_modules": ["q_proj", "down_proj"], "base_model_name_or_path": "meta-llama/Llama-3.2-1B"})"));
    CHECK(a.convention == "peft");
    CHECK(a.warnings.empty());
    CHECK(module_named(a, "model.layers.0.self_attn.q_proj").scale() == 2.0);  // 16 / 8
    CHECK(module_named(a, "model.layers.1.self_attn.q_proj").scale() == 4.0);  // 16 / 4
    // The first key in JSON order that matches wins: "down_proj" (32), not "mlp.down_proj".
    CHECK(module_named(a, "model.layers.0.mlp.down_proj").alpha == 32.0);
    CHECK(module_named(a, "model.layers.0.mlp.down_proj").scale() == 4.0);
    CHECK(a.base_model.family == "Llama");
    CHECK(a.base_model.name == "meta-llama/Llama-3.2-1B");
}

TEST_CASE("PEFT: a pattern must match a whole dotted suffix of the module name", "[conventions][peft]") {
    MemoryTensorFile f;
    add_peft_pair(f, "model.layers.0.self_attn.q_proj", 4, 8, 8);
    add_peft_pair(f, "model.layers.0.self_attn.xq_proj", 4, 8, 8);
    const Adapter a = read(f, config(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
        "alpha_pattern": {"q_proj": 8, "^model.layers.0.self_attn.xq_proj": 12}})"));
    CHECK(module_named(a, "model.layers.0.self_attn.q_proj").alpha == 8.0);
    CHECK(module_named(a, "model.layers.0.self_attn.xq_proj").alpha == 12.0);  // "q_proj" is no dotted suffix of it
}

TEST_CASE("PEFT: a pathological pattern cannot hang the reader", "[conventions][peft]") {
    MemoryTensorFile f;
    add_peft_pair(f, "model.layers.0.self_attn.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa_proj", 2, 4, 4);
    // Exponential for a backtracking matcher; instant for a polynomial one.
    const Adapter a = read(f, config(R"({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
        "alpha_pattern": {"(a*)*b": 8}})"));
    CHECK(a.modules.at(0).alpha == 2.0);
    const Error e = error_of([&] {
        read(f, config(std::string(R"({"peft_type": "LORA", "rank_pattern": {")") + std::string(5000, 'x') + R"(": 2}})"));
    });
    CHECK_THAT(e.what(), Catch::Contains("longer than 4096 characters"));
}

TEST_CASE("PEFT: rsLoRA scales by alpha/sqrt(r)", "[conventions][peft]") {
    MemoryTensorFile f;
    add_peft_pair(f, "model.layers.0.self_attn.v_proj", 16, 8, 8);
    const Adapter a = read(f, config(R"({"peft_type": "LORA", "r": 16, "lora_alpha": 8, "use_rslora": true})"));
    const auto& m = a.modules.at(0);
    CHECK(m.scale_rule == ScaleRule::alpha_over_sqrt_rank);
    CHECK(m.scale() == Approx(2.0).epsilon(1e-15));
}

TEST_CASE("PEFT: config inconsistencies are warnings", "[conventions][peft]") {
    MemoryTensorFile f;
    add_peft_pair(f, "model.layers.0.self_attn.k_proj", 4, 8, 8);
    f.add_f32("base_model.model.lm_head.weight", {2, 8}, iota(16));
    const Adapter a = read(f, config(R"({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "use_dora": true,
        "target_modules": ["q_proj"]})"));
    REQUIRE(a.warnings.size() == 3);
    CHECK_THAT(a.warnings[0], Catch::Contains("has rank 4 but the config says r = 8"));
    CHECK_THAT(a.warnings[1], Catch::Contains("does not match the config's target_modules"));
    CHECK_THAT(a.warnings[2], Catch::Contains("no lora_magnitude_vector"));
    CHECK(a.other_tensors.size() == 1);  // lm_head.weight is carried (saved embedding layers)
}

TEST_CASE("PEFT: embedding LoRA, DoRA magnitude, LoRA bias and fan_in_fan_out", "[conventions][peft]") {
    MemoryTensorFile f;
    f.add_f32("base_model.model.model.embed_tokens.lora_embedding_A", {2, 10}, iota(20));
    f.add_f32("base_model.model.model.embed_tokens.lora_embedding_B", {4, 2}, iota(8));
    add_peft_pair(f, "transformer.h.0.attn.c_attn", 2, 4, 12);
    f.add_f32("base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector", {12}, iota(12));
    f.add_f32("base_model.model.transformer.h.0.attn.c_attn.lora_B.bias", {12}, iota(12));
    const Adapter a = read(f, config(R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true,
        "lora_bias": true, "fan_in_fan_out": true})"));
    const auto& e = module_named(a, "model.embed_tokens");
    CHECK(e.kind == ModuleKind::embedding);
    CHECK(e.in_features() == 10);  // A holds the vocabulary
    CHECK(e.out_features() == 4);
    CHECK_FALSE(e.fan_in_fan_out);
    const auto& c = module_named(a, "transformer.h.0.attn.c_attn");
    CHECK(c.fan_in_fan_out);
    CHECK(c.magnitude.has_value());
    CHECK(c.magnitude_axis == MagnitudeAxis::output_rows);
    CHECK(c.bias.has_value());
    // The embedding module has no magnitude although use_dora is set.
    REQUIRE(a.warnings.size() == 1);
    CHECK_THAT(a.warnings[0], Catch::Contains("model.embed_tokens"));
}

TEST_CASE("PEFT: every non-LoRA PEFT type is refused by name", "[conventions][peft]") {
    const auto& registry = formats::builtin_registry();
    for (const char* type : {"PREFIX_TUNING", "IA3", "VERA", "LOHA", "LOKR", "ADALORA", "BOFT", "PROMPT_TUNING"}) {
        const std::string text = std::string(R"({"peft_type": ")") + type + R"("})";
        const Error e = error_of([&] {
            for (const auto& driver : registry.conventions()) driver->precheck(config(text));
        });
        CHECK(e.code() == ErrorCode::unsupported);
        CHECK_THAT(e.what(), Catch::Contains(std::string("unsupported adapter type ") + type));
    }
}

TEST_CASE("PEFT: the real method-comparison configs parse or are refused by type", "[conventions][peft]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const auto dir = test::real_testdata_dir() / "peft-configs";
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
        const std::string name = entry.path().filename().string();
        INFO(name);
        const SidecarConfig c{entry.path(), test::read_file(entry.path())};
        const bool lora = name.rfind("lora_", 0) == 0;
        bool refused = false;
        try {
            for (const auto& driver : formats::builtin_registry().conventions()) driver->precheck(c);
        } catch (const Error& e) {
            refused = true;
            CHECK(e.code() == ErrorCode::unsupported);
        }
        CHECK(refused == !lora);
    }
}

TEST_CASE("PEFT: the rsLoRA method-comparison config gives alpha/sqrt(r)", "[conventions][peft]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const auto path = test::real_testdata_dir() / "peft-configs/lora_llama-3.2-3B-rank64-rslora.adapter_config.json";
    MemoryTensorFile f;
    add_peft_pair(f, "model.layers.0.self_attn.q_proj", 64, 8, 8);
    const Adapter a = read(f, SidecarConfig{path, test::read_file(path)});
    CHECK(a.modules.at(0).scale() == Approx(64.0 / 8.0));
}

TEST_CASE("kohya: alpha of any dtype, missing alpha, conv kernels, dora_scale axes", "[conventions][kohya]") {
    MemoryTensorFile f;
    f.add_f32("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", {4, 8, 1, 1}, iota(32));
    f.add_f32("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", {8, 4, 1, 1}, iota(32));
    const std::int64_t alpha_i64 = 2;
    std::vector<std::byte> bytes(8);
    std::memcpy(bytes.data(), &alpha_i64, 8);
    f.add("lora_unet_down_blocks_0_attentions_0_proj_in.alpha", Tensor::own(DType::I64, {}, bytes));
    f.add_f32("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight", {2, 3, 3, 3}, iota(54));
    f.add_f32("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight", {5, 2, 1, 1}, iota(10));
    f.add_f32("lora_te_text_model_encoder_layers_0_self_attn_out_proj.lora_down.weight", {2, 6}, iota(12));
    f.add_f32("lora_te_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight", {6, 2}, iota(12));
    f.add_f32("lora_te_text_model_encoder_layers_0_self_attn_out_proj.alpha", {1}, {1.0f});
    f.add_f32("lora_te_text_model_encoder_layers_0_self_attn_out_proj.dora_scale", {6, 1}, iota(6));
    const Adapter a = read(f);
    CHECK(a.convention == "kohya");
    const auto& proj = module_named(a, "unet.down_blocks.0.attentions.0.proj_in");
    CHECK(proj.kind == ModuleKind::conv);
    CHECK(proj.scale() == 0.5);  // I64 alpha 2 / rank 4
    const auto& conv = module_named(a, "unet.down_blocks.0.resnets.0.conv1");
    CHECK(conv.kernel_size() == Shape{3, 3});
    CHECK(conv.flat_in_features() == 27);
    CHECK_FALSE(conv.alpha.has_value());
    CHECK(conv.scale() == 1.0);  // no alpha: alpha = rank
    const auto& te = module_named(a, "text_encoder.text_model.encoder.layers.0.self_attn.out_proj");
    CHECK(te.scale() == 0.5);  // alpha [1] accepted as a scalar
    CHECK(te.magnitude_axis == MagnitudeAxis::output_rows);
    CHECK(a.notes.size() == 1);  // the module without alpha
}

TEST_CASE("kohya: metadata that disagrees with the tensors is a warning", "[conventions][kohya]") {
    MemoryTensorFile f;
    f.add_f32("lora_unet_mid_block_attentions_0_proj_out.lora_down.weight", {4, 8}, iota(32));
    f.add_f32("lora_unet_mid_block_attentions_0_proj_out.lora_up.weight", {8, 4}, iota(32));
    f.add_f32("lora_unet_mid_block_attentions_0_proj_out.alpha", {}, {4.0f});
    f.add_f32("lora_unet_stray_tensor", {2}, {1, 2});
    f.mutable_metadata() = {{"ss_network_dim", "32"}, {"ss_network_alpha", "16.0"}, {"ss_base_model_version", "sd_v1"}};
    const Adapter a = read(f);
    CHECK(a.base_model.family == "SD1.5");
    CHECK(a.base_model.evidence == "metadata ss_base_model_version");
    REQUIRE(a.warnings.size() == 3);
    CHECK_THAT(a.warnings[0], Catch::Contains("lora_unet_stray_tensor"));
    CHECK_THAT(a.warnings[1], Catch::Contains("ss_network_dim is 32"));
    CHECK_THAT(a.warnings[2], Catch::Contains("ss_network_alpha is 16"));
}

TEST_CASE("kohya: LyCORIS modules are recognised by algorithm", "[conventions][kohya][lycoris]") {
    MemoryTensorFile f;
    for (const char* role : {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
        f.add_zeros(std::string("lora_unet_mid_block_attentions_0_proj_out.") + role, DType::F16, {4, 4});
    f.add_f32("lora_unet_mid_block_attentions_0_proj_out.alpha", {}, {2.0f});
    f.add_zeros("lora_unet_mid_block_attentions_0_proj_in.lokr_w1", DType::F16, {2, 2});
    f.add_zeros("lora_unet_mid_block_attentions_0_proj_in.lokr_w2", DType::F16, {4, 4});
    f.add_zeros("lora_unet_time_embedding_linear_1.diff", DType::F16, {8, 8});
    f.add_zeros("lora_unet_conv_in.lora_down.weight", DType::F16, {2, 4, 1, 1});
    f.add_zeros("lora_unet_conv_in.lora_up.weight", DType::F16, {4, 2, 1, 1});
    f.add_zeros("lora_unet_conv_in.lora_mid.weight", DType::F16, {2, 2, 3, 3});
    const Adapter a = read(f);
    CHECK(a.convention == "lycoris");
    REQUIRE(a.lycoris_modules.size() == 4);
    std::map<std::string, std::string> algorithms;
    for (const auto& m : a.lycoris_modules) algorithms[m.name] = m.algorithm;
    CHECK(algorithms["unet.mid_block.attentions.0.proj_out"] == "loha");
    CHECK(algorithms["unet.mid_block.attentions.0.proj_in"] == "lokr");
    CHECK(algorithms["unet.time_embedding.linear_1"] == "full");
    CHECK(algorithms["unet.conv_in"] == "locon-tucker");
    CHECK_THAT(a.convention_detail, Catch::Contains("loha") && Catch::Contains("lokr"));
}

TEST_CASE("structural errors name the module", "[conventions][errors]") {
    SECTION("A without B") {
        MemoryTensorFile f;
        f.add_f32("lora_unet_x_to_q.lora_down.weight", {2, 4}, iota(8));
        const Error e = error_of([&] { read(f); });
        CHECK(e.code() == ErrorCode::bad_input);
        CHECK_THAT(e.what(), Catch::Contains("module 'unet.x.to_q'") && Catch::Contains("no B (up) factor"));
    }
    SECTION("B without A") {
        MemoryTensorFile f;
        f.add_f32("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", {4, 2}, iota(8));
        const Error e = error_of([&] { read(f); });
        CHECK_THAT(e.what(), Catch::Contains("model.layers.0.self_attn.q_proj") && Catch::Contains("no A (down) factor"));
    }
    SECTION("rank of A differs from rank of B") {
        MemoryTensorFile f;
        f.add_f32("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", {4, 4}, iota(16));
        f.add_f32("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", {4, 2}, iota(8));
        const Error e = error_of([&] { read(f); });
        CHECK_THAT(e.what(), Catch::Contains("mlp.fc1") && Catch::Contains("rank of A (4"));
    }
    SECTION("alpha that is not a scalar") {
        MemoryTensorFile f;
        f.add_f32("lora_unet_a.lora_down.weight", {2, 4}, iota(8));
        f.add_f32("lora_unet_a.lora_up.weight", {4, 2}, iota(8));
        f.add_f32("lora_unet_a.alpha", {2}, {1, 2});
        const Error e = error_of([&] { read(f); });
        CHECK_THAT(e.what(), Catch::Contains("alpha 'lora_unet_a.alpha' is not a scalar"));
    }
    SECTION("alpha without factors") {
        MemoryTensorFile f;
        f.add_f32("lora_unet_a.lora_down.weight", {2, 4}, iota(8));
        f.add_f32("lora_unet_a.lora_up.weight", {4, 2}, iota(8));
        f.add_f32("lora_unet_b.alpha", {}, {1});
        const Error e = error_of([&] { read(f); });
        CHECK_THAT(e.what(), Catch::Contains("module 'unet.b'") && Catch::Contains("has an alpha"));
    }
    SECTION("integer factors") {
        MemoryTensorFile f;
        f.add("lora_unet_a.lora_down.weight", Tensor::zeros(DType::I32, {2, 4}));
        f.add_f32("lora_unet_a.lora_up.weight", {4, 2}, iota(8));
        const Error e = error_of([&] { read(f); });
        CHECK_THAT(e.what(), Catch::Contains("floating point"));
    }
    SECTION("an unsupported dtype in a factor") {
        MemoryTensorFile f;
        f.add_unsupported("lora_unet_a.lora_down.weight", "F8_E8M0", {2, 4});
        f.add_f32("lora_unet_a.lora_up.weight", {4, 2}, iota(8));
        const Error e = error_of([&] { read(f); });
        CHECK(e.code() == ErrorCode::unsupported);
        CHECK_THAT(e.what(), Catch::Contains("unsupported dtype F8_E8M0"));
    }
    SECTION("two tensors for one role") {
        MemoryTensorFile f;
        f.add_f32("unet.a.lora_A.weight", {2, 4}, iota(8));
        f.add_f32("unet.a.lora_A.default.weight", {2, 4}, iota(8));
        f.add_f32("unet.a.lora_B.weight", {4, 2}, iota(8));
        const Error e = error_of([&] { read(f); });
        CHECK_THAT(e.what(), Catch::Contains("two tensors give its A (down) factor"));
    }
    SECTION("no known layout: names the conventions and shows keys") {
        MemoryTensorFile f;
        f.add_f32("w_a_000", {2, 4}, iota(8));
        f.add_f32("w_b_000", {4, 2}, iota(8));
        const Error e = error_of([&] { read(f); });
        CHECK(e.code() == ErrorCode::bad_input);
        CHECK_THAT(e.what(), Catch::Contains("tried gguf, peft, mlx, cloneofsimo, kohya, diffusers") &&
                                 Catch::Contains("'w_a_000'"));
    }
    SECTION("a file with no tensors") {
        MemoryTensorFile f;
        const Error e = error_of([&] { read(f); });
        CHECK_THAT(e.what(), Catch::Contains("holds no tensors"));
    }
}

TEST_CASE("mlx-lm: factors are transposed to A [r, in] and B [out, r] exactly", "[conventions][mlx]") {
    MemoryTensorFile f;
    f.add_f32("model.layers.0.self_attn.q_proj.lora_a", {3, 2}, {1, 2, 3, 4, 5, 6});  // [in=3, r=2]
    f.add_f32("model.layers.0.self_attn.q_proj.lora_b", {2, 4}, iota(8));             // [r=2, out=4]
    const Adapter a = read(f, config(R"({"fine_tune_type": "lora", "num_layers": 1,
        "lora_parameters": {"rank": 2, "scale": 10.0, "dropout": 0.0}, "model": "Qwen/Qwen2.5-0.5B"})"));
    const auto& m = a.modules.at(0);
    CHECK(m.down.shape() == Shape{2, 3});
    CHECK(m.up.shape() == Shape{4, 2});
    CHECK(m.down.to_f32() == std::vector<float>{1, 3, 5, 2, 4, 6});
    CHECK(m.up.to_f32() == std::vector<float>{1, 5, 2, 6, 3, 7, 4, 8});
    CHECK(m.scale() == 10.0);
    CHECK_FALSE(m.alpha.has_value());
    CHECK(a.base_model.family == "Qwen");
}

TEST_CASE("mlx-lm: the meaning of alpha follows the writing version", "[conventions][mlx]") {
    MemoryTensorFile f;
    f.add_f32("model.layers.0.self_attn.v_proj.lora_a", {4, 8}, iota(32));
    f.add_f32("model.layers.0.self_attn.v_proj.lora_b", {8, 4}, iota(32));
    // 2024-04..05 (lora_layers, no use_dora): scale * alpha / rank.
    CHECK(read(f, config(R"({"lora_layers": 4, "lora_parameters": {"rank": 8, "alpha": 16, "scale": 10.0}})"))
              .modules.at(0)
              .scale() == 20.0);
    // 2024-05..09 (use_dora present): ambiguous, scale alone, with a note.
    const Adapter mid = read(f, config(R"({"lora_layers": 2, "use_dora": false,
        "lora_parameters": {"rank": 8, "alpha": 16, "scale": 2.0}})"));
    CHECK(mid.modules.at(0).scale() == 2.0);
    CHECK(mid.notes.size() == 1);
    // Current schema: scale alone.
    CHECK(read(f, config(R"({"fine_tune_type": "lora", "lora_parameters": {"rank": 8, "alpha": 16, "scale": 10.0}})"))
              .modules.at(0)
              .scale() == 10.0);
    // No config: mlx-lm's default scale, flagged.
    const Adapter bare = read(f);
    CHECK(bare.modules.at(0).scale() == 20.0);
    CHECK(bare.warnings.size() == 1);
}

TEST_CASE("mlx-lm: full fine-tune configs are refused", "[conventions][mlx]") {
    const Error e = error_of([&] {
        for (const auto& driver : formats::builtin_registry().conventions())
            driver->precheck(config(R"({"fine_tune_type": "full", "lora_parameters": {}})"));
    });
    CHECK(e.code() == ErrorCode::unsupported);
}

TEST_CASE("diffusers: component prefixes, legacy processor keys and lora_adapter_metadata", "[conventions][diffusers]") {
    SECTION("current layout with adapter metadata") {
        MemoryTensorFile f;
        f.add_f32("unet.mid_block.attentions.0.proj_in.lora_A.weight", {2, 4}, iota(8));
        f.add_f32("unet.mid_block.attentions.0.proj_in.lora_B.weight", {4, 2}, iota(8));
        f.add_f32("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", {4, 4}, iota(16));
        f.add_f32("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight", {4, 4}, iota(16));
        f.mutable_metadata() = {{"format", "pt"},
                                {"lora_adapter_metadata", R"({"unet.r": 2, "unet.lora_alpha": 8, "unet.alpha_pattern": {},
                                   "text_encoder.r": 4, "text_encoder.lora_alpha": 4})"}};
        const Adapter a = read(f);
        CHECK(a.convention == "diffusers");
        CHECK(module_named(a, "unet.mid_block.attentions.0.proj_in").scale() == 4.0);
        CHECK(module_named(a, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj").scale() == 1.0);
    }
    SECTION("no alpha anywhere: scale 1") {
        MemoryTensorFile f;
        f.add_f32("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", {2, 4}, iota(8));
        f.add_f32("transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight", {4, 2}, iota(8));
        const Adapter a = read(f);
        CHECK(a.modules.at(0).scale() == 1.0);
        CHECK(a.base_model.family == "Flux");
    }
    SECTION("attention-processor layout without a prefix") {
        MemoryTensorFile f;
        const std::string block = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.";
        f.add_f32(block + "to_out_lora.down.weight", {2, 4}, iota(8));
        f.add_f32(block + "to_out_lora.up.weight", {4, 2}, iota(8));
        f.add_f32(block + "to_k_lora.down.weight", {2, 768}, iota(1536));
        f.add_f32(block + "to_k_lora.up.weight", {4, 2}, iota(8));
        const Adapter a = read(f);
        CHECK(a.convention == "diffusers");
        CHECK_THAT(a.convention_detail, Catch::Contains("attention-processor"));
        CHECK(module_named(a, "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0").rank() == 2);
        CHECK(a.base_model.family == "SD1.5");
    }
    SECTION("old text-encoder keys map to q_proj") {
        MemoryTensorFile f;
        f.add_f32("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight", {2, 4}, iota(8));
        f.add_f32("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight", {4, 2}, iota(8));
        f.add_f32("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight", {2, 4}, iota(8));
        f.add_f32("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight", {4, 2}, iota(8));
        const Adapter a = read(f);
        CHECK(module_named(a, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj").rank() == 2);
        CHECK(module_named(a, "text_encoder.text_model.encoder.layers.0.mlp.fc1").rank() == 2);
    }
}

TEST_CASE("cloneofsimo: numbered modules, ranks in metadata, token embeddings", "[conventions][cloneofsimo]") {
    MemoryTensorFile f;
    f.add_f32("unet:0:down", {2, 4}, iota(8));
    f.add_f32("unet:0:up", {4, 2}, iota(8));
    f.add_f32("text_encoder:0:down", {1, 768}, iota(768));
    f.add_f32("text_encoder:0:up", {768, 1}, iota(768));
    f.add_f32("<s1>", {768}, iota(768));
    f.mutable_metadata() = {{"<s1>", "<embed>"}, {"unet:0:rank", "4"}, {"text_encoder:0:rank", "1"}};
    const Adapter a = read(f);
    CHECK(a.convention == "cloneofsimo");
    CHECK(a.modules.size() == 2);
    CHECK(a.other_tensors.size() == 1);
    REQUIRE(a.warnings.size() == 1);
    CHECK_THAT(a.warnings[0], Catch::Contains("'unet:0' has rank 2 but the metadata says 4"));
    CHECK(a.base_model.family == "SD1.5");
}

TEST_CASE("unflattening kohya names", "[conventions][names]") {
    const auto& registry = formats::builtin_registry();
    (void)registry;
    struct Case {
        const char* key;
        const char* canonical;
    };
    const Case cases[] = {
        {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
         "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"},
        {"lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj",
         "unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj"},
        {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
         "unet.input_blocks.4.1.transformer_blocks.0.attn2.to_k"},
        {"lora_unet_input_blocks_1_0_emb_layers_1", "unet.input_blocks.1.0.emb_layers.1"},
        {"lora_unet_output_blocks_2_2_conv", "unet.output_blocks.2.2.conv"},
        {"lora_te2_text_model_encoder_layers_31_mlp_fc2", "text_encoder_2.text_model.encoder.layers.31.mlp.fc2"},
        {"lora_unet_double_blocks_3_img_attn_qkv", "transformer.double_blocks.3.img_attn.qkv"},
        {"lora_unet_final_layer_adaLN_modulation_1", "transformer.final_layer.adaLN_modulation.1"},
        {"lora_unet_time_in_in_layer", "transformer.time_in.in_layer"},
        {"lora_transformer_transformer_blocks_7_attn_to_add_out", "transformer.transformer_blocks.7.attn.to_add_out"},
        {"lora_transformer_single_transformer_blocks_0_norm_linear",
         "transformer.single_transformer_blocks.0.norm.linear"},
    };
    for (const auto& c : cases) {
        INFO(c.key);
        MemoryTensorFile f;
        f.add_f32(std::string(c.key) + ".lora_down.weight", {1, 2}, {1, 2});
        f.add_f32(std::string(c.key) + ".lora_up.weight", {2, 1}, {1, 2});
        const Adapter a = read(f);
        CHECK(a.modules.at(0).name == c.canonical);
        CHECK(a.modules.at(0).source_name == c.key);
    }
}

TEST_CASE("kohya flattened names unflatten to dotted paths, compound identifiers kept whole", "[conventions]") {
    using lorakit::formats::unflatten_module_path;
    const std::pair<const char*, const char*> cases[] = {
        {"down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q", "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"},
        {"text_model_encoder_layers_11_self_attn_out_proj", "text_model.encoder.layers.11.self_attn.out_proj"},
        {"double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv"},
        {"single_transformer_blocks_3_proj_mlp", "single_transformer_blocks.3.proj_mlp"},  // three tokens
        {"blocks_2_adaln_modulation_cross_attn_1", "blocks.2.adaln_modulation_cross_attn.1"},  // four tokens
        {"model_layers_0_mlp_gate_up_proj", "model.layers.0.mlp.gate_up_proj"},
        {"input_blocks_4_1_proj_in", "input_blocks.4.1.proj_in"},
        {"to__q", "to_q"},              // a doubled underscore is one separator
        {"_a__b___c_", "a.b.c"},        // leading, trailing and repeated underscores
        {"x", "x"},
        {"", ""},
    };
    for (const auto& [flat, dotted] : cases) {
        INFO(flat);
        CHECK(unflatten_module_path(flat) == dotted);
    }
}
