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
        return test::run_process(python(), {"-c", "import safetensors, numpy"}).exit_code == 0;
    }();
    return available;
}

#define LORAKIT_REQUIRE_INTEROP()                                                                        \
    do {                                                                                                 \
        if (!interop_available()) {                                                                      \
            const char* required = std::getenv("LORAKIT_REQUIRE_INTEROP");                               \
            if (required && std::string(required) == "1")                                               \
                FAIL("the safetensors/numpy Python packages are required here but " << python()         \
                                                                                   << " cannot import them"); \
            WARN("skipping: the safetensors/numpy Python packages are not installed at " << python());  \
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
