// lora-extract: truncated SVD of dense deltas (accuracy against the exact optimum, dynamic
// rules, kohya's clamp) and the whole command on synthetic checkpoints of each layout.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>

#include <nlohmann/json.hpp>

#include "lora_helpers.h"
#include "lorakit/bake.h"
#include "lorakit/extract.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/formats/safetensors.h"
#include "support.h"

extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);

using namespace lorakit;
using lorakit::test::ScratchDir;

namespace {

// rows x cols = Σ_i σ_i u_i v_iᵀ with orthonormal u, v (Gram–Schmidt on Gaussian vectors).
std::vector<float> with_spectrum(std::int64_t rows, std::int64_t cols, const std::vector<double>& sigma, unsigned seed) {
    std::mt19937 g(seed);
    std::normal_distribution<double> d;
    auto orthonormal = [&](std::int64_t n, std::size_t count) {
        std::vector<std::vector<double>> q;
        while (q.size() < count) {
            std::vector<double> v(static_cast<std::size_t>(n));
            for (auto& x : v) x = d(g);
            for (const auto& p : q) {
                double dot = 0;
                for (std::size_t i = 0; i < v.size(); ++i) dot += v[i] * p[i];
                for (std::size_t i = 0; i < v.size(); ++i) v[i] -= dot * p[i];
            }
            double norm = 0;
            for (double x : v) norm += x * x;
            for (auto& x : v) x /= std::sqrt(norm);
            q.push_back(std::move(v));
        }
        return q;
    };
    const auto u = orthonormal(rows, sigma.size()), v = orthonormal(cols, sigma.size());
    std::vector<double> m(static_cast<std::size_t>(rows * cols), 0.0);
    for (std::size_t t = 0; t < sigma.size(); ++t)
        for (std::int64_t i = 0; i < rows; ++i) {
            const double a = sigma[t] * u[t][static_cast<std::size_t>(i)];
            for (std::int64_t j = 0; j < cols; ++j) m[static_cast<std::size_t>(i * cols + j)] += a * v[t][static_cast<std::size_t>(j)];
        }
    return std::vector<float>(m.begin(), m.end());
}

// ‖M - up·down‖_F, in double.
double residual(const std::vector<float>& m, std::int64_t rows, std::int64_t cols, const LowRankFit& fit) {
    double sum = 0;
    for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t j = 0; j < cols; ++j) {
            double x = m[static_cast<std::size_t>(i * cols + j)];
            for (std::int64_t t = 0; t < fit.rank; ++t)
                x -= double(fit.up[static_cast<std::size_t>(i * fit.rank + t)]) * fit.down[static_cast<std::size_t>(t * cols + j)];
            sum += x * x;
        }
    return std::sqrt(sum);
}

// max_i |a_i - b_i|, in double.
double max_abs_difference(const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    double diff = 0;
    for (std::size_t j = 0; j < a.size(); ++j) diff = std::max(diff, double(std::abs(a[j] - b[j])));
    return diff;
}

FitOptions fixed_rank(std::int64_t k) {
    FitOptions o;
    o.rank.rank = k;
    return o;
}

}  // namespace

TEST_CASE("extract: the default randomized SVD is within 2% of the optimal error", "[extract][linalg]") {
    // 560 x 640 takes the randomized route by default (short side above 512).
    const std::int64_t rows = 560, cols = 640, k = 32;
    std::vector<double> fast, slow, flat;
    for (int i = 0; i < 400; ++i) {
        fast.push_back(std::pow(0.9, i));                // fast decay
        slow.push_back(1.0 / std::sqrt(double(i + 1)));  // slow decay
        flat.push_back(i < 40 ? 1.0 : 0.5);              // a plateau past the rank: the hard case for sketches
    }
    for (const auto* sigma : {&fast, &slow, &flat}) {
        const auto m = with_spectrum(rows, cols, *sigma, 7);
        const LowRankFit fit = fit_low_rank(m.data(), rows, cols, fixed_rank(k));
        CHECK(fit.randomized);
        CHECK(fit.rank == k);
        double optimal = 0;  // the tail of the known spectrum
        for (std::size_t i = k; i < sigma->size(); ++i) optimal += (*sigma)[i] * (*sigma)[i];
        optimal = std::sqrt(optimal);
        const double error = residual(m, rows, cols, fit);
        INFO("optimal " << optimal << ", randomized " << error);
        CHECK(error <= 1.02 * optimal);
        // The reported error is the measured one.
        CHECK(fit.relative_error == Approx(error / std::sqrt(fit.frobenius_squared)).epsilon(1e-3));
    }
}

TEST_CASE("extract: a delta of low rank is recovered exactly; dynamic rules agree with the full spectrum",
          "[extract][linalg]") {
    const std::int64_t rows = 600, cols = 530;
    SECTION("true rank below the target") {
        const auto m = with_spectrum(rows, cols, {5, 3, 2, 1, 0.5}, 3);
        const LowRankFit fit = fit_low_rank(m.data(), rows, cols, fixed_rank(8));
        CHECK(fit.rank == 8);
        CHECK(residual(m, rows, cols, fit) / std::sqrt(fit.frobenius_squared) < 1e-5);
        CHECK(fit.relative_error < 1e-5);
    }
    SECTION("energy, sv_fro and sv_ratio, including widening past the first sketch") {
        std::vector<double> sigma;
        for (int i = 0; i < 300; ++i) sigma.push_back(1.0 / (1.0 + 0.05 * i));
        const auto m = with_spectrum(rows, cols, sigma, 5);
        const std::vector<double> full = linalg::dense_singular_values(m.data(), rows, cols);
        for (const char* rule : {"energy=0.5", "energy=0.9", "sv_fro=0.8", "sv_ratio=3", "sv_ratio=1.5", "sv_cumulative=0.6"}) {
            FitOptions o;
            o.rank = parse_dynamic_rule(rule);
            const LowRankFit fit = fit_low_rank(m.data(), rows, cols, o);
            const RankChoice expected = choose_rank(full, std::min(rows, cols), std::min(rows, cols), false, o.rank);
            INFO(rule << ": expected rank " << expected.rank << ", got " << fit.rank);
            // The randomized values are within a hair of the exact ones: a rank right at a
            // threshold may move by one.
            CHECK(std::abs(fit.rank - expected.rank) <= 1);
            CHECK(fit.rank > 0);
        }
        // Caps: --rank bounds a dynamic rule, --min-rank lifts it.
        FitOptions o;
        o.rank = parse_dynamic_rule("energy=0.99");
        o.rank.rank = 20;
        CHECK(fit_low_rank(m.data(), rows, cols, o).rank == 20);
        o.rank = parse_dynamic_rule("sv_ratio=1.01");
        o.rank.min_rank = 12;
        CHECK(fit_low_rank(m.data(), rows, cols, o).rank == 12);
    }
}

TEST_CASE("extract: kohya's quantile clamp of both factors", "[extract][linalg]") {
    const std::int64_t rows = 40, cols = 30;
    std::mt19937 g(9);
    std::normal_distribution<float> d;
    std::vector<float> m(static_cast<std::size_t>(rows * cols));
    for (auto& x : m) x = d(g);
    const LowRankFit plain = fit_low_rank(m.data(), rows, cols, fixed_rank(6));
    CHECK_FALSE(plain.randomized);
    // torch.quantile(cat(U.flatten(), Vh.flatten()), q), linear interpolation.
    std::vector<float> all(plain.up);
    all.insert(all.end(), plain.down.begin(), plain.down.end());
    std::sort(all.begin(), all.end());
    const double position = 0.9 * double(all.size() - 1);
    const auto lo = static_cast<std::size_t>(position);
    const double hi = all[lo] + (position - double(lo)) * (all[lo + 1] - all[lo]);
    FitOptions o = fixed_rank(6);
    o.clamp_quantile = 0.9;
    const LowRankFit clamped = fit_low_rank(m.data(), rows, cols, o);
    std::size_t at_bound = 0;
    for (const auto* f : {&clamped.up, &clamped.down})
        for (float x : *f) {
            CHECK(std::abs(x) <= hi * (1 + 1e-6));
            at_bound += std::abs(std::abs(x) - hi) < 1e-6 * hi ? 1 : 0;
        }
    CHECK(at_bound > 0);
    CHECK(clamped.relative_error == Approx(residual(m, rows, cols, clamped) / std::sqrt(clamped.frobenius_squared)).epsilon(1e-4));
    CHECK(clamped.relative_error > plain.relative_error);
}

namespace {

const std::string sample = std::string(LORAKIT_SOURCE_DIR) + "/samples/peft-llama";
const std::string base_llama = std::string(LORAKIT_SOURCE_DIR) + "/samples/base-llama";

// Every module's ΔW of `extracted` matches the same-named module of `original` (weight 1).
void check_same_deltas(const Adapter& original, const Adapter& extracted, double tolerance) {
    REQUIRE(extracted.modules.size() == original.modules.size());
    for (const auto& m : original.modules) {
        const auto it = std::find_if(extracted.modules.begin(), extracted.modules.end(),
                                     [&](const LoraModule& x) { return x.name == m.name; });
        REQUIRE(it != extracted.modules.end());
        const auto want = test::dense_delta(m), got = test::dense_delta(*it);
        REQUIRE(want.size() == got.size());
        double diff = 0, norm = 0;
        for (std::size_t i = 0; i < want.size(); ++i) diff += (want[i] - got[i]) * (want[i] - got[i]), norm += want[i] * want[i];
        INFO(m.name << ": relative difference " << std::sqrt(diff / norm));
        CHECK(std::sqrt(diff / norm) < tolerance);
    }
}

}  // namespace

TEST_CASE("lora-extract: bake then extract recovers the adapter (PEFT, f32 and f16 bases)", "[extract][cli]") {
    ScratchDir dir;
    const auto& registry = formats::builtin_registry();
    const Adapter original = registry.load_adapter(sample);
    SECTION("f32: to float tolerance") {
        auto r = test::run_tool("lora-bake", {base_llama, sample, "-o", (dir / "tuned.safetensors").string(), "--dtype", "f32"});
        REQUIRE(r.exit_code == 0);
        r = test::run_tool("lora-extract", {base_llama, (dir / "tuned.safetensors").string(), "-o", (dir / "x").string(),
                                            "--rank", "8", "--json"});
        INFO(r.err);
        REQUIRE(r.exit_code == 0);
        CHECK_THAT(r.out, Catch::Contains("\"modules_extracted\": 14") && Catch::Contains("\"convention\": \"peft\""));
        CHECK_THAT(r.out, Catch::Contains("\"modules_unchanged\": 1"));  // lm_head
        const Adapter extracted = registry.load_adapter((dir / "x").string());
        CHECK(extracted.convention == "peft");
        CHECK(extracted.base_model.name == base_llama);  // base_model_name_or_path: the model folder
        for (const auto& m : extracted.modules) {
            CHECK(m.rank() == 8);
            CHECK(m.scale() == 1.0);
            CHECK(m.down.dtype() == DType::F32);
        }
        check_same_deltas(original, extracted, 1e-5);
        // Identical inputs give identical bytes.
        r = test::run_tool("lora-extract", {base_llama, (dir / "tuned.safetensors").string(), "-o", (dir / "y").string(), "--rank", "8"});
        REQUIRE(r.exit_code == 0);
        CHECK(test::read_file(dir / "x" / "adapter_model.safetensors") == test::read_file(dir / "y" / "adapter_model.safetensors"));
        CHECK(test::read_file(dir / "x" / "adapter_config.json") == test::read_file(dir / "y" / "adapter_config.json"));
        // Whatever the number of workers (each weight on one worker, BLAS single-threaded in it),
        // and whatever order they finish in: the same bytes.
        for (const char* jobs : {"1", "3"}) {
            const auto z = dir / (std::string("z") + jobs);
            r = test::run_tool("lora-extract",
                               {base_llama, (dir / "tuned.safetensors").string(), "-o", z.string(), "--rank", "8", "-j", jobs});
            REQUIRE(r.exit_code == 0);
            CHECK(test::read_file(dir / "x" / "adapter_model.safetensors") == test::read_file(z / "adapter_model.safetensors"));
        }
    }
    SECTION("f16 (the base's dtype): within the rounding of the tuned weights") {
        auto r = test::run_tool("lora-bake", {base_llama, sample, "-o", (dir / "tuned.safetensors").string()});
        REQUIRE(r.exit_code == 0);
        r = test::run_tool("lora-extract", {base_llama, (dir / "tuned.safetensors").string(), "-o",
                                            (dir / "x").string(), "--rank", "4"});
        INFO(r.err);
        REQUIRE(r.exit_code == 0);
        const Adapter extracted = registry.load_adapter((dir / "x").string());
        CHECK(extracted.modules.front().down.dtype() == DType::F16);
        // Rank 4 holds the rank-4 modules; the two rank-8 ones lose their tail (reported).
        Adapter rank4 = original;
        std::erase_if(rank4.modules, [](const LoraModule& m) { return m.rank() != 4; });
        Adapter got = extracted;
        std::erase_if(got.modules, [&](const LoraModule& m) {
            return std::none_of(rank4.modules.begin(), rank4.modules.end(), [&](const LoraModule& x) { return x.name == m.name; });
        });
        check_same_deltas(rank4, got, 2e-2);  // f16 rounding of W (|W| ~ 1) against |ΔW| ~ 0.05
    }
}

TEST_CASE("lora-extract on an SD single file: kohya names, OpenCLIP parts, 3x3 convs with --conv-rank", "[extract][cli]") {
    ScratchDir dir;
    std::mt19937 g(4);
    std::normal_distribution<float> d;
    auto random = [&](Shape shape, float scale) {
        std::vector<float> v(static_cast<std::size_t>(checked_element_count(shape)));
        for (auto& x : v) x = scale * d(g);
        return v;
    };
    // name, shape, and the rank-2 delta the tuned copy gets (0: unchanged).
    struct Item {
        std::string name;
        Shape shape;
        bool changed;
    };
    const std::vector<Item> items = {
        {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", {16, 16}, true},
        {"model.diffusion_model.input_blocks.1.0.in_layers.2.weight", {8, 8, 3, 3}, true},
        {"model.diffusion_model.input_blocks.1.1.proj_in.weight", {16, 16, 1, 1}, true},
        {"model.diffusion_model.input_blocks.1.1.norm.weight", {16}, true},
        {"model.diffusion_model.input_blocks.1.1.norm.bias", {16}, true},
        {"model.diffusion_model.input_blocks.1.1.proj_in.bias", {16}, true},
        {"conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias", {30}, true},
        {"model.diffusion_model.output_blocks.11.1.proj_out.weight", {16, 16, 1, 1}, false},
        {"conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", {12, 12}, true},
        {"conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", {30, 10}, true},
        {"conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight", {20, 10}, true},
    };
    std::vector<Tensor> base_tensors, tuned_tensors;
    for (const auto& item : items) {
        const auto w = random(item.shape, 1.0f);
        base_tensors.push_back(Tensor::from_f32(DType::F32, item.shape, w));
        auto t = w;
        if (item.changed) {
            const std::int64_t rows = item.shape[0], cols = static_cast<std::int64_t>(w.size()) / rows;
            const auto b = random({rows, 2}, 0.1f), a = random({2, cols}, 0.1f);
            cblas_sgemm(101, 111, 111, int(rows), int(cols), 2, 1.0f, b.data(), 2, a.data(), int(cols), 1.0f, t.data(), int(cols));
        }
        tuned_tensors.push_back(Tensor::from_f32(DType::F32, item.shape, t));
    }
    auto save = [&](const std::string& file, const std::vector<Tensor>& tensors) {
        std::vector<formats::TensorToWrite> list;
        for (std::size_t i = 0; i < items.size(); ++i) list.push_back({items[i].name, tensors[i].view()});
        formats::write_safetensors(dir / file, list, {}, false);
    };
    save("base.safetensors", base_tensors);
    save("tuned.safetensors", tuned_tensors);
    const std::string base = (dir / "base.safetensors").string(), tuned = (dir / "tuned.safetensors").string();

    auto r = test::run_tool("lora-extract", {base, tuned, "-o", (dir / "a.safetensors").string(), "--rank", "4", "--json", "-v"});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    CHECK_THAT(r.out, Catch::Contains("\"convention\": \"kohya\"") && Catch::Contains("\"family\": \"SDXL\""));
    CHECK_THAT(r.out, Catch::Contains("\"convs_without_conv_rank\": 1"));
    CHECK_THAT(r.err, Catch::Contains("--conv-rank"));
    // The norm's weight and bias, proj_in's bias, OpenCLIP's fused in_proj bias.
    CHECK_THAT(r.err, Catch::Contains("4 changed tensor(s) are not LoRA targets") && Catch::Contains("--keep-full"));
    std::string keys;
    {
        const auto file = formats::builtin_registry().open_tensor_file(dir / "a.safetensors");
        for (const auto& e : file->entries()) keys += e.name + "\n";
    }
    CHECK_THAT(keys, Catch::Contains("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight"));
    CHECK_THAT(keys, Catch::Contains("lora_unet_input_blocks_1_1_proj_in.lora_up.weight"));
    CHECK_THAT(keys, Catch::Contains("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"));
    for (const char* part : {"q_proj", "k_proj", "v_proj"})
        CHECK_THAT(keys, Catch::Contains(std::string("lora_te2_text_model_encoder_layers_0_self_attn_") + part + ".lora_down.weight"));
    CHECK_THAT(keys, Catch::Contains("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"));
    CHECK_THAT(keys, !Catch::Contains("in_layers") && !Catch::Contains("proj_out"));

    r = test::run_tool("lora-extract", {base, tuned, "-o", (dir / "b.safetensors").string(), "--rank", "4", "--conv-rank", "4"});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    // Baking the extracted adapter back into the base gives the tuned weights.
    r = test::run_tool("lora-bake", {base, (dir / "b.safetensors").string(), "-o", (dir / "rebuilt.safetensors").string()});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    const auto rebuilt = formats::builtin_registry().open_tensor_file(dir / "rebuilt.safetensors");
    for (std::size_t i = 0; i < items.size(); ++i) {
        if (items[i].shape.size() == 1) continue;  // norms are not extracted
        const auto got = rebuilt->find(items[i].name)->tensor.to_f32(), want = tuned_tensors[i].to_f32();
        INFO(items[i].name);
        CHECK(max_abs_difference(got, want) < 1e-5);
    }

    // --keep-full: the norm as a LyCORIS full diff, proj_in's bias as diff_b beside its LoRA;
    // the fused in_proj bias has no module of its own and is reported. Baked back: the tuned model.
    r = test::run_tool("lora-extract", {base, tuned, "-o", (dir / "full.safetensors").string(), "--rank", "4", "--conv-rank",
                                        "4", "--keep-full", "-v"});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    CHECK_THAT(r.err, Catch::Contains("3 changed tensor(s) that are not LoRA targets kept whole"));
    CHECK_THAT(r.err, Catch::Contains("1 changed tensor(s) could not be kept") && Catch::Contains("in_proj_bias"));
    {
        const auto file = formats::builtin_registry().open_tensor_file(dir / "full.safetensors");
        for (const char* key : {"lora_unet_input_blocks_1_1_norm.diff", "lora_unet_input_blocks_1_1_norm.diff_b",
                                "lora_unet_input_blocks_1_1_proj_in.diff_b", "lora_unet_input_blocks_1_1_proj_in.lora_up.weight"}) {
            INFO(key);
            CHECK(file->find(key));
        }
        // lorakit reads it back: the diff_b as proj_in's LoRA bias, the norm as a full module.
        const Adapter a = formats::builtin_registry().load_adapter((dir / "full.safetensors").string());
        CHECK(a.lycoris_modules.size() == 1);
        CHECK(a.lycoris_modules.front().algorithm == "full");
        CHECK(std::count_if(a.modules.begin(), a.modules.end(), [](const LoraModule& m) { return m.bias.has_value(); }) == 1);
    }
    r = test::run_tool("lora-bake", {base, (dir / "full.safetensors").string(), "-o", (dir / "rebuilt-full.safetensors").string()});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    CHECK_THAT(r.out, Catch::Contains("and 2 full tensor(s)"));
    const auto full = formats::builtin_registry().open_tensor_file(dir / "rebuilt-full.safetensors");
    for (std::size_t i = 0; i < items.size(); ++i) {
        const bool fused_bias = items[i].name.ends_with("in_proj_bias");
        const auto got = full->find(items[i].name)->tensor.to_f32();
        const auto want = (fused_bias ? base_tensors[i] : tuned_tensors[i]).to_f32();
        INFO(items[i].name);
        CHECK(max_abs_difference(got, want) < 1e-5);
    }
}

TEST_CASE("lora-extract --keep-full to PEFT: LoRA biases, modules_to_save that bake back exactly", "[extract][cli]") {
    ScratchDir dir;
    std::mt19937 g(9);
    std::normal_distribution<float> d;
    auto random = [&](std::size_t n, float scale) {
        std::vector<float> v(n);
        for (auto& x : v) x = scale * d(g);
        return v;
    };
    struct Item {
        std::string name;
        Shape shape;
    };
    const std::vector<Item> items = {{"model.embed_tokens.weight", {50, 16}},
                                     {"model.layers.0.input_layernorm.weight", {16}},
                                     {"model.layers.0.self_attn.q_proj.weight", {16, 16}},
                                     {"model.layers.0.self_attn.q_proj.bias", {16}},
                                     {"model.layers.0.self_attn.k_proj.weight", {16, 16}},
                                     {"model.layers.0.self_attn.k_proj.bias", {16}},
                                     {"model.norm.weight", {16}}};
    std::vector<Tensor> base_tensors, tuned_tensors;
    for (const auto& item : items) {
        const auto n = static_cast<std::size_t>(checked_element_count(item.shape));
        auto w = random(n, 1.0f), t = w;
        if (item.name.find("q_proj.weight") != std::string::npos) {
            const auto b = random(16 * 2, 0.1f), a = random(2 * 16, 0.1f);
            cblas_sgemm(101, 111, 111, 16, 16, 2, 1.0f, b.data(), 2, a.data(), 16, 1.0f, t.data(), 16);
        } else if (item.name != "model.norm.weight" && item.name.find("k_proj.weight") == std::string::npos) {
            const auto delta = random(n, 0.01f);  // embeddings, the layer norm, both biases
            for (std::size_t i = 0; i < n; ++i) t[i] += delta[i];
        }
        base_tensors.push_back(Tensor::from_f32(DType::F32, item.shape, w));
        tuned_tensors.push_back(Tensor::from_f32(DType::F32, item.shape, t));
    }
    for (const auto* which : {&base_tensors, &tuned_tensors}) {
        const auto folder = dir / (which == &base_tensors ? "base" : "tuned");
        std::filesystem::create_directories(folder);
        std::vector<formats::TensorToWrite> list;
        for (std::size_t i = 0; i < items.size(); ++i) list.push_back({items[i].name, (*which)[i].view()});
        formats::write_safetensors(folder / "model.safetensors", list, {{"format", "pt"}}, false);
        test::write_file(folder / "config.json", R"({"model_type": "qwen2"})");
    }
    const std::string base = (dir / "base").string(), tuned = (dir / "tuned").string();
    auto r = test::run_tool("lora-extract", {base, tuned, "-o", (dir / "plain").string(), "--rank", "4", "-v"});
    REQUIRE(r.exit_code == 0);
    CHECK_THAT(r.err, Catch::Contains("4 changed tensor(s) are not LoRA targets"));
    r = test::run_tool("lora-extract", {base, tuned, "-o", (dir / "lora").string(), "--rank", "4", "--keep-full", "--json"});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    CHECK_THAT(r.out, Catch::Contains("\"kept_full\": 4"));
    const auto config = nlohmann::json::parse(test::read_file(dir / "lora" / "adapter_config.json"));
    CHECK(config["lora_bias"] == true);
    CHECK(config["modules_to_save"] == nlohmann::json::array({"model.embed_tokens", "model.layers.0.input_layernorm",
                                                              "model.layers.0.self_attn.k_proj"}));
    const auto file = formats::builtin_registry().open_tensor_file(dir / "lora" / "adapter_model.safetensors");
    // The saved modules hold the tuned values, as PEFT saves modules_to_save.
    CHECK(file->find("base_model.model.model.embed_tokens.weight")->tensor.to_f32() == tuned_tensors[0].to_f32());
    CHECK(file->find("base_model.model.model.layers.0.input_layernorm.weight")->tensor.to_f32() == tuned_tensors[1].to_f32());
    CHECK(file->find("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"));
    CHECK_FALSE(file->find("base_model.model.model.norm.weight"));  // unchanged
    // k_proj's weight is unchanged, so its changed bias has no LoRA to ride on: the module is saved whole.
    CHECK(file->find("base_model.model.model.layers.0.self_attn.k_proj.bias"));
    CHECK(file->find("base_model.model.model.layers.0.self_attn.k_proj.weight"));
    CHECK_THAT(r.err, !Catch::Contains("could not be kept"));

    r = test::run_tool("lora-bake", {base, (dir / "lora").string(), "-o", (dir / "rebuilt.safetensors").string()});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    const auto rebuilt = formats::builtin_registry().open_tensor_file(dir / "rebuilt.safetensors");
    for (std::size_t i = 0; i < items.size(); ++i) {
        const auto got = rebuilt->find(items[i].name)->tensor.to_f32(), want = tuned_tensors[i].to_f32();
        INFO(items[i].name);
        CHECK(max_abs_difference(got, want) < 1e-5);
    }
}

TEST_CASE("lora-extract refuses clearly and leaves nothing behind", "[extract][cli]") {
    ScratchDir dir;
    const std::string out = (dir / "x").string();
    SECTION("identical checkpoints") {
        const auto r = test::run_tool("lora-extract", {base_llama, base_llama, "-o", out, "--rank", "4"});
        CHECK(r.exit_code == 3);
        CHECK_THAT(r.err, Catch::Contains("do not differ"));
    }
    SECTION("a different model: shapes disagree") {
        const Tensor w = Tensor::zeros(DType::F16, {64, 32});
        formats::write_safetensors(dir / "other.safetensors", {{"model.layers.0.self_attn.q_proj.weight", w.view()}}, {}, false);
        const auto r = test::run_tool("lora-extract", {base_llama, (dir / "other.safetensors").string(), "-o", out, "--rank", "4"});
        CHECK(r.exit_code == 3);
        CHECK_THAT(r.err, Catch::Contains("model.layers.0.self_attn.q_proj") && Catch::Contains("does not fit"));
    }
    SECTION("a tensor the base lacks, unless --allow-unmatched") {
        const Tensor w = Tensor::from_f32(DType::F32, {4, 4}, std::vector<float>(16, 1.0f));
        formats::write_safetensors(dir / "extra.safetensors", {{"model.layers.9.mlp.up_proj.weight", w.view()}}, {}, false);
        auto r = test::run_tool("lora-extract", {base_llama, (dir / "extra.safetensors").string(), "-o", out, "--rank", "4"});
        CHECK(r.exit_code == 3);
        CHECK_THAT(r.err, Catch::Contains("no counterpart in the base") && Catch::Contains("model.layers.9.mlp.up_proj"));
        r = test::run_tool("lora-extract", {base_llama, (dir / "extra.safetensors").string(), "-o", out, "--rank", "4",
                                            "--allow-unmatched"});
        CHECK(r.exit_code == 3);  // and then nothing is left to extract
        CHECK_THAT(r.err, Catch::Contains("no weight lorakit can extract"));
    }
    SECTION("NaN in the tuned weights") {
        const Adapter a = formats::builtin_registry().load_adapter(sample);
        const auto base = formats::builtin_registry().open_tensor_file(base_llama + "/model.safetensors");
        std::vector<Tensor> keep;
        std::vector<formats::TensorToWrite> list;
        for (const auto& e : base->entries()) {
            auto v = e.tensor.to_f32();
            if (e.name == "model.layers.1.mlp.down_proj.weight") v[5] = std::nanf("");
            keep.push_back(Tensor::from_f32(DType::F32, e.shape, v));
        }
        for (std::size_t i = 0; i < keep.size(); ++i) list.push_back({base->entries()[i].name, keep[i].view()});
        formats::write_safetensors(dir / "nan.safetensors", list, {}, false);
        const auto r = test::run_tool("lora-extract", {base_llama, (dir / "nan.safetensors").string(), "-o", out, "--rank", "4"});
        CHECK(r.exit_code == 3);
        CHECK_THAT(r.err, Catch::Contains("model.layers.1.mlp.down_proj") && Catch::Contains("NaN"));
    }
    SECTION("usage: no rank, an existing output, the output replacing an input") {
        auto r = test::run_tool("lora-extract", {base_llama, base_llama, "-o", out});
        CHECK(r.exit_code == 2);
        test::write_file(dir / "exists", "x");
        r = test::run_tool("lora-bake", {base_llama, sample, "-o", (dir / "tuned.safetensors").string()});
        REQUIRE(r.exit_code == 0);
        r = test::run_tool("lora-extract", {base_llama, (dir / "tuned.safetensors").string(), "-o", (dir / "exists").string(),
                                            "--rank", "4", "--to", "kohya"});
        CHECK(r.exit_code == 2);
        CHECK_THAT(r.err, Catch::Contains("exists"));
        CHECK(test::read_file(dir / "exists") == "x");
        r = test::run_tool("lora-extract", {base_llama, (dir / "tuned.safetensors").string(), "-o",
                                            (dir / "tuned.safetensors").string(), "--rank", "4", "--force"});
        CHECK(r.exit_code == 2);
        CHECK_THAT(r.err, Catch::Contains("would replace the tuned checkpoint"));
    }
    CHECK_FALSE(std::filesystem::exists(out));
}
