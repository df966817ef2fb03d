// The safetensors container: real third-party files, round trips through the writer, the
// reference writer's exact bytes, the data-section hash, identify(). SHA-256 itself is tested
// in test_sha256.cpp, broken files in test_safetensors_malformed.cpp.
#include <catch2/catch.hpp>

#include <cstring>
#include <map>
#include <set>

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

}  // namespace

TEST_CASE("every real safetensors file parses, as its header describes it", "[safetensors][real]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const fs::path root = test::real_testdata_dir();
    // Read from the headers with a separate Python script (json + struct) while writing this:
    // tensor and metadata counts, the first and last tensor in header order, the last one's
    // dtype and shape. MLX files hold "__metadata__": null; the SAM file has none at all.
    struct Expected {
        std::size_t tensors;
        std::size_t metadata;
        const char* first;
        const char* last;
        const char* dtype;
        Shape shape;
    };
    const std::map<std::string, Expected> expected = {
        {"cloneofsimo-lora/analog_svd_rank4.safetensors", {384, 194, "text_encoder:0:down", "unet:9:up", "F16", {320, 4}}},
        {"cloneofsimo-lora/lora_disney.safetensors", {386, 196, "<s1>", "unet:9:up", "F32", {320, 1}}},
        {"diffusers-sd15-catundchat/pytorch_lora_weights.safetensors",
         {256, 1, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora.down.weight",
          "up_blocks.3.attentions.2.transformer_blocks.0.attn2.processor.to_v_lora.up.weight", "F32", {320, 4}}},
        {"mlx-cli-wyek1n/adapters/adapters.safetensors",
         {16, 0, "model.layers.20.self_attn.q_proj.lora_a", "model.layers.23.self_attn.v_proj.lora_b", "F32", {8, 128}}},
        {"mlx-examples/adapters/adapters.safetensors",
         {16, 0, "model.layers.36.self_attn.q_proj.lora_a", "model.layers.39.self_attn.v_proj.lora_b", "F32", {8, 2304}}},
        {"mlx-lm/test_dpo_adapters/adapters.safetensors",
         {8, 0, "model.layers.22.self_attn.q_proj.lora_a", "model.layers.23.self_attn.v_proj.lora_b", "F32", {8, 128}}},
        {"ollama/discollama/adapters.safetensors",
         {8, 0, "model.layers.30.self_attn.q_proj.lora_a", "model.layers.31.self_attn.v_proj.lora_b", "F32", {8, 1024}}},
        {"peft-gpt2-fmi-chatbot/model.safetensors",
         {24, 1, "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
          "base_model.model.transformer.h.9.attn.c_attn.lora_B.weight", "F32", {2304, 8}}},
        {"peft-gptneo125m-movies/adapter_model.safetensors",
         {48, 1, "base_model.model.transformer.h.0.attn.attention.q_proj.lora_A.weight",
          "base_model.model.transformer.h.9.attn.attention.v_proj.lora_B.weight", "F32", {768, 8}}},
        {"peft-gptoss20b-hackindia/adapter_model.safetensors",
         {96, 1, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
          "base_model.model.model.layers.9.self_attn.v_proj.lora_B.weight", "F32", {512, 4}}},
        {"peft-qwen25-3b-law-llm/adapter_model.safetensors",
         {144, 1, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
          "base_model.model.model.layers.9.self_attn.v_proj.lora_B.weight", "F32", {256, 4}}},
        {"safetensors-samples/B.safetensors", {1, 1, "B", "B", "U8", {6}}},
        {"safetensors-samples/H.safetensors", {1, 1, "H", "H", "U16", {6}}},
        {"safetensors-samples/I.safetensors", {1, 1, "I", "I", "U32", {6}}},
        {"safetensors-samples/b.safetensors", {1, 1, "b", "b", "I8", {6}}},
        {"safetensors-samples/d.safetensors", {1, 1, "d", "d", "F64", {6}}},
        {"safetensors-samples/e.safetensors", {1, 1, "e", "e", "F16", {6}}},
        {"safetensors-samples/f.safetensors", {1, 1, "f", "f", "F32", {6}}},
        {"safetensors-samples/h.safetensors", {1, 1, "h", "h", "I16", {6}}},
        {"safetensors-samples/i.safetensors", {1, 1, "i", "i", "I32", {6}}},
        {"safetensors-samples/overall.safetensors", {9, 1, "B", "i", "I32", {6}}},
        {"sam-lora-custom/lora_rank2.safetensors", {48, 0, "w_a_000", "w_b_023", "F32", {768, 2}}},
    };
    // Every .safetensors file present is read, including any added after this test was written.
    std::set<std::string> found;
    for (const auto& item : fs::recursive_directory_iterator(root)) {
        if (!item.is_regular_file() || item.path().extension() != ".safetensors") continue;
        const std::string relative = item.path().lexically_relative(root).generic_string();
        INFO(relative);
        found.insert(relative);
        std::unique_ptr<TensorFile> file;
        REQUIRE_NOTHROW(file = formats::builtin_registry().open_tensor_file(item.path()));
        CHECK(file->format_name() == "safetensors");
        const auto it = expected.find(relative);
        if (it == expected.end()) continue;
        const Expected& e = it->second;
        REQUIRE(file->entries().size() == e.tensors);
        CHECK(file->metadata().size() == e.metadata);
        CHECK(file->entries().front().name == e.first);
        CHECK(file->entries().back().name == e.last);
        CHECK(file->entries().back().dtype_name == e.dtype);
        CHECK(file->entries().back().shape == e.shape);
        for (const auto& entry : file->entries()) CHECK(entry.supported());
    }
    for (const auto& [relative, e] : expected) {
        INFO(relative);
        CHECK(found.count(relative) == 1);
    }
}

TEST_CASE("tensors alias the file's bytes instead of copying them", "[safetensors][real]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const fs::path path = test::real_testdata_dir() / "safetensors-samples/overall.safetensors";
    const auto mapped = MappedFile::open(path);
    const auto file = formats::read_safetensors(mapped);
    // N = 526 (not a multiple of 8: an old writer), so the data section starts at byte 534.
    const std::byte* data = mapped->bytes().data() + 8 + 526;
    for (const auto& entry : file->entries()) {
        INFO(entry.name);
        CHECK(entry.tensor.bytes().data() == data + entry.offset);
    }
    CHECK(file->find("d")->offset == 48);  // an F64 at file offset 582: unaligned, and read fine
}

TEST_CASE("the data-section hash of a real file matches Python's hashlib", "[safetensors][real]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const auto mapped = MappedFile::open(test::real_testdata_dir() / "peft-gpt2-fmi-chatbot/model.safetensors");
    CHECK(formats::safetensors_data_sha256(mapped->bytes()) ==
          "ef4d93c620fb14e25108daa3dd104cc126b8a877858fef09e97b6a112134331d");
    CHECK(sha256_hex(mapped->bytes()) == "8370d211dd4773f7973352050f49dd238f27693005307a9b3088ec49db97b6b1");
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

TEST_CASE("a data hash written into the header while streaming matches the data and the two-pass file", "[safetensors]") {
    // The kohya writer patches sshs_model_hash into the header after the data; the result must
    // be byte-identical to hashing first and writing after, and must parse back.
    test::ScratchDir dir;
    std::vector<float> big(300000);
    for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(i % 977) * 0.25f;
    const auto a = Tensor::from_f32(DType::F16, {300, 1000}, big);
    const auto b = Tensor::from_f32(DType::F32, {3}, std::vector<float>{1, 2, 3});
    const std::map<std::string, std::string> meta{{"ss_network_dim", "8"}, {"zz_last", "x"}};
    formats::write_safetensors(dir / "streamed.safetensors", {{"b", b.view()}, {"a", a.view()}}, meta, false,
                               "sshs_model_hash");
    const auto file = MappedFile::open(dir / "streamed.safetensors");
    const auto bytes = file->bytes();
    auto expected_meta = meta;
    expected_meta["sshs_model_hash"] = formats::safetensors_data_sha256(bytes);
    const auto two_pass = formats::serialize_safetensors({{"b", b.view()}, {"a", a.view()}}, expected_meta);
    CHECK(std::vector<std::byte>(bytes.begin(), bytes.end()) == two_pass);
    const auto parsed = formats::read_safetensors(file);
    CHECK(parsed->metadata().at("sshs_model_hash") == sha256_hex(std::span(two_pass).subspan(two_pass.size() - 300000 * 2 - 12)));
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

TEST_CASE("names that JSON cannot hold are refused by the writer with an Error", "[safetensors]") {
    const auto t = Tensor::zeros(DType::F32, {1});
    try {
        formats::serialize_safetensors({{"bad\xff", t.view()}}, {});
        FAIL("expected a refusal");
    } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::bad_input);
        CHECK_THAT(e.what(), Catch::Contains("tensor name 'bad") && Catch::Contains("is not valid UTF-8"));
    }
    CHECK_THROWS_AS(formats::serialize_safetensors({}, {{"k", "\xc3"}}), Error);
}

TEST_CASE("identify claims plausible headers, and broken .safetensors files weakly", "[safetensors]") {
    const formats::SafetensorsDriver driver;
    const auto t = Tensor::zeros(DType::F32, {1});
    const auto good = formats::serialize_safetensors({{"t", t.view()}}, {});
    const auto head = [](const std::vector<std::byte>& bytes) {
        return std::span(bytes).first(std::min<std::size_t>(bytes.size(), 64));
    };
    CHECK(driver.identify(head(good), "weights.bin") == 100);
    std::vector<std::byte> spaced(8, std::byte{0});
    spaced[0] = std::byte{5};
    for (char c : std::string(" \n\t{}")) spaced.push_back(static_cast<std::byte>(c));
    CHECK(driver.identify(head(spaced), "x") == 100);
    std::vector<std::byte> huge = good;
    huge[5] = std::byte{1};  // N around 2^40: beyond the reference's limit
    CHECK(driver.identify(head(huge), "x") == 0);
    CHECK(driver.identify(head(huge), "x.safetensors") == 10);
    const std::string text = "hello, world, not a tensor file";
    const auto plain = std::as_bytes(std::span(text.data(), text.size()));
    CHECK(driver.identify(plain, "x.txt") == 0);
    CHECK(driver.identify({}, "x.safetensors") == 10);

    // Through the registry, a broken .safetensors file gets the parser's precise message.
    test::ScratchDir dir;
    test::write_file(dir / "short.safetensors", std::string("\x10\0\0\0\0\0\0\0{\"a\"", 12));
    try {
        formats::builtin_registry().open_tensor_file(dir / "short.safetensors");
        FAIL("expected an error");
    } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::bad_input);
        CHECK_THAT(e.what(), Catch::Contains("short.safetensors") && Catch::Contains("header length 16 exceeds the file size 12"));
    }
}
