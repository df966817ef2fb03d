// The safetensors container: real third-party files, round trips through the writer, the
// reference writer's exact bytes, the data-section hash; SHA-256 itself.
#include <catch2/catch.hpp>

#include <cstring>
#include <map>

#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/formats/safetensors.h"
#include "lorakit/sha256.h"
#include "support.h"

namespace fs = std::filesystem;
using namespace lorakit;

namespace {

std::string as_string(const std::vector<std::byte>& bytes) {
    return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

std::unique_ptr<TensorFile> parse(const std::vector<std::byte>& bytes) {
    return formats::read_safetensors(MappedFile::from_bytes("memory", bytes));
}

std::string hex_of(std::string_view text) {
    return sha256_hex(std::as_bytes(std::span(text.data(), text.size())));
}

}  // namespace

TEST_CASE("SHA-256 matches the FIPS 180-4 examples", "[sha256]") {
    CHECK(hex_of("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    CHECK(hex_of("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    CHECK(hex_of("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
          "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    Sha256 million;
    const std::string chunk(1000, 'a');
    for (int i = 0; i < 1000; ++i) million.update(std::as_bytes(std::span(chunk.data(), chunk.size())));
    std::string hex;
    for (auto b : million.finish()) hex += fmt::format("{:02x}", b);
    CHECK(hex == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_CASE("every real safetensors file parses, with the header's tensor counts", "[safetensors][real]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const fs::path root = test::real_testdata_dir();
    // Tensor counts and one tensor each, read from the headers with a separate script.
    struct Expected {
        const char* file;
        std::size_t tensors;
        const char* tensor;
        const char* dtype;
        Shape shape;
    };
    const Expected cases[] = {
        {"cloneofsimo-lora/analog_svd_rank4.safetensors", 384, "text_encoder:0:down", "F16", {4, 768}},
        {"cloneofsimo-lora/lora_disney.safetensors", 386, "<s1>", "F32", {768}},
        {"diffusers-sd15-catundchat/pytorch_lora_weights.safetensors", 256,
         "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight", "F32", {4, 768}},
        {"peft-gpt2-fmi-chatbot/model.safetensors", 24, "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight", "F32", {2304, 8}},
        {"peft-gptneo125m-movies/adapter_model.safetensors", 48,
         "base_model.model.transformer.h.0.attn.attention.q_proj.lora_A.weight", "F32", {8, 768}},
        {"peft-gptoss20b-hackindia/adapter_model.safetensors", 96,
         "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight", "F32", {512, 4}},
        {"peft-qwen25-3b-law-llm/adapter_model.safetensors", 144,
         "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight", "F32", {256, 4}},
        {"mlx-cli-wyek1n/adapters/adapters.safetensors", 16, "model.layers.20.self_attn.v_proj.lora_b", "F32", {8, 128}},
        {"mlx-examples/adapters/adapters.safetensors", 16, "model.layers.36.self_attn.q_proj.lora_a", "F32", {2304, 8}},
        {"mlx-lm/test_dpo_adapters/adapters.safetensors", 8, "model.layers.22.self_attn.q_proj.lora_a", "F32", {896, 8}},
        {"ollama/discollama/adapters.safetensors", 8, "model.layers.30.self_attn.v_proj.lora_b", "F32", {8, 1024}},
        {"sam-lora-custom/lora_rank2.safetensors", 48, "w_b_023", "F32", {768, 2}},
        {"safetensors-samples/overall.safetensors", 9, "d", "F64", {6}},
    };
    for (const auto& c : cases) {
        INFO(c.file);
        const auto file = formats::builtin_registry().open_tensor_file(root / c.file);
        CHECK(file->format_name() == "safetensors");
        CHECK(file->entries().size() == c.tensors);
        const TensorEntry* entry = file->find(c.tensor);
        REQUIRE(entry);
        CHECK(entry->dtype_name == c.dtype);
        CHECK(entry->shape == c.shape);
    }
}

TEST_CASE("the reference samples decode to their values", "[safetensors][real]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    // safetensors-samples/overall.safetensors holds arange(-3, 3) in nine dtypes (unsigned ones
    // wrapped), metadata {"test": "a"}: decoded with Python's struct module while writing this.
    const auto file = formats::builtin_registry().open_tensor_file(test::real_testdata_dir() /
                                                                   "safetensors-samples/overall.safetensors");
    CHECK(file->metadata().at("test") == "a");
    const std::map<std::string, std::vector<double>> expected = {
        {"B", {253, 254, 255, 0, 1, 2}},
        {"H", {65533, 65534, 65535, 0, 1, 2}},
        {"I", {4294967293.0, 4294967294.0, 4294967295.0, 0, 1, 2}},
        {"b", {-3, -2, -1, 0, 1, 2}},
        {"d", {-3, -2, -1, 0, 1, 2}},
        {"e", {-3, -2, -1, 0, 1, 2}},
        {"f", {-3, -2, -1, 0, 1, 2}},
        {"h", {-3, -2, -1, 0, 1, 2}},
        {"i", {-3, -2, -1, 0, 1, 2}},
    };
    for (const auto& [name, values] : expected) {
        INFO(name);
        const Tensor& t = file->tensor(name);
        std::vector<double> got(6);
        convert_to_f64(t.dtype(), t.bytes().data(), got.data(), 6);
        CHECK(got == values);
    }
}

TEST_CASE("write then read gives back every tensor and the metadata", "[safetensors]") {
    std::vector<Tensor> keep;
    std::vector<formats::TensorToWrite> tensors;
    std::vector<std::string> names;
    int i = 0;
    for (DType type : all_dtypes) {
        std::vector<float> values = {0, 1, 2, 3, 4, 5};
        keep.push_back(Tensor::from_f32(type, {2, 3}, values));
        names.push_back(fmt::format("t{:02}.{}", i++, dtype_name(type)));
    }
    keep.push_back(Tensor::from_f32(DType::F32, {}, std::vector<float>{3.5f}));
    names.push_back("scalar");
    keep.push_back(Tensor::zeros(DType::BF16, {0, 7}));
    names.push_back("empty");
    keep.push_back(Tensor::from_f32(DType::F16, {1}, std::vector<float>{1}));
    names.push_back("quote\" back\\slash\nnew line \x01 and unicode \xc3\xa9\xe2\x82\xac");
    for (std::size_t k = 0; k < keep.size(); ++k) tensors.push_back({names[k], keep[k].view()});
    const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"ss_note", "a \"quoted\"\nvalue"}};
    const auto bytes = formats::serialize_safetensors(tensors, metadata);
    std::uint64_t n = 0;
    std::memcpy(&n, bytes.data(), 8);
    CHECK(n % 8 == 0);
    CHECK(formats::serialize_safetensors(tensors, metadata) == bytes);  // deterministic
    const auto file = parse(bytes);
    CHECK(file->metadata() == metadata);
    REQUIRE(file->entries().size() == keep.size());
    for (std::size_t k = 0; k < keep.size(); ++k) {
        INFO(names[k]);
        const Tensor& t = file->tensor(names[k]);
        CHECK(t.dtype() == keep[k].dtype());
        CHECK(t.shape() == keep[k].shape());
        REQUIRE(t.bytes().size() == keep[k].bytes().size());
        if (!t.bytes().empty()) CHECK(std::memcmp(t.bytes().data(), keep[k].bytes().data(), t.bytes().size()) == 0);
    }
}

TEST_CASE("the writer lays files out exactly as the reference writer", "[safetensors]") {
    // formats.md §1.2: empty file = "{}" padded to 8; metadata first; tensors sorted by dtype
    // (widest first) then name; compact JSON; fields dtype, shape, data_offsets.
    CHECK(as_string(formats::serialize_safetensors({}, {})) == std::string("\x08\0\0\0\0\0\0\0{}      ", 16));
    CHECK(as_string(formats::serialize_safetensors({}, {{"framework", "pt"}})) ==
          std::string("\x28\0\0\0\0\0\0\0", 8) + "{\"__metadata__\":{\"framework\":\"pt\"}}     ");
    const auto f16 = Tensor::zeros(DType::F16, {2});
    const auto f32 = Tensor::zeros(DType::F32, {1, 2});
    const auto i64 = Tensor::zeros(DType::I64, {});
    const auto bytes = formats::serialize_safetensors(
        {{"z_f16", f16.view()}, {"b_f32", f32.view()}, {"a_f16", f16.view()}, {"alpha", i64.view()}}, {{"format", "pt"}});
    std::uint64_t n = 0;
    std::memcpy(&n, bytes.data(), 8);
    const std::string header = as_string(bytes).substr(8, n);
    const std::string json =
        R"({"__metadata__":{"format":"pt"},"alpha":{"dtype":"I64","shape":[],"data_offsets":[0,8]},)"
        R"("b_f32":{"dtype":"F32","shape":[1,2],"data_offsets":[8,16]},)"
        R"("a_f16":{"dtype":"F16","shape":[2],"data_offsets":[16,20]},)"
        R"("z_f16":{"dtype":"F16","shape":[2],"data_offsets":[20,24]}})";
    CHECK(n == (json.size() + 7) / 8 * 8);
    CHECK(header == json + std::string(n - json.size(), ' '));
    CHECK(bytes.size() == 8 + n + 24);
    // Duplicate names are a bug in the caller.
    CHECK_THROWS_AS(formats::serialize_safetensors({{"x", f16.view()}, {"x", f32.view()}}, {}), Error);
}

TEST_CASE("the data-section hash is kohya's sshs_model_hash", "[safetensors]") {
    const auto t = Tensor::from_f32(DType::F32, {2}, std::vector<float>{1, 2});
    const auto with_meta = formats::serialize_safetensors({{"x", t.view()}}, {{"ss_a", "1"}});
    const auto without = formats::serialize_safetensors({{"x", t.view()}}, {});
    // Only the data counts, so metadata does not change it.
    CHECK(formats::safetensors_data_sha256(with_meta) == formats::safetensors_data_sha256(without));
    CHECK(formats::safetensors_data_sha256(with_meta) == sha256_hex(t.bytes()));
}

TEST_CASE("write_safetensors refuses to replace a file unless asked", "[safetensors]") {
    test::ScratchDir dir;
    const auto t = Tensor::zeros(DType::F32, {3});
    formats::write_safetensors(dir / "a.safetensors", {{"t", t.view()}}, {}, false);
    try {
        formats::write_safetensors(dir / "a.safetensors", {{"t", t.view()}}, {}, false);
        FAIL("expected a refusal");
    } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::usage);
        CHECK_THAT(e.what(), Catch::Contains("exists (use --force"));
    }
    formats::write_safetensors(dir / "a.safetensors", {{"u", t.view()}}, {}, true);
    CHECK(formats::builtin_registry().open_tensor_file(dir / "a.safetensors")->find("u"));
    CHECK(dir.list() == std::vector<std::string>{"a.safetensors"});
}
