// Every merge method against its formula computed densely (and independently) in the test.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "lorakit/error.h"
#include "lorakit/linalg.h"
#include "lorakit/merge.h"
#include "lora_helpers.h"
#include "support.h"

using namespace lorakit;
using test::adapter_of;
using test::random_module;

namespace {

using Matrix = std::vector<double>;  // row-major

struct Shape2 {
    std::int64_t out, in;
};

Matrix product(const std::vector<float>& b, const std::vector<float>& a, std::int64_t out, std::int64_t r, std::int64_t in,
               double c = 1.0) {
    Matrix m(static_cast<std::size_t>(out * in), 0.0);
    for (std::int64_t o = 0; o < out; ++o)
        for (std::int64_t k = 0; k < r; ++k)
            for (std::int64_t i = 0; i < in; ++i) m[o * in + i] += c * b[o * r + k] * a[k * in + i];
    return m;
}

Matrix delta(const LoraModule& m) { return test::dense_delta(m); }

Matrix add(const Matrix& x, const Matrix& y, double c = 1.0) {
    Matrix z = x;
    for (std::size_t i = 0; i < z.size(); ++i) z[i] += c * y[i];
    return z;
}

double norm(const Matrix& x) {
    double s = 0;
    for (double v : x) s += v * v;
    return std::sqrt(s);
}

double relative_difference(const Matrix& x, const Matrix& y) { return norm(add(x, y, -1.0)) / std::max(norm(y), 1e-30); }

MergeResult merge(const std::vector<Adapter>& inputs, MergeMethod method, std::vector<double> weights = {},
                  MergeOptions options = {}) {
    options.method = method;
    options.weights = std::move(weights);
    options.threads = 1;
    return merge_adapters(inputs, options, no_progress());
}

// Reference MERGE of PEFT's merge_utils, written out directly.
std::vector<double> reference_prune_magnitude(std::vector<double> t, double density) {
    if (density >= 1) return t;
    const auto keep = static_cast<std::size_t>(density * static_cast<double>(t.size()));
    std::vector<std::size_t> idx(t.size());
    for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = i;
    std::stable_sort(idx.begin(), idx.end(), [&](auto a, auto b) { return std::abs(t[a]) > std::abs(t[b]); });
    std::vector<double> out(t.size(), 0.0);
    for (std::size_t i = 0; i < keep; ++i) out[idx[i]] = t[idx[i]];
    return out;
}

std::vector<double> reference_ties(const std::vector<std::vector<double>>& ts, const std::vector<double>& w, double density,
                                   bool frequency) {
    std::vector<std::vector<double>> pruned;
    for (const auto& t : ts) pruned.push_back(reference_prune_magnitude(t, density));
    std::vector<double> out(ts[0].size());
    for (std::size_t j = 0; j < out.size(); ++j) {
        double elect = 0;
        for (const auto& p : pruned) elect += frequency ? (p[j] > 0) - (p[j] < 0) : p[j];
        const int majority = elect >= 0 ? 1 : -1;
        double sum = 0;
        int n = 0;
        for (std::size_t i = 0; i < pruned.size(); ++i) {
            const int s = (pruned[i][j] > 0) - (pruned[i][j] < 0);
            if (s == majority) {
                sum += w[i] * pruned[i][j];
                ++n;
            }
        }
        out[j] = sum / std::max(n, 1);
    }
    return out;
}

std::vector<double> as_double(const Tensor& t) {
    const auto f = t.to_f32();
    return std::vector<double>(f.begin(), f.end());
}

std::vector<float> as_float(const std::vector<double>& d) { return std::vector<float>(d.begin(), d.end()); }

}  // namespace

TEST_CASE("concat and cat are the exact weighted sum of the deltas", "[merge]") {
    for (unsigned seed : {1u, 2u, 3u}) {
        std::mt19937 g(seed);
        const auto m1 = random_module(g, 12, 10, 3, 6.0), m2 = random_module(g, 12, 10, 5, 2.5);
        const std::vector<Adapter> inputs = {adapter_of({m1}), adapter_of({m2})};
        const Matrix want = add(add(Matrix(120, 0.0), delta(m1), 0.7), delta(m2), -1.3);
        for (MergeMethod method : {MergeMethod::concat, MergeMethod::cat}) {
            const MergeResult r = merge(inputs, method, {0.7, -1.3});
            REQUIRE(r.adapter.modules.size() == 1);
            CHECK(r.adapter.modules[0].rank() == 8);
            CHECK(r.adapter.modules[0].scale() == 1.0);
            CHECK(relative_difference(delta(r.adapter.modules[0]), want) < 1e-6);
        }
    }
}

TEST_CASE("svd is the best rank-k approximation of the weighted sum", "[merge]") {
    for (unsigned seed : {4u, 5u}) {
        std::mt19937 g(seed);
        const auto m1 = random_module(g, 14, 11, 4, 4.0), m2 = random_module(g, 14, 11, 3, 9.0);
        const std::vector<Adapter> inputs = {adapter_of({m1}), adapter_of({m2})};
        const Matrix want = add(add(Matrix(154, 0.0), delta(m1), 0.5), delta(m2), 2.0);
        const auto values = linalg::dense_singular_values(as_float(want).data(), 14, 11);
        for (std::int64_t k : {2, 5, 7}) {
            MergeOptions o;
            o.rank.rank = k;
            const MergeResult r = merge(inputs, MergeMethod::svd, {0.5, 2.0}, o);
            double optimal = 0;
            for (std::size_t j = static_cast<std::size_t>(k); j < values.size(); ++j) optimal += values[j] * values[j];
            CHECK(r.adapter.modules[0].rank() == k);
            CHECK(norm(add(delta(r.adapter.modules[0]), want, -1.0)) ==
                  Approx(std::sqrt(optimal)).epsilon(1e-4).margin(1e-6 * norm(want)));
            CHECK(r.modules[0].relative_error == Approx(std::sqrt(optimal) / norm(want)).epsilon(1e-4).margin(1e-6));
        }
        // PEFT's legacy double scaling: Σ w_i s_i² B_i A_i.
        MergeOptions legacy;
        legacy.rank.rank = 7;
        legacy.compat = MergeCompat::peft_legacy;
        const Matrix want_legacy = add(add(Matrix(154, 0.0), delta(m1), 0.5 * m1.scale()), delta(m2), 2.0 * m2.scale());
        CHECK(relative_difference(delta(merge(inputs, MergeMethod::svd, {0.5, 2.0}, legacy).adapter.modules[0]), want_legacy) <
              1e-5);
    }
}

TEST_CASE("PEFT's factor-wise methods follow merge_utils on A and B separately", "[merge]") {
    std::mt19937 g(6);
    const auto m1 = random_module(g, 9, 7, 3, 6.0), m2 = random_module(g, 9, 7, 3, 1.5), m3 = random_module(g, 9, 7, 3, 3.0);
    const std::vector<Adapter> inputs = {adapter_of({m1}), adapter_of({m2}), adapter_of({m3})};
    const std::vector<double> w = {1.0, -0.5, 2.0};
    std::vector<double> wa, wb;
    for (std::size_t i = 0; i < 3; ++i) {
        const double c = w[i] * inputs[i].modules[0].scale();
        wa.push_back((c < 0 ? -1 : 1) * std::sqrt(std::abs(c)));
        wb.push_back(std::sqrt(std::abs(c)));
    }
    const std::vector<std::vector<double>> as = {as_double(m1.down), as_double(m2.down), as_double(m3.down)};
    const std::vector<std::vector<double>> bs = {as_double(m1.up), as_double(m2.up), as_double(m3.up)};
    auto check_against = [&](const MergeResult& r, const std::vector<double>& a, const std::vector<double>& b) {
        const Matrix want = product(as_float(b), as_float(a), 9, 3, 7);
        CHECK(r.adapter.modules[0].scale() == 1.0);
        CHECK(relative_difference(delta(r.adapter.modules[0]), want) < 1e-5);
    };
    auto weighted_sum = [](const std::vector<std::vector<double>>& ts, const std::vector<double>& v) {
        std::vector<double> out(ts[0].size(), 0.0);
        for (std::size_t i = 0; i < ts.size(); ++i)
            for (std::size_t j = 0; j < out.size(); ++j) out[j] += v[i] * ts[i][j];
        return out;
    };
    check_against(merge(inputs, MergeMethod::linear, w), weighted_sum(as, wa), weighted_sum(bs, wb));
    for (double density : {1.0, 0.6, 0.3}) {
        INFO("density " << density);
        MergeOptions o;
        o.density = density;
        std::vector<std::vector<double>> pa, pb;
        for (const auto& t : as) pa.push_back(reference_prune_magnitude(t, density));
        for (const auto& t : bs) pb.push_back(reference_prune_magnitude(t, density));
        check_against(merge(inputs, MergeMethod::magnitude_prune, w, o), weighted_sum(pa, wa), weighted_sum(pb, wb));
        for (bool frequency : {false, true}) {
            o.majority_sign = frequency ? MajoritySign::frequency : MajoritySign::total;
            check_against(merge(inputs, MergeMethod::ties, w, o), reference_ties(as, wa, density, frequency),
                          reference_ties(bs, wb, density, frequency));
        }
    }
    // DARE without dropping is task arithmetic (linear) / TIES.
    MergeOptions keep_all;
    keep_all.density = 1.0;
    check_against(merge(inputs, MergeMethod::dare_linear, w, keep_all), weighted_sum(as, wa), weighted_sum(bs, wb));
    check_against(merge(inputs, MergeMethod::dare_ties, w, keep_all), reference_ties(as, wa, 1.0, false),
                  reference_ties(bs, wb, 1.0, false));
    // Unequal ranks are refused, naming the module.
    const std::vector<Adapter> unequal = {adapter_of({m1}), adapter_of({random_module(g, 9, 7, 2, 2.0)})};
    try {
        merge(unequal, MergeMethod::ties);
        FAIL("accepted");
    } catch (const Error& e) {
        CHECK_THAT(e.what(), Catch::Contains("model.layers.0.self_attn.q_proj") && Catch::Contains("equal ranks"));
    }
}

TEST_CASE("DARE: seeded masks, density and 1/density rescaling", "[merge]") {
    std::mt19937 g(7);
    const std::vector<Adapter> inputs = {adapter_of({random_module(g, 40, 30, 4, 4.0)}),
                                         adapter_of({random_module(g, 40, 30, 4, 4.0)})};
    MergeOptions o;
    o.density = 0.25;
    o.seed = 11;
    const auto a = merge(inputs, MergeMethod::dare_linear, {}, o).adapter.modules[0].down.to_f32();
    const auto b = merge(inputs, MergeMethod::dare_linear, {}, o).adapter.modules[0].down.to_f32();
    CHECK(a == b);
    o.seed = 12;
    CHECK(merge(inputs, MergeMethod::dare_linear, {}, o).adapter.modules[0].down.to_f32() != a);
    // One input, weight 1: every kept entry is the original over the density, the rest zero.
    o.seed = 11;
    const auto single = merge({inputs[0], inputs[0]}, MergeMethod::dare_linear, {1.0, 0.0}, o).adapter.modules[0];
    const auto original = inputs[0].modules[0].down.to_f32();
    const auto pruned = single.down.to_f32();
    std::size_t kept = 0;
    for (std::size_t i = 0; i < original.size(); ++i) {
        if (pruned[i] == 0.0f) continue;
        ++kept;
        CHECK(pruned[i] == Approx(original[i] / 0.25));
    }
    CHECK(kept > 0.15 * original.size());
    CHECK(kept < 0.35 * original.size());
}

TEST_CASE("the dense svd methods apply MERGE to s_i·B_i·A_i with weights w_i", "[merge]") {
    std::mt19937 g(8);
    const auto m1 = random_module(g, 10, 8, 3, 6.0), m2 = random_module(g, 10, 8, 3, 1.5);
    const std::vector<Adapter> inputs = {adapter_of({m1}), adapter_of({m2})};
    const std::vector<double> w = {0.8, 1.7};
    const std::vector<std::vector<double>> d = {delta(m1), delta(m2)};
    MergeOptions o;
    o.rank.rank = 8;  // full rank: the SVD is exact
    o.density = 0.5;
    {
        const Matrix want = reference_ties(d, w, 0.5, false);
        CHECK(relative_difference(delta(merge(inputs, MergeMethod::ties_svd, w, o).adapter.modules[0]), want) < 1e-5);
    }
    {
        Matrix want(80, 0.0);
        for (std::size_t i = 0; i < 2; ++i) want = add(want, reference_prune_magnitude(d[i], 0.5), w[i]);
        CHECK(relative_difference(delta(merge(inputs, MergeMethod::magnitude_prune_svd, w, o).adapter.modules[0]), want) < 1e-5);
    }
    o.density = 1.0;
    {
        const Matrix want = add(add(Matrix(80, 0.0), d[0], w[0]), d[1], w[1]);
        CHECK(relative_difference(delta(merge(inputs, MergeMethod::dare_linear_svd, w, o).adapter.modules[0]), want) < 1e-5);
    }
    // Truncated: rank 2, with the reported error matching the dense truth.
    o.rank.rank = 2;
    o.density = 0.5;
    const MergeResult r = merge(inputs, MergeMethod::ties_svd, w, o);
    const Matrix full = reference_ties(d, w, 0.5, false);
    const auto values = linalg::dense_singular_values(as_float(full).data(), 10, 8);
    double optimal = 0;
    for (std::size_t j = 2; j < values.size(); ++j) optimal += values[j] * values[j];
    CHECK(norm(add(delta(r.adapter.modules[0]), full, -1.0)) == Approx(std::sqrt(optimal)).epsilon(1e-4));
}

TEST_CASE("kohya compatibility: merge_lora.py squares the ratio; svd_merge clamps when asked", "[merge]") {
    std::mt19937 g(9);
    const auto m1 = random_module(g, 8, 6, 2, 1.0), m2 = random_module(g, 8, 6, 2, 4.0);
    const std::vector<Adapter> inputs = {adapter_of({m1}), adapter_of({m2})};
    MergeOptions o;
    o.compat = MergeCompat::kohya;
    const std::vector<double> w = {0.5, -0.8};
    const double base_alpha = 1.0;
    const double r1 = std::sqrt(1.0 / base_alpha) * w[0], r2 = std::sqrt(4.0 / base_alpha) * w[1];
    {
        // up' = Σ|r_i| up_i, down' = Σ r_i down_i, alpha' = base_alpha (rank 2).
        std::vector<double> up(16, 0.0), down(12, 0.0);
        const auto u1 = as_double(m1.up), u2 = as_double(m2.up), d1 = as_double(m1.down), d2 = as_double(m2.down);
        for (std::size_t i = 0; i < 16; ++i) up[i] = std::abs(r1) * u1[i] + std::abs(r2) * u2[i];
        for (std::size_t i = 0; i < 12; ++i) down[i] = r1 * d1[i] + r2 * d2[i];
        const Matrix want = product(as_float(up), as_float(down), 8, 2, 6, base_alpha / 2);
        const MergeResult r = merge(inputs, MergeMethod::linear, w, o);
        CHECK(*r.adapter.modules[0].alpha == base_alpha);
        CHECK(relative_difference(delta(r.adapter.modules[0]), want) < 1e-5);
        // A single LoRA at ratio w comes out at strength w·|w|.
        const MergeResult single = merge({inputs[0], inputs[0]}, MergeMethod::linear, {0.5, 0.0}, o);
        CHECK(relative_difference(delta(single.adapter.modules[0]), add(Matrix(48, 0.0), delta(m1), 0.25)) < 1e-5);
    }
    {
        // concat: factors [r_i down_i], [|r_i| up_i] with alpha' = base_alpha over rank 4.
        const Matrix want = add(add(Matrix(48, 0.0), product(m1.up.to_f32(), m1.down.to_f32(), 8, 2, 6), std::abs(r1) * r1 * base_alpha / 4),
                                product(m2.up.to_f32(), m2.down.to_f32(), 8, 2, 6), std::abs(r2) * r2 * base_alpha / 4);
        const MergeResult r = merge(inputs, MergeMethod::concat, w, o);
        CHECK(r.adapter.modules[0].rank() == 4);
        CHECK(relative_difference(delta(r.adapter.modules[0]), want) < 1e-5);
    }
    {
        o.rank.rank = 3;
        o.clamp_quantile = 0.9;
        const MergeResult r = merge(inputs, MergeMethod::svd, w, o);
        const auto up = r.adapter.modules[0].up.to_f32(), down = r.adapter.modules[0].down.to_f32();
        std::vector<float> all = up;
        all.insert(all.end(), down.begin(), down.end());
        std::sort(all.begin(), all.end());
        const double pos = 0.9 * (all.size() - 1);
        const float hi = all[static_cast<std::size_t>(std::floor(pos))];
        for (float x : all) CHECK(std::abs(x) <= std::abs(hi) + 1e-6f + std::abs(all.back()));
        CHECK(r.adapter.modules[0].rank() == 3);
        CHECK(*r.adapter.modules[0].alpha == 3.0);
    }
}

TEST_CASE("modules present in some inputs, mismatched shapes, DoRA", "[merge]") {
    std::mt19937 g(10);
    const auto q = random_module(g, 6, 6, 2, 2.0, "model.layers.0.self_attn.q_proj");
    const auto v = random_module(g, 6, 6, 2, 2.0, "model.layers.0.self_attn.v_proj");
    const MergeResult r = merge({adapter_of({q}), adapter_of({q, v})}, MergeMethod::concat);
    REQUIRE(r.adapter.modules.size() == 2);
    CHECK(r.modules[1].inputs == std::vector<std::size_t>{1});
    CHECK(r.notes.size() == 1);
    CHECK(relative_difference(delta(r.adapter.modules[1]), delta(v)) < 1e-6);
    const auto wide = random_module(g, 6, 8, 2, 2.0, "model.layers.0.self_attn.q_proj");
    try {
        merge({adapter_of({q}), adapter_of({wide})}, MergeMethod::concat);
        FAIL("accepted");
    } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::bad_input);
        CHECK_THAT(e.what(), Catch::Contains("q_proj") && Catch::Contains("different base models"));
    }
    auto dora = q;
    dora.magnitude = Tensor::zeros(DType::F32, {6});
    CHECK_THROWS_AS(merge({adapter_of({q}), adapter_of({dora})}, MergeMethod::concat), Error);
}

TEST_CASE("randomized truncated SVD is within 2% of the optimal error", "[merge][linalg]") {
    // 300 x 400 with a slowly decaying spectrum σ_i = 1/sqrt(i) (the hard case for sketches).
    std::mt19937 g(12);
    const std::int64_t m = 300, n = 400, k = 20;
    std::vector<float> matrix(static_cast<std::size_t>(m * n), 0.0f);
    std::normal_distribution<float> d;
    for (std::int64_t t = 0; t < 120; ++t) {
        std::vector<float> u(m), v(n);
        for (auto& x : u) x = d(g) / std::sqrt(float(m));
        for (auto& x : v) x = d(g) / std::sqrt(float(n));
        const float s = 1.0f / std::sqrt(float(t + 1));
        for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t j = 0; j < n; ++j) matrix[i * n + j] += s * u[i] * v[j];
    }
    auto error_of = [&](const linalg::DenseSvd& svd) {
        double e = 0;
        for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t j = 0; j < n; ++j) {
                double x = matrix[i * n + j];
                for (std::int64_t t = 0; t < svd.kept; ++t) x -= double(svd.u[i * svd.kept + t]) * svd.singular_values[t] * svd.v[j * svd.kept + t];
                e += x * x;
            }
        return std::sqrt(e);
    };
    linalg::DenseSvdOptions exact, randomized;
    exact.method = linalg::DenseSvdOptions::Method::exact;
    randomized.method = linalg::DenseSvdOptions::Method::randomized;
    const auto best = linalg::truncated_svd(matrix.data(), m, n, k, exact);
    const auto fast = linalg::truncated_svd(matrix.data(), m, n, k, randomized);
    CHECK(fast.randomized);
    CHECK(error_of(fast) <= 1.02 * error_of(best));
    CHECK(fast.frobenius_squared == Approx(best.frobenius_squared));
    // Deterministic for a seed.
    const auto again = linalg::truncated_svd(matrix.data(), m, n, k, randomized);
    CHECK(again.u == fast.u);
}

TEST_CASE("lora-merge end to end: exact concat of the samples, then svd", "[merge][cli]") {
    test::ScratchDir dir;
    const auto samples = std::filesystem::path(LORAKIT_SOURCE_DIR) / "samples";
    const std::string llama = (samples / "peft-llama").string();
    auto r = test::run_tool("lora-merge", {llama, llama, "--weights", "0.5,-0.25", "-o", (dir / "m").string(), "--json"});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    CHECK_THAT(r.out, Catch::Contains("\"method\": \"concat\""));
    r = test::run_tool("lora-merge", {llama, llama, "--method", "svd", "--rank", "3", "-o", (dir / "s").string()});
    REQUIRE(r.exit_code == 0);
    // No common modules: each merged from its own input; a PEFT output cannot span a UNet and an LLM.
    r = test::run_tool("lora-merge", {llama, (samples / "kohya-sdxl.safetensors").string(), "-o", (dir / "x").string()});
    CHECK(r.exit_code == 3);
    CHECK_THAT(r.err, Catch::Contains("a PEFT adapter covers one model"));
    // Each part named (the LLM's paths have no component name: they used to print as "spans , text_encoder").
    CHECK_THAT(r.err, Catch::Contains("spans an LLM's module paths, 'text_encoder'"));
    // Weights that push the f16 factors past 65504: refused naming the module (it used to write
    // infinities and exit 0); with --dtype f32 the same merge is written.
    const std::string sdxl = (samples / "kohya-sdxl.safetensors").string();
    for (const char* method : {"concat", "svd"}) {
        INFO(method);
        r = test::run_tool("lora-merge", {sdxl, sdxl, "--weights", "1e9,1e9", "--method", method, "--rank", "4", "-o",
                                          (dir / "big.safetensors").string()});
        CHECK(r.exit_code == 3);
        CHECK_THAT(r.err, Catch::Contains("module '") && Catch::Contains("beyond F16's range") && Catch::Contains("--dtype f32"));
        CHECK_FALSE(std::filesystem::exists(dir / "big.safetensors"));
    }
    r = test::run_tool("lora-merge", {sdxl, sdxl, "--weights", "1e9,1e9", "--dtype", "f32", "-o", (dir / "big.safetensors").string()});
    CHECK(r.exit_code == 0);
    r = test::run_tool("lora-merge", {llama, "-o", (dir / "y").string()});
    CHECK(r.exit_code == 2);
    r = test::run_tool("lora-merge", {llama, llama, "--weights", "1,x", "-o", (dir / "z").string()});
    CHECK(r.exit_code == 2);
}

TEST_CASE("several inputs load together: order kept, the first failure in argument order reported", "[merge][cli]") {
    test::ScratchDir dir;
    const auto samples = std::filesystem::path(LORAKIT_SOURCE_DIR) / "samples";
    const std::string llama = (samples / "peft-llama").string();
    const std::string sdxl = (samples / "kohya-sdxl.safetensors").string();
    // A file whose header is garbage, loaded (and failing) beside a missing one listed earlier.
    const auto garbage = dir / "garbage.safetensors";
    {
        std::ofstream f(garbage, std::ios::binary);
        f << std::string(64, '\xff');
    }
    const auto missing = dir / "missing.safetensors";
    for (int round = 0; round < 5; ++round) {  // the loads race; the report must not
        auto r = test::run_tool("lora-merge", {llama, missing.string(), garbage.string(), "-o", (dir / "m").string()});
        INFO(r.err);
        CHECK(r.exit_code == 4);  // io: the missing file, not the garbage one (bad input, 3)
        CHECK_THAT(r.err, Catch::Contains("missing.safetensors"));
        CHECK_THAT(r.err, !Catch::Contains("garbage.safetensors"));
        r = test::run_tool("lora-merge", {llama, garbage.string(), missing.string(), "-o", (dir / "m").string()});
        CHECK(r.exit_code == 3);
        CHECK_THAT(r.err, Catch::Contains("garbage.safetensors"));
    }
    // Inputs keep their order: the stack's JSON lists them as given.
    const auto copy = dir / "copy.safetensors";
    std::filesystem::copy_file(sdxl, copy);
    auto r = test::run_tool("lora-stack", {copy.string() + ":0.5", sdxl + ":0.25", copy.string(), "--json"});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    const auto report = nlohmann::json::parse(r.out);
    REQUIRE(report["adapters"].size() == 3);
    CHECK(report["adapters"][0]["path"] == copy.string());
    CHECK(report["adapters"][0]["weight"] == 0.5);
    CHECK(report["adapters"][1]["path"] == sdxl);
    CHECK(report["adapters"][1]["weight"] == 0.25);
    CHECK(report["adapters"][2]["path"] == copy.string());
}
