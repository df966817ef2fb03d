#include "lorakit/resize.h"

#include <cmath>

#include <fmt/format.h>

#include "lorakit/error.h"
#include "lorakit/linalg.h"
#include "parallel.h"
#include "pipeline.h"

namespace lorakit {

namespace {

// The alpha that keeps `scale` at the new rank under the module's scale rule.
std::optional<double> alpha_for(const LoraModule& m, std::int64_t k) {
    if (!m.alpha) return std::nullopt;  // "no alpha" means scale 1 at any rank
    switch (m.scale_rule) {
    case ScaleRule::alpha_over_rank: return m.scale() * static_cast<double>(k);
    case ScaleRule::alpha_over_sqrt_rank: return m.scale() * std::sqrt(static_cast<double>(k));
    case ScaleRule::fixed: return m.alpha;
    }
    return m.alpha;
}

}  // namespace

namespace {

// The module with new factors of rank k (up: out x k and down: k x in, row-major f32).
LoraModule module_with_factors(const LoraModule& m, const std::vector<float>& up, const std::vector<float>& down,
                               std::int64_t k, std::optional<DType> dtype) {
    LoraModule result = m;
    Shape down_shape = m.down.shape();
    down_shape[0] = k;
    Shape up_shape = m.up.shape();
    up_shape[1] = k;
    result.down = Tensor::from_f32(dtype.value_or(m.down.dtype()), down_shape, down);
    result.up = Tensor::from_f32(dtype.value_or(m.up.dtype()), up_shape, up);
    result.alpha = alpha_for(m, k);
    return result;
}

// Factor buffers reused across modules by each worker (fresh pages are slow to touch).
thread_local std::vector<float> up_buffer, down_buffer;

// The module's factors as stored (mapped, any float dtype): factored_lora widens them while
// stacking, and its Grams' diagonals (sums of squares in double) reject NaN or infinite
// factors with bad_input, so no separate pass over the values is needed.
linalg::LowRankTerm term_of(const LoraModule& m) {
    return {m.up.view().bytes().data(), m.down.view().bytes().data(), m.out_features(), m.rank(), m.flat_in_features(),
            1.0, m.up.dtype(), m.down.dtype()};
}

}  // namespace

LoraModule refactor_module(const LoraModule& m, std::int64_t k, FactorSplit split, std::optional<DType> dtype,
                           std::vector<double>* singular_values) {
    return with_context(fmt::format("module {}", quote(m.name)), [&] {
        thread_local linalg::Workspace workspace;
        const linalg::LowRankTerm term = term_of(m);
        const linalg::FactoredLora svd = linalg::factored_lora(
            {&term, 1}, [k](const std::vector<double>&) { return k; }, split == FactorSplit::balanced, workspace,
            up_buffer, down_buffer);
        if (singular_values) *singular_values = svd.singular_values;
        return module_with_factors(m, up_buffer, down_buffer, k, dtype);
    });
}

namespace {

// One module of lora-resize: `report` filled, the module returned with its new factors (or as it
// was, in the output dtype, when the rule keeps its rank).
LoraModule resize_module(const LoraModule& m, const ResizeOptions& options, ModuleResize& report) {
    const bool compat = options.rank.compat != RankCompat::lorakit;
    report.name = m.name;
    report.old_rank = m.rank();
    return with_context(fmt::format("module {}", quote(m.name)), [&] {
        thread_local linalg::Workspace workspace;
        const linalg::LowRankTerm term = term_of(m);
        const std::int64_t full = std::min(m.out_features(), m.flat_in_features());
        // One decomposition: the rule sees the spectrum, vectors are formed only for what it keeps.
        linalg::factored_lora(
            {&term, 1},
            [&](const std::vector<double>& spectrum) -> std::int64_t {
                report.choice = choose_rank(spectrum, full, m.rank(), m.kind == ModuleKind::conv, options.rank);
                report.unchanged = !compat && report.choice.rank >= m.rank();
                return report.unchanged ? 0 : report.choice.rank;
            },
            options.split == FactorSplit::balanced, workspace, up_buffer, down_buffer);
        if (!report.unchanged) return module_with_factors(m, up_buffer, down_buffer, report.choice.rank, options.dtype);
        LoraModule same = m;
        if (options.dtype) {
            same.down = m.down.converted(*options.dtype);
            same.up = m.up.converted(*options.dtype);
        }
        return same;
    });
}

void add_notes(const Adapter& input, ResizeResult& result) {
    std::size_t dora = 0;
    for (const auto& m : result.adapter.modules) dora += m.magnitude ? 1 : 0;
    if (dora)
        result.notes.push_back(fmt::format(
            "{} DoRA module(s): magnitudes are kept; their normalisation now applies to the resized delta", dora));
    if (!input.lycoris_modules.empty())
        result.notes.push_back(fmt::format("{} LyCORIS module(s) are carried unchanged (lora-convert --rank turns them into LoRA)",
                                           input.lycoris_modules.size()));
}

}  // namespace

ResizeResult resize_adapter(const Adapter& input, const ResizeOptions& options, Progress& progress) {
    ResizeResult result;
    result.adapter = input;
    result.modules.resize(input.modules.size());
    const std::size_t count = input.modules.size();
    progress.begin("resize", count, 0);
    detail::parallel_for(count, options.threads, progress, [&](std::size_t i) -> std::uint64_t {
        result.adapter.modules[i] = resize_module(input.modules[i], options, result.modules[i]);
        return 0;
    });
    add_notes(input, result);
    return result;
}

std::optional<ResizeResult> resize_adapter_streamed(const Adapter& input, const ResizeOptions& options,
                                                    Progress& progress,
                                                    const std::function<void(const Adapter&)>& write) {
    const std::size_t count = input.modules.size();
    std::vector<std::int64_t> ranks(count);
    for (std::size_t i = 0; i < count; ++i) {
        const LoraModule& m = input.modules[i];
        const auto k = rank_without_spectrum(m.rank(), m.kind == ModuleKind::conv, options.rank);
        if (!k) return std::nullopt;
        ranks[i] = *k;
    }
    // The workers fill the reports (under a lock: a module made again later, when the returned
    // adapter's deferred factors are read, may be made on two threads at once); the pipeline's
    // copies of the input and options keep those factors makeable for as long as they live.
    auto reports = std::make_shared<detail::Guarded<std::vector<ModuleResize>>>();
    reports->value.resize(count);
    auto pipeline = std::make_shared<detail::TensorPipeline>(
        count, 2,
        [input, options, reports, ranks](std::size_t i) {
            ModuleResize report;
            const LoraModule made = resize_module(input.modules[i], options, report);
            reports->set([&](std::vector<ModuleResize>& all) { all[i] = report; });
            if (made.rank() != ranks[i])
                fail(ErrorCode::internal, "module {}: rank {} made for {} foreseen", quote(made.name), made.rank(), ranks[i]);
            return std::vector<Tensor>{made.down, made.up};
        },
        2 * detail::worker_count(options.threads) + 2);
    ResizeResult result;
    result.adapter = input;
    for (std::size_t i = 0; i < count; ++i) {
        const LoraModule& m = input.modules[i];
        LoraModule& out = result.adapter.modules[i];
        const std::int64_t k = ranks[i];
        Shape down_shape = m.down.shape(), up_shape = m.up.shape();
        if (k < m.rank()) {  // resized; otherwise kept as it is
            down_shape[0] = k;
            up_shape[1] = k;
            out.alpha = alpha_for(m, k);
        }
        out.down = Tensor::deferred(options.dtype.value_or(m.down.dtype()), down_shape, pipeline, 2 * i);
        out.up = Tensor::deferred(options.dtype.value_or(m.up.dtype()), up_shape, pipeline, 2 * i + 1);
    }
    progress.begin("resize", count, 0);
    detail::write_while_made(*pipeline, options.threads, progress, [&] { write(result.adapter); });
    for (std::size_t i = 0; i < count; ++i)  // a module the writer did not take: its report alone
        if (!pipeline->made(i)) resize_module(input.modules[i], options, reports->value[i]);
    result.modules = reports->get();
    add_notes(input, result);
    return result;
}

}  // namespace lorakit
