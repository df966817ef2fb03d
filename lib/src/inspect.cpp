#include "lorakit/inspect.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "lorakit/error.h"
#include "lorakit/linalg.h"
#include "parallel.h"

namespace lorakit {

std::int64_t rank_for_energy(const std::vector<double>& singular_values, double fraction) {
    double total = 0;
    for (double s : singular_values) total += s * s;
    if (total <= 0) return 0;
    double running = 0;
    for (std::size_t i = 0; i < singular_values.size(); ++i) {
        running += singular_values[i] * singular_values[i];
        // A relative slack keeps exact ties (e.g. 99% of a spectrum that is exactly 99% in
        // its first k values) from flipping on the last bit of rounding.
        if (running >= fraction * total * (1 - 1e-12)) return static_cast<std::int64_t>(i + 1);
    }
    return static_cast<std::int64_t>(singular_values.size());
}

namespace {

std::int64_t count_nonfinite(const float* values, std::size_t count) {
    std::int64_t bad = 0;
    for (std::size_t i = 0; i < count; ++i) bad += std::isfinite(values[i]) ? 0 : 1;
    return bad;
}

struct ModuleScratch {
    linalg::Workspace workspace;
    std::vector<float> a, b;
};

void analyse_module(const LoraModule& m, ModuleReport& out, ModuleScratch& scratch, bool spectra) {
    const float* a = m.down.view().f32_data(scratch.a);
    const float* b = m.up.view().f32_data(scratch.b);
    const auto a_count = static_cast<std::size_t>(m.down.element_count());
    const auto b_count = static_cast<std::size_t>(m.up.element_count());
    out.nonfinite = count_nonfinite(a, a_count) + count_nonfinite(b, b_count);
    if (m.magnitude) out.nonfinite += m.magnitude->view().count_nonfinite();
    if (m.bias) out.nonfinite += m.bias->view().count_nonfinite();
    if (!std::isfinite(out.scale)) ++out.nonfinite;
    if (!spectra || out.nonfinite > 0) return;
    const linalg::LowRankTerm term{b, a, m.out_features(), m.rank(), m.flat_in_features(), m.scale()};
    out.singular_values = linalg::factored_singular_values({&term, 1}, scratch.workspace);
    double energy = 0;
    for (double s : out.singular_values) energy += s * s;
    out.fro_norm = std::sqrt(energy);
    out.spectral_norm = out.singular_values.empty() ? 0.0 : out.singular_values.front();
    out.effective_rank_90 = rank_for_energy(out.singular_values, 0.90);
    out.effective_rank_99 = rank_for_energy(out.singular_values, 0.99);
}

ModuleReport describe_module(const LoraModule& m) {
    ModuleReport r;
    r.name = m.name;
    r.source_name = m.source_name;
    r.kind = m.kind;
    r.rank = m.rank();
    r.alpha = m.alpha;
    r.scale = m.scale();
    r.scale_rule = m.scale_rule;
    r.in_features = m.in_features();
    r.out_features = m.out_features();
    r.kernel_size = m.kernel_size();
    r.dtype = std::string(dtype_name(m.down.dtype()));
    if (m.up.dtype() != m.down.dtype()) r.dtype = fmt::format("{}/{}", r.dtype, dtype_name(m.up.dtype()));
    r.dora = m.magnitude.has_value();
    r.lora_bias = m.bias.has_value();
    r.parameter_count = m.down.element_count() + m.up.element_count();
    if (m.magnitude) r.parameter_count += m.magnitude->element_count();
    if (m.bias) r.parameter_count += m.bias->element_count();
    return r;
}

// Runs analyse_module over all modules on `threads` workers (0: all cores). Each worker keeps
// its own scratch memory, and BLAS runs single-threaded inside (one level of parallelism).
void analyse_all(const std::vector<LoraModule>& modules, std::vector<ModuleReport>& reports, int threads,
                 bool spectra, Progress& progress) {
    const std::size_t count = modules.size();
    std::uint64_t total_bytes = 0;
    for (const auto& m : modules) total_bytes += m.down.bytes().size() + m.up.bytes().size();
    progress.begin("inspect", count, total_bytes);
    detail::parallel_for(count, threads, progress, [&](std::size_t i) -> std::uint64_t {
        thread_local ModuleScratch scratch;
        with_context(fmt::format("module {}", quote(modules[i].name)),
                     [&] { analyse_module(modules[i], reports[i], scratch, spectra); });
        return modules[i].down.bytes().size() + modules[i].up.bytes().size();
    });
}

}  // namespace

InspectReport inspect_adapter(const Adapter& adapter, const InspectOptions& options, Progress& progress) {
    InspectReport report;
    report.path = adapter.source;
    report.container = adapter.container;
    report.convention = adapter.convention;
    report.convention_detail = adapter.convention_detail;
    report.base_model = adapter.base_model;
    report.metadata = adapter.metadata;
    report.config_json = adapter.config_json;
    report.config_path = adapter.config_path;
    report.warnings = adapter.warnings;
    report.notes = adapter.notes;
    report.spectra = options.spectra;

    auto count_tensor = [&](const Tensor& t) {
        report.parameter_count += t.element_count();
        report.tensor_bytes += t.bytes().size();
        ++report.dtypes[std::string(dtype_name(t.dtype()))];
    };

    report.modules.reserve(adapter.modules.size());
    for (const auto& m : adapter.modules) {
        report.modules.push_back(describe_module(m));
        count_tensor(m.down);
        count_tensor(m.up);
        if (m.magnitude) count_tensor(*m.magnitude);
        if (m.bias) count_tensor(*m.bias);
    }
    analyse_all(adapter.modules, report.modules, options.threads, options.spectra, progress);

    for (const auto& m : adapter.lycoris_modules) {
        LycorisReport r;
        r.name = m.name;
        r.algorithm = m.algorithm;
        r.alpha = m.alpha;
        for (const auto& t : m.tensors) {
            r.tensors.emplace_back(t.name, t.tensor.view());
            r.parameter_count += t.tensor.element_count();
            r.nonfinite += t.tensor.view().count_nonfinite();
            count_tensor(t.tensor);
        }
        if (m.dora_scale) {
            r.tensors.emplace_back("dora_scale", m.dora_scale->view());
            r.parameter_count += m.dora_scale->element_count();
            r.nonfinite += m.dora_scale->view().count_nonfinite();
            count_tensor(*m.dora_scale);
        }
        report.lycoris_modules.push_back(std::move(r));
    }
    for (const auto& t : adapter.other_tensors) {
        TensorSummary s{t.name, std::string(dtype_name(t.tensor.dtype())), t.tensor.shape(),
                        t.tensor.view().count_nonfinite()};
        count_tensor(t.tensor);
        report.other_tensors.push_back(std::move(s));
    }

    for (const auto& m : report.modules) report.nonfinite += m.nonfinite;
    for (const auto& m : report.lycoris_modules) report.nonfinite += m.nonfinite;
    for (const auto& t : report.other_tensors) report.nonfinite += t.nonfinite;
    return report;
}

RawReport inspect_raw(const TensorFile& file) {
    RawReport report;
    report.path = file.name();
    report.container = std::string(file.format_name());
    report.metadata = file.metadata();
    for (const auto& e : file.entries()) report.tensors.push_back({e.name, e.dtype_name, e.shape, e.offset, e.size});
    return report;
}

}  // namespace lorakit
