// lora-inspect over every third-party file in ../shared/testdata/real, compared with the
// expectations in tests/cli/real_files.json (derived by hand from the files' headers and
// configs, not from lorakit's output).
#include <catch2/catch.hpp>

#include <set>

#include <nlohmann/json.hpp>

#include "support.h"

namespace fs = std::filesystem;
using lorakit::test::read_file;
using lorakit::test::real_testdata_dir;
using lorakit::test::run_tool;
using Json = nlohmann::json;

namespace {

Json expectations() { return Json::parse(read_file(fs::path(LORAKIT_SOURCE_DIR) / "tests/cli/real_files.json")); }

std::size_t line_count(const std::string& text) { return static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n')); }

}  // namespace

TEST_CASE("real test data is present", "[cli][real]") {
    if (std::getenv("LORAKIT_ALLOW_MISSING_TESTDATA")) return;
    INFO("../shared/testdata/real was not found next to the source tree; set LORAKIT_TESTDATA to its path, "
         "or LORAKIT_ALLOW_MISSING_TESTDATA=1 to skip the real-file tests");
    CHECK_FALSE(real_testdata_dir().empty());
}

TEST_CASE("lora-inspect --json on every real adapter matches the expected table", "[cli][real]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const fs::path root = real_testdata_dir();
    const Json table = expectations();
    for (const auto& e : table["files"]) {
        const std::string input = e["input"];
        INFO("input: " << input);
        const auto r = run_tool("lora-inspect", {"--json", (root / input).string()});
        INFO("stderr: " << r.err);
        REQUIRE_FALSE(r.timed_out);
        REQUIRE(r.exit_code == e["exit"].get<int>());
        if (r.exit_code != 0) {
            CHECK(r.out.empty());
            CHECK(line_count(r.err) == 1);
            CHECK_THAT(r.err, Catch::Contains(e["stderr"].get<std::string>()));
            CHECK_THAT(r.err, Catch::StartsWith("lora-inspect: error: "));
            continue;
        }
        const Json report = Json::parse(r.out);
        CHECK(report["convention"] == e["convention"]);
        CHECK(report["module_count"] == e["module_count"]);
        CHECK(report["modules"].size() == e["module_count"].get<std::size_t>());
        std::set<long long> ranks;
        std::set<double> scales;
        for (const auto& m : report["modules"]) {
            ranks.insert(m["rank"].get<long long>());
            scales.insert(m["scale"].get<double>());
            CHECK(m["nonfinite"] == 0);
            CHECK(m["fro_norm"].is_number());
            CHECK(m["spectral_norm"].get<double>() <= m["fro_norm"].get<double>() * (1 + 1e-12));
            CHECK(m["effective_rank"]["90"].get<long long>() <= m["effective_rank"]["99"].get<long long>());
            CHECK(m["effective_rank"]["99"].get<long long>() <= m["rank"].get<long long>());
            CHECK(m["singular_values"].size() <= static_cast<std::size_t>(m["rank"].get<long long>()));
        }
        std::set<long long> expected_ranks;
        for (const auto& x : e["ranks"]) expected_ranks.insert(x.get<long long>());
        CHECK(ranks == expected_ranks);
        std::set<double> expected_scales;
        for (const auto& x : e["scales"]) expected_scales.insert(x.get<double>());
        CHECK(scales == expected_scales);
        CHECK(report["base_model"]["family"] == e["family"]);
        CHECK(report["other_tensors"].size() == e["other_tensors"].get<std::size_t>());
        CHECK(report["nonfinite"] == 0);
        for (const char* field : {"path", "convention", "base_model", "module_count", "parameter_count", "dtypes",
                                  "metadata", "config", "warnings", "other_tensors", "modules"})
            CHECK(report.contains(field));
    }
}

TEST_CASE("every real test file has an expectation", "[cli][real]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const fs::path root = real_testdata_dir();
    const Json table = expectations();
    std::set<std::string> covered;
    for (const auto& e : table["files"]) covered.insert(e["input"].get<std::string>());
    for (const auto& p : table["not_adapters"]["raw_ok"]) covered.insert(p.get<std::string>());
    for (const auto& entry : fs::recursive_directory_iterator(root)) {
        if (!entry.is_regular_file()) continue;
        const std::string rel = fs::relative(entry.path(), root).string();
        const std::string name = entry.path().filename().string();
        const bool documentation = entry.path().extension() == ".md";
        const bool json = entry.path().extension() == ".json";
        const bool in_covered_dir = covered.count(fs::relative(entry.path().parent_path(), root).string()) > 0;
        INFO("file: " << rel);
        CHECK((covered.count(rel) || documentation || json || in_covered_dir));
    }
}

TEST_CASE("lora-inspect refuses non-adapter real files and --raw lists them", "[cli][real]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const fs::path root = real_testdata_dir();
    const Json table = expectations()["not_adapters"];
    for (const auto& p : table["raw_ok"]) {
        const std::string rel = p.get<std::string>();
        INFO("file: " << rel);
        const auto plain = run_tool("lora-inspect", {(root / rel).string()});
        CHECK(plain.exit_code == 3);
        CHECK_THAT(plain.err, Catch::Contains("not a LoRA adapter"));
        CHECK(plain.out.empty());
        const auto raw = run_tool("lora-inspect", {"--raw", "--json", (root / rel).string()});
        REQUIRE(raw.exit_code == 0);
        const Json report = Json::parse(raw.out);
        if (table["raw_tensor_counts"].contains(rel))
            CHECK(report["tensor_count"] == table["raw_tensor_counts"][rel]);
    }
    // JSON files (configs, key manifests) are not tensor files at all.
    for (const auto& entry : fs::recursive_directory_iterator(root)) {
        if (!entry.is_regular_file() || entry.path().extension() != ".json") continue;
        INFO("file: " << entry.path());
        const auto r = run_tool("lora-inspect", {entry.path().string()});
        CHECK(r.exit_code == 3);
        CHECK_THAT(r.err, Catch::Contains("not a recognised tensor file"));
    }
}
