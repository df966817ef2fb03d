// Benchmark of lora-convert next to copying the same bytes: an SDXL-shaped kohya LoRA to
// diffusers and back, and a Llama-7B-shaped PEFT LoRA to GGUF; also lorakit's own read + write
// of the 7B file (PEFT to PEFT), the floor lora-resize is compared with. lorakit's writes end
// with an fsync (a finished output is on disk) unless --no-sync: each is compared with `cp` timed
// the same way (with and without an fsync of the copy).
//
// Usage: bench-convert [DIR] [REPEATS]   (DIR default /tmp/lorakit-bench, shared with the
// other benchmarks; REPEATS default 3, median reported after a warm-up; each row's four commands
// are timed in interleaved rounds)
#include <cstdio>

#include <fmt/format.h>

#include "common.h"
#include "synthetic.h"

namespace fs = std::filesystem;
using namespace lorakit::bench;

int main(int argc, char** argv) {
    const auto [dir, rounds] = bench_arguments(argc, argv);
    const int repeats = rounds;  // captured below: a lambda cannot capture a structured binding in C++20 (clang)
    const fs::path llama = llama7b_peft_in(dir), sdxl = sdxl_kohya_in(dir);
    const std::string convert = tool(argv[0], "lora-convert");
    const fs::path copy = dir / "out-copy", diffusers = dir / "out-diffusers.safetensors",
                   kohya = dir / "out-kohya.safetensors", gguf = dir / "out-llama.gguf", peft = dir / "out-peft";
    struct Row {
        std::string what;
        Run ours, ours_no_sync, cp, cp_sync;
        double mb;
    };
    std::vector<Row> rows;
    auto run = [&](std::string what, const fs::path& input, const fs::path& input_bytes, std::vector<std::string> args,
                   const fs::path& output) {
        std::vector<std::string> command{convert, input.string(), "-o", output.string(), "-q", "-f"};
        command.insert(command.end(), args.begin(), args.end());
        std::vector<std::string> no_sync = command;
        no_sync.push_back("--no-sync");
        auto clean = [&] { fs::remove_all(output); };
        auto clean_copy = [&] { fs::remove(copy); };
        const std::vector<Run> r = interleaved_medians(
            {{command, clean},
             {no_sync, clean},
             {{"cp", input_bytes.string(), copy.string()}, clean_copy},
             {{"sh", "-c", fmt::format("cp '{}' '{}' && sync '{}'", input_bytes.string(), copy.string(), copy.string())},
              clean_copy}},
            repeats);
        Row row{std::move(what), r[0], r[1], r[2], r[3], static_cast<double>(fs::file_size(input_bytes)) / 1e6};
        if (row.ours.status != 0 || row.ours_no_sync.status != 0) {
            std::fprintf(stderr, "lora-convert failed (%d) for %s\n", row.ours.status, row.what.c_str());
            std::exit(1);
        }
        rows.push_back(std::move(row));
    };
    run("SDXL kohya r32 f16 -> diffusers", sdxl, sdxl, {"--to", "diffusers"}, diffusers);
    run("SDXL diffusers -> kohya", diffusers, diffusers, {"--to", "kohya"}, kohya);
    run("7B PEFT r128 f32 -> GGUF (llama, 32 heads)", llama, llama / "adapter_model.safetensors",
        {"--to", "gguf", "--arch", "llama", "--head-count", "32", "--head-count-kv", "32"}, gguf);
    run("7B PEFT -> PEFT (lorakit read + write)", llama, llama / "adapter_model.safetensors", {"--to", "peft"}, peft);

    fmt::print("## lora-convert (median of {} interleaved rounds, after a warm-up round)\n\n", repeats);
    fmt::print("| conversion | input | `cp` + fsync | lora-convert | ratio | `cp` | lora-convert --no-sync | ratio | peak RSS |\n");
    fmt::print("|---|---|---|---|---|---|---|---|---|\n");
    for (const auto& r : rows)
        fmt::print("| {} | {:.0f} MB | {:.3f} s | {:.3f} s | {:.2f}x | {:.3f} s | {:.3f} s | {:.2f}x | {:.0f} MB |\n", r.what,
                   r.mb, r.cp_sync.seconds, r.ours.seconds, r.ours.seconds / r.cp_sync.seconds, r.cp.seconds,
                   r.ours_no_sync.seconds, r.ours_no_sync.seconds / r.cp.seconds, r.ours.peak_rss_mb);
    for (const auto& p : {copy, diffusers, kohya, gguf}) fs::remove(p);
    fs::remove_all(peft);
    return 0;
}
