// Benchmark of `lora-inspect --json` on large synthetic adapters, next to `cat` of the same
// bytes measured in the same run (these machines are noisy; ratios are what to compare).
//
// Usage: bench-inspect [DIR] [REPEATS]
//   DIR      where the synthetic adapters are generated (default /tmp/lorakit-bench); kept
//            between runs, regenerated when missing
//   REPEATS  timed runs per command after one warm-up (default 3); the median is reported
//
// Prints a markdown table: file size, median wall time of `cat FILE > /dev/null` and of
// `lora-inspect --json DIR > /dev/null`, their ratio, lora-inspect's peak RSS (VmHWM of the
// child, from wait4) and its ratio to the file size.
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "synthetic.h"

namespace fs = std::filesystem;

namespace {

struct Run {
    double seconds = 0;
    double peak_rss_mb = 0;
    int status = 0;
};

// Runs argv with stdout to /dev/null; wall time and the child's peak RSS.
Run run(const std::vector<std::string>& argv) {
    const auto start = std::chrono::steady_clock::now();
    const pid_t pid = ::fork();
    if (pid == 0) {
        const int null = ::open("/dev/null", O_WRONLY);
        ::dup2(null, 1);
        std::vector<char*> args;
        for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        ::execvp(args[0], args.data());
        ::_exit(127);
    }
    int status = 0;
    struct rusage usage {};
    ::wait4(pid, &status, 0, &usage);
    Run r;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    r.peak_rss_mb = static_cast<double>(usage.ru_maxrss) / 1024.0;
    r.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return r;
}

Run median_of(const std::vector<std::string>& argv, int repeats) {
    run(argv);  // warm-up: page cache, first-touch effects
    std::vector<Run> runs;
    for (int i = 0; i < repeats; ++i) runs.push_back(run(argv));
    std::sort(runs.begin(), runs.end(), [](const Run& a, const Run& b) { return a.seconds < b.seconds; });
    return runs[runs.size() / 2];
}

std::string tool(const char* self, const char* name) {
    // The tools live next to this benchmark in build/bin.
    return (fs::path(self).parent_path() / name).string();
}

}  // namespace

int main(int argc, char** argv) {
    const fs::path dir = argc > 1 ? fs::path(argv[1]) : fs::path("/tmp/lorakit-bench");
    const int repeats = argc > 2 ? std::max(1, std::atoi(argv[2])) : 3;
    fs::create_directories(dir);
    const fs::path llama = dir / "llama7b-r128-peft";
    const fs::path sdxl = dir / "sdxl-r32-kohya.safetensors";
    if (!fs::exists(llama / "adapter_model.safetensors")) {
        std::fprintf(stderr, "generating %s ...\n", llama.c_str());
        lorakit::bench::make_llama7b_peft(llama);
    }
    if (!fs::exists(sdxl)) {
        std::fprintf(stderr, "generating %s ...\n", sdxl.c_str());
        lorakit::bench::make_sdxl_kohya(sdxl);
    }
    const std::string inspect = tool(argv[0], "lora-inspect");
    struct Case {
        std::string label;
        fs::path input;
        fs::path weights;
    };
    const Case cases[] = {{"Llama-7B-shaped PEFT, r=128, f32, 224 modules", llama, llama / "adapter_model.safetensors"},
                          {"SDXL-shaped kohya, r=32, f16, 986 modules", sdxl, sdxl}};
    fmt::print("| adapter | size | `cat` | `lora-inspect --json` | ratio to `cat` | peak RSS | RSS / size |\n");
    fmt::print("|---|---|---|---|---|---|---|\n");
    for (const auto& c : cases) {
        const double size_mb = static_cast<double>(fs::file_size(c.weights)) / 1e6;
        const Run cat = median_of({"cat", c.weights.string()}, repeats);
        const Run lk = median_of({inspect, "--json", c.input.string()}, repeats);
        if (lk.status != 0) {
            std::fprintf(stderr, "lora-inspect failed with status %d on %s\n", lk.status, c.input.c_str());
            return 1;
        }
        fmt::print("| {} | {:.0f} MB | {:.3f} s | {:.3f} s | {:.1f}x | {:.0f} MB | {:.2f} |\n", c.label, size_mb,
                   cat.seconds, lk.seconds, lk.seconds / cat.seconds, lk.peak_rss_mb, lk.peak_rss_mb / size_mb);
    }
    return 0;
}
