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
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "common.h"
#include "lorakit/linalg.h"
#include "synthetic.h"

extern "C" void cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);

namespace fs = std::filesystem;
using namespace lorakit::bench;

int main(int argc, char** argv) {
    const auto [dir, repeats] = bench_arguments(argc, argv);
    const fs::path llama = llama7b_peft_in(dir), sdxl = sdxl_kohya_in(dir);
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
    // The dense route the Python tools take for the same numbers, on one 4096 x 4096 module
    // at rank 128: form B·A, then a full SVD (values only) of the dense matrix.
    {
        const std::int64_t n = 4096, r = 128;
        lorakit::SplitMix64 random(7);
        std::vector<float> b(static_cast<std::size_t>(n * r)), a(static_cast<std::size_t>(r * n)), dense(static_cast<std::size_t>(n * n));
        for (auto& x : b) x = random.uniform();
        for (auto& x : a) x = random.uniform();
        lorakit::linalg::Workspace workspace;
        const lorakit::linalg::LowRankTerm term{b.data(), a.data(), n, r, n, 1.0};
        lorakit::linalg::factored_singular_values({&term, 1}, workspace);  // warm-up
        const auto t0 = std::chrono::steady_clock::now();
        const auto factored = lorakit::linalg::factored_singular_values({&term, 1}, workspace);
        const double factored_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const auto t1 = std::chrono::steady_clock::now();
        cblas_sgemm(101, 111, 111, static_cast<int>(n), static_cast<int>(n), static_cast<int>(r), 1.0f, b.data(),
                    static_cast<int>(r), a.data(), static_cast<int>(n), 0.0f, dense.data(), static_cast<int>(n));
        const auto values = lorakit::linalg::dense_singular_values(dense.data(), n, n);
        const double dense_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
        double worst = 0;
        for (std::size_t i = 0; i < factored.size(); ++i)
            worst = std::max(worst, std::abs(factored[i] - values[i]) / values[0]);
        fmt::print("\nOne 4096x4096 module, rank 128: factored {:.4f} s, dense (sgemm + dgesdd values) {:.2f} s, "
                   "{:.0f}x; largest singular-value difference {:.1e} of sigma_1\n",
                   factored_s, dense_s, dense_s / factored_s, worst);
    }
    return 0;
}
