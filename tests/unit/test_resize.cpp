// Rank rules (lorakit's and kohya's, with known answers) and resize against dense references.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>

#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/linalg.h"
#include "lorakit/resize.h"
#include "support.h"

using namespace lorakit;

namespace {

// A module with the given spectrum: B = U·diag(σ) (out x r), A = Vᵀ (r x in), orthonormal
// U, V from a QR-free Gram–Schmidt on random vectors, so its singular values are exactly σ.
LoraModule module_with_spectrum(const std::vector<double>& sigma, std::int64_t out, std::int64_t in, unsigned seed,
                                DType type = DType::F32) {
    std::mt19937 g(seed);
    std::normal_distribution<double> d;
    const auto r = static_cast<std::int64_t>(sigma.size());
    auto orthonormal = [&](std::int64_t n) {
        std::vector<std::vector<double>> q;
        for (std::int64_t j = 0; j < r; ++j) {
            std::vector<double> v(static_cast<std::size_t>(n));
            for (auto& x : v) x = d(g);
            for (const auto& p : q) {
                double dot = 0;
                for (std::int64_t i = 0; i < n; ++i) dot += v[i] * p[i];
                for (std::int64_t i = 0; i < n; ++i) v[i] -= dot * p[i];
            }
            double norm = 0;
            for (double x : v) norm += x * x;
            for (auto& x : v) x /= std::sqrt(norm);
            q.push_back(v);
        }
        return q;
    };
    const auto u = orthonormal(out), v = orthonormal(in);
    std::vector<float> b(static_cast<std::size_t>(out * r)), a(static_cast<std::size_t>(r * in));
    for (std::int64_t o = 0; o < out; ++o)
        for (std::int64_t k = 0; k < r; ++k) b[o * r + k] = static_cast<float>(u[k][o] * sigma[k]);
    for (std::int64_t k = 0; k < r; ++k)
        for (std::int64_t i = 0; i < in; ++i) a[k * in + i] = static_cast<float>(v[k][i]);
    LoraModule m;
    m.name = "model.layers.0.self_attn.q_proj";
    m.down = Tensor::from_f32(type, {r, in}, a);
    m.up = Tensor::from_f32(type, {out, r}, b);
    m.alpha = static_cast<double>(r);  // scale 1
    return m;
}

// Dense scale·B·A in double.
std::vector<double> dense_delta(const LoraModule& m) {
    const auto a = m.down.to_f32(), b = m.up.to_f32();
    const std::int64_t out = m.out_features(), in = m.flat_in_features(), r = m.rank();
    std::vector<double> w(static_cast<std::size_t>(out * in), 0.0);
    for (std::int64_t o = 0; o < out; ++o)
        for (std::int64_t k = 0; k < r; ++k)
            for (std::int64_t i = 0; i < in; ++i) w[o * in + i] += m.scale() * b[o * r + k] * a[k * in + i];
    return w;
}

double fro(const std::vector<double>& x) {
    double s = 0;
    for (double v : x) s += v * v;
    return std::sqrt(s);
}

double fro_diff(const std::vector<double>& x, const std::vector<double>& y) {
    double s = 0;
    for (std::size_t i = 0; i < x.size(); ++i) s += (x[i] - y[i]) * (x[i] - y[i]);
    return std::sqrt(s);
}

}  // namespace

TEST_CASE("lorakit's rank rules on a known spectrum", "[resize][rank]") {
    const std::vector<double> s = {8, 4, 2, 1, 0.5};  // Σσ = 15.5, Σσ² = 85.25
    auto rank_of = [&](const char* rule, std::int64_t max = 0) {
        RankSpec spec = parse_dynamic_rule(rule);
        spec.rank = max;
        return choose_rank(s, 5, 5, false, spec).rank;
    };
    CHECK(rank_of("sv_ratio=3") == 2);        // σ > 8/3: {8, 4}
    CHECK(rank_of("sv_ratio=8") == 3);        // σ > 1 strictly: {8, 4, 2}
    CHECK(rank_of("sv_cumulative=0.75") == 2);  // 12/15.5 = 0.774 >= 0.75
    CHECK(rank_of("sv_cumulative=0.78") == 3);
    CHECK(rank_of("energy=0.9") == 2);        // 80/85.25 = 0.938
    CHECK(rank_of("energy=0.95") == 3);       // 84/85.25 = 0.985
    CHECK(rank_of("sv_fro=0.96") == 2);       // sqrt(0.938) = 0.969
    CHECK(rank_of("sv_fro=0.97") == 3);
    CHECK(rank_of("sv_ratio=100", 4) == 4);   // --rank caps a dynamic rule
    RankSpec fixed;
    fixed.rank = 3;
    CHECK(choose_rank(s, 5, 5, false, fixed).rank == 3);
    CHECK(choose_rank(s, 5, 2, false, fixed).rank == 2);  // never raises a rank
    const RankChoice c = rank_statistics(s, 2);
    CHECK(c.fro_retained == Approx(std::sqrt(80.0 / 85.25)));
    CHECK(c.sum_retained == Approx(12.0 / 15.5));
    CHECK(c.max_ratio == 2.0);
    CHECK(c.relative_error == Approx(std::sqrt(5.25 / 85.25)));
    CHECK_THROWS_AS(parse_dynamic_rule("sv_ratio=0.5"), Error);
    CHECK_THROWS_AS(parse_dynamic_rule("energy=1.5"), Error);
    CHECK_THROWS_AS(parse_dynamic_rule("nope=1"), Error);
}

TEST_CASE("kohya's rank rules, legacy and after PR #2194, on padded spectra", "[resize][rank]") {
    // A rank-5 module of a 64 x 64 layer: kohya's full SVD has 64 values, the last 59 zero.
    const std::vector<double> s = {8, 4, 2, 1, 0.5};
    auto rank_of = [&](const char* rule, RankCompat compat, std::int64_t max = 64) {
        RankSpec spec = parse_dynamic_rule(rule);
        spec.rank = max;
        spec.compat = compat;
        return choose_rank(s, 64, 5, false, spec).rank;
    };
    // sv_ratio=3: count = 2. Legacy: clamp(2, 1, 63) + 1 = 3; after #2194: clamp(1, 0, 63) + 1 = 2.
    CHECK(rank_of("sv_ratio=3", RankCompat::kohya) == 3);
    CHECK(rank_of("sv_ratio=3", RankCompat::kohya_2194) == 2);
    // sv_cumulative=0.75: searchsorted index 1. Legacy: clamp(2, 1, 63) + 1 = 3; #2194: 1 + 1 = 2.
    CHECK(rank_of("sv_cumulative=0.75", RankCompat::kohya) == 3);
    CHECK(rank_of("sv_cumulative=0.75", RankCompat::kohya_2194) == 2);
    // sv_fro=0.96 compares cumsum(σ²)/Σσ² with 0.96² = 0.9216: index 1 again.
    CHECK(rank_of("sv_fro=0.96", RankCompat::kohya) == 3);
    CHECK(rank_of("sv_fro=0.96", RankCompat::kohya_2194) == 2);
    // --new_rank caps dynamic ranks; a fixed rank is taken as given, even above the module's rank.
    CHECK(rank_of("sv_ratio=1000", RankCompat::kohya, 4) == 4);
    RankSpec fixed;
    fixed.rank = 8;
    fixed.compat = RankCompat::kohya;
    CHECK(choose_rank(s, 64, 5, false, fixed).rank == 8);
    // A zero matrix (σ1 <= 1e-6) gets rank 1.
    CHECK(choose_rank({0, 0}, 64, 2, false, fixed).rank == 1);
    // Convolutions use --new_conv_rank.
    fixed.conv_rank = 2;
    CHECK(choose_rank(s, 64, 5, true, fixed).rank == 2);
}

TEST_CASE("resize gives the best rank-k approximation and keeps the scale", "[resize]") {
    for (unsigned seed : {1u, 2u, 3u}) {
        LoraModule m = module_with_spectrum({5, 3, 2, 1, 0.5, 0.25}, 40, 30, seed);
        m.alpha = 12.0;  // scale 2
        const auto dense = dense_delta(m);
        for (std::int64_t k : {1, 3, 5}) {
            const LoraModule r = refactor_module(m, k, FactorSplit::up, std::nullopt);
            CHECK(r.rank() == k);
            CHECK(r.scale() == Approx(2.0));  // alpha became 2 * k
            CHECK(*r.alpha == Approx(2.0 * k));
            const auto approx = dense_delta(r);
            // Eckart–Young: the error is the dropped singular values of 2·B·A.
            double optimal = 0;
            const std::vector<double> sigma = {5, 3, 2, 1, 0.5, 0.25};
            for (std::size_t j = static_cast<std::size_t>(k); j < sigma.size(); ++j) optimal += 4 * sigma[j] * sigma[j];
            CHECK(fro_diff(dense, approx) == Approx(std::sqrt(optimal)).epsilon(1e-4));
            const LoraModule balanced = refactor_module(m, k, FactorSplit::balanced, std::nullopt);
            CHECK(fro_diff(dense_delta(balanced), approx) <= 1e-5 * fro(dense));
        }
    }
}

TEST_CASE("resize reproduces a LoRA whose true rank is below the target exactly", "[resize]") {
    // Rank-8 factors holding a rank-3 product.
    LoraModule m = module_with_spectrum({4, 2, 1}, 24, 20, 9);
    std::vector<float> a = m.down.to_f32(), b = m.up.to_f32();
    std::vector<float> a8(8 * 20, 0.0f), b8(24 * 8, 0.0f);
    for (int k = 0; k < 3; ++k) {
        for (int i = 0; i < 20; ++i) a8[k * 20 + i] = a[k * 20 + i];
        for (int o = 0; o < 24; ++o) b8[o * 8 + k] = b[o * 3 + k];
    }
    for (int i = 0; i < 20; ++i) a8[5 * 20 + i] = 0.3f * static_cast<float>(i);  // a direction B ignores
    m.down = Tensor::from_f32(DType::F32, {8, 20}, a8);
    m.up = Tensor::from_f32(DType::F32, {24, 8}, b8);
    m.alpha = 8.0;
    Adapter adapter;
    adapter.modules.push_back(m);
    ResizeOptions options;
    options.rank.rank = 4;
    const ResizeResult r = resize_adapter(adapter, options, no_progress());
    REQUIRE(r.modules.size() == 1);
    CHECK(r.modules[0].choice.rank == 4);
    CHECK(r.modules[0].choice.relative_error < 1e-6);
    CHECK(fro_diff(dense_delta(m), dense_delta(r.adapter.modules[0])) <= 1e-5 * fro(dense_delta(m)));
    // At or below the target: copied unchanged.
    options.rank.rank = 8;
    const ResizeResult same = resize_adapter(adapter, options, no_progress());
    CHECK(same.modules[0].unchanged);
    CHECK(same.adapter.modules[0].down.bytes().data() == m.down.bytes().data());
}

TEST_CASE("resize reads 16-bit factors as stored and refuses non-finite ones", "[resize]") {
    // The same module in f32, f16 and bf16: the factors go to the factored SVD undecoded, and
    // each result equals the one from its values widened to f32 beforehand.
    for (const DType type : {DType::F16, DType::BF16}) {
        INFO(dtype_name(type));
        const LoraModule m = module_with_spectrum({5, 3, 2, 1, 0.5, 0.25}, 30, 26, 21, type);
        LoraModule widened = m;
        widened.down = Tensor::from_f32(DType::F32, m.down.shape(), m.down.to_f32());
        widened.up = Tensor::from_f32(DType::F32, m.up.shape(), m.up.to_f32());
        std::vector<double> s16, s32;
        const LoraModule r16 = refactor_module(m, 3, FactorSplit::up, DType::F32, &s16);
        const LoraModule r32 = refactor_module(widened, 3, FactorSplit::up, DType::F32, &s32);
        CHECK(s16 == s32);
        CHECK(r16.up.to_f32() == r32.up.to_f32());
        CHECK(r16.down.to_f32() == r32.down.to_f32());
    }
    // A NaN in up, an infinity in down, each alone: both are bad input naming the module, from
    // resize_adapter and refactor_module alike.
    for (int which = 0; which < 2; ++which) {
        LoraModule m = module_with_spectrum({4, 2, 1, 0.5}, 12, 10, 22, DType::F16);
        std::vector<float> a = m.down.to_f32(), b = m.up.to_f32();
        if (which == 0)
            b[7] = std::nanf("");
        else
            a[13] = std::numeric_limits<float>::infinity();
        m.down = Tensor::from_f32(DType::F16, m.down.shape(), a);
        m.up = Tensor::from_f32(DType::F16, m.up.shape(), b);
        Adapter adapter;
        adapter.modules.push_back(m);
        ResizeOptions options;
        options.rank.rank = 2;
        try {
            (void)resize_adapter(adapter, options, no_progress());
            FAIL("resize accepted non-finite factors");
        } catch (const Error& e) {
            CHECK(e.code() == ErrorCode::bad_input);
            CHECK_THAT(e.what(), Catch::Contains("NaN or infinite") && Catch::Contains("q_proj"));
        }
        CHECK_THROWS_WITH(refactor_module(m, 2, FactorSplit::up, std::nullopt), Catch::Contains("NaN or infinite"));
    }
}

TEST_CASE("resize of convolutions and rsLoRA modules", "[resize]") {
    LoraModule conv = module_with_spectrum({3, 2, 1, 0.5}, 6, 5 * 9, 4);
    conv.down = conv.down.reshaped({4, 5, 3, 3});
    conv.up = conv.up.reshaped({6, 4, 1, 1});
    conv.kind = ModuleKind::conv;
    const LoraModule r = refactor_module(conv, 2, FactorSplit::up, DType::F16);
    CHECK(r.down.shape() == Shape{2, 5, 3, 3});
    CHECK(r.up.shape() == Shape{6, 2, 1, 1});
    CHECK(r.down.dtype() == DType::F16);
    LoraModule rs = module_with_spectrum({3, 2, 1, 0.5}, 8, 8, 5);
    rs.scale_rule = ScaleRule::alpha_over_sqrt_rank;
    rs.alpha = 6.0;  // scale 3
    const LoraModule rr = refactor_module(rs, 1, FactorSplit::up, std::nullopt);
    CHECK(rr.scale() == Approx(3.0));
    CHECK(*rr.alpha == Approx(3.0));  // 3 · sqrt(1)
}

TEST_CASE("lora-resize writes every convention and the result reads back", "[resize][cli]") {
    test::ScratchDir dir;
    const auto samples = std::filesystem::path(LORAKIT_SOURCE_DIR) / "samples";
    struct Case {
        const char* input;
        const char* output;
    };
    const Case cases[] = {{"peft-llama", "peft-out"},
                          {"kohya-sdxl.safetensors", "kohya.safetensors"},
                          {"diffusers-sd15.safetensors", "diffusers.safetensors"},
                          {"mlx-qwen", "mlx-out"},
                          {"cloneofsimo-sd15.safetensors", "clone.safetensors"}};
    for (const auto& c : cases) {
        INFO(c.input);
        const auto r = test::run_tool("lora-resize", {(samples / c.input).string(), "-o", (dir / c.output).string(),
                                                      "--rank", "2", "--json"});
        INFO(r.err);
        REQUIRE(r.exit_code == 0);
        const Adapter before = formats::builtin_registry().load_adapter(samples / c.input);
        const Adapter after = formats::builtin_registry().load_adapter(dir / c.output);
        CHECK(after.convention == before.convention);
        REQUIRE(after.modules.size() == before.modules.size());
        for (std::size_t i = 0; i < after.modules.size(); ++i) {
            CHECK(after.modules[i].name == before.modules[i].name);
            CHECK(after.modules[i].rank() == std::min<std::int64_t>(2, before.modules[i].rank()));
            CHECK(after.modules[i].scale() == Approx(before.modules[i].scale()));
        }
        // Refuses to overwrite, succeeds with --force.
        const auto again = test::run_tool("lora-resize", {(samples / c.input).string(), "-o", (dir / c.output).string(), "--rank", "2"});
        CHECK(again.exit_code == 2);
        CHECK(test::run_tool("lora-resize", {(samples / c.input).string(), "-o", (dir / c.output).string(), "--rank",
                                             "2", "--force", "-q"})
                  .exit_code == 0);
    }
    // Identical inputs and options give identical bytes.
    test::run_tool("lora-resize", {(samples / "kohya-sdxl.safetensors").string(), "-o", (dir / "a.safetensors").string(),
                                   "--dynamic", "sv_fro=0.9", "-q"});
    test::run_tool("lora-resize", {(samples / "kohya-sdxl.safetensors").string(), "-o", (dir / "b.safetensors").string(),
                                   "--dynamic", "sv_fro=0.9", "-j", "1", "-q"});
    CHECK(test::read_file(dir / "a.safetensors") == test::read_file(dir / "b.safetensors"));
}

TEST_CASE("lora-resize usage errors", "[resize][cli]") {
    const auto samples = std::filesystem::path(LORAKIT_SOURCE_DIR) / "samples";
    CHECK(test::run_tool("lora-resize", {(samples / "peft-llama").string(), "-o", "/tmp/x"}).exit_code == 2);  // no rank
    CHECK(test::run_tool("lora-resize", {(samples / "peft-llama").string(), "--rank", "2"}).exit_code == 2);  // no -o
    const auto bad = test::run_tool("lora-resize", {(samples / "peft-llama").string(), "--dry-run", "--dynamic", "sv_ratio=0.5"});
    CHECK(bad.exit_code == 2);
    CHECK_THAT(bad.err, Catch::Contains("sv_ratio must be above 1"));
    const auto dry = test::run_tool("lora-resize", {(samples / "peft-llama").string(), "--dry-run", "--rank", "2"});
    CHECK(dry.exit_code == 0);
    CHECK_THAT(dry.out, Catch::Contains("14 modules, 14 resized"));
}
