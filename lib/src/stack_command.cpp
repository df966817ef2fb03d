// The lora-stack command: load the adapters (and the base), analyse, optionally write the
// stacked adapter, report.
#include <algorithm>
#include <cmath>
#include <cstdlib>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "lorakit/checkpoint.h"
#include "lorakit/stack.h"

namespace lorakit {

namespace {

using Json = nlohmann::ordered_json;

Json number(double v) { return std::isfinite(v) ? Json(v) : Json(nullptr); }

class CheckpointWeights final : public BaseWeights {
public:
    explicit CheckpointWeights(const Checkpoint& checkpoint) : checkpoint_(checkpoint) {}
    bool load(const LoraModule& module, BaseWeight& w) const override {
        const auto where = checkpoint_.locate(module);
        if (!where) return false;
        // Resident: one tensor, not the base. A tensor read in place is released once the
        // module is done with it; a gathered copy right away.
        const TensorFile& file = *checkpoint_.files()[where->file];
        const TensorEntry& entry = *where->entry;
        if (const auto view = weight_in_place(*where, module)) {
            w.values = {};
            w.stored = view->bytes().data();
            w.stored_dtype = view->dtype();
            w.release = [&file, &entry] { file.release(entry); };
        } else {
            w.values = gather_weight_into(*where, module, w.storage);
            file.release(entry);
        }
        w.tensor = where->describe();
        w.dtype = where->entry->dtype_name;
        w.limit = dtype_finite_limit(w.dtype);
        return true;
    }

    std::uint64_t prefetch(const LoraModule& module) const override {
        try {
            const auto where = checkpoint_.locate(module);
            if (!where) return 0;
            checkpoint_.files()[where->file]->prefetch(*where->entry);
            return where->entry->size;
        } catch (const Error&) {
            return 0;  // only a read ahead: a module that does not fit its tensor fails when it is loaded
        }
    }

private:
    const Checkpoint& checkpoint_;
};

Json pair_json(const PairStats& p) {
    return {{"adapters", {p.first + 1, p.second + 1}},
            {"cosine", p.cosine},
            {"out_max_cosine", p.out_max_cosine},
            {"out_phi", p.out_phi},
            {"in_max_cosine", p.in_max_cosine},
            {"in_phi", p.in_phi},
            {"sign_conflict", number(p.sign_conflict)},
            {"sign_samples", p.sign_samples}};
}

Json report_json(const StackReport& r, const StackRequest& request) {
    Json j;
    Json adapters = Json::array();
    for (std::size_t i = 0; i < r.names.size(); ++i) adapters.push_back({{"path", r.names[i]}, {"weight", r.weights[i]}});
    j["adapters"] = adapters;
    j["base"] = request.base.empty() ? Json(nullptr) : Json(request.base);
    j["output"] = request.output.empty() ? Json(nullptr) : Json(request.output);
    j["total_weight"] = r.total_weight;
    const auto& th = request.options.thresholds;
    j["thresholds"] = {{"strength_warn", th.strength_warn},
                       {"strength_unstable", th.strength_unstable},
                       {"base_warn", th.base_warn},
                       {"base_unstable", th.base_unstable}};
    j["verdict"] = verdict_name(r.verdict);
    j["counts"] = {{"ok", r.counts[0]}, {"warn", r.counts[1]}, {"unstable", r.counts[2]}};
    j["suggested_factor"] = r.suggested_factor;
    j["applied_factor"] = r.applied_factor;
    Json pairs = Json::array();
    for (const auto& p : r.pair_summary) {
        Json pj = pair_json(p);
        pj["rms_cosine"] = pj["cosine"];
        pj.erase("cosine");
        pj["modules"] = p.modules;
        pairs.push_back(pj);
    }
    j["pairs"] = pairs;
    Json modules = Json::array();
    for (const auto& m : r.modules) {
        Json mj;
        mj["name"] = m.name;
        Json inputs = Json::array();
        for (std::size_t i = 0; i < m.inputs.size(); ++i)
            inputs.push_back({{"adapter", m.inputs[i] + 1}, {"fro", m.fro[i]}, {"spectral", m.spectral[i]}});
        mj["adapters"] = inputs;
        mj["sum_fro"] = m.sum_fro;
        mj["sum_spectral"] = m.sum_spectral;
        mj["kappa"] = m.kappa;
        mj["growth"] = m.growth;
        mj["strength"] = m.strength;
        Json mp = Json::array();
        for (const auto& p : m.pairs) mp.push_back(pair_json(p));
        mj["pairs"] = mp;
        if (m.base)
            mj["base"] = {{"tensor", m.base->tensor},         {"dtype", m.base->dtype},
                          {"spectral", m.base->spectral},     {"ratio", number(m.base->ratio)},
                          {"limit", m.base->limit},           {"max_abs_bound", m.base->max_abs},
                          {"overflow_count", m.base->overflow_count}, {"overflow_factor", m.base->overflow_factor}};
        else
            mj["base"] = nullptr;
        mj["verdict"] = verdict_name(m.verdict);
        mj["reasons"] = m.reasons;
        mj["ok_factor"] = m.ok_factor;
        modules.push_back(mj);
    }
    j["modules"] = modules;
    j["notes"] = r.notes;
    return j;
}

std::string report_text(const StackReport& r, const StackRequest& request) {
    std::string out;
    std::vector<const ModuleStack*> order;
    for (const auto& m : r.modules) order.push_back(&m);
    std::stable_sort(order.begin(), order.end(), [](const ModuleStack* a, const ModuleStack* b) {
        if (a->verdict != b->verdict) return a->verdict > b->verdict;
        return a->strength > b->strength;
    });
    const bool base = !request.base.empty();
    const std::size_t shown = request.top == 0 ? order.size() : std::min(order.size(), request.top);
    std::size_t width = 6;
    for (std::size_t i = 0; i < shown; ++i) width = std::max(width, order[i]->name.size());
    out += fmt::format("{:<{}}  {:<8} {:>8} {:>6} {:>7} {:>7} {:>6}{}\n", "module", width, "verdict", "strength", "kappa",
                       "max|cos|", "overlap", "signs", base ? fmt::format(" {:>8}", "|dW|/|W|") : "");
    for (std::size_t i = 0; i < shown; ++i) {
        const ModuleStack& m = *order[i];
        double max_cos = 0, overlap = 0, conflict = std::nan("");
        for (const auto& p : m.pairs) {
            max_cos = std::max(max_cos, std::abs(p.cosine));
            overlap = std::max(overlap, p.out_phi);
            if (!std::isnan(p.sign_conflict)) conflict = std::isnan(conflict) ? p.sign_conflict : std::max(conflict, p.sign_conflict);
        }
        const std::string signs = std::isnan(conflict) ? "-" : fmt::format("{:.0f}%", 100 * conflict);
        std::string base_column;
        if (base) base_column = m.base ? fmt::format(" {:>8.3g}", m.base->ratio) : fmt::format(" {:>8}", "-");
        out += fmt::format("{:<{}}  {:<8} {:>8.3f} {:>6.2f} {:>7.3f} {:>7.2f} {:>6}{}\n", m.name, width,
                           verdict_name(m.verdict), m.strength, m.kappa, m.pairs.empty() ? 0.0 : max_cos, overlap, signs,
                           base_column);
    }
    if (shown < order.size())
        out += fmt::format("... {} more module(s), all {} or better (--top 0 or --json for every one)\n", order.size() - shown,
                           verdict_name(order[shown]->verdict));
    out += "\n";
    for (std::size_t i = 0; i < r.names.size(); ++i)
        out += fmt::format("adapter {}: {} (weight {:g})\n", i + 1, r.names[i], r.weights[i]);
    for (const auto& p : r.pair_summary) {
        if (p.modules == 0) {
            out += fmt::format("pair {}+{}: no module in common\n", p.first + 1, p.second + 1);
            continue;
        }
        const std::string signs = std::isnan(p.sign_conflict) ? "-" : fmt::format("{:.0f}%", 100 * p.sign_conflict);
        out += fmt::format("pair {}+{}: {} shared modules, RMS cosine {:.3f}, output-subspace overlap {:.2f}, input {:.2f}, "
                           "sign conflicts {}\n",
                           p.first + 1, p.second + 1, p.modules, p.cosine, p.out_phi, p.in_phi, signs);
    }
    out += fmt::format("total weight {:g}; {} modules: {} ok, {} warn, {} unstable\n", r.total_weight, r.modules.size(),
                       r.counts[0], r.counts[1], r.counts[2]);
    if (r.applied_factor < 1)
        out += fmt::format("auto-scale: weights multiplied by {:.4g}\n", r.applied_factor);
    if (r.suggested_factor < 1)
        out += fmt::format("verdict: {} (scale every weight by {:.3g} or less for ok, or use --auto-scale)\n",
                           verdict_name(r.verdict), r.suggested_factor);
    else
        out += fmt::format("verdict: {}\n", verdict_name(r.verdict));
    return out;
}

}  // namespace

ToolResult run_stack(const Registry& registry, const StackRequest& request, Progress& progress) {
    return guarded([&](ToolResult& result) {
        if (request.inputs.empty()) fail(ErrorCode::usage, "give at least one adapter");
        auto [adapters, given] = load_weighted_adapters(registry, request.inputs);
        StackOptions options = request.options;
        const bool explicit_weights = !options.weights.empty();
        for (const auto& weight : given)
            if (weight && explicit_weights) fail(ErrorCode::usage, "give weights either as PATH:W or with --weights, not both");
        if (!explicit_weights)
            for (const auto& weight : given) options.weights.push_back(weight.value_or(1.0));
        const std::string convention = registry.output_convention(request.to, adapters[0].convention, request.output);
        if (!request.output.empty()) registry.check_output(convention, request.output, request.force);
        std::unique_ptr<Checkpoint> checkpoint;
        std::unique_ptr<CheckpointWeights> base;
        if (!request.base.empty()) {
            checkpoint = registry.open_checkpoint(request.base);
            base = std::make_unique<CheckpointWeights>(*checkpoint);
        }
        StackReport report = analyse_stack(adapters, options, request.auto_scale, base.get(), progress);
        if (base) {
            std::size_t missing = 0;
            for (const auto& m : report.modules) missing += m.base ? 0 : 1;
            if (missing)
                report.notes.push_back(fmt::format("{} module(s) have no tensor in the base checkpoint and were checked "
                                                   "without it", missing));
        }
        std::vector<std::string> notes = report.notes;
        const bool refused = request.strict && report.verdict == Verdict::unstable;
        if (!request.output.empty() && !refused) {
            MergeOptions merge;
            merge.weights = report.weights;
            merge.method = request.rank ? MergeMethod::svd : MergeMethod::concat;
            if (request.rank) merge.rank = *request.rank;
            merge.dtype = request.dtype;
            merge.threads = options.threads;
            std::vector<std::string> write_notes;
            const std::string comment = fmt::format("stacked by lorakit from {} adapters", adapters.size());
            auto write = [&](const Adapter& stacked) {
                Adapter out = stacked;
                if (out.metadata.count("ss_network_dim") || convention == "kohya") out.metadata["ss_training_comment"] = comment;
                registry.write_adapter(out, convention, request.output, write_options(request.force), write_notes);
            };
            // Written while merged when the ranks are known beforehand (concat, a fixed --rank).
            std::optional<MergeResult> streamed = merge_adapters_streamed(adapters, merge, progress, write);
            const MergeResult merged = streamed ? std::move(*streamed) : merge_adapters(adapters, merge, progress);
            if (!streamed) write(merged.adapter);
            notes.insert(notes.end(), merged.notes.begin(), merged.notes.end());
            if (request.rank) {
                double worst = 0;
                for (const auto& m : merged.modules) worst = std::max(worst, m.relative_error);
                notes.push_back(fmt::format("compressed by factored SVD ({}): largest relative error {:.3g}",
                                            describe(*request.rank), worst));
            }
            notes.insert(notes.end(), write_notes.begin(), write_notes.end());
        }
        result.out = request.json ? report_json(report, request).dump(2) + "\n" : report_text(report, request);
        for (const auto& note : notes) result.note(note);
        if (refused)
            result.error(fmt::format("the stack is unstable ({} module(s)){}", report.counts[2],
                                     request.output.empty() ? "" : "; nothing written (--strict)"),
                         exit_codes::check_failed);
    });
}

}  // namespace lorakit
