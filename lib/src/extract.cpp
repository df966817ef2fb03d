// The lora-extract command (see extract.h).
#include "lorakit/extract.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <optional>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "lorakit/checkpoint.h"
#include "lorakit/error.h"
#include "parallel.h"

extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);

namespace lorakit {

namespace {

using Json = nlohmann::ordered_json;

// torch.quantile's default ('linear') of the values: position q·(n-1), interpolated.
double quantile(std::vector<float> values, double q) {
    if (values.empty()) return 0;
    const double position = q * static_cast<double>(values.size() - 1);
    const auto lo = static_cast<std::size_t>(std::floor(position));
    const auto hi = std::min(values.size() - 1, lo + 1);
    std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(lo), values.end());
    const double a = values[lo];
    double b = a;
    if (hi != lo) b = *std::min_element(values.begin() + static_cast<std::ptrdiff_t>(lo) + 1, values.end());
    return a + (position - static_cast<double>(lo)) * (b - a);
}

// ‖Δ - up·down‖_F², formed densely (only after clamping, when no cheaper identity holds).
double residual_squared(const float* delta, std::int64_t rows, std::int64_t cols, const LowRankFit& fit) {
    std::vector<float> r(delta, delta + rows * cols);
    cblas_sgemm(101, 111, 111, static_cast<int>(rows), static_cast<int>(cols), static_cast<int>(fit.rank), -1.0f,
                fit.up.data(), static_cast<int>(fit.rank), fit.down.data(), static_cast<int>(cols), 1.0f, r.data(),
                static_cast<int>(cols));
    double sum = 0;
    for (float x : r) sum += static_cast<double>(x) * x;
    return sum;
}

}  // namespace

LowRankFit fit_low_rank(const float* delta, std::int64_t rows, std::int64_t cols, const FitOptions& options) {
    const RankSpec& spec = options.rank;
    if (spec.compat != RankCompat::lorakit) fail(ErrorCode::usage, "extraction uses lorakit's rank rules only");
    const std::int64_t full = std::min(rows, cols);
    const std::int64_t limit = options.conv && spec.conv_rank > 0 ? spec.conv_rank : spec.rank;
    std::int64_t cap = full;
    if (limit > 0) cap = std::min(cap, limit);
    if (spec.max_rank > 0) cap = std::min(cap, spec.max_rank);
    if (spec.rule == RankRule::fixed && limit <= 0) fail(ErrorCode::usage, "give --rank N or --dynamic RULE");

    linalg::DenseSvd svd;
    std::int64_t k = 0;
    if (spec.rule == RankRule::fixed) {
        k = cap;
        svd = linalg::truncated_svd(delta, rows, cols, k, options.svd);
    } else {
        // Widen the sketch until the computed values and ‖Δ‖_F decide the rule.
        linalg::DenseSvdOptions svd_options = options.svd;
        if (spec.rule == RankRule::sv_cumulative) svd_options.method = linalg::DenseSvdOptions::Method::exact;
        std::int64_t width = std::min(cap, std::max<std::int64_t>(64, spec.min_rank));
        for (;;) {
            svd = linalg::truncated_svd(delta, rows, cols, width, svd_options);
            std::vector<double> values = svd.singular_values;
            const auto computed = static_cast<std::int64_t>(values.size());
            const bool complete = computed >= full;
            double kept_sq = 0;
            for (double s : values) kept_sq += s * s;
            // The energy beyond the computed values, as one pseudo-value: the squared rules then
            // see the true total, and choosing it means "more values needed".
            if (!complete && spec.rule != RankRule::sv_ratio)
                values.push_back(std::sqrt(std::max(0.0, svd.frobenius_squared - kept_sq)));
            k = choose_rank(values, complete ? full : static_cast<std::int64_t>(values.size()), full, options.conv, spec).rank;
            std::int64_t counted = 0;
            if (spec.rule == RankRule::sv_ratio)
                for (double s : svd.singular_values) counted += s > svd.singular_values.front() / spec.parameter ? 1 : 0;
            const bool undecided = spec.rule == RankRule::sv_ratio ? counted >= computed && k >= computed : k > computed;
            if (complete || !undecided || width >= cap) {
                k = std::min({k, computed, cap});
                break;
            }
            width = std::min(cap, 2 * width);
        }
        // The exact route knows every value but formed vectors for `width` only.
        if (k > svd.kept) svd = linalg::truncated_svd(delta, rows, cols, k, svd_options);
    }

    LowRankFit fit;
    fit.rank = std::max<std::int64_t>(1, k);
    fit.randomized = svd.randomized;
    fit.frobenius_squared = svd.frobenius_squared;
    linalg::split_factors(svd.u, svd.singular_values, svd.v, rows, cols, svd.kept, fit.rank, false, fit.up, fit.down);
    double kept_sq = 0, dropped_sq = 0;
    for (std::size_t i = 0; i < svd.singular_values.size(); ++i) {
        const double s2 = svd.singular_values[i] * svd.singular_values[i];
        (static_cast<std::int64_t>(i) < fit.rank ? kept_sq : dropped_sq) += s2;
    }
    // With every value known the dropped energy is summed directly (exact even when tiny);
    // otherwise it is what the kept part leaves of ‖Δ‖_F² (the kept part is a projection of Δ).
    if (static_cast<std::int64_t>(svd.singular_values.size()) < full) dropped_sq = std::max(0.0, fit.frobenius_squared - kept_sq);
    fit.singular_values = std::move(svd.singular_values);
    const double total = fit.frobenius_squared;
    fit.fro_retained = total > 0 ? std::sqrt(std::min(1.0, kept_sq / total)) : 1.0;
    fit.relative_error = total > 0 ? std::sqrt(dropped_sq / total) : 0.0;
    if (options.clamp_quantile) {
        const double q = *options.clamp_quantile;
        if (!(q > 0 && q <= 1)) fail(ErrorCode::usage, "--clamp-quantile must be in (0, 1]");
        std::vector<float> all(fit.up);
        all.insert(all.end(), fit.down.begin(), fit.down.end());
        const auto hi = static_cast<float>(quantile(std::move(all), q));
        for (auto* factor : {&fit.up, &fit.down})
            for (float& x : *factor) x = std::clamp(x, -hi, hi);
        fit.relative_error = total > 0 ? std::sqrt(residual_squared(delta, rows, cols, fit) / total) : 0.0;
    }
    return fit;
}

namespace {

bool is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

struct Planned {
    LoraModule probe;           // name, kind and shape
    WeightLocation tuned, base;
    std::uint64_t bytes = 0;
};

struct Extracted {
    std::string name;
    std::int64_t out = 0, in = 0;
    Shape kernel;
    std::string status;  // "extracted", "unchanged", "below min-diff", "conv without --conv-rank"
    double max_diff = 0;
    LowRankFit fit;
};

std::uint64_t entry_bytes(const TensorEntry& e) { return e.decode ? e.size : e.tensor.bytes().size(); }

// Whether a tensor pair (not a LoRA target) differs.
bool differs(const TensorEntry& a, const TensorEntry& b) {
    if (a.shape != b.shape) return true;
    if (a.dtype_name == b.dtype_name && !a.decode && !b.decode) {
        const auto x = a.tensor.bytes(), y = b.tensor.bytes();
        return x.size() != y.size() || !std::equal(x.begin(), x.end(), y.begin());
    }
    if (!a.supported() || !b.supported()) return true;
    return a.to_f32() != b.to_f32();  // the same values in another dtype are no change
}

std::string shape_text(const Extracted& e) {
    std::string s = fmt::format("{}x{}", e.out, e.in);
    if (!e.kernel.empty()) s += fmt::format("x{}x{}", e.kernel[0], e.kernel[1]);
    return s;
}

}  // namespace

ToolResult run_extract(const Registry& registry, const ExtractRequest& request, Progress& progress) {
    return guarded([&](ToolResult& result) {
        if (request.output.empty()) fail(ErrorCode::usage, "give -o OUT");
        if (request.dtype && !is_float(*request.dtype)) fail(ErrorCode::usage, "--dtype must be f32, f16 or bf16");
        if (!(request.min_diff >= 0)) fail(ErrorCode::usage, "--min-diff must be at least 0");
        if (!request.to.empty() && request.to != "peft" && request.to != "kohya")
            fail(ErrorCode::usage, "--to must be peft or kohya");
        const auto base = registry.open_checkpoint(request.base);
        const auto tuned = registry.open_checkpoint(request.tuned);
        const BaseModelHint hint = base->model_hint();
        const bool diffusion = hint.family == "SD1.5" || hint.family == "SDXL" || hint.family == "Flux";
        refuse_replacing(*base, "base", request.output);
        refuse_replacing(*tuned, "tuned checkpoint", request.output);
        const std::string convention = registry.output_convention(request.to, diffusion ? "kohya" : "peft", request.output);
        registry.check_output(convention, request.output, request.force);  // before any work

        // Pair every LoRA-targetable tensor of the tuned model with its base rows.
        std::vector<Planned> plan;
        std::vector<std::string> unmatched, other_changed;
        struct Changed {
            std::size_t file;
            const TensorEntry* tuned;
            const TensorEntry* base;
        };
        std::vector<Changed> changed_full;
        std::uint64_t total_bytes = 0;
        for (std::size_t f = 0; f < tuned->files().size(); ++f)
            for (const auto& e : tuned->files()[f]->entries()) {
                auto modules = tuned->modules_at(f, e);
                if (modules.empty() || modules.front().kind == ModuleKind::embedding) {
                    // Not factored: report whether it changed (same name in the base).
                    const TensorEntry* twin = nullptr;
                    for (const auto& file : base->files())
                        if ((twin = file->find(e.name))) break;
                    if (!twin) unmatched.push_back(e.name);
                    else if (differs(e, *twin)) {
                        other_changed.push_back(e.name);
                        changed_full.push_back({f, &e, twin});
                    }
                    continue;
                }
                for (auto& m : modules) {
                    Planned p;
                    p.tuned = *tuned->locate(m);
                    const auto where = with_context(fmt::format("{}: module {}", quote(request.base), quote(m.name)),
                                                    [&] { return base->locate(m); });
                    if (!where) {
                        unmatched.push_back(m.name);
                        continue;
                    }
                    p.base = *where;
                    p.bytes = entry_bytes(e) / modules.size();
                    total_bytes += p.bytes;
                    p.probe = std::move(m);
                    plan.push_back(std::move(p));
                }
            }
        if (!unmatched.empty()) {
            const std::string what = fmt::format("{} tensor(s) of {} have no counterpart in the base (first: {})",
                                                 unmatched.size(), quote(request.tuned), quote(unmatched.front()));
            if (!request.allow_unmatched) fail(ErrorCode::bad_input, "{}; is it the right base? --allow-unmatched skips them", what);
            result.warning(what + "; skipped (--allow-unmatched)");
        }
        if (plan.empty()) fail(ErrorCode::bad_input, "{} holds no weight lorakit can extract a LoRA from", quote(request.tuned));

        Adapter adapter;
        adapter.source = request.tuned;
        adapter.container = "safetensors";
        adapter.base_model = hint;
        // One tensor pair per worker at a time, BLAS single-threaded inside each (parallel_for):
        // with one pair at a time and multi-threaded BLAS, OpenBLAS's idle thread spun through
        // every gather, subtraction and scan between the products (a fifth of the run's samples
        // in sched_yield), taking a core from them. Results go to their plan slot, so the output
        // does not depend on the order the workers finish in.
        std::vector<Extracted> report(plan.size());
        std::vector<std::optional<LoraModule>> factored(plan.size());
        progress.begin("extract", plan.size(), total_bytes);
        // Both checkpoints are read on a thread of their own ahead of the workers, so that files on
        // the disk stream while earlier weights are computed (as lora-stack --base).
        detail::ReadAhead ahead(plan.size(), std::uint64_t{256} << 20, [&](std::size_t i) -> std::uint64_t {
            const auto& p = plan[i];
            tuned->files()[p.tuned.file]->prefetch(*p.tuned.entry);
            base->files()[p.base.file]->prefetch(*p.base.entry);
            return p.tuned.entry->size + p.base.entry->size;
        });
        detail::parallel_for(plan.size(), request.threads, progress, [&](std::size_t index) -> std::uint64_t {
            ahead.started(index);
            const auto& p = plan[index];
            const LoraModule& m = p.probe;
            Extracted& x = report[index];
            x.name = m.name;
            x.out = m.out_features();
            x.in = m.in_features();
            x.kernel = m.kernel_size();
            const std::int64_t rows = m.out_features(), cols = m.flat_in_features();
            thread_local std::vector<float> delta_storage, base_storage;  // only grow (gather_weight_into)
            const std::span<float> base_weight = with_context(fmt::format("{}: module {}", quote(request.base), quote(m.name)),
                                                              [&] { return gather_weight_into(p.base, m, base_storage); });
            const std::span<float> delta = with_context(fmt::format("{}: module {}", quote(request.tuned), quote(m.name)),
                                                        [&] { return gather_weight_into(p.tuned, m, delta_storage); });
            for (std::size_t i = 0; i < delta.size(); ++i) delta[i] -= base_weight[i];
            const linalg::DenseStats stats = linalg::dense_stats(delta.data(), delta.size());
            if (!stats.finite) fail(ErrorCode::bad_input, "module {}: the difference holds NaN or infinite values", quote(m.name));
            x.max_diff = stats.max_abs;
            // Done with both tensors' mapped pages (a fused tensor's later parts map them again).
            tuned->files()[p.tuned.file]->release(*p.tuned.entry);
            base->files()[p.base.file]->release(*p.base.entry);
            const bool wide_kernel = m.kind == ModuleKind::conv && m.kernel_size() != Shape{1, 1};
            if (x.max_diff == 0) x.status = "unchanged";
            else if (x.max_diff <= request.min_diff) x.status = "below min-diff";
            else if (wide_kernel && request.fit.rank.conv_rank <= 0) x.status = "conv without --conv-rank";
            else {
                FitOptions fit = request.fit;
                fit.conv = m.kind == ModuleKind::conv;
                fit.svd.known_frobenius_squared = stats.sum_squares;  // scanned above
                x.fit = with_context(fmt::format("module {}", quote(m.name)), [&] { return fit_low_rank(delta.data(), rows, cols, fit); });
                x.status = "extracted";
                const DType type = request.dtype.value_or(is_float(p.tuned.entry->value_dtype()) ? p.tuned.entry->value_dtype()
                                                                                                   : DType::F32);
                const double limit = dtype_finite_limit(dtype_name(type));
                for (const auto* factor : {&x.fit.up, &x.fit.down})
                    for (float v : *factor)
                        if (limit > 0 && std::abs(v) > limit)
                            fail(ErrorCode::bad_input, "module {}: a factor value of {:g} exceeds the largest finite {}; "
                                 "extract to a wider --dtype", quote(m.name), static_cast<double>(v), dtype_name(type));
                LoraModule out;
                out.name = m.name;
                out.kind = m.kind;
                out.fan_in_fan_out = m.fan_in_fan_out;
                const std::int64_t k = x.fit.rank;
                Shape down{k, m.in_features()}, up{rows, k};
                if (m.kind == ModuleKind::conv) down = {k, m.in_features(), x.kernel[0], x.kernel[1]}, up = {rows, k, 1, 1};
                out.down = Tensor::from_f32(type, down, x.fit.down);
                out.up = Tensor::from_f32(type, up, x.fit.up);
                out.alpha = static_cast<double>(k);
                out.alpha_dtype = type;
                factored[index] = std::move(out);
                x.fit.up.clear();
                x.fit.up.shrink_to_fit();
                x.fit.down.clear();
                x.fit.down.shrink_to_fit();
            }
            return p.bytes;
        });
        for (auto& module : factored)
            if (module) adapter.modules.push_back(std::move(*module));
        if (adapter.modules.empty())
            fail(ErrorCode::bad_input, "{} and {} do not differ in any weight lorakit extracts{}", quote(request.base),
                 quote(request.tuned), request.min_diff > 0 ? " (above --min-diff)" : "");

        // --keep-full: the changed tensors that are not factored, whole.
        std::vector<std::string> not_kept;
        std::size_t kept = 0;
        if (request.keep_full) {
            std::map<std::string, std::size_t> extracted;
            for (std::size_t i = 0; i < adapter.modules.size(); ++i) extracted[adapter.modules[i].name] = i;
            std::map<std::string, std::size_t> full;  // module -> index in lycoris_modules
            std::set<std::string> saved;              // PEFT tensor names already written
            for (const auto& c : changed_full) {
                const auto where = tuned->parameter_at(c.file, *c.tuned);
                if (!where || c.tuned->shape != c.base->shape || !c.tuned->supported() || !c.base->supported()) {
                    not_kept.push_back(c.tuned->name);
                    continue;
                }
                const auto& [module, param] = *where;
                const std::vector<float> tuned_values = c.tuned->to_f32();
                std::vector<float> delta = tuned_values;
                const auto base_values = c.base->to_f32();
                for (std::size_t i = 0; i < delta.size(); ++i) delta[i] -= base_values[i];
                if (!linalg::dense_stats(delta.data(), delta.size()).finite)
                    fail(ErrorCode::bad_input, "tensor {}: the difference holds NaN or infinite values", quote(c.tuned->name));
                const DType type = request.dtype.value_or(is_float(c.tuned->value_dtype()) ? c.tuned->value_dtype() : DType::F32);
                ++kept;
                if (auto it = extracted.find(module); it != extracted.end() && param == "bias") {
                    adapter.modules[it->second].bias = Tensor::from_f32(type, c.tuned->shape, delta);  // its scale is 1
                } else if (convention == "peft") {
                    // modules_to_save holds modules whole: every parameter of it, as tuned.
                    if (std::find(adapter.modules_to_save.begin(), adapter.modules_to_save.end(), module) ==
                        adapter.modules_to_save.end())
                        adapter.modules_to_save.push_back(module);
                    const std::string stem = c.tuned->name.substr(0, c.tuned->name.size() - param.size() - 1);
                    for (const std::string p : {"weight", "bias"}) {
                        const TensorEntry* e = p == param ? c.tuned : tuned->files()[c.file]->find(stem + "." + p);
                        const std::string name = "base_model.model." + module + "." + p;
                        if (!e || !e->supported() || !saved.insert(name).second) continue;
                        adapter.other_tensors.push_back(
                            {name, Tensor::from_f32(type, e->shape, e == c.tuned ? tuned_values : e->to_f32())});
                    }
                } else {
                    auto [it, fresh] = full.emplace(module, adapter.lycoris_modules.size());
                    if (fresh) {
                        LycorisModule m;
                        m.name = module;
                        m.algorithm = "full";
                        adapter.lycoris_modules.push_back(std::move(m));
                    }
                    adapter.lycoris_modules[it->second].tensors.push_back(
                        {param == "weight" ? "diff" : "diff_b", Tensor::from_f32(type, c.tuned->shape, delta)});
                }
            }
        }

        adapter.metadata["ss_training_comment"] =
            fmt::format("extracted by lorakit from {} - {} ({})", std::filesystem::path(request.tuned).filename().string(),
                        std::filesystem::path(request.base).filename().string(), describe(request.fit.rank));
        std::vector<std::string> notes;
        registry.write_adapter(adapter, convention, request.output, write_options(request.force), notes);

        std::size_t extracted = 0, unchanged = 0, small = 0, conv_skipped = 0;
        double energy = 0, error = 0;
        for (const auto& x : report) {
            extracted += x.status == "extracted";
            unchanged += x.status == "unchanged";
            small += x.status == "below min-diff";
            conv_skipped += x.status == "conv without --conv-rank";
            if (x.status == "extracted") {
                energy += x.fit.frobenius_squared;
                error += x.fit.relative_error * x.fit.relative_error * x.fit.frobenius_squared;
            }
        }
        const double overall_error = energy > 0 ? std::sqrt(error / energy) : 0.0;
        if (conv_skipped > 0)
            result.warning(fmt::format("{} changed convolution(s) with kernels larger than 1x1 were not extracted "
                                       "(give --conv-rank N)", conv_skipped));
        if (request.keep_full) {
            if (kept)
                result.note(fmt::format("{} changed tensor(s) that are not LoRA targets kept whole (--keep-full: {})", kept,
                                        convention == "peft" ? "LoRA biases and modules_to_save" : "LoRA biases and LyCORIS diffs"));
            if (!not_kept.empty())
                result.warning(fmt::format("{} changed tensor(s) could not be kept (no module name for them, or another shape "
                                           "than the base's; first: {})", not_kept.size(), quote(not_kept.front())));
        } else if (!other_changed.empty()) {
            result.note(fmt::format("{} changed tensor(s) are not LoRA targets and were not extracted (norms, biases, "
                                    "embeddings; first: {}); --keep-full keeps them", other_changed.size(),
                                    quote(other_changed.front())));
        }
        if (request.json) {
            Json j;
            j["base"] = request.base;
            j["tuned"] = request.tuned;
            j["output"] = request.output;
            j["convention"] = convention;
            j["family"] = hint.family;
            j["rule"] = describe(request.fit.rank);
            j["modules_extracted"] = extracted;
            j["modules_unchanged"] = unchanged;
            j["modules_below_min_diff"] = small;
            j["convs_without_conv_rank"] = conv_skipped;
            j["relative_error"] = overall_error;
            Json modules = Json::array();
            for (const auto& x : report) {
                Json item{{"name", x.name}, {"shape", shape_text(x)}, {"status", x.status}, {"max_diff", x.max_diff}};
                if (x.status == "extracted") {
                    item["rank"] = x.fit.rank;
                    item["fro_retained"] = x.fit.fro_retained;
                    item["relative_error"] = x.fit.relative_error;
                    item["svd"] = x.fit.randomized ? "randomized" : "exact";
                }
                modules.push_back(std::move(item));
            }
            j["modules"] = modules;
            j["other_changed_tensors"] = other_changed;
            if (request.keep_full) {
                j["kept_full"] = kept;
                j["not_kept"] = not_kept;
            }
            j["notes"] = notes;
            result.out = j.dump(2) + "\n";
        } else {
            std::size_t width = 6;
            for (const auto& x : report) width = std::max(width, x.name.size());
            std::string& out = result.out;
            out += fmt::format("{:<{}}  {:>16} {:>5} {:>10} {:>10}  {}\n", "module", width, "shape", "rank", "fro kept",
                               "rel error", "svd");
            for (const auto& x : report) {
                if (x.status == "extracted")
                    out += fmt::format("{:<{}}  {:>16} {:>5} {:>9.2f}% {:>10.3g}  {}\n", x.name, width, shape_text(x),
                                       x.fit.rank, 100 * x.fit.fro_retained, x.fit.relative_error,
                                       x.fit.randomized ? "randomized" : "exact");
                else
                    out += fmt::format("{:<{}}  {:>16} {:>5} {:>10} {:>10}  ({})\n", x.name, width, shape_text(x), "-", "-",
                                       "-", x.status);
            }
            out += fmt::format("{} module(s) extracted ({}), {} unchanged, {} below --min-diff, {} conv(s) skipped; "
                               "relative error {:.3g} overall; wrote {} ({})\n",
                               extracted, describe(request.fit.rank), unchanged, small, conv_skipped, overall_error,
                               request.output, convention);
        }
        for (const auto& note : notes) result.note(note);
    });
}

}  // namespace lorakit
