// What a Makefile relies on, checked for every tool that writes an output: identical inputs
// give byte-identical outputs; stdout holds the result only, stderr stays empty off a terminal
// (notes with --verbose; --quiet silences them); an existing output is kept without --force;
// a failed run exits non-zero and leaves no output; `-o -` streams a single-file output to
// stdout (and nothing else), and is refused for directory outputs; a run killed with SIGKILL at
// any moment leaves either nothing or the complete output (test_atomic_file.cpp and
// test_bake.cpp kill writers at a chosen point mid-write; here each tool is killed at spread-out
// moments of its run).
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "support.h"

namespace fs = std::filesystem;
using lorakit::test::read_file;
using lorakit::test::run_tool;
using lorakit::test::ScratchDir;

namespace {

const std::string samples = std::string(LORAKIT_SOURCE_DIR) + "/samples";

struct Case {
    std::string tool;
    std::vector<std::string> arguments;  // "OUT" stands for the output path, "BROKEN" for a bad input
    bool directory = false;              // the output is a directory (PEFT, a model folder)
    std::string streamed = {};           // a directory output's file that `-o -` streams instead ("": refused)
};

std::vector<std::string> with(const std::vector<std::string>& arguments, const std::string& out, const std::string& broken = {}) {
    std::vector<std::string> result;
    for (const auto& a : arguments) result.push_back(a == "OUT" ? out : a == "BROKEN" ? broken : a);
    return result;
}

// Every file under `path` (or the file itself), relative path -> bytes.
std::vector<std::pair<std::string, std::string>> contents(const fs::path& path) {
    std::vector<std::pair<std::string, std::string>> out;
    if (fs::is_regular_file(path)) {
        out.emplace_back("", read_file(path));
        return out;
    }
    for (const auto& e : fs::recursive_directory_iterator(path))
        if (e.is_regular_file()) out.emplace_back(e.path().lexically_relative(path).string(), read_file(e.path()));
    std::sort(out.begin(), out.end());
    return out;
}

// Starts `tool` with `arguments` (stdout and stderr to /dev/null), SIGKILLs it after `delay`, and
// reaps it.
void kill_after(const std::string& tool, const std::vector<std::string>& arguments, std::chrono::microseconds delay) {
    const std::string path = lorakit::test::tool_path(tool);
    std::vector<char*> argv{const_cast<char*>(path.c_str())};
    for (const auto& a : arguments) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        const int null = ::open("/dev/null", O_WRONLY);
        ::dup2(null, STDOUT_FILENO);
        ::dup2(null, STDERR_FILENO);
        ::execv(path.c_str(), argv.data());
        ::_exit(127);
    }
    ::usleep(static_cast<useconds_t>(delay.count()));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
}

}  // namespace

TEST_CASE("every tool keeps the Makefile contract: determinism, quiet stderr, no partial output, -o -", "[cli][contract]") {
    ScratchDir dir;
    // lora-extract needs a tuned checkpoint: the sample base with the sample PEFT LoRA baked in.
    auto r = run_tool("lora-bake", {samples + "/base-llama", samples + "/peft-llama", "-o", (dir / "tuned.safetensors").string()});
    REQUIRE(r.exit_code == 0);
    lorakit::test::write_file(dir / "broken.safetensors", std::string("\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", 13));
    const std::string broken = (dir / "broken.safetensors").string();
    const std::string kohya = samples + "/kohya-sdxl.safetensors";
    const std::vector<Case> cases = {
        {"lora-resize", {kohya, "--rank", "2", "-o", "OUT"}},
        {"lora-resize", {"BROKEN", "--rank", "2", "-o", "OUT"}},
        {"lora-merge", {kohya, kohya, "--weights", "0.5,0.3", "--method", "svd", "--rank", "4", "-o", "OUT"}},
        {"lora-convert", {samples + "/diffusers-sd15.safetensors", "--to", "kohya", "-o", "OUT"}},
        {"lora-convert", {samples + "/mlx-qwen", "--to", "peft", "-o", "OUT"}, true},
        {"lora-stack", {kohya + ":0.5", samples + "/kohya-sdxl.safetensors:0.7", "--rank", "8", "-o", "OUT"}},
        {"lora-bake", {samples + "/base-llama/model.safetensors", samples + "/peft-llama:0.5", "-o", "OUT"}},
        // A model folder bakes into a folder (config.json copied); `-o -` streams its weights.
        {"lora-bake", {samples + "/base-llama", samples + "/peft-llama:0.5", "-o", "OUT"}, true, "model.safetensors"},
        {"lora-extract", {samples + "/base-llama", (dir / "tuned.safetensors").string(), "--rank", "4", "-o", "OUT"}, true},
    };
    for (std::size_t i = 0; i < cases.size(); ++i) {
        const Case& c = cases[i];
        const auto failing = std::find(c.arguments.begin(), c.arguments.end(), "BROKEN") != c.arguments.end();
        DYNAMIC_SECTION(c.tool << " case " << i) {
            const std::string a = (dir / fmt::format("{}-a", i)).string(), b = (dir / fmt::format("{}-b", i)).string();
            if (failing) {
                // A failed run: exit 3 (bad input), one error line naming the file, no output.
                r = run_tool(c.tool, with(c.arguments, a, broken));
                CHECK(r.exit_code == 3);
                CHECK(r.out.empty());
                CHECK_THAT(r.err, Catch::Contains("error: ") && Catch::Contains("broken.safetensors"));
                CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
                CHECK_FALSE(fs::exists(a));
                continue;
            }
            const auto started = std::chrono::steady_clock::now();
            r = run_tool(c.tool, with(c.arguments, a));
            const auto took = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started);
            INFO(r.err);
            REQUIRE(r.exit_code == 0);
            // stdout: the report (lora-convert has none), never a diagnostic.
            CHECK_THAT(r.out, !Catch::Contains("note:") && !Catch::Contains("warning:"));
            CHECK(r.err.empty());  // not a terminal: no progress, no notes
            auto args = with(c.arguments, b);
            args.push_back("--quiet");
            r = run_tool(c.tool, args);
            REQUIRE(r.exit_code == 0);
            CHECK(r.err.empty());
            // Byte-identical outputs from identical inputs.
            const auto first = contents(a), second = contents(b);
            REQUIRE_FALSE(first.empty());
            CHECK(first == second);
            // An existing output is kept unless --force.
            r = run_tool(c.tool, with(c.arguments, a));
            CHECK(r.exit_code == 2);
            CHECK_THAT(r.err, Catch::Contains("--force"));
            CHECK(contents(a) == first);
            args = with(c.arguments, a);
            args.push_back("--force");
            args.push_back("--no-sync");  // scratch output: same bytes, not flushed to disk
            r = run_tool(c.tool, args);
            CHECK(r.exit_code == 0);
            CHECK(contents(a) == first);
            // Killed at spread-out moments of a run: nothing, or the whole output; no temporary left.
            const fs::path killed_dir = dir / fmt::format("{}-killed", i);
            fs::create_directories(killed_dir);
            const fs::path killed = killed_dir / "out";
            auto leftovers = [&] {
                std::vector<std::string> names;
                for (const auto& e : fs::directory_iterator(killed_dir))
                    if (e.path() != killed) names.push_back(e.path().filename().string());
                return names;
            };
            for (int k = 0; k < 12; ++k) {
                kill_after(c.tool, with(c.arguments, killed.string()), took * k / 10);
                // A file output is unnamed until its one link(); a directory output has a hidden
                // temporary during the few calls that link its files in (atomic_file.h).
                for (const auto& name : leftovers()) {
                    INFO(name);
                    CHECK((c.directory && name.starts_with(".out.lorakit-")));
                }
                if (fs::exists(killed)) {
                    CHECK(contents(killed) == first);
                    fs::remove_all(killed);
                }
            }
            // The next run on the same output removes what a killed one left.
            r = run_tool(c.tool, with(c.arguments, killed.string()));
            CHECK(r.exit_code == 0);
            CHECK(leftovers().empty());
            // `-o -`: the file itself on stdout, nothing after it; directories are refused.
            r = run_tool(c.tool, with(c.arguments, "-"));
            if (!c.streamed.empty()) {
                CHECK(r.exit_code == 0);
                const auto file = std::find_if(first.begin(), first.end(), [&](const auto& f) { return f.first == c.streamed; });
                REQUIRE(file != first.end());
                CHECK(r.out == file->second);
                CHECK(r.err.empty());
            } else if (c.directory) {
                CHECK(r.exit_code == 2);
                CHECK_THAT(r.err, Catch::Contains("directory"));
                CHECK_FALSE(fs::exists(dir / "-"));
                CHECK_FALSE(fs::exists(fs::path(LORAKIT_BINARY_DIR) / "-"));
            } else {
                CHECK(r.exit_code == 0);
                CHECK(r.out == first.front().second);
                CHECK(r.err.empty());
            }
        }
    }
}

TEST_CASE("notes reach stderr on request only: --verbose off a terminal, never with --quiet", "[cli][contract]") {
    ScratchDir dir;
    // Converting the mlx sample to GGUF notes how its scale was folded into one alpha.
    const std::vector<std::string> args = {samples + "/mlx-qwen", "--to", "gguf", "-o", (dir / "x.gguf").string()};
    auto r = run_tool("lora-convert", args);
    REQUIRE(r.exit_code == 0);
    CHECK(r.err.empty());
    auto verbose = args;
    verbose.push_back("--verbose");
    verbose.push_back("--force");
    r = run_tool("lora-convert", verbose);
    REQUIRE(r.exit_code == 0);
    CHECK_THAT(r.err, Catch::Contains("lora-convert: note: "));
    verbose.push_back("--quiet");
    r = run_tool("lora-convert", verbose);
    REQUIRE(r.exit_code == 0);
    CHECK(r.err.empty());
}

TEST_CASE("many inputs open under a small descriptor limit (mapped inputs keep descriptors only up to half of it)", "[cli][contract]") {
    // 60 inputs under a hard limit of 40 descriptors: each mapped input would keep one open.
    std::string command = "ulimit -n 40 && exec '" + lorakit::test::tool_path("lora-stack") + "'";
    for (int i = 0; i < 60; ++i) command += " '" + samples + "/kohya-sdxl.safetensors:0.01'";
    const auto r = lorakit::test::run_process("/bin/sh", {"-c", command});
    INFO(r.err);
    CHECK(r.exit_code == 0);
    CHECK_THAT(r.out, Catch::Contains("pair 59+60") && Catch::Contains("verdict: ok"));
}

TEST_CASE("the output's name decides the convention where --to is absent, and a contradicting --to is refused",
          "[cli][contract]") {
    // Regression: `-o x.gguf` used to write the input's convention under that name (a PEFT
    // directory called x.gguf, a kohya file called x.gguf), and `-o x.safetensors` of a PEFT
    // input a directory called x.safetensors.
    ScratchDir dir;
    const std::string peft = samples + "/peft-llama", kohya = samples + "/kohya-sdxl.safetensors";
    const std::vector<std::string> heads = {"--head-count", "8", "--head-count-kv", "2"};
    SECTION("*.gguf: a GGUF file, from any tool that writes") {
        std::vector<std::string> args = {peft, "-o", (dir / "a.gguf").string()};
        args.insert(args.end(), heads.begin(), heads.end());
        auto r = run_tool("lora-convert", args);
        INFO(r.err);
        REQUIRE(r.exit_code == 0);
        CHECK(fs::is_regular_file(dir / "a.gguf"));
        CHECK(read_file(dir / "a.gguf").substr(0, 4) == "GGUF");
        r = run_tool("lora-resize", {(dir / "a.gguf").string(), "-o", (dir / "b.gguf").string(), "--rank", "2"});
        INFO(r.err);
        CHECK(r.exit_code == 0);
        CHECK(read_file(dir / "b.gguf").substr(0, 4) == "GGUF");
        // An SD adapter has no GGUF form: refused, nothing written.
        r = run_tool("lora-convert", {kohya, "-o", (dir / "c.gguf").string()});
        CHECK(r.exit_code != 0);
        CHECK_FALSE(fs::exists(dir / "c.gguf"));
    }
    SECTION("a directory-writing input to *.safetensors: refused with what to pass") {
        auto r = run_tool("lora-convert", {peft, "-o", (dir / "x.safetensors").string()});
        CHECK(r.exit_code == 2);
        CHECK_THAT(r.err, Catch::Contains("names a safetensors file") && Catch::Contains("--to"));
        r = run_tool("lora-merge", {peft, peft, "-o", (dir / "x.safetensors").string()});
        CHECK(r.exit_code == 2);
        CHECK_THAT(r.err, Catch::Contains("names a safetensors file") && Catch::Contains("--to"));
        CHECK(fs::is_empty(dir.path()));
    }
    SECTION("--to contradicting the name: refused") {
        auto r = run_tool("lora-convert", {kohya, "-o", (dir / "y.safetensors").string(), "--to", "peft"});
        CHECK(r.exit_code == 2);
        CHECK_THAT(r.err, Catch::Contains("--to peft writes a directory"));
        r = run_tool("lora-convert", {kohya, "-o", (dir / "y.gguf").string(), "--to", "kohya"});
        CHECK(r.exit_code == 2);
        CHECK_THAT(r.err, Catch::Contains("names a GGUF file"));
        CHECK(fs::is_empty(dir.path()));
    }
    SECTION("a name ending in '/' or an existing directory: PEFT for a single-file input") {
        std::vector<std::string> args = {peft, "-o", (dir / "g.gguf").string()};
        args.insert(args.end(), heads.begin(), heads.end());
        REQUIRE(run_tool("lora-convert", args).exit_code == 0);
        const auto r = run_tool("lora-convert", {(dir / "g.gguf").string(), "-o", (dir / "back").string() + "/"});
        INFO(r.err);
        CHECK(r.exit_code == 0);
        CHECK(fs::is_regular_file(dir / "back" / "adapter_config.json"));
    }
}
