// The real clients on PyTorch (tests/interop/torch_client.py): PEFT loads the PEFT adapters
// lorakit writes (every tensor reaches the model) and its merge_and_unload() gives the weights
// lora-bake gives; diffusers' own loader reads lorakit's kohya and diffusers files of SD1.5 and
// SDXL LoRAs to the same modules and values; lora-bake equals PEFT's and diffusers' merges of adapters
// they wrote themselves, and transformers and diffusers load the folders it writes.
//
// These packages are large and not installed in CI: the tests run where $LORAKIT_TORCH_PYTHON
// (default $LORAKIT_PYTHON, then build/venv/bin/python) imports torch, transformers, peft and
// diffusers, and otherwise skip with a warning. README "Tests" says how to set one up.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "lorakit/formats/builtin.h"
#include "support.h"

namespace fs = std::filesystem;
using namespace lorakit;
using Json = nlohmann::json;

namespace {

const std::string samples = std::string(LORAKIT_SOURCE_DIR) + "/samples";
const std::string client = std::string(LORAKIT_SOURCE_DIR) + "/tests/interop/torch_client.py";

std::string torch_python() {
    for (const char* name : {"LORAKIT_TORCH_PYTHON", "LORAKIT_PYTHON"})
        if (const char* env = std::getenv(name); env && *env) return env;
    return std::string(LORAKIT_BINARY_DIR) + "/venv/bin/python";
}

bool torch_available() {
    static const bool available = [] {
        std::error_code ec;
        if (!fs::exists(torch_python(), ec)) return false;
        return test::run_process(torch_python(), {"-c", "import torch, transformers, peft, diffusers, safetensors"}).exit_code == 0;
    }();
    return available;
}

#define LORAKIT_REQUIRE_TORCH_CLIENTS()                                                                     \
    do {                                                                                                    \
        if (!torch_available()) {                                                                           \
            WARN("skipping: torch/transformers/peft/diffusers are not importable by " << torch_python()     \
                                                                                      << " (set LORAKIT_TORCH_PYTHON)"); \
            return;                                                                                         \
        }                                                                                                   \
    } while (0)

Json run_client(const std::vector<std::string>& arguments) {
    const auto r = test::run_process(torch_python(), arguments);
    INFO("python stderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    return Json::parse(r.out);
}

void run_ok(const std::string& tool, const std::vector<std::string>& arguments) {
    const auto r = test::run_tool(tool, arguments);
    INFO(tool << ": " << r.err);
    REQUIRE(r.exit_code == 0);
}

// name -> f32 values of every tensor in a safetensors file.
std::map<std::string, std::vector<float>> read_all(const fs::path& file) {
    std::map<std::string, std::vector<float>> out;
    const auto t = formats::builtin_registry().open_tensor_file(file);
    for (const auto& e : t->entries()) out[e.name] = e.tensor.to_f32();
    return out;
}

// The largest |expected - got| over every tensor of `expected`, each of which `got` must hold
// with the same number of values.
double worst_difference(const std::map<std::string, std::vector<float>>& expected,
                        const std::map<std::string, std::vector<float>>& got) {
    double worst = 0;
    for (const auto& [name, values] : expected) {
        INFO(name);
        REQUIRE(got.count(name) == 1);
        const auto& mine = got.at(name);
        REQUIRE(mine.size() == values.size());
        for (std::size_t i = 0; i < values.size(); ++i) worst = std::max(worst, std::abs(static_cast<double>(values[i]) - mine[i]));
    }
    return worst;
}

}  // namespace

TEST_CASE("PEFT loads lorakit's PEFT adapters whole and merges them to lora-bake's weights", "[interop][torch]") {
    LORAKIT_REQUIRE_TORCH_CLIENTS();
    test::ScratchDir dir;
    const std::string base = samples + "/base-llama", config = base + "/config.json";
    const std::string adapters = samples + "/pipeline/adapters";
    const auto out = [&](const std::string& name) { return (dir / name).string(); };
    // What lorakit writes as PEFT: the sample itself (rank_pattern), a resize, a concat merge
    // with a negative weight (rank_pattern and alpha_pattern), conversions from llama.cpp GGUF
    // (rows un-permuted), mlx-lm (scale folded) and a PEFT -> GGUF -> PEFT round trip, and an
    // extraction from a tuned checkpoint.
    run_ok("lora-resize", {samples + "/peft-llama", "--rank", "2", "-o", out("resized")});
    run_ok("lora-merge", {samples + "/peft-llama", adapters + "/style", "--weights", "0.7,-0.4", "-o", out("merged")});
    run_ok("lora-convert", {adapters + "/detail.gguf", "--to", "peft", "--base", config, "-o", out("from-gguf")});
    run_ok("lora-convert", {adapters + "/tone", "--to", "peft", "-o", out("from-mlx")});
    run_ok("lora-convert", {adapters + "/style", "--to", "gguf", "--base", config, "-o", out("style.gguf")});
    run_ok("lora-convert", {out("style.gguf"), "--to", "peft", "--base", config, "-o", out("style-back")});
    run_ok("lora-bake", {base, samples + "/peft-llama", "-o", out("tuned.safetensors")});
    run_ok("lora-extract", {base, out("tuned.safetensors"), "--rank", "8", "-o", out("extracted")});
    // Section names must not depend on the scratch directory (Catch reruns the case per section).
    for (const std::string label : {"peft-llama", "resized", "merged", "from-gguf", "from-mlx", "style-back", "extracted"}) {
        DYNAMIC_SECTION(label) {
            const std::string adapter = label == "peft-llama" ? samples + "/peft-llama" : out(label);
            const Json report = run_client({client, "peft-merge", base, adapter, out("peft.safetensors")});
            CHECK(report["adapter_tensors"].get<int>() > 0);
            run_ok("lora-bake", {base, adapter, "--dtype", "f32", "-o", out("ours.safetensors"), "--force"});
            const auto peft = read_all(out("peft.safetensors")), ours = read_all(out("ours.safetensors"));
            REQUIRE(peft.size() == ours.size());
            const double worst = worst_difference(peft, ours);
            // Both add s·B·A to the f32 weights (magnitudes ~0.2-1); only the summation order differs.
            CHECK(worst < 2e-6);
        }
    }
}

TEST_CASE("lora-bake and lora-convert agree with PEFT on adapters PEFT itself wrote", "[interop][torch]") {
    LORAKIT_REQUIRE_TORCH_CLIENTS();
    test::ScratchDir dir;
    // DoRA; rsLoRA with rank_pattern and alpha_pattern; GPT-2 Conv1D (fan_in_fan_out) with a LoRA
    // bias where PEFT has it; LoRA on embed_tokens and lm_head. Every LoRA parameter random.
    for (const std::string kind : {"dora", "rslora", "gpt2", "embedding"}) {
        DYNAMIC_SECTION(kind) {
            const std::string base = (dir / kind / "base").string(), adapter = (dir / kind / "adapter").string(),
                              reference = (dir / kind / "merged.safetensors").string();
            fs::create_directories(dir / kind);
            const auto made = test::run_process(torch_python(), {client, "peft-make", kind, base, adapter, reference});
            INFO(made.err);
            REQUIRE(made.exit_code == 0);
            const auto expected = read_all(reference);
            auto compare = [&](const fs::path& file, bool all) {
                const auto got = read_all(file);
                if (all) CHECK(got.size() == expected.size());
                const double worst = worst_difference(expected, got);
                CHECK(worst < 1e-6);  // measured: 0 (6e-8 for DoRA, whose norm sums in another order)
            };
            // lora-bake reads PEFT's file and merges as merge_and_unload() does; the folder it
            // writes loads in transformers as that model.
            run_ok("lora-bake", {base, adapter, "--dtype", "f32", "-o", (dir / kind / "ours").string()});
            compare(dir / kind / "ours" / "model.safetensors", true);
            run_client({client, "hf-weights", (dir / kind / "ours").string(), (dir / kind / "loaded.safetensors").string()});
            compare(dir / kind / "loaded.safetensors", false);
            // lorakit's rewrite of it, loaded by PEFT, merges to the same weights.
            run_ok("lora-convert", {adapter, "--to", "peft", "-o", (dir / kind / "rewritten").string()});
            run_client({client, "peft-merge", base, (dir / kind / "rewritten").string(), (dir / kind / "peft.safetensors").string()});
            compare(dir / kind / "peft.safetensors", false);  // a tied lm_head appears in PEFT's merge only
        }
    }
}

TEST_CASE("diffusers reads lorakit's kohya and diffusers files of SD1.5 and SDXL LoRAs as the same modules", "[interop][torch]") {
    LORAKIT_REQUIRE_TORCH_CLIENTS();
    test::ScratchDir dir;
    const auto out = [&](const std::string& name) { return (dir / name).string(); };
    struct Case {
        std::string original, kind;
    };
    // SDXL: a kohya file (SGM block names, alphas) into diffusers and back; SD1.5: a diffusers
    // file (no alphas) into kohya and back.
    for (const Case& c : {Case{samples + "/kohya-sdxl.safetensors", "sdxl"}, Case{samples + "/diffusers-sd15.safetensors", "sd15"}}) {
        DYNAMIC_SECTION(c.original) {
            const bool from_kohya = c.kind == "sdxl";
            const std::string there = out("there.safetensors"), back = out("back.safetensors");
            run_ok("lora-convert", {c.original, "--to", from_kohya ? "diffusers" : "kohya", "-o", there, "--force"});
            run_ok("lora-convert", {there, "--to", from_kohya ? "kohya" : "diffusers", "-o", back, "--force"});
            const Json seen_original = run_client({client, "diffusers-lora", c.original, c.kind});
            const Json seen_there = run_client({client, "diffusers-lora", there, c.kind});
            const Json seen_back = run_client({client, "diffusers-lora", back, c.kind});
            const Adapter adapter = formats::builtin_registry().load_adapter(c.original);
            REQUIRE(seen_original["tensors"].size() == 2 * adapter.modules.size());
            std::set<double> scales;
            for (const auto& m : adapter.modules) scales.insert(m.scale());
            // diffusers' own conversion of each file lands on the same module names and shapes.
            for (const auto& [name, original] : seen_original["tensors"].items()) {
                INFO(name);
                REQUIRE(seen_there["tensors"].contains(name));
                REQUIRE(seen_back["tensors"].contains(name));
                const Json& mid = seen_there["tensors"][name];
                const Json& end = seen_back["tensors"][name];
                CHECK(mid[0] == original[0]);
                CHECK(end[0] == original[0]);
                const double sum = original[1].get<double>(), squares = original[2].get<double>();
                const bool is_a = name.find(".lora_A.") != std::string::npos;
                if (is_a || !from_kohya) {
                    // A never changes; nor does B where no alpha has to be folded into it.
                    CHECK(mid[1].get<double>() == Approx(sum).epsilon(1e-6));
                    CHECK(end[2].get<double>() == Approx(squares).epsilon(1e-6));
                } else {
                    // diffusers has no alpha: the file holds B·alpha/r, which diffusers applies
                    // as is, and the kohya file made from it keeps that B (and no alpha).
                    const double ratio = std::sqrt(mid[2].get<double>() / squares);
                    bool known = false;
                    for (double s : scales) known |= std::abs(ratio - s) < 1e-3 * s;
                    CHECK(known);
                    CHECK(end[2].get<double>() == Approx(mid[2].get<double>()).epsilon(1e-9));
                }
            }
            CHECK(seen_there["tensors"].size() == seen_original["tensors"].size());
            CHECK(seen_back["tensors"].size() == seen_original["tensors"].size());
            // Alphas reach diffusers from the kohya files that hold them.
            CHECK(seen_original["alphas"].size() == (from_kohya ? adapter.modules.size() : 0));
        }
    }
}

TEST_CASE("lora-bake of a LoRA diffusers saved equals diffusers' own merge, directly and through kohya", "[interop][torch]") {
    LORAKIT_REQUIRE_TORCH_CLIENTS();
    test::ScratchDir dir;
    const std::string unet = (dir / "unet").string(), lora = (dir / "lora").string(),
                      reference = (dir / "merged.safetensors").string();
    // A tiny SD-layout UNet; a LoRA on attention, feed-forward, proj_in and the resnet 3x3 convs.
    run_client({client, "diffusers-make", unet, lora, reference});
    const auto expected = read_all(reference);
    auto compare = [&](const fs::path& file) {
        const auto got = read_all(file);
        REQUIRE(got.size() == expected.size());
        const double worst = worst_difference(expected, got);
        CHECK(worst < 1e-6);  // measured: 0
    };
    const std::string file = lora + "/pytorch_lora_weights.safetensors";
    run_ok("lora-bake", {unet, file, "--dtype", "f32", "-o", (dir / "ours").string()});
    compare(dir / "ours" / "diffusion_pytorch_model.safetensors");
    // The baked component folder loads in diffusers as that UNet.
    run_client({client, "unet-weights", (dir / "ours").string(), (dir / "loaded.safetensors").string()});
    compare(dir / "loaded.safetensors");
    // Through lorakit's kohya conversion (convolutions included), the same bytes.
    run_ok("lora-convert", {file, "--to", "kohya", "-o", (dir / "kohya.safetensors").string()});
    run_ok("lora-bake", {unet, (dir / "kohya.safetensors").string(), "--dtype", "f32", "-o", (dir / "via-kohya").string()});
    CHECK(test::read_file(dir / "via-kohya" / "diffusion_pytorch_model.safetensors") ==
          test::read_file(dir / "ours" / "diffusion_pytorch_model.safetensors"));
}
