// lora-inspect as a user meets it: golden text output on the samples, JSON, exit codes,
// one-line errors, stdin, argument files, --check.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include "lorakit/formats/safetensors.h"
#include "support.h"

namespace fs = std::filesystem;
using lorakit::test::read_file;
using lorakit::test::run_tool;
using lorakit::test::ScratchDir;
using lorakit::test::write_file;
using Json = nlohmann::json;

namespace {

fs::path samples() { return fs::path(LORAKIT_SOURCE_DIR) / "samples"; }
fs::path golden(const std::string& name) { return fs::path(LORAKIT_SOURCE_DIR) / "tests/cli/golden" / name; }

std::size_t lines(const std::string& text) { return static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n')); }

// Runs lora-inspect from the source directory so that paths in the output are relative.
lorakit::test::ProcessResult inspect_in_source(const std::vector<std::string>& arguments) {
    return lorakit::test::run_process(lorakit::test::tool_path("lora-inspect"), arguments, {}, 120,
                                      fs::path(LORAKIT_SOURCE_DIR));
}

// A small kohya file written with lorakit's own writer; `poison` puts a NaN into B.
void write_small_kohya(const fs::path& path, bool poison) {
    std::vector<float> down(8, 0.5f), up(8, 0.25f);
    if (poison) up[3] = std::numeric_limits<float>::quiet_NaN();
    const auto a = lorakit::Tensor::from_f32(lorakit::DType::F16, {2, 4}, down);
    const auto b = lorakit::Tensor::from_f32(lorakit::DType::F16, {4, 2}, up);
    const float alpha_value = 1.0f;
    const auto alpha = lorakit::Tensor::from_f32(lorakit::DType::F32, {}, {&alpha_value, 1});
    lorakit::formats::write_safetensors(path,
                                        {{"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight", a.view()},
                                         {"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight", b.view()},
                                         {"lora_unet_mid_block_attentions_0_proj_in.alpha", alpha.view()}},
                                        {}, true);
}

}  // namespace

TEST_CASE("lora-inspect text output on the samples matches the golden files", "[cli][inspect]") {
    struct Case {
        std::vector<std::string> arguments;
        const char* golden;
    };
    const Case cases[] = {
        {{"samples/peft-llama"}, "inspect-peft-llama.txt"},
        {{"samples/kohya-sdxl.safetensors", "--modules"}, "inspect-kohya-sdxl-modules.txt"},
        {{"samples/diffusers-sd15.safetensors"}, "inspect-diffusers-sd15.txt"},
        {{"samples/mlx-qwen"}, "inspect-mlx-qwen.txt"},
        {{"samples/cloneofsimo-sd15.safetensors", "--modules"}, "inspect-cloneofsimo-sd15-modules.txt"},
        {{"--raw", "samples/diffusers-sd15.safetensors"}, "inspect-raw-diffusers-sd15.txt"},
    };
    for (const auto& c : cases) {
        INFO("golden " << c.golden);
        const auto r = inspect_in_source(c.arguments);
        CHECK(r.exit_code == 0);
        CHECK(r.err.empty());
        CHECK(r.out == read_file(golden(c.golden)));
    }
}

TEST_CASE("lora-inspect --json is deterministic and complete", "[cli][inspect]") {
    const auto first = run_tool("lora-inspect", {"--json", (samples() / "kohya-sdxl.safetensors").string()});
    const auto second = run_tool("lora-inspect", {"--json", "-j", "1", (samples() / "kohya-sdxl.safetensors").string()});
    REQUIRE(first.exit_code == 0);
    CHECK(first.out == second.out);  // thread count does not change a single byte
    const Json report = Json::parse(first.out);
    CHECK(report["convention"] == "kohya");
    CHECK(report["base_model"]["family"] == "SDXL");
    CHECK(report["module_count"] == 13);
    CHECK(report["check_passed"] == true);
    bool saw_conv = false;
    for (const auto& m : report["modules"]) {
        if (m["name"] != "unet.input_blocks.4.0.in_layers.2") continue;
        saw_conv = true;
        CHECK(m["kind"] == "conv");
        CHECK(m["kernel_size"] == Json::array({3, 3}));
        CHECK(m["in_features"] == 32);
    }
    CHECK(saw_conv);
}

TEST_CASE("several inputs: a JSON array, a failed input reported in place, the first error's exit code",
          "[cli][inspect]") {
    ScratchDir dir;
    write_file(dir / "empty.safetensors", "");
    const auto r = run_tool("lora-inspect", {"--json", (samples() / "diffusers-sd15.safetensors").string(),
                                             (dir / "empty.safetensors").string(), (samples() / "mlx-qwen").string()});
    CHECK(r.exit_code == 3);
    CHECK(lines(r.err) == 1);
    CHECK_THAT(r.err, Catch::Contains("empty.safetensors") && Catch::Contains("file is empty"));
    const Json reports = Json::parse(r.out);
    REQUIRE(reports.size() == 3);
    CHECK(reports[0]["convention"] == "diffusers");
    CHECK(reports[1]["error"]["code"] == "bad input");
    CHECK(reports[2]["convention"] == "mlx");
}

TEST_CASE("lora-inspect reads standard input and @argument files", "[cli][inspect]") {
    const std::string bytes = read_file(samples() / "diffusers-sd15.safetensors");
    const auto piped = lorakit::test::run_process(lorakit::test::tool_path("lora-inspect"), {"--json", "-"}, bytes);
    REQUIRE(piped.exit_code == 0);
    CHECK(Json::parse(piped.out)["module_count"] == 9);
    ScratchDir dir;
    write_file(dir / "inputs.txt", "# the samples\n" + (samples() / "mlx-qwen").string() + "\n\n" +
                                       (samples() / "peft-llama").string() + "\n");
    const auto listed = run_tool("lora-inspect", {"--json", "@" + (dir / "inputs.txt").string()});
    REQUIRE(listed.exit_code == 0);
    CHECK(Json::parse(listed.out).size() == 2);
}

TEST_CASE("lora-inspect --check fails on NaN and passes a clean file", "[cli][inspect]") {
    ScratchDir dir;
    write_small_kohya(dir / "clean.safetensors", false);
    write_small_kohya(dir / "nan.safetensors", true);
    const auto clean = run_tool("lora-inspect", {"--check", (dir / "clean.safetensors").string()});
    CHECK(clean.exit_code == 0);
    const auto bad = run_tool("lora-inspect", {"--check", (dir / "nan.safetensors").string()});
    CHECK(bad.exit_code == 1);
    CHECK_THAT(bad.err, Catch::Contains("check failed: 1 NaN/Inf values"));
    CHECK_THAT(bad.out, Catch::Contains("NaN/Inf      1 values"));
    // Without --check the same file is inspected successfully; its norms are not computed.
    const auto plain = run_tool("lora-inspect", {"--json", (dir / "nan.safetensors").string()});
    CHECK(plain.exit_code == 0);
    const Json report = Json::parse(plain.out);
    CHECK(report["nonfinite"] == 1);
    CHECK(report["modules"][0]["fro_norm"].is_null());
}

TEST_CASE("lora-inspect usage and input errors: exit codes and one-line messages", "[cli][inspect][errors]") {
    ScratchDir dir;
    write_file(dir / "truncated.safetensors", read_file(samples() / "diffusers-sd15.safetensors").substr(0, 300));
    write_file(dir / "garbage.bin", "this is not a tensor file at all");
    fs::create_directory(dir / "emptydir");
    struct Case {
        std::vector<std::string> arguments;
        int exit_code;
        const char* message;
    };
    const Case cases[] = {
        {{}, 2, "inputs is required"},
        {{"--no-such-option", "x"}, 2, "no-such-option"},
        {{"-j", "-3", "x"}, 2, "--threads"},
        {{(dir / "missing.safetensors").string()}, 4, "no such file or directory"},
        {{(dir / "truncated.safetensors").string()}, 3, "truncated.safetensors"},
        {{(dir / "garbage.bin").string()}, 3, "not a recognised tensor file"},
        {{(dir / "emptydir").string()}, 3, "directory holds no adapter weights file"},
        {{"@" + (dir / "no-list.txt").string()}, 4, "cannot open argument file"},
    };
    for (const auto& c : cases) {
        INFO("arguments: " << (c.arguments.empty() ? std::string("(none)") : c.arguments.front()));
        const auto r = run_tool("lora-inspect", c.arguments);
        CHECK(r.exit_code == c.exit_code);
        CHECK(r.out.empty());
        CHECK(lines(r.err) == 1);
        CHECK_THAT(r.err, Catch::StartsWith("lora-inspect: error: ") && Catch::Contains(c.message));
    }
}

TEST_CASE("lora-inspect --help and --version go to stdout", "[cli][inspect]") {
    const auto help = run_tool("lora-inspect", {"--help"});
    CHECK(help.exit_code == 0);
    CHECK(help.err.empty());
    CHECK_THAT(help.out, Catch::Contains("--json") && Catch::Contains("--check") && Catch::Contains("Exit status"));
    const auto version = run_tool("lora-inspect", {"--version"});
    CHECK(version.exit_code == 0);
    CHECK_THAT(version.out, Catch::StartsWith("lora-inspect (lorakit) "));
}

TEST_CASE("the committed samples are what lorakit-make-samples writes", "[samples]") {
    ScratchDir dir;
    const auto r = lorakit::test::run_process(lorakit::test::tool_path("lorakit-make-samples"), {dir.path().string()});
    REQUIRE(r.exit_code == 0);
    for (const char* file : {"peft-llama/adapter_model.safetensors", "peft-llama/adapter_config.json",
                             "kohya-sdxl.safetensors", "diffusers-sd15.safetensors", "mlx-qwen/adapters.safetensors",
                             "mlx-qwen/adapter_config.json", "cloneofsimo-sd15.safetensors",
                             "base-llama/model.safetensors", "base-llama/config.json",
                             "pipeline/adapters/style/adapter_model.safetensors", "pipeline/adapters/style/adapter_config.json",
                             "pipeline/adapters/detail.gguf", "pipeline/adapters/tone/adapters.safetensors",
                             "pipeline/adapters/tone/adapter_config.json"}) {
        INFO(file);
        const std::string generated = read_file(dir / file);
        CHECK(generated.size() < 1000000);
        CHECK(generated == read_file(samples() / file));
    }
}
