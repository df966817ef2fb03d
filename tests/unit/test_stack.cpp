// lora-stack: every metric against a dense computation on small shapes, the known-answer
// stacks (orthogonal, self, negation, nearly parallel), base checks, auto-scale and the CLI.
#include <catch2/catch.hpp>

#include <chrono>
#include <condition_variable>

#include <thread>

#include <mutex>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include <nlohmann/json.hpp>

#include "lorakit/checkpoint.h"
#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/formats/safetensors.h"
#include "lorakit/linalg.h"
#include "lorakit/stack.h"
#include "lora_helpers.h"
#include "select.h"
#include "support.h"

using namespace lorakit;
using test::adapter_of;
using test::module_of;
using test::random_module;

namespace {

using Dense = std::vector<double>;  // row-major

Dense delta(const LoraModule& m, double w = 1.0) { return test::dense_delta(m, w); }

double dot(const Dense& x, const Dense& y) {
    double s = 0;
    for (std::size_t i = 0; i < x.size(); ++i) s += x[i] * y[i];
    return s;
}

double spectral(const Dense& x, std::int64_t rows, std::int64_t cols) {
    const std::vector<float> f(x.begin(), x.end());
    return linalg::dense_singular_values(f.data(), rows, cols).front();
}

// The top singular vectors carrying `energy` of ‖x‖_F², as columns (rows x k, row-major).
std::vector<float> top_vectors(const Dense& x, std::int64_t rows, std::int64_t cols, double energy, bool left,
                               std::int64_t& k) {
    const std::vector<float> f(x.begin(), x.end());
    linalg::DenseSvdOptions o;
    o.method = linalg::DenseSvdOptions::Method::exact;
    const auto svd = linalg::truncated_svd(f.data(), rows, cols, std::min(rows, cols), o);
    double total = 0, sum = 0;
    for (double s : svd.singular_values) total += s * s;
    k = 0;
    while (sum < energy * total) {
        const double s = svd.singular_values[static_cast<std::size_t>(k++)];
        sum += s * s;
    }
    const std::int64_t n = left ? rows : cols;
    std::vector<float> v(static_cast<std::size_t>(n * k));
    for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t j = 0; j < k; ++j)
            v[static_cast<std::size_t>(i * k + j)] = (left ? svd.u : svd.v)[static_cast<std::size_t>(i * svd.kept + j)];
    return v;
}

// max cos θ and φ = ‖UᵀV‖_F² / min(k1, k2) for column blocks u (n x k1) and v (n x k2).
std::pair<double, double> overlap(const std::vector<float>& u, std::int64_t k1, const std::vector<float>& v, std::int64_t k2,
                                  std::int64_t n) {
    std::vector<float> m(static_cast<std::size_t>(k1 * k2), 0.0f);
    double f2 = 0;
    for (std::int64_t i = 0; i < k1; ++i)
        for (std::int64_t j = 0; j < k2; ++j) {
            double s = 0;
            for (std::int64_t t = 0; t < n; ++t) s += static_cast<double>(u[static_cast<std::size_t>(t * k1 + i)]) * v[static_cast<std::size_t>(t * k2 + j)];
            m[static_cast<std::size_t>(i * k2 + j)] = static_cast<float>(s);
            f2 += s * s;
        }
    return {linalg::dense_singular_values(m.data(), k1, k2).front(), f2 / static_cast<double>(std::min(k1, k2))};
}

StackReport analyse(const std::vector<Adapter>& adapters, std::vector<double> weights, bool auto_scale = false,
                    const BaseWeights* base = nullptr, std::int64_t samples = 8192) {
    StackOptions o;
    o.weights = std::move(weights);
    o.samples = samples;
    o.threads = 1;
    return analyse_stack(adapters, o, auto_scale, base, no_progress());
}

class FixedBase final : public BaseWeights {
public:
    FixedBase(std::vector<float> values, double limit) : values_(std::move(values)), limit_(limit) {}
    bool load(const LoraModule&, BaseWeight& into) const override {
        into.values = values_;
        into.tensor = "fixed";
        into.dtype = "F16";
        into.limit = limit_;
        return true;
    }

private:
    std::vector<float> values_;
    double limit_;
};

// The same values served as stored F16 or BF16 bytes read in place (as lora-stack serves a
// mapped checkpoint tensor), counting the releases.
class StoredBase final : public BaseWeights {
public:
    StoredBase(const std::vector<float>& values, std::int64_t out, std::int64_t in, DType type, double limit)
        : tensor_(Tensor::from_f32(type, {out, in}, values)), limit_(limit) {}
    bool load(const LoraModule&, BaseWeight& into) const override {
        into.values = {};
        into.stored = tensor_.bytes().data();
        into.stored_dtype = tensor_.dtype();
        into.release = [this] { ++releases; };
        into.tensor = "stored";
        into.dtype = std::string(dtype_name(tensor_.dtype()));
        into.limit = limit_;
        return true;
    }
    std::vector<float> widened() const { return tensor_.to_f32(); }
    mutable int releases = 0;

private:
    Tensor tensor_;
    double limit_;
};

}  // namespace

TEST_CASE("stack metrics match a dense computation on random small modules", "[stack]") {
    std::mt19937 g(7);
    for (int trial = 0; trial < 6; ++trial) {
        const std::int64_t out = 17 + trial * 3, in = 13 + trial * 5;
        const auto m1 = random_module(g, out, in, 3, 6.0), m2 = random_module(g, out, in, 5, 2.5),
                   m3 = random_module(g, out, in, 4, 4.0);
        const std::vector<double> w = {0.8, -0.6, 1.3};
        const auto report = analyse({adapter_of({m1}), adapter_of({m2}), adapter_of({m3})}, w);
        REQUIRE(report.modules.size() == 1);
        const ModuleStack& s = report.modules[0];
        const std::vector<Dense> d = {delta(m1, w[0]), delta(m2, w[1]), delta(m3, w[2])};
        Dense sum(d[0].size(), 0.0);
        double parts = 0, max_spectral = 0, max_unit = 0;
        const std::vector<const LoraModule*> ms = {&m1, &m2, &m3};
        for (std::size_t i = 0; i < 3; ++i) {
            for (std::size_t t = 0; t < sum.size(); ++t) sum[t] += d[i][t];
            CHECK(s.fro[i] == Approx(std::sqrt(dot(d[i], d[i]))).epsilon(1e-6));
            CHECK(s.spectral[i] == Approx(spectral(d[i], out, in)).epsilon(1e-5));
            parts += dot(d[i], d[i]);
            max_spectral = std::max(max_spectral, spectral(d[i], out, in));
            max_unit = std::max(max_unit, spectral(delta(*ms[i]), out, in));
        }
        CHECK(s.sum_fro == Approx(std::sqrt(dot(sum, sum))).epsilon(1e-6));
        CHECK(s.kappa == Approx(dot(sum, sum) / parts).epsilon(1e-6));
        CHECK(s.sum_spectral == Approx(spectral(sum, out, in)).epsilon(1e-5));
        CHECK(s.growth == Approx(spectral(sum, out, in) / max_spectral).epsilon(1e-5));
        CHECK(s.strength == Approx(spectral(sum, out, in) / max_unit).epsilon(1e-5));
        REQUIRE(s.pairs.size() == 3);
        for (const auto& p : s.pairs) {
            const Dense &x = d[p.first], &y = d[p.second];
            CHECK(p.cosine == Approx(dot(x, y) / std::sqrt(dot(x, x) * dot(y, y))).margin(1e-6));
            std::int64_t k1 = 0, k2 = 0;
            const auto u1 = top_vectors(x, out, in, 0.9, true, k1), u2 = top_vectors(y, out, in, 0.9, true, k2);
            const auto [out_cos, out_phi] = overlap(u1, k1, u2, k2, out);
            CHECK(p.out_max_cosine == Approx(out_cos).margin(1e-4));
            CHECK(p.out_phi == Approx(out_phi).margin(1e-4));
            const auto v1 = top_vectors(x, out, in, 0.9, false, k1), v2 = top_vectors(y, out, in, 0.9, false, k2);
            const auto [in_cos, in_phi] = overlap(v1, k1, v2, k2, in);
            CHECK(p.in_max_cosine == Approx(in_cos).margin(1e-4));
            CHECK(p.in_phi == Approx(in_phi).margin(1e-4));
            CHECK(p.sign_samples > 0);
        }
        // RMS cosine of a pair over one module is its |cosine|.
        CHECK(report.pair_summary[0].cosine == Approx(std::abs(s.pairs[0].cosine)).margin(1e-12));
        CHECK(report.total_weight == Approx(2.7));
    }
}

TEST_CASE("the sign-conflict estimate follows the exact rate over all entries", "[stack]") {
    std::mt19937 g(11);
    const std::int64_t out = 60, in = 50;
    const auto m1 = random_module(g, out, in, 4, 4.0);
    auto m2 = random_module(g, out, in, 4, 4.0);
    // Partly correlated with m1 so the rate is neither 0 nor 1/2.
    {
        auto b1 = m1.up.to_f32(), b2 = m2.up.to_f32();
        for (std::size_t i = 0; i < b2.size(); ++i) b2[i] = 0.7f * b1[i] + 0.3f * b2[i];
        m2.up = Tensor::from_f32(DType::F32, {out, 4}, b2);
        m2.down = m1.down;
    }
    const auto report = analyse({adapter_of({m1}), adapter_of({m2})}, {1, 1}, false, nullptr, 200000);
    const Dense x = delta(m1), y = delta(m2);
    auto threshold = [](const Dense& v) {
        std::vector<double> a(v.size());
        for (std::size_t i = 0; i < v.size(); ++i) a[i] = std::abs(v[i]);
        std::sort(a.begin(), a.end());
        return a[static_cast<std::size_t>(std::floor(0.8 * static_cast<double>(a.size())))];
    };
    const double tx = threshold(x), ty = threshold(y);
    double both = 0, conflicts = 0;
    for (std::size_t i = 0; i < x.size(); ++i)
        if (std::abs(x[i]) >= tx && std::abs(y[i]) >= ty) {
            ++both;
            conflicts += (x[i] < 0) != (y[i] < 0);
        }
    REQUIRE(both > 0);
    CHECK(report.modules[0].pairs[0].sign_conflict == Approx(conflicts / both).margin(0.03));
}

TEST_CASE("known stacks: orthogonal, self, negation, nearly parallel", "[stack]") {
    std::mt19937 g(3);
    const std::int64_t out = 24, in = 20, r = 3;
    std::normal_distribution<float> d;
    SECTION("adapters on disjoint rows and columns are orthogonal: kappa 1, cosine 0, no overlap") {
        std::vector<float> b1(out * r, 0.0f), a1(r * in, 0.0f), b2(out * r, 0.0f), a2(r * in, 0.0f);
        for (std::int64_t o = 0; o < out / 2; ++o)
            for (std::int64_t k = 0; k < r; ++k) b1[o * r + k] = d(g), b2[(o + out / 2) * r + k] = d(g);
        for (std::int64_t k = 0; k < r; ++k)
            for (std::int64_t i = 0; i < in / 2; ++i) a1[k * in + i] = d(g), a2[k * in + i + in / 2] = d(g);
        const auto report = analyse({adapter_of({module_of(b1, a1, out, r, in, 3)}), adapter_of({module_of(b2, a2, out, r, in, 3)})},
                                    {1, 1});
        const auto& s = report.modules[0];
        CHECK(s.kappa == Approx(1.0).margin(1e-9));
        CHECK(s.pairs[0].cosine == Approx(0.0).margin(1e-9));
        CHECK(s.pairs[0].out_phi == Approx(0.0).margin(1e-9));
        CHECK(s.pairs[0].in_max_cosine == Approx(0.0).margin(1e-9));
        // ‖A ⊕ B‖_2 = max: the stack is no stronger than its strongest part.
        CHECK(s.growth == Approx(1.0).margin(1e-9));
        CHECK(s.verdict == Verdict::ok);
    }
    SECTION("an adapter with itself: kappa 2, cosine 1, strength 2, unstable") {
        const auto m = random_module(g, out, in, r, 6);
        const auto report = analyse({adapter_of({m}), adapter_of({m})}, {1, 1});
        const auto& s = report.modules[0];
        CHECK(s.kappa == Approx(2.0).epsilon(1e-9));
        CHECK(s.pairs[0].cosine == Approx(1.0).epsilon(1e-9));
        CHECK(s.pairs[0].out_phi == Approx(1.0).epsilon(1e-6));
        CHECK(s.pairs[0].sign_conflict == 0.0);
        CHECK(s.strength == Approx(2.0).epsilon(1e-9));
        CHECK(s.verdict == Verdict::unstable);
        CHECK(report.verdict == Verdict::unstable);
        CHECK(report.suggested_factor == Approx(0.75).epsilon(1e-6));
        SECTION("--auto-scale brings it to ok at strength 1.5") {
            const auto scaled = analyse({adapter_of({m}), adapter_of({m})}, {1, 1}, true);
            CHECK(scaled.applied_factor == Approx(0.75).epsilon(1e-6));
            CHECK(scaled.weights[0] == Approx(0.75).epsilon(1e-6));
            CHECK(scaled.modules[0].strength == Approx(1.5).epsilon(1e-6));
            CHECK(scaled.verdict == Verdict::ok);
        }
    }
    SECTION("an adapter with its negation cancels: kappa 0, cosine -1, every sign in conflict") {
        const auto m = random_module(g, out, in, r, 6);
        const auto report = analyse({adapter_of({m}), adapter_of({m})}, {1, -1});
        const auto& s = report.modules[0];
        CHECK(s.kappa == Approx(0.0).margin(1e-9));
        CHECK(s.sum_fro == Approx(0.0).margin(1e-6 * s.fro[0]));
        CHECK(s.pairs[0].cosine == Approx(-1.0).epsilon(1e-9));
        CHECK(s.pairs[0].sign_conflict == 1.0);
        CHECK(s.strength == Approx(0.0).margin(1e-5));
        CHECK(s.verdict == Verdict::ok);
    }
    SECTION("nearly parallel adapters: cosine near 1 as the dense value, kappa near 2") {
        const auto m1 = random_module(g, out, in, r, 6);
        auto m2 = m1;
        auto b = m2.up.to_f32();
        for (auto& x : b) x += 0.05f * d(g);
        m2.up = Tensor::from_f32(DType::F32, {out, r}, b);
        const auto report = analyse({adapter_of({m1}), adapter_of({m2})}, {0.5, 0.5});
        const Dense x = delta(m1), y = delta(m2);
        const double cosine = dot(x, y) / std::sqrt(dot(x, x) * dot(y, y));
        CHECK(cosine > 0.99);
        CHECK(report.modules[0].pairs[0].cosine == Approx(cosine).margin(1e-9));
        CHECK(report.modules[0].kappa == Approx(1 + cosine * std::sqrt(dot(x, x) * dot(y, y)) * 2 / (dot(x, x) + dot(y, y))).epsilon(1e-6));
        CHECK(report.modules[0].verdict == Verdict::ok);  // two halves: strength about 1
    }
    SECTION("a single adapter at weight w has strength |w|") {
        const auto m = random_module(g, out, in, r, 6);
        CHECK(analyse({adapter_of({m})}, {1.7}).modules[0].strength == Approx(1.7).epsilon(1e-9));
        CHECK(analyse({adapter_of({m})}, {1.7}).modules[0].verdict == Verdict::warn);
        CHECK(analyse({adapter_of({m})}, {-0.4}).modules[0].strength == Approx(0.4).epsilon(1e-9));
    }
}

TEST_CASE("stack against a base weight: spectral ratio and fp16 overflow", "[stack]") {
    std::mt19937 g(5);
    std::normal_distribution<float> d;
    const std::int64_t out = 30, in = 26;
    const auto m = random_module(g, out, in, 4, 4.0);
    const Dense dw = delta(m, 2.0);
    SECTION("the ratio |dW|_2 / |W|_2 matches dense values") {
        // A base with a clear top singular value, as trained weights have.
        std::vector<float> w(static_cast<std::size_t>(out * in));
        std::vector<float> u(out), v(in);
        for (auto& x : u) x = d(g);
        for (auto& x : v) x = d(g);
        for (std::int64_t i = 0; i < out; ++i)
            for (std::int64_t j = 0; j < in; ++j) w[i * in + j] = 3 * u[i] * v[j] + 0.2f * d(g);
        const double w_spectral = linalg::dense_singular_values(w.data(), out, in).front();
        FixedBase base(w, 65504);
        const auto report = analyse({adapter_of({m})}, {2.0}, false, &base);
        REQUIRE(report.modules[0].base);
        CHECK(report.modules[0].base->spectral == Approx(w_spectral).epsilon(1e-4));
        CHECK(report.modules[0].base->ratio == Approx(spectral(dw, out, in) / w_spectral).epsilon(1e-4));
        CHECK(report.modules[0].base->overflow_count == 0);
    }
    SECTION("overflow: counted exactly, and the factor it suggests is tight") {
        std::vector<float> w(static_cast<std::size_t>(out * in));
        double dmax = 0;
        for (double x : dw) dmax = std::max(dmax, std::abs(x));
        for (std::size_t i = 0; i < w.size(); ++i) w[i] = (i % 7 == 0 ? 65504.0f - static_cast<float>(0.5 * dmax) : 10.0f) * (i % 2 ? 1.0f : -1.0f);
        std::int64_t expected = 0;
        for (std::size_t i = 0; i < w.size(); ++i) expected += std::abs(w[i] + dw[i]) > 65504 ? 1 : 0;
        REQUIRE(expected > 0);
        FixedBase base(w, 65504);
        StackOptions o;
        o.weights = {2.0};
        o.threads = 1;
        o.thresholds.strength_warn = o.thresholds.strength_unstable = 100;  // only the base decides
        o.thresholds.base_warn = o.thresholds.base_unstable = 1e9;
        const auto report = analyse_stack({adapter_of({m})}, o, false, &base, no_progress());
        const auto& b = *report.modules[0].base;
        CHECK(b.overflow_count == expected);
        CHECK(report.modules[0].verdict == Verdict::unstable);
        CHECK(b.overflow_factor < 1);
        const auto scaled = analyse_stack({adapter_of({m})}, o, true, &base, no_progress());
        CHECK(scaled.modules[0].base->overflow_count == 0);
        CHECK(scaled.verdict == Verdict::ok);
        o.weights = {2.0 * b.overflow_factor * 1.001};
        CHECK(analyse_stack({adapter_of({m})}, o, false, &base, no_progress()).modules[0].base->overflow_count > 0);
    }
    SECTION("f16 and bf16 base values read in place give what their f32 widening gives") {
        std::vector<float> w(static_cast<std::size_t>(out * in));
        double dmax = 0;
        for (double x : dw) dmax = std::max(dmax, std::abs(x));
        for (std::size_t i = 0; i < w.size(); ++i) w[i] = 0.3f * d(g);
        for (const DType type : {DType::F16, DType::BF16}) {
            CAPTURE(dtype_name(type));
            for (const bool overflowing : {false, true}) {
                std::vector<float> v = w;
                // Entries near the limit (after rounding to the type) that ΔW pushes over it.
                const double limit = overflowing ? 1000.0 : 65504.0;
                if (overflowing)
                    for (std::size_t i = 0; i < v.size(); i += 5) v[i] = static_cast<float>((limit - 0.5 * dmax) * (i % 2 ? 1 : -1));
                StoredBase stored(v, out, in, type, limit);
                FixedBase widened(stored.widened(), limit);
                StackOptions o;
                o.weights = {2.0};
                o.threads = 1;
                const auto a = analyse_stack({adapter_of({m})}, o, false, &stored, no_progress());
                const auto b = analyse_stack({adapter_of({m})}, o, false, &widened, no_progress());
                CHECK(stored.releases == 1);  // released once the module is done
                REQUIRE(a.modules[0].base);
                REQUIRE(b.modules[0].base);
                const BaseStats &sa = *a.modules[0].base, &sb = *b.modules[0].base;
                CHECK(sa.dtype == dtype_name(type));
                CHECK(sa.spectral == Approx(sb.spectral).epsilon(1e-6));
                CHECK(sa.overflow_count == sb.overflow_count);
                CHECK(sa.overflow_factor == sb.overflow_factor);
                CHECK(sa.max_abs == sb.max_abs);
                // Against dense values: the count is exact, and max_abs bounds every entry.
                const std::vector<float> wv = stored.widened();
                std::int64_t expected = 0;
                double largest = 0;
                for (std::size_t i = 0; i < wv.size(); ++i) {
                    expected += std::abs(wv[i] + dw[i]) > limit ? 1 : 0;
                    largest = std::max(largest, std::abs(wv[i] + dw[i]));
                }
                CHECK(sa.overflow_count == expected);
                CHECK((expected > 0) == overflowing);
                if (!overflowing) {
                    // The whole-tensor screen: max|W| + a bound on max|ΔW_pq|, tighter than ‖ΔW‖_F here.
                    double wmax = 0, fro = 0;
                    for (float x : wv) wmax = std::max(wmax, static_cast<double>(std::abs(x)));
                    for (double x : dw) fro += x * x;
                    CHECK(sa.max_abs >= largest);
                    CHECK(sa.max_abs <= (wmax + std::sqrt(fro)) * (1 + 1e-6));
                }
            }
        }
    }
}

TEST_CASE("stack refuses what it cannot model, naming it", "[stack]") {
    std::mt19937 g(9);
    const auto m = random_module(g, 10, 8, 2, 2);
    auto other = random_module(g, 12, 8, 2, 2);
    try {
        analyse({adapter_of({m}), adapter_of({other})}, {1, 1});
        FAIL("mismatched shapes accepted");
    } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::bad_input);
        CHECK_THAT(e.what(), Catch::Contains("model.layers.0.self_attn.q_proj") && Catch::Contains("different base models"));
    }
    auto dora = m;
    dora.magnitude = Tensor::from_f32(DType::F32, {10}, std::vector<float>(10, 1.0f));
    CHECK_THROWS_WITH(analyse({adapter_of({m}), adapter_of({dora})}, {1, 1}), Catch::Contains("DoRA"));
    CHECK_THROWS_WITH(analyse({adapter_of({m})}, {1, 2}), Catch::Contains("2 weights for 1 adapters"));
    auto bad = m;
    auto b = bad.up.to_f32();
    b[3] = NAN;
    bad.up = Tensor::from_f32(DType::F32, {10, 2}, b);
    CHECK_THROWS_WITH(analyse({adapter_of({m}), adapter_of({bad})}, {1, 1}), Catch::Contains("NaN"));
}

TEST_CASE("base tensors are read ahead of the workers, in order, each once, within the budget", "[stack]") {
    // Each module's base tensor "holds" 1000 bytes and the budget is 3500: the reader may hold
    // at most 3 read and not yet loaded (a fourth may be in its read when one of them starts).
    class Recording final : public BaseWeights {
    public:
        bool load(const LoraModule& m, BaseWeight&) const override {
            std::unique_lock lock(mutex);
            // The first load waits for the reader's first read (up to 10 s), so that a busy
            // machine (CI under ASan) cannot finish every module before the reader thread runs.
            if (loads.empty()) read_once.wait_for(lock, std::chrono::seconds(10), [&] { return !reads.empty(); });
            loads.push_back(m.name);
            std::erase(pending, m.name);
            return false;  // no base tensor: reported, not an error
        }
        std::uint64_t prefetch(const LoraModule& m) const override {
            std::this_thread::sleep_for(std::chrono::milliseconds(2));  // a disk
            std::lock_guard lock(mutex);
            reads.push_back(m.name);
            if (std::find(loads.begin(), loads.end(), m.name) == loads.end()) pending.push_back(m.name);
            most_pending = std::max(most_pending, pending.size());
            read_once.notify_all();
            return 1000;
        }
        mutable std::mutex mutex;
        mutable std::condition_variable read_once;
        mutable std::vector<std::string> loads, reads, pending;
        mutable std::size_t most_pending = 0;
    };
    std::mt19937 g(3);
    std::vector<LoraModule> modules;
    for (int i = 0; i < 40; ++i) modules.push_back(random_module(g, 12, 10, 2, 2, fmt::format("model.layers.{}.mlp.up_proj", i)));
    for (const int threads : {1, 2}) {
        INFO(threads);
        Recording base;
        StackOptions o;
        o.threads = threads;
        o.read_ahead_bytes = 3500;
        const auto report = analyse_stack({adapter_of(modules)}, o, false, &base, no_progress());
        CHECK(report.modules.size() == 40);
        CHECK(base.loads.size() == 40);
        CHECK(base.most_pending <= 4);
        CHECK_FALSE(base.reads.empty());
        // In module order, each at most once.
        std::vector<std::size_t> index;
        for (const auto& name : base.reads) {
            const auto at = std::find_if(modules.begin(), modules.end(), [&](const LoraModule& m) { return m.name == name; });
            REQUIRE(at != modules.end());
            index.push_back(static_cast<std::size_t>(at - modules.begin()));
        }
        CHECK(std::is_sorted(index.begin(), index.end()));
        CHECK(std::adjacent_find(index.begin(), index.end()) == index.end());
    }
}

TEST_CASE("split_weight separates PATH:W only when W is a number", "[stack]") {
    CHECK(split_weight("a.safetensors:0.8") == std::pair<std::string, std::optional<double>>{"a.safetensors", 0.8});
    CHECK(split_weight("a.safetensors:-1e-1") == std::pair<std::string, std::optional<double>>{"a.safetensors", -0.1});
    CHECK(split_weight("a.safetensors") == std::pair<std::string, std::optional<double>>{"a.safetensors", std::nullopt});
    CHECK(split_weight("C:/x/a.safetensors").second == std::nullopt);
    CHECK(split_weight("dir:name/a.safetensors").first == "dir:name/a.safetensors");
    CHECK(split_weight("a:nan").second == std::nullopt);
}

TEST_CASE("lora-stack CLI: report, --json, --strict, -o writes the exact sum", "[stack][cli]") {
    using namespace lorakit::test;
    ScratchDir dir;
    const std::string sample = std::string(LORAKIT_SOURCE_DIR) + "/samples/peft-llama";
    SECTION("the same adapter twice is unstable; --strict fails and writes nothing") {
        auto r = run_tool("lora-stack", {sample, sample, "--strict", "-o", (dir / "out").string()});
        CHECK(r.exit_code == 1);
        CHECK_THAT(r.err, Catch::Contains("unstable") && Catch::Contains("nothing written"));
        CHECK_THAT(r.out, Catch::Contains("verdict: unstable"));
        CHECK(dir.list().empty());
        r = run_tool("lora-stack", {sample, sample});
        CHECK(r.exit_code == 0);
        CHECK_THAT(r.out, Catch::Contains("scale every weight by 0.75"));
    }
    SECTION("--auto-scale and --json") {
        auto r = run_tool("lora-stack", {sample, sample + ":0.5", "--auto-scale", "--json"});
        REQUIRE(r.exit_code == 0);
        const auto j = nlohmann::json::parse(r.out);
        CHECK(j["verdict"] == "ok");
        CHECK(j["applied_factor"].get<double>() == Approx(1.0));  // strength 1.5: already ok
        CHECK(j["modules"].size() == 14);
        CHECK(j["pairs"][0]["rms_cosine"].get<double>() == Approx(1.0).epsilon(1e-9));
        r = run_tool("lora-stack", {sample, sample + ":0.8", "--auto-scale", "--json"});
        const auto k = nlohmann::json::parse(r.out);
        CHECK(k["applied_factor"].get<double>() == Approx(1.5 / 1.8).epsilon(1e-6));
        CHECK(k["adapters"][1]["weight"].get<double>() == Approx(0.8 * 1.5 / 1.8).epsilon(1e-6));
    }
    SECTION("-o writes the concatenation: its delta is the weighted sum") {
        const auto out = dir / "stacked";
        auto r = run_tool("lora-stack", {sample + ":0.5", sample + ":0.25", "-o", out.string()});
        REQUIRE(r.exit_code == 0);
        const auto& registry = formats::builtin_registry();
        const Adapter in = registry.load_adapter(sample), stacked = registry.load_adapter(out);
        REQUIRE(stacked.modules.size() == in.modules.size());
        for (const auto& m : in.modules) {
            const auto it = std::find_if(stacked.modules.begin(), stacked.modules.end(), [&](const LoraModule& s) { return s.name == m.name; });
            REQUIRE(it != stacked.modules.end());
            CHECK(it->rank() == 2 * m.rank());
            const Dense expected = delta(m, 0.75), got = delta(*it);
            double err = 0, ref = 0;
            for (std::size_t i = 0; i < got.size(); ++i) err += (got[i] - expected[i]) * (got[i] - expected[i]), ref += expected[i] * expected[i];
            CHECK(std::sqrt(err / ref) < 1e-6);
        }
        r = run_tool("lora-stack", {sample, sample, "-o", out.string()});
        CHECK(r.exit_code == 2);  // exists, no --force
    }
    SECTION("with --base: the ratio per module from a checkpoint with the model's tensor names") {
        const Adapter in = formats::builtin_registry().load_adapter(sample);
        std::vector<Tensor> keep;
        std::vector<formats::TensorToWrite> tensors;
        std::mt19937 g(1);
        std::normal_distribution<float> d;
        for (const auto& m : in.modules) {
            std::vector<float> w(static_cast<std::size_t>(m.out_features() * m.in_features()));
            for (auto& x : w) x = d(g);
            keep.push_back(Tensor::from_f32(DType::F16, {m.out_features(), m.in_features()}, w));
            tensors.push_back({m.name + ".weight", keep.back().view()});
        }
        formats::write_safetensors(dir / "model.safetensors", tensors, {}, false);
        auto r = run_tool("lora-stack", {sample, "--base", (dir / "model.safetensors").string(), "--json"});
        REQUIRE(r.exit_code == 0);
        const auto j = nlohmann::json::parse(r.out);
        for (const auto& m : j["modules"]) {
            REQUIRE(m["base"].is_object());
            CHECK(m["base"]["dtype"] == "F16");
            CHECK(m["base"]["overflow_count"] == 0);
            CHECK(m["base"]["ratio"].get<double>() > 0);
        }
        r = run_tool("lora-stack", {sample, "--base", (dir / "missing.safetensors").string()});
        CHECK(r.exit_code == 4);
        CHECK_THAT(r.err, Catch::Contains("missing.safetensors"));
        // A tensor that cannot take its module: the error names that module (the tensors are
        // asked for ahead of use, and that hint must not report it under another module).
        const std::string last = in.modules.back().name;
        keep.back() = Tensor::from_f32(DType::F16, {in.modules.back().out_features(), in.modules.back().in_features() + 1},
                                       std::vector<float>(static_cast<std::size_t>(in.modules.back().out_features() *
                                                                                   (in.modules.back().in_features() + 1))));
        tensors.back() = {last + ".weight", keep.back().view()};
        formats::write_safetensors(dir / "wrong.safetensors", tensors, {}, false);
        r = run_tool("lora-stack", {sample, "--base", (dir / "wrong.safetensors").string(), "-j", "1"});
        CHECK(r.exit_code == 3);
        CHECK_THAT(r.err, Catch::Contains("module '" + last + "'") && Catch::Contains("does not fit"));
    }
}

TEST_CASE("the top-fraction threshold (radix select) equals nth_element's order statistic", "[stack]") {
    std::mt19937 g(5);
    std::normal_distribution<float> normal;
    for (int trial = 0; trial < 120; ++trial) {
        const std::size_t n = 1 + static_cast<std::size_t>(g() % 9000);
        std::vector<float> values(n);
        for (auto& v : values) {
            switch (trial % 8) {
            case 0: v = normal(g); break;                                            // one scale
            case 1: v = normal(g) * std::ldexp(1.0f, static_cast<int>(g() % 60) - 30); break;  // many exponents
            case 2: v = static_cast<float>(static_cast<int>(g() % 7) - 3); break;    // duplicates and zeros
            case 3: v = normal(g) * 1e-40f; break;                                   // subnormal
            case 4: v = g() % 50 == 0 ? std::numeric_limits<float>::infinity() : normal(g); break;  // infinities
            case 5: v = 0.25f; break;                                                // all equal
            default: v = normal(g); break;                                           // arranged below
            }
        }
        if (trial % 8 == 6) {
            // Sorted, and then a few large values at regular positions among tiny ones.
            std::sort(values.begin(), values.end());
        } else if (trial % 8 == 7) {
            for (std::size_t i = 0; i < n; ++i) values[i] = 1e-3f * normal(g);
            for (std::size_t i = 0; i < 256 && n >= 1024; ++i) values[i * n / 256] = 1e3f + static_cast<float>(i);
        }
        for (std::size_t keep : {std::size_t{1}, std::max<std::size_t>(1, n / 5), n}) {
            std::vector<float> magnitudes(n);
            for (std::size_t i = 0; i < n; ++i) magnitudes[i] = std::abs(values[i]);
            std::nth_element(magnitudes.begin(), magnitudes.begin() + static_cast<std::ptrdiff_t>(n - keep), magnitudes.end());
            INFO("trial " << trial << " n " << n << " keep " << keep);
            CHECK(lorakit::kth_largest_magnitude(values, keep) == magnitudes[n - keep]);
        }
    }
}
