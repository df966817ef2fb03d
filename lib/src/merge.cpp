#include "lorakit/merge.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>

#include <fmt/format.h>

#include "lorakit/error.h"
#include "lorakit/names.h"
#include "merge_math.h"
#include "module_groups.h"
#include "parallel.h"
#include "pipeline.h"

namespace lorakit {

namespace {

using Term = detail::ModuleRef;

bool is_svd_method(MergeMethod m) {
    return m == MergeMethod::svd || m == MergeMethod::ties_svd || m == MergeMethod::dare_linear_svd ||
           m == MergeMethod::dare_ties_svd || m == MergeMethod::magnitude_prune_svd;
}

constexpr std::pair<MergeMethod, std::string_view> method_names[] = {
    {MergeMethod::concat, "concat"},
    {MergeMethod::svd, "svd"},
    {MergeMethod::cat, "cat"},
    {MergeMethod::linear, "linear"},
    {MergeMethod::ties, "ties"},
    {MergeMethod::dare_linear, "dare_linear"},
    {MergeMethod::dare_ties, "dare_ties"},
    {MergeMethod::magnitude_prune, "magnitude_prune"},
    {MergeMethod::ties_svd, "ties_svd"},
    {MergeMethod::dare_linear_svd, "dare_linear_svd"},
    {MergeMethod::dare_ties_svd, "dare_ties_svd"},
    {MergeMethod::magnitude_prune_svd, "magnitude_prune_svd"},
};

// The merged factors of one module, in f32, before dtype rounding.
struct Factors {
    std::vector<float> down;  // rank x flat_in
    std::vector<float> up;    // out x rank
    std::int64_t rank = 0;
    std::optional<double> alpha;  // nullopt: scale 1
    double fro_retained = 1, relative_error = 0;
};

// ---- exact concatenation ---------------------------------------------------------------------

Factors concatenate(const std::vector<Term>& terms, const std::vector<double>& coefficients, bool on_a) {
    const std::int64_t out = terms[0].module->out_features(), in = terms[0].module->flat_in_features();
    Factors f;
    for (const auto& t : terms) f.rank += t.module->rank();
    f.down.assign(static_cast<std::size_t>(f.rank * in), 0.0f);
    f.up.assign(static_cast<std::size_t>(out * f.rank), 0.0f);
    std::int64_t column = 0;
    for (std::size_t i = 0; i < terms.size(); ++i) {
        const auto a = terms[i].module->down.to_f32(), b = terms[i].module->up.to_f32();
        const std::int64_t r = terms[i].module->rank();
        const double ca = on_a ? coefficients[i] : 1.0, cb = on_a ? 1.0 : coefficients[i];
        for (std::int64_t k = 0; k < r; ++k)
            for (std::int64_t j = 0; j < in; ++j)
                f.down[static_cast<std::size_t>((column + k) * in + j)] = static_cast<float>(ca * a[static_cast<std::size_t>(k * in + j)]);
        for (std::int64_t o = 0; o < out; ++o)
            for (std::int64_t k = 0; k < r; ++k)
                f.up[static_cast<std::size_t>(o * f.rank + column + k)] = static_cast<float>(cb * b[static_cast<std::size_t>(o * r + k)]);
        column += r;
    }
    return f;
}

// ---- SVD-based methods ----------------------------------------------------------------------

void clamp_factors(Factors& f, double q) {
    std::vector<float> all = f.up;
    all.insert(all.end(), f.down.begin(), f.down.end());
    const auto hi = static_cast<float>(detail::quantile(std::move(all), q));
    for (auto& x : f.up) x = std::clamp(x, -hi, hi);
    for (auto& x : f.down) x = std::clamp(x, -hi, hi);
}

// Factors U_k·Σ_k, V_kᵀ (or √Σ on both) of rank k from an SVD; scale 1.
template <typename Svd>
Factors from_svd(const Svd& svd, std::int64_t out, std::int64_t in, std::int64_t k, FactorSplit split) {
    Factors f;
    f.rank = k;
    linalg::split_factors(svd.u, svd.singular_values, svd.v, out, in, svd.kept, k, split == FactorSplit::balanced, f.up,
                          f.down);
    f.alpha = static_cast<double>(k);  // scale 1
    return f;
}

// The svd method's rank for a module: from `spectrum` (null: only when the rule fixes the rank
// without it, else nullopt).
std::optional<std::int64_t> svd_rank(const std::vector<Term>& terms, const std::vector<double>* spectrum,
                                     std::int64_t total_rank, const MergeOptions& o) {
    const LoraModule& m = *terms[0].module;
    const bool conv3 = m.kind == ModuleKind::conv && m.flat_in_features() != m.in_features();
    const std::int64_t full = std::min(m.out_features(), m.flat_in_features());
    RankSpec spec = o.rank;
    if (spec.rule == RankRule::fixed && spec.rank <= 0) {
        // PEFT's default: the largest input rank.
        spec.rank = 0;
        for (const auto& t : terms) spec.rank = std::max(spec.rank, t.module->rank());
    }
    if (o.compat == MergeCompat::kohya) {
        // svd_merge_lora.py: k = min(new_rank or new_conv_rank for 3x3, in, out).
        const std::int64_t k = conv3 && spec.conv_rank > 0 ? spec.conv_rank : spec.rank;
        return std::max<std::int64_t>(1, std::min(k, full));
    }
    spec.compat = RankCompat::lorakit;
    const std::int64_t current = std::max(total_rank, spec.rank);
    if (!spectrum) return rank_without_spectrum(current, conv3, spec);
    return choose_rank(*spectrum, full, current, conv3, spec).rank;
}

// Buffers the svd method's factors live in between modules (fresh pages are slow to touch):
// svd_merge takes them, merge_module gives them back once the tensors are encoded.
thread_local std::vector<float> spare_up, spare_down;

Factors svd_merge(const std::vector<Term>& terms, const std::vector<double>& coefficients, const MergeOptions& o) {
    const LoraModule& first = *terms[0].module;
    const std::int64_t out = first.out_features(), in = first.flat_in_features();
    std::vector<linalg::LowRankTerm> low;
    std::int64_t total = 0;
    for (std::size_t i = 0; i < terms.size(); ++i) {
        // The factors as stored: stacking widens them straight from the mapped inputs.
        const LoraModule& m = *terms[i].module;
        low.push_back({m.up.view().bytes().data(), m.down.view().bytes().data(), out, m.rank(), in, coefficients[i],
                       m.up.dtype(), m.down.dtype()});
        total += m.rank();
    }
    thread_local linalg::Workspace workspace;
    Factors f;
    f.up.swap(spare_up);
    f.down.swap(spare_down);
    const linalg::FactoredLora svd = linalg::factored_lora(
        low, [&](const std::vector<double>& spectrum) { return *svd_rank(terms, &spectrum, total, o); },
        o.split == FactorSplit::balanced, workspace, f.up, f.down);
    f.rank = svd.rank;
    f.alpha = static_cast<double>(svd.rank);  // scale 1
    const RankChoice stats = rank_statistics(svd.singular_values, svd.rank);
    f.fro_retained = stats.fro_retained;
    f.relative_error = stats.relative_error;
    return f;
}

Factors dense_svd_merge(const std::vector<Term>& terms, const std::vector<double>& weights, const MergeOptions& o,
                        std::uint64_t seed) {
    const LoraModule& first = *terms[0].module;
    const std::int64_t out = first.out_features(), in = first.flat_in_features();
    std::vector<std::vector<float>> deltas;
    for (const auto& t : terms) {
        // D_i = s_i · B_i · A_i, formed densely: pruning acts on its entries.
        const auto a = t.module->down.to_f32(), b = t.module->up.to_f32();
        const std::int64_t r = t.module->rank();
        const double s = t.module->scale();
        std::vector<double> d(static_cast<std::size_t>(out * in), 0.0);
        for (std::int64_t row = 0; row < out; ++row)
            for (std::int64_t k = 0; k < r; ++k) {
                const double bk = s * b[static_cast<std::size_t>(row * r + k)];
                for (std::int64_t j = 0; j < in; ++j) d[static_cast<std::size_t>(row * in + j)] += bk * a[static_cast<std::size_t>(k * in + j)];
            }
        deltas.emplace_back(d.begin(), d.end());
    }
    const std::vector<float> merged = detail::merge_tensors(std::move(deltas), weights, o.method, o.density, o.majority_sign, seed);
    std::int64_t k = 0;
    {
        // The rank rule needs a spectrum only for dynamic rules.
        std::vector<double> spectrum;
        if (o.rank.rule != RankRule::fixed) spectrum = linalg::dense_singular_values(merged.data(), out, in);
        k = *svd_rank(terms, &spectrum, std::min(out, in), o);
    }
    const linalg::DenseSvd svd = linalg::truncated_svd(merged.data(), out, in, k, o.dense_svd);
    Factors f = from_svd(svd, out, in, k, o.split);
    double kept = 0;
    for (std::int64_t j = 0; j < std::min(k, svd.kept); ++j) kept += svd.singular_values[j] * svd.singular_values[j];
    f.fro_retained = svd.frobenius_squared > 0 ? std::sqrt(std::min(1.0, kept / svd.frobenius_squared)) : 1.0;
    f.relative_error = svd.frobenius_squared > 0 ? std::sqrt(std::max(0.0, 1.0 - kept / svd.frobenius_squared)) : 0.0;
    return f;
}

// ---- PEFT's factor-wise methods and kohya's merge_lora.py ------------------------------------

Factors factorwise_merge(const std::vector<Term>& terms, const std::vector<double>& coefficients, const MergeOptions& o,
                         std::uint64_t seed) {
    const std::int64_t rank = terms[0].module->rank();
    for (const auto& t : terms)
        if (t.module->rank() != rank)
            fail(ErrorCode::bad_input,
                 "method {} merges factors entry by entry and needs equal ranks, found {} and {} (use concat or svd)",
                 merge_method_name(o.method), rank, t.module->rank());
    std::vector<std::vector<float>> as, bs;
    std::vector<double> wa, wb;
    for (std::size_t i = 0; i < terms.size(); ++i) {
        as.push_back(terms[i].module->down.to_f32());
        bs.push_back(terms[i].module->up.to_f32());
        const double c = coefficients[i];
        wa.push_back((c < 0 ? -1.0 : 1.0) * std::sqrt(std::abs(c)));
        wb.push_back(std::sqrt(std::abs(c)));
    }
    Factors f;
    f.rank = rank;
    f.down = detail::merge_tensors(std::move(as), wa, o.method, o.density, o.majority_sign, seed);
    f.up = detail::merge_tensors(std::move(bs), wb, o.method, o.density, o.majority_sign, seed ^ 0x5bd1e995u);
    return f;
}

// A module's alpha as merge_lora.py reads it: the one that gives its scale at its rank.
double kohya_alpha(const LoraModule& m) { return m.scale() * static_cast<double>(m.rank()); }

Factors kohya_merge(const std::vector<Term>& terms, bool concat) {
    // merge_lora.py: base_alpha from the first input having the module; ratio_i applied as
    // sqrt(alpha_i / base_alpha) · ratio_i on down and its absolute value on up.
    const double base_alpha = kohya_alpha(*terms[0].module);
    std::vector<double> ratios;
    for (const auto& t : terms) ratios.push_back(std::sqrt(kohya_alpha(*t.module) / base_alpha) * t.weight);
    if (concat) {
        std::vector<double> up_ratios;
        for (double r : ratios) up_ratios.push_back(std::abs(r));
        Factors f = concatenate(terms, ratios, true);
        // concatenate put `ratios` on A; up needs |ratio|.
        const std::int64_t out = terms[0].module->out_features();
        std::int64_t column = 0;
        for (std::size_t i = 0; i < terms.size(); ++i) {
            const std::int64_t r = terms[i].module->rank();
            for (std::int64_t o = 0; o < out; ++o)
                for (std::int64_t k = 0; k < r; ++k) f.up[static_cast<std::size_t>(o * f.rank + column + k)] *= static_cast<float>(up_ratios[i]);
            column += r;
        }
        f.alpha = base_alpha;
        return f;
    }
    const std::int64_t rank = terms[0].module->rank();
    for (const auto& t : terms)
        if (t.module->rank() != rank)
            fail(ErrorCode::bad_input, "kohya's merge needs equal ranks, found {} and {}", rank, t.module->rank());
    Factors f;
    f.rank = rank;
    f.down.assign(terms[0].module->down.element_count(), 0.0f);
    f.up.assign(terms[0].module->up.element_count(), 0.0f);
    for (std::size_t i = 0; i < terms.size(); ++i) {
        const auto a = terms[i].module->down.to_f32(), b = terms[i].module->up.to_f32();
        for (std::size_t j = 0; j < a.size(); ++j) f.down[j] += static_cast<float>(ratios[i] * a[j]);
        for (std::size_t j = 0; j < b.size(); ++j) f.up[j] += static_cast<float>(std::abs(ratios[i]) * b[j]);
    }
    f.alpha = base_alpha;
    return f;
}

// ---- one module -----------------------------------------------------------------------------

LoraModule merge_module(const std::vector<Term>& terms, const MergeOptions& o, std::uint64_t seed, DType type,
                        bool keep_source_name, ModuleMerge& report) {
    detail::check_same_base(terms, "no merge method combines DoRA magnitudes");
    const LoraModule& first = *terms[0].module;
    std::vector<double> coefficients;  // w_i · s_i
    for (const auto& t : terms) {
        double c = t.weight * t.module->scale();
        if (o.compat == MergeCompat::peft_legacy && o.method == MergeMethod::svd) c *= t.module->scale();
        coefficients.push_back(c);
    }
    const bool kohya = o.compat == MergeCompat::kohya;
    Factors f;
    switch (o.method) {
    case MergeMethod::concat: f = kohya ? kohya_merge(terms, true) : concatenate(terms, coefficients, false); break;
    case MergeMethod::cat: f = concatenate(terms, coefficients, true); break;
    case MergeMethod::svd: f = svd_merge(terms, coefficients, o); break;
    case MergeMethod::linear:
        f = kohya ? kohya_merge(terms, false) : factorwise_merge(terms, coefficients, o, seed);
        break;
    case MergeMethod::ties:
    case MergeMethod::dare_linear:
    case MergeMethod::dare_ties:
    case MergeMethod::magnitude_prune: f = factorwise_merge(terms, coefficients, o, seed); break;
    default: {
        std::vector<double> weights;
        for (std::size_t i = 0; i < terms.size(); ++i)
            weights.push_back(o.compat == MergeCompat::peft_legacy ? coefficients[i] : terms[i].weight);
        f = dense_svd_merge(terms, weights, o, seed);
    }
    }
    if (o.clamp_quantile && is_svd_method(o.method)) clamp_factors(f, *o.clamp_quantile);

    LoraModule m;
    m.name = first.name;
    m.source_name = keep_source_name ? first.source_name : std::string();
    m.kind = first.kind;
    m.fan_in_fan_out = first.fan_in_fan_out;
    Shape down_shape = first.down.shape(), up_shape = first.up.shape();
    down_shape[0] = f.rank;
    up_shape[1] = f.rank;
    m.down = Tensor::from_f32(type, down_shape, f.down);
    m.up = Tensor::from_f32(type, up_shape, f.up);
    if (o.method == MergeMethod::svd) {
        spare_up.swap(f.up);
        spare_down.swap(f.down);
    }
    m.scale_rule = ScaleRule::alpha_over_rank;
    m.alpha = f.alpha.value_or(static_cast<double>(f.rank));
    m.alpha_dtype = first.alpha_dtype;
    // LoRA biases add like the deltas: bias' = Σ c_i bias_i at the output's scale.
    bool any_bias = false;
    for (const auto& t : terms) any_bias |= t.module->bias.has_value();
    if (any_bias) {
        if (o.method != MergeMethod::concat && o.method != MergeMethod::cat && o.method != MergeMethod::svd)
            fail(ErrorCode::unsupported, "a LoRA bias cannot be combined by method {}", merge_method_name(o.method));
        std::vector<float> bias(static_cast<std::size_t>(first.out_features()), 0.0f);
        const double output_scale = m.scale();
        for (std::size_t i = 0; i < terms.size(); ++i) {
            if (!terms[i].module->bias) continue;
            const auto values = terms[i].module->bias->to_f32();
            for (std::size_t j = 0; j < bias.size(); ++j)
                bias[j] += static_cast<float>(coefficients[i] * values[j] / output_scale);
        }
        m.bias = Tensor::from_f32(type, {first.out_features()}, bias);
    }
    report.rank = f.rank;
    report.fro_retained = f.fro_retained;
    report.relative_error = f.relative_error;
    return m;
}

}  // namespace

MergeMethod parse_merge_method(const std::string& name) {
    for (const auto& [method, text] : method_names)
        if (text == name) return method;
    fail(ErrorCode::usage, "unknown merge method {}", quote(name));
}

std::string_view merge_method_name(MergeMethod method) noexcept {
    for (const auto& [m, text] : method_names)
        if (m == method) return text;
    return "concat";
}

namespace {

// A merge ready to run: the inputs (copies: the module references point into them), the
// groups of modules, the output dtype, and the result with its reports' names and inputs set.
struct MergeJob {
    std::vector<Adapter> inputs;
    MergeOptions options;
    detail::ModuleGroups groups;
    DType type = DType::F32;
    MergeResult result;

    const std::vector<Term>& terms(std::size_t i) const { return groups.by_name.at(groups.order[i]); }

    // Module i merged (its report filled).
    LoraModule make(std::size_t i, ModuleMerge& report) const {
        const auto& t = terms(i);
        // The first input's keys are reused when the output is in its convention.
        const bool keep_name = t[0].adapter == 0;
        return with_context(fmt::format("module {}", quote(groups.order[i])), [&] {
            return merge_module(t, options, options.seed + 0x632be59bd9b4e019ULL * (i + 1), type, keep_name, report);
        });
    }
};

std::shared_ptr<MergeJob> prepare_merge(const std::vector<Adapter>& inputs, const MergeOptions& o) {
    if (inputs.empty()) fail(ErrorCode::usage, "nothing to merge");
    auto job = std::make_shared<MergeJob>();
    job->inputs = inputs;
    job->options = o;
    std::vector<double>& weights = job->options.weights;
    if (weights.empty()) weights.assign(inputs.size(), 1.0);
    if (weights.size() != inputs.size())
        fail(ErrorCode::usage, "{} weights for {} inputs", weights.size(), inputs.size());
    if (o.compat == MergeCompat::kohya && o.method != MergeMethod::concat && o.method != MergeMethod::linear &&
        o.method != MergeMethod::svd)
        fail(ErrorCode::usage, "--compat kohya applies to the methods linear, concat and svd");
    for (std::size_t i = 0; i < inputs.size(); ++i)
        if (!inputs[i].lycoris_modules.empty())
            fail(ErrorCode::unsupported, "input {} holds LyCORIS modules; convert them to LoRA first (lora-convert --rank)",
                 i + 1);

    // Modules by canonical name, in the first input's order, then new ones as they appear.
    job->groups = detail::group_modules(job->inputs, weights);
    const auto& order = job->groups.order;
    // Output dtype: the inputs' common dtype, F32 when they differ.
    std::optional<DType> common;
    bool mixed = false;
    for (const auto& a : inputs)
        for (const auto& m : a.modules)
            for (DType t : {m.down.dtype(), m.up.dtype()}) {
                if (!common) common = t;
                else if (*common != t) mixed = true;
            }
    job->type = o.dtype.value_or(mixed || !common ? DType::F32 : *common);

    MergeResult& result = job->result;
    result.adapter = inputs[0];
    result.adapter.modules.assign(order.size(), LoraModule{});
    result.modules.assign(order.size(), ModuleMerge{});
    std::size_t partial = 0;
    for (std::size_t i = 0; i < order.size(); ++i) {
        result.modules[i].name = order[i];
        for (const auto& t : job->terms(i)) result.modules[i].inputs.push_back(t.adapter);
        partial += result.modules[i].inputs.size() < inputs.size() ? 1 : 0;
    }
    if (partial)
        result.notes.push_back(fmt::format("{} module(s) are in only some inputs and were merged from those", partial));
    for (std::size_t i = 1; i < inputs.size(); ++i)
        if (!inputs[i].other_tensors.empty())
            result.notes.push_back(fmt::format("input {}: {} non-LoRA tensor(s) not carried (only the first input's are)",
                                               i + 1, inputs[i].other_tensors.size()));
    return job;
}

// The merged module's rank and alpha when the method fixes them before computing (concat, cat,
// kohya's linear, an svd to a fixed rank), for a module without LoRA biases; nullopt otherwise.
struct Foreseen {
    std::int64_t rank = 0;
    double alpha = 0;
};
std::optional<Foreseen> foresee(const std::vector<Term>& terms, const MergeOptions& o) {
    std::int64_t total = 0;
    for (const auto& t : terms) {
        if (t.module->bias) return std::nullopt;
        total += t.module->rank();
    }
    const LoraModule& first = *terms[0].module;
    const double base_alpha = kohya_alpha(first);  // kohya_merge's
    const bool kohya = o.compat == MergeCompat::kohya;
    switch (o.method) {
    case MergeMethod::concat: return Foreseen{total, kohya ? base_alpha : static_cast<double>(total)};
    case MergeMethod::cat: return Foreseen{total, static_cast<double>(total)};
    case MergeMethod::linear:
        if (kohya) return Foreseen{first.rank(), base_alpha};
        return std::nullopt;
    case MergeMethod::svd:
        if (const auto k = svd_rank(terms, nullptr, total, o)) return Foreseen{*k, static_cast<double>(*k)};
        return std::nullopt;
    default: return std::nullopt;
    }
}

}  // namespace

MergeResult merge_adapters(const std::vector<Adapter>& inputs, const MergeOptions& o, Progress& progress) {
    const std::shared_ptr<MergeJob> job = prepare_merge(inputs, o);
    MergeResult& result = job->result;
    const std::size_t count = job->groups.order.size();
    progress.begin("merge", count, 0);
    detail::parallel_for(count, o.threads, progress, [&](std::size_t i) -> std::uint64_t {
        result.adapter.modules[i] = job->make(i, result.modules[i]);
        return 0;
    });
    return std::move(result);
}

std::optional<MergeResult> merge_adapters_streamed(const std::vector<Adapter>& inputs, const MergeOptions& o,
                                                   Progress& progress,
                                                   const std::function<void(const Adapter&)>& write) {
    const std::shared_ptr<MergeJob> job = prepare_merge(inputs, o);
    const std::size_t count = job->groups.order.size();
    std::vector<Foreseen> foreseen(count);
    for (std::size_t i = 0; i < count; ++i) {
        const auto f = foresee(job->terms(i), job->options);
        if (!f) return std::nullopt;
        foreseen[i] = *f;
    }
    // The workers fill the reports (under a lock, as resize_adapter_streamed's); the pipeline
    // keeps the job (and so the deferred factors makeable) for as long as the returned adapter
    // lives.
    auto reports = std::make_shared<detail::Guarded<std::vector<ModuleMerge>>>();
    reports->value = job->result.modules;
    auto pipeline = std::make_shared<detail::TensorPipeline>(
        count, 2,
        [job, foreseen, reports](std::size_t i) {
            ModuleMerge report = job->result.modules[i];
            const LoraModule m = job->make(i, report);
            reports->set([&](std::vector<ModuleMerge>& all) { all[i] = report; });
            if (m.rank() != foreseen[i].rank || m.alpha != foreseen[i].alpha)
                fail(ErrorCode::internal, "module {}: rank {} alpha {} made for rank {} alpha {} foreseen", quote(m.name),
                     m.rank(), m.alpha.value_or(0), foreseen[i].rank, foreseen[i].alpha);
            return std::vector<Tensor>{m.down, m.up};
        },
        2 * detail::worker_count(o.threads) + 2);
    MergeResult result = job->result;  // the reports' names and inputs, the notes
    for (std::size_t i = 0; i < count; ++i) {
        const LoraModule& first = *job->terms(i)[0].module;
        LoraModule& m = result.adapter.modules[i];
        m.name = first.name;
        m.source_name = job->terms(i)[0].adapter == 0 ? first.source_name : std::string();
        m.kind = first.kind;
        m.fan_in_fan_out = first.fan_in_fan_out;
        Shape down_shape = first.down.shape(), up_shape = first.up.shape();
        down_shape[0] = foreseen[i].rank;
        up_shape[1] = foreseen[i].rank;
        m.down = Tensor::deferred(job->type, down_shape, pipeline, 2 * i);
        m.up = Tensor::deferred(job->type, up_shape, pipeline, 2 * i + 1);
        m.scale_rule = ScaleRule::alpha_over_rank;
        m.alpha = foreseen[i].alpha;
        m.alpha_dtype = first.alpha_dtype;
    }
    progress.begin("merge", count, 0);
    detail::write_while_made(*pipeline, o.threads, progress, [&] { write(result.adapter); });
    for (std::size_t i = 0; i < count; ++i)  // a module the writer did not take: its report alone
        if (!pipeline->made(i)) (void)job->make(i, reports->value[i]);
    result.modules = reports->get();
    return result;
}

}  // namespace lorakit
