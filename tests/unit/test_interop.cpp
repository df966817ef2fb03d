// Interoperability with the real `safetensors` Python package (tests/interop/safetensors_client.py):
// it loads what lorakit writes with identical bytes, lorakit loads what it writes, and
// lorakit's writer produces the reference writer's bytes exactly.
//
// The package lives in a virtualenv ($LORAKIT_PYTHON, default build/venv/bin/python, made by
// `make test`). Without it these tests warn and skip, unless LORAKIT_REQUIRE_INTEROP=1 (CI),
// where a missing package is a failure.
#include <catch2/catch.hpp>

#include <cstdlib>

#include <nlohmann/json.hpp>

#include "lorakit/formats/builtin.h"
#include "lorakit/formats/gguf.h"
#include "lorakit/formats/safetensors.h"
#include "lorakit/sha256.h"
#include "support.h"

namespace fs = std::filesystem;
using namespace lorakit;
using Json = nlohmann::json;

namespace {

std::string python() {
    if (const char* env = std::getenv("LORAKIT_PYTHON"); env && *env) return env;
    return std::string(LORAKIT_BINARY_DIR) + "/venv/bin/python";
}

const std::string client = std::string(LORAKIT_SOURCE_DIR) + "/tests/interop/safetensors_client.py";

bool interop_available() {
    static const bool available = [] {
        std::error_code ec;
        if (!fs::exists(python(), ec)) return false;
        return test::run_process(python(), {"-c", "import safetensors, numpy, gguf"}).exit_code == 0;
    }();
    return available;
}

#define LORAKIT_REQUIRE_INTEROP()                                                                        \
    do {                                                                                                 \
        if (!interop_available()) {                                                                      \
            const char* required = std::getenv("LORAKIT_REQUIRE_INTEROP");                               \
            if (required && std::string(required) == "1")                                               \
                FAIL("the safetensors/numpy/gguf Python packages are required here but " << python()         \
                                                                                   << " cannot import them"); \
            WARN("skipping: the safetensors/numpy/gguf Python packages are not installed at " << python());  \
            return;                                                                                      \
        }                                                                                                \
    } while (0)

Json python_read(const fs::path& file) {
    const auto r = test::run_process(python(), {client, "read", file.string()});
    INFO("python stderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    return Json::parse(r.out);
}

// What lorakit sees in a file, in the client's description format.
Json lorakit_read(const fs::path& file) {
    const auto t = formats::builtin_registry().open_tensor_file(file);
    Json out;
    out["metadata"] = Json::object();
    for (const auto& [k, v] : t->metadata()) out["metadata"][k] = v;
    out["tensors"] = Json::object();
    for (const auto& e : t->entries())
        out["tensors"][e.name] = {{"dtype", e.dtype_name}, {"shape", e.shape}, {"sha256", sha256_hex(e.tensor.bytes())}};
    return out;
}

}  // namespace

TEST_CASE("safetensors (Python) loads every file lorakit writes, with identical bytes", "[interop]") {
    LORAKIT_REQUIRE_INTEROP();
    test::ScratchDir dir;
    std::vector<Tensor> keep;
    std::vector<formats::TensorToWrite> tensors;
    for (DType type : all_dtypes) {
        std::vector<float> values(12);
        for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i) * 0.75f - 3.0f;
        keep.push_back(Tensor::from_f32(type, {3, 4}, values));
        tensors.push_back({std::string("t.") + std::string(dtype_name(type)), keep.back().view()});
    }
    keep.push_back(Tensor::from_f32(DType::F32, {}, std::vector<float>{4.0f}));
    tensors.push_back({"scalar.alpha", keep.back().view()});
    keep.push_back(Tensor::zeros(DType::F16, {0, 3}));
    tensors.push_back({"zero.size", keep.back().view()});
    formats::write_safetensors(dir / "all.safetensors", tensors, {{"format", "pt"}, {"note", "é \"q\""}}, false);
    CHECK(python_read(dir / "all.safetensors") == lorakit_read(dir / "all.safetensors"));
}

TEST_CASE("safetensors (Python) loads the committed samples", "[interop]") {
    LORAKIT_REQUIRE_INTEROP();
    const fs::path samples = fs::path(LORAKIT_SOURCE_DIR) / "samples";
    for (const char* file : {"kohya-sdxl.safetensors", "diffusers-sd15.safetensors", "cloneofsimo-sd15.safetensors",
                             "peft-llama/adapter_model.safetensors", "mlx-qwen/adapters.safetensors"}) {
        INFO(file);
        CHECK(python_read(samples / file) == lorakit_read(samples / file));
    }
}

TEST_CASE("lorakit reads what safetensors (Python) writes", "[interop]") {
    LORAKIT_REQUIRE_INTEROP();
    test::ScratchDir dir;
    const auto r = test::run_process(python(), {client, "write", (dir / "py.safetensors").string()});
    INFO("python stderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    const Json written = Json::parse(r.out);
    CHECK(lorakit_read(dir / "py.safetensors") == written);
    CHECK(written["tensors"].size() == 8);
    // And the CLI lists it.
    const auto raw = test::run_tool("lora-inspect", {"--raw", "--json", (dir / "py.safetensors").string()});
    REQUIRE(raw.exit_code == 0);
    CHECK(Json::parse(raw.out)["tensor_count"] == 8);
}

TEST_CASE("lorakit's writer produces the reference writer's bytes", "[interop]") {
    LORAKIT_REQUIRE_INTEROP();
    test::ScratchDir dir;
    const auto r = test::run_process(python(), {client, "serialize", (dir / "reference.safetensors").string()});
    INFO("python stderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    // The same tensors as the client's "serialize" command.
    std::vector<float> z(6), b(4);
    for (int i = 0; i < 6; ++i) z[static_cast<std::size_t>(i)] = static_cast<float>(i);
    for (int i = 0; i < 4; ++i) b[static_cast<std::size_t>(i)] = static_cast<float>(i);
    const float eight = 8, m0 = 0, m1 = 1, m2 = 2;
    const Tensor tz = Tensor::from_f32(DType::F16, {2, 3}, z);
    const Tensor tb = Tensor::from_f32(DType::F32, {4, 1}, b);
    const Tensor ta = Tensor::from_f32(DType::I64, {}, {&eight, 1});
    const Tensor tm = Tensor::from_f32(DType::U8, {3}, std::vector<float>{m0, m1, m2});
    const auto ours = formats::serialize_safetensors(
        {{"z.weight", tz.view()}, {"b.weight", tb.view()}, {"a.alpha", ta.view()}, {"m", tm.view()}}, {{"format", "pt"}});
    const std::string reference = test::read_file(dir / "reference.safetensors");
    CHECK(std::string(reinterpret_cast<const char*>(ours.data()), ours.size()) == reference);
}

// ---- GGUF: the real gguf-py package (llama.cpp's) ----------------------------------------------

namespace {

const std::string gguf_client = std::string(LORAKIT_SOURCE_DIR) + "/tests/interop/gguf_client.py";

Json gguf_python(const std::string& command, const fs::path& file) {
    const auto r = test::run_process(python(), {gguf_client, command, file.string()});
    INFO("python stderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    return Json::parse(r.out);
}

// gguf-py's description of a file (gguf_python "read") against lorakit's reading of it: the same
// tensor names and shapes in the same order, and identical values wherever lorakit computes.
void check_same_tensors(const Json& seen, const formats::GgufFile& ours) {
    REQUIRE(seen["tensors"].size() == ours.entries().size());
    for (std::size_t i = 0; i < ours.entries().size(); ++i) {
        const Json& t = seen["tensors"][i];
        INFO(t["name"]);
        CHECK(t["name"] == ours.entries()[i].name);
        CHECK(t["shape"].get<std::vector<std::int64_t>>() == ours.entries()[i].shape);
        if (!ours.entries()[i].supported()) continue;
        const auto values = ours.entries()[i].to_f32();
        const auto theirs = t["values"].get<std::vector<double>>();
        REQUIRE(theirs.size() == values.size());
        std::size_t wrong = 0;
        for (std::size_t j = 0; j < values.size(); ++j) wrong += theirs[j] != static_cast<double>(values[j]);
        CHECK(wrong == 0);
    }
}

}  // namespace

TEST_CASE("gguf (Python) reads every value and tensor lorakit writes", "[interop][gguf]") {
    LORAKIT_REQUIRE_INTEROP();
    test::ScratchDir dir;
    std::vector<float> a(4 * 64), b(8 * 4);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i % 13) * 0.25f - 1.5f;
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(i) / 8.0f;
    const Tensor ta = Tensor::from_f32(DType::F32, {4, 64}, a), tb = Tensor::from_f32(DType::F32, {8, 4}, b);
    const std::vector<std::pair<std::string, formats::GgufValue>> kv{
        {"general.architecture", formats::GgufValue::string("llama")},
        {"general.alignment", formats::GgufValue::u32(64)},
        {"adapter.lora.alpha", formats::GgufValue::f32(16.0f)},
        {"some.f64", formats::GgufValue::f64(0.5)},
        {"some.i32", formats::GgufValue::i32(-3)},
        {"some.u64", formats::GgufValue::u64(1ull << 40)},
        {"some.flag", formats::GgufValue::boolean(false)},
        {"some.names", formats::GgufValue::strings({"a", "ünï"})},
        {"some.ids", formats::GgufValue::u32s({5, 6})}};
    std::vector<formats::GgufTensorToWrite> tensors;
    tensors.push_back(formats::gguf_tensor("x.lora_a", ta, formats::ggml_f32));
    tensors.push_back(formats::gguf_tensor("x.lora_b", tb, formats::ggml_f16));
    tensors.push_back(formats::gguf_tensor("y.lora_a", ta, formats::ggml_q8_0));
    tensors.push_back(formats::gguf_tensor("y.lora_b", tb, formats::ggml_bf16));
    formats::write_gguf(dir / "ours.gguf", kv, tensors, false);
    const Json seen = gguf_python("read", dir / "ours.gguf");
    CHECK(seen["version"] == 3);
    CHECK(seen["kv"]["general.architecture"]["value"] == "llama");
    CHECK(seen["kv"]["general.alignment"]["type"] == "UINT32");
    CHECK(seen["kv"]["general.alignment"]["value"] == 64);
    CHECK(seen["kv"]["adapter.lora.alpha"]["type"] == "FLOAT32");
    CHECK(seen["kv"]["adapter.lora.alpha"]["value"] == 16.0);
    CHECK(seen["kv"]["some.f64"]["value"] == 0.5);
    CHECK(seen["kv"]["some.i32"]["value"] == -3);
    CHECK(seen["kv"]["some.u64"]["value"] == 1099511627776ull);
    CHECK(seen["kv"]["some.flag"]["value"] == false);
    CHECK(seen["kv"]["some.names"]["value"] == Json::array({"a", "ünï"}));
    CHECK(seen["kv"]["some.ids"]["value"] == Json::array({5, 6}));
    REQUIRE(seen["tensors"].size() == 4);
    const auto ours = formats::read_gguf(MappedFile::open(dir / "ours.gguf"));
    const std::vector<std::string> types{"F32", "F16", "Q8_0", "BF16"};
    for (std::size_t i = 0; i < 4; ++i) {
        const Json& t = seen["tensors"][i];
        INFO(t["name"]);
        CHECK(t["name"] == ours->entries()[i].name);
        CHECK(t["type"] == types[i]);
        CHECK(t["shape"].get<std::vector<std::int64_t>>() == ours->entries()[i].shape);
        const auto values = ours->entries()[i].to_f32();
        const auto theirs = t["values"].get<std::vector<double>>();
        REQUIRE(theirs.size() == values.size());
        for (std::size_t j = 0; j < values.size(); ++j) CHECK(theirs[j] == static_cast<double>(values[j]));
    }
}

TEST_CASE("lorakit reads what gguf (Python) writes and rewrites it byte for byte; Q8_0 bits match", "[interop][gguf]") {
    LORAKIT_REQUIRE_INTEROP();
    test::ScratchDir dir;
    const Json written = gguf_python("write", dir / "theirs.gguf");
    const auto file = formats::read_gguf(MappedFile::open(dir / "theirs.gguf"));
    REQUIRE(file->entries().size() == written["tensors"].size());
    for (std::size_t i = 0; i < file->entries().size(); ++i) {
        const Json& t = written["tensors"][i];
        const auto& e = file->entries()[i];
        INFO(e.name);
        CHECK(e.name == t["name"]);
        CHECK(e.dtype_name == t["type"]);
        CHECK(e.shape == t["shape"].get<std::vector<std::int64_t>>());
        const auto values = e.to_f32();
        const auto theirs = t["values"].get<std::vector<double>>();
        REQUIRE(theirs.size() == values.size());
        for (std::size_t j = 0; j < values.size(); ++j) CHECK(theirs[j] == static_cast<double>(values[j]));
    }
    for (const auto& [key, value] : written["kv"].items()) {
        INFO(key);
        const formats::GgufValue* v = file->find_kv(key);
        REQUIRE(v != nullptr);
        CHECK(formats::gguf_type_name(v->type) == value["type"].get<std::string>());
    }
    // Our writer, given the same pairs and tensors, produces gguf-py's bytes.
    std::vector<formats::GgufTensorToWrite> tensors;
    for (std::size_t i = 0; i < file->entries().size(); ++i) {
        formats::GgufTensorToWrite t;
        t.name = file->entries()[i].name;
        t.type = file->ggml_type(i);
        t.shape = file->entries()[i].shape;
        t.view = file->raw(i);
        tensors.push_back(std::move(t));
    }
    const auto ours = formats::serialize_gguf(file->kv(), tensors);
    const std::string reference = test::read_file(dir / "theirs.gguf");
    CHECK(std::string(reinterpret_cast<const char*>(ours.data()), ours.size()) == reference);
    // gguf-py quantized the same f32 values to Q8_0: our quantizer gives the same bits.
    const auto f32 = file->entries()[0].to_f32();
    const auto q = formats::quantize_q8_0(f32.data(), f32.size());
    const auto raw = file->raw(2);
    CHECK(std::vector<std::byte>(raw.begin(), raw.end()) == q);
}

TEST_CASE("gguf (Python) reads lora-convert's GGUF adapters with identical values (F32 and Q8_0)", "[interop][gguf]") {
    LORAKIT_REQUIRE_INTEROP();
    test::ScratchDir dir;
    for (const std::string dtype : {"", "q8_0"}) {
        INFO("dtype " << dtype);
        const fs::path out = dir / ("a" + dtype + ".gguf");
        const auto r = test::run_tool("lora-convert", {std::string(LORAKIT_SOURCE_DIR) + "/samples/peft-llama", "--to", "gguf",
                                                       "--head-count", "8", "--head-count-kv", "2", "-o", out.string(),
                                                       "-q", "--dtype", dtype.empty() ? "f32" : dtype});
        INFO(r.err);
        REQUIRE(r.exit_code == 0);
        const Json seen = gguf_python("read", out);
        CHECK(seen["kv"]["general.type"]["value"] == "adapter");
        CHECK(seen["kv"]["adapter.type"]["value"] == "lora");
        CHECK(seen["kv"]["adapter.lora.alpha"]["type"] == "FLOAT32");
        CHECK(seen["kv"]["llama.attention.head_count"]["value"] == 8);
        check_same_tensors(seen, *formats::read_gguf(MappedFile::open(out)));
    }
}

TEST_CASE("gguf (Python) reads a GGUF model lora-bake wrote (real tiny llama), values identical", "[interop][gguf][bake]") {
    LORAKIT_REQUIRE_INTEROP();
    LORAKIT_REQUIRE_REAL_TESTDATA();
    test::ScratchDir dir;
    Adapter a = formats::builtin_registry().load_adapter(std::string(LORAKIT_SOURCE_DIR) + "/samples/peft-llama");
    a.modules.resize(1);
    auto& m = a.modules[0];
    m.name = m.source_name = "model.layers.0.self_attn.q_proj";  // q: rows in llama.cpp's rotary order
    m.down = Tensor::from_f32(DType::F32, {2, 8}, std::vector<float>{0.1f, -0.2f, 0.3f, 0.1f, 0.0f, 0.5f, -0.1f, 0.2f,
                                                                       0.2f, 0.1f, -0.3f, 0.4f, 0.1f, 0.0f, 0.2f, -0.5f});
    m.up = Tensor::from_f32(DType::F32, {8, 2}, std::vector<float>{1, 0, 0, 1, 1, 1, -1, 0, 0, -1, 2, 0, 0, 2, 1, -1});
    std::vector<std::string> notes;
    formats::builtin_registry().write_adapter(a, "peft", dir / "lora", write_options(false), notes);
    const fs::path out = dir / "baked.gguf";
    const auto r = test::run_tool("lora-bake", {(test::real_testdata_dir() / "ollama" / "llama-2-tiny-random.gguf").string(),
                                                (dir / "lora").string(), "-o", out.string()});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    const Json seen = gguf_python("read", out);
    CHECK(seen["kv"]["general.architecture"]["value"] == "llama");
    check_same_tensors(seen, *formats::read_gguf(MappedFile::open(out)));
}
