// Benchmark of lora-resize and lora-merge next to the I/O they cannot avoid and to the dense
// route the Python tools take (form B·A, full SVD), timed on a few modules and extrapolated.
//
// Usage: bench-resize_merge [DIR] [REPEATS]   (DIR default /tmp/lorakit-bench, shared with
// bench-inspect; REPEATS default 3, median reported after a warm-up)
#include <lapacke.h>

#include <cmath>
#include <cstdio>

#include <fmt/format.h>

#include "common.h"
#include "synthetic.h"

extern "C" void cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
extern "C" void openblas_set_num_threads(int);

namespace fs = std::filesystem;
using namespace lorakit::bench;

namespace {

// The dense route for one out x in module of rank r: form B·A (sgemm), then the full SVD with
// vectors that kohya's resize_lora.py / svd_merge_lora.py run (LAPACK sgesdd, the fastest
// driver; torch.linalg.svd is slower, research/performance.md §4).
double dense_route_seconds(std::int64_t out, std::int64_t in, std::int64_t r, int terms) {
    lorakit::SplitMix64 random(5);
    std::vector<float> b(static_cast<std::size_t>(out * r)), a(static_cast<std::size_t>(r * in)),
        m(static_cast<std::size_t>(out * in), 0.0f);
    for (auto& x : b) x = random.uniform();
    for (auto& x : a) x = random.uniform();
    return seconds_of([&] {
        for (int t = 0; t < terms; ++t)
            cblas_sgemm(101, 111, 111, static_cast<int>(out), static_cast<int>(in), static_cast<int>(r), 1.0f, b.data(),
                        static_cast<int>(r), a.data(), static_cast<int>(in), 1.0f, m.data(), static_cast<int>(in));
        const int mn = static_cast<int>(std::min(out, in));
        std::vector<float> s(static_cast<std::size_t>(mn)), u(static_cast<std::size_t>(out) * mn), vt(static_cast<std::size_t>(mn) * in);
        LAPACKE_sgesdd(LAPACK_ROW_MAJOR, 'S', static_cast<int>(out), static_cast<int>(in), m.data(), static_cast<int>(in),
                       s.data(), u.data(), mn, vt.data(), static_cast<int>(in));
    });
}

}  // namespace

int main(int argc, char** argv) {
    const auto [dir, repeats] = bench_arguments(argc, argv);
    const fs::path llama = llama7b_peft_in(dir);
    std::vector<fs::path> sdxl;
    for (std::uint64_t seed : {42, 43, 44}) sdxl.push_back(sdxl_kohya_in(dir, seed));
    const std::string resize = tool(argv[0], "lora-resize"), merge = tool(argv[0], "lora-merge");
    const fs::path resized = dir / "out-resized", merged = dir / "out-merged.safetensors", copy = dir / "out-copy";

    // Resize: 224 modules, rank 128 -> 32.
    const std::string input = (llama / "adapter_model.safetensors").string();
    auto clean_copy = [&] { fs::remove(copy); };
    auto clean_resized = [&] { fs::remove_all(resized); };
    const std::vector<Run> timed = interleaved_medians(
        {{{"cp", input, copy.string()}, clean_copy},
         {{"sh", "-c", "cp \"$0\" \"$1\" && sync \"$1\"", input, copy.string()}, clean_copy},
         {{resize, llama.string(), "-o", resized.string(), "--rank", "32", "-q"}, clean_resized},
         {{resize, llama.string(), "-o", resized.string(), "--rank", "32", "-q", "--no-sync"}, clean_resized}},
        repeats);
    const Run &cp = timed[0], &cp_sync = timed[1], &lr = timed[2], &lr_no_sync = timed[3];
    if (lr.status != 0 || lr_no_sync.status != 0) {
        std::fprintf(stderr, "lora-resize failed (%d)\n", lr.status);
        return 1;
    }
    openblas_set_num_threads(2);
    const double dense_4096 = dense_route_seconds(4096, 4096, 128, 1);
    const double dense_11008 = dense_route_seconds(11008, 4096, 128, 1);
    const double dense_total = 32 * (4 * dense_4096 + 3 * dense_11008);
    fmt::print("## Resize: Llama-7B-shaped PEFT, rank 128 -> 32 (224 modules, 1279 MB in)\n\n");
    fmt::print("| | time | peak RSS |\n|---|---|---|\n");
    fmt::print("| `cp` of the input | {:.3f} s | |\n", cp.seconds);
    fmt::print("| `lora-resize --rank 32 --no-sync` | {:.3f} s | {:.0f} MB |\n", lr_no_sync.seconds, lr_no_sync.peak_rss_mb);
    fmt::print("| `cp` + fsync of the input | {:.3f} s | |\n", cp_sync.seconds);
    fmt::print("| `lora-resize --rank 32` (durable: fsync) | {:.3f} s | {:.0f} MB |\n", lr.seconds, lr.peak_rss_mb);
    fmt::print("| dense route, one 4096x4096 module (sgemm + sgesdd with vectors) | {:.2f} s | |\n", dense_4096);
    fmt::print("| dense route, one 11008x4096 module | {:.2f} s | |\n", dense_11008);
    fmt::print("| dense route, whole file (extrapolated: 32 x (4 x 4096² + 3 x 11008x4096)) | {:.0f} s | |\n\n", dense_total);
    fmt::print("lora-resize: {:.2f}x the time of cp (both without fsync), {:.2f}x cp + fsync (both durable); {:.0f}x faster "
               "than the dense route\n\n",
               lr_no_sync.seconds / cp.seconds, lr.seconds / cp_sync.seconds, dense_total / lr.seconds);

    // Merge: three SDXL-shaped kohya LoRAs (986 modules each, rank 32) with svd to rank 64.
    const Run cat = median_of({"cat", sdxl[0].string(), sdxl[1].string(), sdxl[2].string()}, repeats);
    const Run lm = median_of({merge, sdxl[0].string(), sdxl[1].string(), sdxl[2].string(), "--method", "svd", "--rank", "64",
                              "-o", merged.string(), "-q"},
                             repeats, [&] { fs::remove(merged); });
    if (lm.status != 0) {
        std::fprintf(stderr, "lora-merge failed (%d)\n", lm.status);
        return 1;
    }
    // SDXL module shapes: 1280-wide blocks dominate; time the dense route on the common shapes.
    const double d1280 = dense_route_seconds(1280, 1280, 32, 3), d640 = dense_route_seconds(640, 640, 32, 3),
                 dff = dense_route_seconds(10240, 1280, 32, 3), dte2 = dense_route_seconds(1280, 1280, 32, 3);
    // 60 blocks at 1280: 8 square-ish (q,k,v,out x2 + attn2 k/v from 2048 ~ square) + ff0 (1280->10240) + ff2 (5120->1280);
    // 10 blocks at 640; proj_in/out; text encoders (CLIP-G 32 layers of 6, CLIP-L 12 of 6).
    const double dense_merge = 60 * (8 * d1280 + 2 * dff) + 10 * (10 * d640) + 22 * d1280 + 32 * 6 * dte2 + 12 * 6 * d640;
    fmt::print("## Merge: three SDXL-shaped kohya LoRAs (rank 32, 986 modules each) with svd to rank 64\n\n");
    fmt::print("| | time | peak RSS |\n|---|---|---|\n");
    fmt::print("| `cat` of the inputs | {:.3f} s | |\n", cat.seconds);
    fmt::print("| `lora-merge --method svd --rank 64` | {:.3f} s | {:.0f} MB |\n", lm.seconds, lm.peak_rss_mb);
    fmt::print("| dense route (3 products + sgesdd; measured on 640², 1280², 10240x1280, extrapolated) | {:.0f} s | |\n\n",
               dense_merge);
    fmt::print("lora-merge: {:.0f}x faster than the dense route\n", dense_merge / lm.seconds);
    fs::remove_all(resized);
    fs::remove(merged);
    fs::remove(copy);
    return 0;
}
