// Benchmark of lora-stack: the stability report of five SDXL-shaped kohya LoRAs, next to `cat`
// of the same bytes and to the dense route (form every ΔW_i, dot products, an SVD of the sum),
// and the same report against an SDXL-shaped base checkpoint next to `cat` of the base, both with
// the base in the page cache and read from the disk.
//
// Usage: bench-stack [DIR] [REPEATS]   (DIR default /tmp/lorakit-bench, shared with the other
// benchmarks; REPEATS default 3, median reported after a warm-up)
#include <lapacke.h>

#include <cmath>
#include <cstdio>
#include <map>

#include <fmt/format.h>

#include "common.h"
#include "lorakit/formats/builtin.h"
#include "synthetic.h"

extern "C" void cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
extern "C" void openblas_set_num_threads(int);

namespace fs = std::filesystem;
using namespace lorakit;
using namespace lorakit::bench;

namespace {

// The dense route for one out x in module and n adapters of rank r: form each ΔW_i (sgemm),
// the n(n-1)/2 inner products and norms, the sum, and its singular values (sgesdd, values only).
double dense_route_seconds(std::int64_t out, std::int64_t in, std::int64_t r, int n) {
    SplitMix64 random(5);
    std::vector<float> b(static_cast<std::size_t>(out * r)), a(static_cast<std::size_t>(r * in));
    for (auto& x : b) x = random.uniform();
    for (auto& x : a) x = random.uniform();
    std::vector<std::vector<float>> d(static_cast<std::size_t>(n), std::vector<float>(static_cast<std::size_t>(out * in)));
    return seconds_of([&] {
        for (auto& m : d)
            cblas_sgemm(101, 111, 111, static_cast<int>(out), static_cast<int>(in), static_cast<int>(r), 1.0f, b.data(),
                        static_cast<int>(r), a.data(), static_cast<int>(in), 0.0f, m.data(), static_cast<int>(in));
        double sink = 0;
        for (int i = 0; i < n; ++i)
            for (int j = i; j < n; ++j)
                for (std::size_t t = 0; t < d[0].size(); ++t) sink += static_cast<double>(d[static_cast<std::size_t>(i)][t]) * d[static_cast<std::size_t>(j)][t];
        for (int i = 1; i < n; ++i)
            for (std::size_t t = 0; t < d[0].size(); ++t) d[0][t] += d[static_cast<std::size_t>(i)][t];
        const int mn = static_cast<int>(std::min(out, in));
        std::vector<float> s(static_cast<std::size_t>(mn));
        LAPACKE_sgesdd(LAPACK_ROW_MAJOR, 'N', static_cast<int>(out), static_cast<int>(in), d[0].data(), static_cast<int>(in),
                       s.data(), nullptr, mn, nullptr, static_cast<int>(in));
        if (sink == 1.2345) std::puts("");
    });
}

// An SDXL-shaped base: one f16 tensor for every module the LoRA targets, under the names of
// the original single-file checkpoint (SGM UNet, CLIP-L, OpenCLIP with fused in_proj).
void make_sdxl_base(const fs::path& lora, const fs::path& path) {
    const Adapter a = formats::builtin_registry().load_adapter(lora);
    SyntheticAdapter base;
    base.random = SplitMix64(99);
    std::map<std::string, bool> done;
    for (const auto& m : a.modules) {
        std::string key;
        Shape shape = {m.out_features(), m.in_features()};
        const std::string& n = m.name;
        if (n.starts_with("unet.")) key = "model.diffusion_model." + n.substr(5) + ".weight";
        else if (n.starts_with("text_encoder.")) key = "conditioner.embedders.0.transformer." + n.substr(13) + ".weight";
        else if (n.starts_with("text_encoder_2.text_model.encoder.layers.")) {
            const std::string rest = n.substr(std::string("text_encoder_2.text_model.encoder.layers.").size());
            const std::string index = rest.substr(0, rest.find('.')), tail = rest.substr(rest.find('.') + 1);
            const std::string block = "conditioner.embedders.1.model.transformer.resblocks." + index + ".";
            if (tail == "self_attn.q_proj" || tail == "self_attn.k_proj" || tail == "self_attn.v_proj") {
                key = block + "attn.in_proj_weight";
                shape = {3 * m.out_features(), m.in_features()};
            } else if (tail == "self_attn.out_proj") key = block + "attn.out_proj.weight";
            else if (tail == "mlp.fc1") key = block + "mlp.c_fc.weight";
            else if (tail == "mlp.fc2") key = block + "mlp.c_proj.weight";
        }
        if (key.empty() || done[key]) continue;
        done[key] = true;
        base.tensors.emplace_back(key, base.random_tensor(DType::F16, shape, 0.05f));
    }
    base.write(path);
}

}  // namespace

int main(int argc, char** argv) {
    const auto [dir, repeats] = bench_arguments(argc, argv);
    std::vector<std::string> loras;
    for (std::uint64_t seed : {42, 43, 44, 45, 46}) loras.push_back(sdxl_kohya_in(dir, seed).string());
    const fs::path base = dir / "sdxl-base-targets.safetensors";
    generate_once(base, base, [&] { make_sdxl_base(loras[0], base); });
    const std::string stack = tool(argv[0], "lora-stack");
    std::vector<std::string> cat = {"cat"}, report = {stack, "-q"};
    for (const auto& l : loras) cat.push_back(l), report.push_back(l);
    std::uint64_t lora_bytes = 0;
    for (const auto& l : loras) lora_bytes += fs::file_size(l);

    const Run c = median_of(cat, repeats);
    const Run s = median_of(report, repeats);
    if (s.status != 0) {
        std::fprintf(stderr, "lora-stack failed (%d)\n", s.status);
        return 1;
    }
    std::vector<std::string> with_base = report;
    with_base.insert(with_base.end(), {"--base", base.string()});
    const Run cb = median_of({"cat", base.string()}, repeats);
    const Run sb = median_of(with_base, repeats);
    if (sb.status != 0) {
        std::fprintf(stderr, "lora-stack --base failed (%d)\n", sb.status);
        return 1;
    }
    // The same with the base read from the disk: its pages dropped from the page cache before
    // each run (the adapters stay cached).
    const auto cold = [&] { evict(base); };
    const Run cbc = median_of({"cat", base.string()}, repeats, cold);
    const Run sbc = median_of(with_base, repeats, cold);

    // The dense route on the module shapes of the file, each timed once and weighted by its count.
    openblas_set_num_threads(2);
    const Adapter a = formats::builtin_registry().load_adapter(loras[0]);
    std::map<std::pair<std::int64_t, std::int64_t>, int> shapes;
    for (const auto& m : a.modules) ++shapes[{m.out_features(), m.flat_in_features()}];
    double dense = 0;
    for (const auto& [shape, count] : shapes) dense += count * dense_route_seconds(shape.first, shape.second, 32, 5);

    fmt::print("## Stack: five SDXL-shaped kohya LoRAs (rank 32, {} modules each, {:.0f} MB in all)\n\n", a.modules.size(),
               static_cast<double>(lora_bytes) / 1e6);
    fmt::print("| | time | peak RSS |\n|---|---|---|\n");
    fmt::print("| `cat` of the five adapters | {:.3f} s | |\n", c.seconds);
    fmt::print("| `lora-stack` (full report, no base) | {:.3f} s | {:.0f} MB |\n", s.seconds, s.peak_rss_mb);
    fmt::print("| dense route (5 products, 15 inner products, sgesdd of the sum; each shape timed) | {:.1f} s | |\n",
               dense);
    fmt::print("| `cat` of the base ({:.2f} GB, the tensors the LoRAs target) | {:.3f} s | |\n",
               static_cast<double>(fs::file_size(base)) / 1e9, cb.seconds);
    fmt::print("| `lora-stack --base` | {:.3f} s | {:.0f} MB |\n", sb.seconds, sb.peak_rss_mb);
    fmt::print("| `cat` of the base, read from the disk (dropped from the page cache) | {:.3f} s | |\n", cbc.seconds);
    fmt::print("| `lora-stack --base`, the base read from the disk | {:.3f} s | {:.0f} MB |\n\n", sbc.seconds,
               sbc.peak_rss_mb);
    fmt::print("lora-stack: {:.2f}x the time of cat, {:.0f}x faster than the dense route (goal: under 2 s)\n", s.seconds / c.seconds,
               dense / s.seconds);
    fmt::print("lora-stack --base: {:.2f}x the time of cat of the base (page cache), {:.2f}x (from the disk)\n",
               sb.seconds / cb.seconds, sbc.seconds / cbc.seconds);
    return 0;
}
