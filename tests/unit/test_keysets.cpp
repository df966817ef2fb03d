// Convention detection and key mapping on files shaped exactly like real ones: every key and
// shape of the manifests in ../shared/testdata/real/keysets (Flux kohya / diffusers /
// OneTrainer DoRA / ai-toolkit / XLabs / BFL control, Anima, Krea-2, Qwen-Image, LyCORIS),
// with zero-valued tensors.
#include <catch2/catch.hpp>

#include <set>

#include <nlohmann/json.hpp>

#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "memory_tensor_file.h"
#include "support.h"

namespace fs = std::filesystem;
using namespace lorakit;
using Json = nlohmann::json;

namespace {

// The manifest as an in-memory file: scalars (alphas) as F32, everything else as F16.
std::unique_ptr<test::MemoryTensorFile> keyset_file(const std::string& name) {
    const fs::path path = test::real_testdata_dir() / "keysets" / (name + ".json");
    const Json manifest = Json::parse(test::read_file(path));
    auto file = std::make_unique<test::MemoryTensorFile>(name);
    for (const auto& [key, shape_json] : manifest["tensors"].items()) {
        Shape shape = shape_json.get<Shape>();
        file->add_zeros(key, shape.empty() ? DType::F32 : DType::F16, shape);
    }
    return file;
}

Adapter read_keyset(const std::string& name) {
    auto file = keyset_file(name);
    return formats::builtin_registry().read_adapter(name, *file, std::nullopt);
}

struct Expected {
    const char* keyset;
    const char* convention;
    std::size_t modules;
    std::size_t lycoris_modules;
    const char* family;
    const char* first_module;  // canonical name of the first module in natural order, or ""
};

}  // namespace

TEST_CASE("every LoRA key manifest is detected and mapped", "[conventions][keysets]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    // Module counts are the number of distinct key stems in each manifest.
    const Expected cases[] = {
        {"flux_lora_kohya", "kohya", 304, 0, "Flux", "transformer.double_blocks.0.img_attn.proj"},
        {"flux_lora_kohya_with_te1", "kohya", 376, 0, "Flux", "text_encoder.text_model.encoder.layers.0.mlp.fc1"},
        {"flux_dora_onetrainer", "kohya", 506, 0, "Flux", "text_encoder.text_model.encoder.layers.0.mlp.fc1"},
        {"flux_lora_aitoolkit", "diffusers", 228, 0, "Flux", "transformer.double_blocks.0.img_attn.proj"},
        {"flux_lora_diffusers", "diffusers", 494, 0, "Flux", "transformer.single_transformer_blocks.0.attn.to_k"},
        {"flux_lora_diffusers_base_model", "peft", 381, 0, "Flux", "transformer.proj_out"},
        {"flux_lora_diffusers_no_proj_mlp", "diffusers", 342, 0, "Flux", ""},
        {"flux_lora_xlabs", "diffusers", 12, 0, "Flux", "transformer.double_blocks.0.img_attn.proj"},
        {"flux_control_lora", "diffusers", 314, 0, "Flux", "transformer.double_blocks.0.img_attn.proj"},
        {"flux_lokr_bfl", "lycoris", 0, 6, "Flux", ""},
        {"anima_lora_kohya", "kohya", 11, 0, "unknown", "transformer.blocks.0.adaln_modulation_cross_attn.1"},
        {"anima_lora_kohya_with_te", "kohya", 9, 0, "unknown", ""},
        {"anima_lora_peft", "diffusers", 6, 0, "unknown", "transformer.blocks.0.cross_attn.k_proj"},
        {"anima_lora_lokr", "lycoris", 0, 3, "unknown", ""},
        {"krea2_lora_kohya", "kohya", 40, 0, "unknown", ""},
        {"qwen_image_lora_diffusers", "kohya", 3, 0, "unknown", "transformer.transformer_blocks.0.attn.to_k"},
        {"qwen_image_lora_kohya", "lycoris", 0, 8, "unknown", ""},
    };
    for (const auto& c : cases) {
        INFO("keyset " << c.keyset);
        const Adapter a = read_keyset(c.keyset);
        CHECK(a.convention == c.convention);
        CHECK(a.modules.size() == c.modules);
        CHECK(a.lycoris_modules.size() == c.lycoris_modules);
        CHECK(a.base_model.family == c.family);
        if (*c.first_module) {
            REQUIRE_FALSE(a.modules.empty());
            CHECK(a.modules.front().name == c.first_module);
        }
    }
}

TEST_CASE("kohya Flux names map to BFL module paths and components", "[conventions][keysets]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const Adapter a = read_keyset("flux_lora_kohya");
    std::set<std::string> names;
    for (const auto& m : a.modules) names.insert(m.name);
    for (const char* expected : {"transformer.double_blocks.0.img_attn.qkv", "transformer.double_blocks.0.img_mlp.0",
                                 "transformer.double_blocks.18.txt_mod.lin", "transformer.single_blocks.0.linear1",
                                 "transformer.single_blocks.37.modulation.lin"})
        CHECK(names.count(expected));
    for (const auto& m : a.modules) {
        CHECK(m.alpha.has_value());  // every module of this file has an .alpha
        CHECK(m.kind == ModuleKind::linear);
    }
}

TEST_CASE("OneTrainer Flux DoRA: T5 is text_encoder_2, dora_scale [1, in] normalises input columns",
          "[conventions][keysets]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const Adapter a = read_keyset("flux_dora_onetrainer");
    bool saw_t5 = false;
    for (const auto& m : a.modules) {
        REQUIRE(m.magnitude.has_value());
        CHECK(m.magnitude_axis == MagnitudeAxis::input_columns);
        if (m.name == "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0") saw_t5 = true;
    }
    CHECK(saw_t5);
    CHECK_THAT(a.convention_detail, Catch::Contains("DoRA"));
}

TEST_CASE("BFL control LoRA keeps lora_B.bias and carries norm scales", "[conventions][keysets]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const Adapter a = read_keyset("flux_control_lora");
    for (const auto& m : a.modules) CHECK(m.bias.has_value());
    CHECK(a.other_tensors.size() == 152);
    CHECK(a.warnings.empty());
}

TEST_CASE("non-LoRA key manifests are refused with the conventions tried", "[conventions][keysets]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    for (const char* name : {"controlnet_flux_instantx_union", "controlnet_flux_xlabs_canny_v2", "ipadapter_flux_xlabs",
                             "ipadapter_flux_xlabs_v2", "model_anima_transformer", "model_flux2_klein_transformer_bfl",
                             "model_flux2_vae_bfl", "model_qwen25_vl_encoder_comfyui",
                             "model_z_image_transformer_comfyui"}) {
        INFO("keyset " << name);
        try {
            read_keyset(name);
            FAIL("expected an error");
        } catch (const Error& e) {
            CHECK(e.code() == ErrorCode::bad_input);
            CHECK_THAT(e.what(), Catch::Contains("not a LoRA adapter in any known layout"));
            CHECK_THAT(e.what(), Catch::Contains("peft, mlx, cloneofsimo, kohya, diffusers"));
        }
    }
}
