// LyCORIS to LoRA: each algorithm's ΔW (computed here naively from the research doc's formulas)
// is what lycoris_delta materialises, and the re-factored LoRA reproduces it (exactly when the
// rank allows, with the reported error otherwise). Through lora-convert as well.
#include <catch2/catch.hpp>

#include <cmath>
#include <random>

#include "lorakit/convert.h"
#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/formats/safetensors.h"
#include "lorakit/lycoris.h"
#include "support.h"

using namespace lorakit;

namespace {

std::vector<float> random_values(std::size_t n, std::uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 0.5f);
    std::vector<float> v(n);
    for (auto& x : v) x = normal(rng);
    return v;
}

Tensor random_tensor(Shape shape, std::uint32_t seed) {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return Tensor::from_f32(DType::F32, shape, random_values(static_cast<std::size_t>(n), seed));
}

float at(const std::vector<float>& v, std::initializer_list<std::int64_t> index, std::initializer_list<std::int64_t> dims) {
    std::int64_t flat = 0;
    auto d = dims.begin();
    for (auto i : index) flat = flat * *d++ + i;
    return v[static_cast<std::size_t>(flat)];
}

double relative(const std::vector<float>& got, const std::vector<double>& want) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    return std::sqrt(num / den);
}

// B·A of a LoRA module, scale included, flattened [out, in·k].
std::vector<float> lora_delta(const LoraModule& m) {
    const auto a = m.down.to_f32(), b = m.up.to_f32();
    const std::int64_t out = m.out_features(), in = m.flat_in_features(), r = m.rank();
    std::vector<float> d(static_cast<std::size_t>(out * in), 0.0f);
    for (std::int64_t o = 0; o < out; ++o)
        for (std::int64_t k = 0; k < r; ++k)
            for (std::int64_t i = 0; i < in; ++i)
                d[static_cast<std::size_t>(o * in + i)] += static_cast<float>(m.scale()) * b[static_cast<std::size_t>(o * r + k)] * a[static_cast<std::size_t>(k * in + i)];
    return d;
}

LycorisModule module(std::string algorithm, std::optional<double> alpha, std::vector<NamedTensor> tensors) {
    LycorisModule m;
    m.name = "unet.test";
    m.source_name = "lora_unet_test";
    m.algorithm = std::move(algorithm);
    m.alpha = alpha;
    m.tensors = std::move(tensors);
    return m;
}

}  // namespace

TEST_CASE("LoHa: (w1a·w1b) ⊙ (w2a·w2b) · alpha/r; exact at rank r², reported error below it", "[lycoris]") {
    const std::int64_t out = 12, in = 10, r = 3;
    const auto w1a = random_tensor({out, r}, 1), w1b = random_tensor({r, in}, 2), w2a = random_tensor({out, r}, 3),
               w2b = random_tensor({r, in}, 4);
    const auto m = module("loha", 6.0, {{"hada_w1_a", w1a}, {"hada_w1_b", w1b}, {"hada_w2_a", w2a}, {"hada_w2_b", w2b}});
    const auto A1 = w1a.to_f32(), B1 = w1b.to_f32(), A2 = w2a.to_f32(), B2 = w2b.to_f32();
    std::vector<double> want(static_cast<std::size_t>(out * in));
    for (std::int64_t o = 0; o < out; ++o)
        for (std::int64_t i = 0; i < in; ++i) {
            double p1 = 0, p2 = 0;
            for (std::int64_t k = 0; k < r; ++k) {
                p1 += at(A1, {o, k}, {out, r}) * at(B1, {k, i}, {r, in});
                p2 += at(A2, {o, k}, {out, r}) * at(B2, {k, i}, {r, in});
            }
            want[static_cast<std::size_t>(o * in + i)] = 6.0 / r * p1 * p2;
        }
    const LycorisDelta d = lycoris_delta(m);
    CHECK(d.weight_shape == Shape{out, in});
    CHECK(relative(d.values, want) < 1e-6);
    // Rank r² = 9 holds it exactly; rank 2 does not, and says how much is lost.
    const auto exact = lycoris_to_lora(m, 9, DType::F32);
    CHECK(exact.relative_error < 1e-5);
    CHECK(relative(lora_delta(exact.module), want) < 1e-5);
    CHECK(exact.module.scale() == 1.0);
    const auto low = lycoris_to_lora(m, 2, DType::F32);
    CHECK(low.module.rank() == 2);
    CHECK(low.relative_error > 0.01);
    CHECK(low.relative_error == Approx(relative(lora_delta(low.module), want)).epsilon(1e-3));
}

TEST_CASE("LoKr: kron(W1, W2) with low-rank or full factors, the scale rule of each case, conv kernels", "[lycoris]") {
    const std::int64_t a = 2, c = 3, b = 4, dd = 5, r = 2;
    const auto w1 = random_tensor({a, c}, 5), w2a = random_tensor({b, r}, 6), w2b = random_tensor({r, dd}, 7);
    const auto W1 = w1.to_f32(), A = w2a.to_f32(), B = w2b.to_f32();
    std::vector<double> want(static_cast<std::size_t>(a * b * c * dd));
    for (std::int64_t i = 0; i < a; ++i)
        for (std::int64_t j = 0; j < b; ++j)
            for (std::int64_t k = 0; k < c; ++k)
                for (std::int64_t l = 0; l < dd; ++l) {
                    double w2 = 0;
                    for (std::int64_t q = 0; q < r; ++q) w2 += at(A, {j, q}, {b, r}) * at(B, {q, l}, {r, dd});
                    want[static_cast<std::size_t>((i * b + j) * (c * dd) + k * dd + l)] = 8.0 / r * at(W1, {i, k}, {a, c}) * w2;
                }
    const auto low = module("lokr", 8.0, {{"lokr_w1", w1}, {"lokr_w2_a", w2a}, {"lokr_w2_b", w2b}});
    const LycorisDelta d = lycoris_delta(low);
    CHECK(d.weight_shape == Shape{a * b, c * dd});
    CHECK(relative(d.values, want) < 1e-6);
    const auto lora = lycoris_to_lora(low, 20, DType::F32);
    CHECK(relative(lora_delta(lora.module), want) < 1e-5);

    // Both factors full: alpha is ignored (scale 1), and a 4-D W2 gives a conv LoRA.
    const auto w2full = random_tensor({b, dd, 3, 3}, 8);
    const auto full = module("lokr", 100.0, {{"lokr_w1", w1}, {"lokr_w2", w2full}});
    const LycorisDelta fd = lycoris_delta(full);
    CHECK(fd.weight_shape == Shape{a * b, c * dd, 3, 3});
    const auto W2 = w2full.to_f32();
    std::size_t wrong = 0;
    for (std::int64_t i = 0; i < a; ++i)
        for (std::int64_t j = 0; j < b; ++j)
            for (std::int64_t k = 0; k < c; ++k)
                for (std::int64_t l = 0; l < dd; ++l)
                    for (std::int64_t s = 0; s < 9; ++s) {
                        const float expected = at(W1, {i, k}, {a, c}) * W2[static_cast<std::size_t>((j * dd + l) * 9 + s)];
                        const float got = fd.values[static_cast<std::size_t>((i * b + j) * (c * dd * 9) + (k * dd + l) * 9 + s)];
                        wrong += std::fabs(got - expected) > 1e-6f;
                    }
    CHECK(wrong == 0);
    const auto conv = lycoris_to_lora(full, 8, DType::F32);
    CHECK(conv.module.kind == ModuleKind::conv);
    CHECK(conv.module.down.shape() == Shape{8, c * dd, 3, 3});
    CHECK(conv.module.up.shape() == Shape{a * b, 8, 1, 1});
    CHECK(conv.relative_error < 1e-5);  // rank of kron = rank(W1)·rank(W2) ≤ 2·4 = 8
}

TEST_CASE("LoHa Tucker and LoCon Tucker rebuild conv deltas; full/diff is the delta itself", "[lycoris]") {
    const std::int64_t out = 6, in = 4, r = 2, kh = 3, kw = 3;
    // LoCon Tucker: ΔW[o,i,k,l] = s Σ_pq mid[p,q,k,l] up[o,p] down[q,i].
    const auto up = random_tensor({out, r, 1, 1}, 9), down = random_tensor({r, in, 1, 1}, 10),
               mid = random_tensor({r, r, kh, kw}, 11);
    const auto U = up.to_f32(), D = down.to_f32(), M = mid.to_f32();
    std::vector<double> want(static_cast<std::size_t>(out * in * kh * kw));
    for (std::int64_t o = 0; o < out; ++o)
        for (std::int64_t i = 0; i < in; ++i)
            for (std::int64_t s = 0; s < kh * kw; ++s) {
                double v = 0;
                for (std::int64_t p = 0; p < r; ++p)
                    for (std::int64_t q = 0; q < r; ++q)
                        v += M[static_cast<std::size_t>((p * r + q) * kh * kw + s)] * U[static_cast<std::size_t>(o * r + p)] *
                             D[static_cast<std::size_t>(q * in + i)];
                want[static_cast<std::size_t>((o * in + i) * kh * kw + s)] = 0.5 * v;  // alpha 1 / r 2
            }
    const auto tucker = module("locon-tucker", 1.0, {{"lora_down", down}, {"lora_up", up}, {"lora_mid", mid}});
    const LycorisDelta d = lycoris_delta(tucker);
    CHECK(d.weight_shape == Shape{out, in, kh, kw});
    CHECK(relative(d.values, want) < 1e-6);

    // LoHa Tucker: M_k = einsum('ijkl,jr,ip->prkl', t_k, w_k_b, w_k_a), ΔW = s·M_1⊙M_2.
    const auto t1 = random_tensor({r, r, kh, kw}, 12), t2 = random_tensor({r, r, kh, kw}, 13);
    const auto a1 = random_tensor({r, out}, 14), b1 = random_tensor({r, in}, 15), a2 = random_tensor({r, out}, 16),
               b2 = random_tensor({r, in}, 17);
    auto rebuild = [&](const Tensor& t, const Tensor& wb, const Tensor& wa) {
        const auto T = t.to_f32(), WB = wb.to_f32(), WA = wa.to_f32();
        std::vector<double> m(static_cast<std::size_t>(out * in * kh * kw), 0.0);
        for (std::int64_t p = 0; p < out; ++p)
            for (std::int64_t rr = 0; rr < in; ++rr)
                for (std::int64_t s = 0; s < kh * kw; ++s)
                    for (std::int64_t i = 0; i < r; ++i)
                        for (std::int64_t j = 0; j < r; ++j)
                            m[static_cast<std::size_t>((p * in + rr) * kh * kw + s)] +=
                                T[static_cast<std::size_t>((i * r + j) * kh * kw + s)] * WB[static_cast<std::size_t>(j * in + rr)] *
                                WA[static_cast<std::size_t>(i * out + p)];
        return m;
    };
    const auto m1 = rebuild(t1, b1, a1), m2 = rebuild(t2, b2, a2);
    for (std::size_t i = 0; i < want.size(); ++i) want[i] = 4.0 / r * m1[i] * m2[i];
    const auto loha = module("loha", 4.0, {{"hada_w1_a", a1}, {"hada_w1_b", b1}, {"hada_w2_a", a2}, {"hada_w2_b", b2},
                                           {"hada_t1", t1}, {"hada_t2", t2}});
    const LycorisDelta ld = lycoris_delta(loha);
    CHECK(ld.weight_shape == Shape{out, in, kh, kw});
    CHECK(relative(ld.values, want) < 1e-5);

    const auto diff = random_tensor({out, in}, 18), bias = random_tensor({out}, 19);
    const auto full = module("full", std::nullopt, {{"diff", diff}, {"diff_b", bias}});
    const auto c = lycoris_to_lora(full, 4, DType::F32);
    CHECK(c.relative_error < 1e-5);
    REQUIRE(c.module.bias.has_value());
    CHECK(c.module.bias->to_f32() == bias.to_f32());
}

TEST_CASE("LyCORIS modules without a LoRA form are refused by name", "[lycoris]") {
    const auto ia3 = module("ia3", std::nullopt, {{"weight", random_tensor({4}, 1)}});
    CHECK_THROWS_WITH(lycoris_delta(ia3), Catch::Contains("depends on the base weight"));
    auto dora = module("loha", 1.0, {{"hada_w1_a", random_tensor({2, 1}, 1)}, {"hada_w1_b", random_tensor({1, 2}, 1)},
                                     {"hada_w2_a", random_tensor({2, 1}, 1)}, {"hada_w2_b", random_tensor({1, 2}, 1)}});
    dora.dora_scale = random_tensor({2, 1}, 2);
    CHECK_THROWS_WITH(lycoris_delta(dora), Catch::Contains("DoRA"));
}

TEST_CASE("lora-convert --rank turns a kohya LyCORIS file into a LoRA file with a per-module error table", "[lycoris][convert]") {
    test::ScratchDir dir;
    const std::int64_t out = 8, in = 6, r = 2;
    const auto w1a = random_tensor({out, r}, 21), w1b = random_tensor({r, in}, 22), w2a = random_tensor({out, r}, 23),
               w2b = random_tensor({r, in}, 24);
    const auto alpha = Tensor::from_f32(DType::F32, {}, std::vector<float>{2.0f});
    const std::string stem = "lora_unet_down_blocks_0_attentions_0_proj_in";
    const auto bytes = formats::serialize_safetensors({{stem + ".hada_w1_a", w1a.view()},
                                                       {stem + ".hada_w1_b", w1b.view()},
                                                       {stem + ".hada_w2_a", w2a.view()},
                                                       {stem + ".hada_w2_b", w2b.view()},
                                                       {stem + ".alpha", alpha.view()}},
                                                      {{"ss_network_module", "lycoris.kohya"}});
    test::write_file(dir / "loha.safetensors", std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
    ConvertRequest request;
    request.input = (dir / "loha.safetensors").string();
    request.output = (dir / "lora.safetensors").string();
    request.to = "diffusers";
    ToolResult r1 = run_convert(formats::builtin_registry(), request, no_progress());
    CHECK(r1.exit_code == 2);  // LyCORIS into diffusers needs --rank
    CHECK_FALSE(std::filesystem::exists(request.output));
    request.to = "kohya";
    request.rank = 4;
    const ToolResult r2 = run_convert(formats::builtin_registry(), request, no_progress());
    REQUIRE(r2.exit_code == 0);
    CHECK_THAT(r2.out, Catch::Contains("loha") && Catch::Contains("rel error"));
    const Adapter original = formats::builtin_registry().load_adapter(dir / "loha.safetensors");
    const Adapter converted = formats::builtin_registry().load_adapter(request.output);
    REQUIRE(original.lycoris_modules.size() == 1);
    REQUIRE(converted.modules.size() == 1);
    CHECK(converted.lycoris_modules.empty());
    CHECK(converted.modules[0].name == original.lycoris_modules[0].name);
    const LycorisDelta d = lycoris_delta(original.lycoris_modules[0]);
    std::vector<double> want(d.values.begin(), d.values.end());
    CHECK(relative(lora_delta(converted.modules[0]), want) < 1e-5);  // rank 4 = r² holds it exactly
}

TEST_CASE("LyCORIS modules without --rank: refused saying what would be lost, left out with --allow-lossy", "[lycoris][convert][lossy]") {
    test::ScratchDir dir;
    const std::int64_t out = 8, in = 6, r = 2;
    const auto w1a = random_tensor({out, r}, 31), w1b = random_tensor({r, in}, 32), w2a = random_tensor({out, r}, 33),
               w2b = random_tensor({r, in}, 34), down = random_tensor({r, in}, 35), up = random_tensor({out, r}, 36);
    const auto alpha = Tensor::from_f32(DType::F32, {}, std::vector<float>{2.0f});
    const std::string loha = "lora_unet_down_blocks_0_attentions_0_proj_in", lora = "lora_unet_mid_block_attentions_0_proj_in";
    const auto bytes = formats::serialize_safetensors({{loha + ".hada_w1_a", w1a.view()},
                                                       {loha + ".hada_w1_b", w1b.view()},
                                                       {loha + ".hada_w2_a", w2a.view()},
                                                       {loha + ".hada_w2_b", w2b.view()},
                                                       {loha + ".alpha", alpha.view()},
                                                       {lora + ".lora_down.weight", down.view()},
                                                       {lora + ".lora_up.weight", up.view()},
                                                       {lora + ".alpha", alpha.view()}},
                                                      {{"ss_network_module", "lycoris.kohya"}});
    test::write_file(dir / "mixed.safetensors", std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
    ConvertRequest request;
    request.input = (dir / "mixed.safetensors").string();
    request.output = (dir / "out.safetensors").string();
    request.to = "diffusers";
    const ToolResult refused = run_convert(formats::builtin_registry(), request, no_progress());
    CHECK(refused.exit_code == exit_codes::usage);
    REQUIRE_FALSE(refused.diagnostics.empty());
    CHECK_THAT(refused.diagnostics.front().message, Catch::Contains("--rank N") && Catch::Contains("--allow-lossy"));
    CHECK_FALSE(std::filesystem::exists(request.output));
    request.allow_lossy = true;
    const ToolResult written = run_convert(formats::builtin_registry(), request, no_progress());
    REQUIRE(written.exit_code == 0);
    bool noted = false;
    for (const auto& d : written.diagnostics) noted |= d.message.find("left out 1 LyCORIS module(s)") != std::string::npos;
    CHECK(noted);
    const Adapter back = formats::builtin_registry().load_adapter(request.output);
    REQUIRE(back.modules.size() == 1);
    CHECK(back.lycoris_modules.empty());
    CHECK(back.modules[0].up.to_f32() == up.to_f32());  // alpha = rank: nothing folded
}

TEST_CASE("flattened LoHa/LoKr convolutions of SD UNets get their 3x3 kernel back by name", "[lycoris]") {
    // LyCORIS stores a conv LoHa (and LoKr's low-rank w2) without Tucker as [r, in·3·3].
    const std::int64_t out = 8, in = 4, r = 2;
    auto loha = module("loha", 2.0, {{"hada_w1_a", random_tensor({out, r}, 11)}, {"hada_w1_b", random_tensor({r, in * 9}, 12)},
                                     {"hada_w2_a", random_tensor({out, r}, 13)}, {"hada_w2_b", random_tensor({r, in * 9}, 14)}});
    auto lokr = module("lokr", 2.0, {{"lokr_w1", random_tensor({2, 2}, 15)}, {"lokr_w2_a", random_tensor({out / 2, r}, 16)},
                                     {"lokr_w2_b", random_tensor({r, in / 2 * 9}, 17)}});
    for (const char* name : {"unet.down_blocks.0.resnets.0.conv1", "unet.up_blocks.1.upsamplers.0.conv",
                             "unet.input_blocks.1.0.in_layers.2", "lora_unet_output_blocks_2_1_conv", "unet.conv_in"}) {
        for (LycorisModule* m : {&loha, &lokr}) {
            INFO(name << " " << m->algorithm);
            m->name = name;
            m->source_name.clear();
            const LycorisDelta d = lycoris_delta(*m);
            CHECK(d.weight_shape == Shape{out, in, 3, 3});
            // The LoRA is a 3x3 conv LoRA holding the same delta (full rank: exact).
            const auto c = lycoris_to_lora(*m, 64, DType::F32);
            CHECK(c.module.kind == ModuleKind::conv);
            CHECK(c.module.down.shape() == Shape{c.module.rank(), in, 3, 3});
            CHECK(c.module.up.shape() == Shape{out, c.module.rank(), 1, 1});
            std::vector<double> want(d.values.begin(), d.values.end());
            CHECK(relative(lora_delta(c.module), want) < 1e-5);
        }
    }
    // Any other name (a linear layer, a 1x1 conv, a text encoder) keeps the 2-D form.
    for (const char* name : {"unet.down_blocks.0.attentions.0.proj_in", "unet.down_blocks.0.resnets.0.conv_shortcut",
                             "text_encoder.text_model.encoder.layers.0.mlp.fc1"}) {
        INFO(name);
        loha.name = name;
        CHECK(lycoris_delta(loha).weight_shape == Shape{out, in * 9});
    }
}
