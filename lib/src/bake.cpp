// The lora-bake command (see bake.h).
#include "lorakit/bake.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "lorakit/checkpoint.h"
#include "lorakit/error.h"
#include "lorakit/linalg.h"
#include "parallel.h"

extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);

namespace lorakit {

namespace {

struct Contribution {
    Contribution(const LoraModule* m, std::size_t a, double c, WeightLocation w, bool b)
        : module(m), adapter(a), coefficient(c), where(std::move(w)), bias(b) {}

    const LoraModule* module;  // null for a full tensor (`dense`)
    std::size_t adapter;
    double coefficient;  // weight · scale, negated when subtracting
    WeightLocation where;
    bool bias = false;   // adds the module's LoRA bias into this (bias) tensor
    // A full tensor the adapter carries: a LyCORIS diff added with the weight alone, or a PEFT
    // modules_to_save parameter that replaces the base's values (`assign`).
    const Tensor* dense = nullptr;
    bool assign = false;
    std::string label;  // the module (and parameter) for reports

    const std::string& name() const { return module ? module->name : label; }
};

bool is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

class BakeSource final : public TensorSource {
public:
    BakeSource(std::map<std::pair<std::size_t, std::string>, std::vector<Contribution>> plan, std::optional<DType> dtype)
        : plan_(std::move(plan)), dtype_(dtype) {}

    std::optional<DType> output_dtype(std::size_t file, const TensorEntry& e) const override {
        const bool touched = plan_.count({file, e.name}) > 0;
        if (touched) {
            if (!e.supported() || !is_float(e.value_dtype()))
                fail(ErrorCode::unsupported, "tensor {} has dtype {}; lorakit bakes into F32, F16, BF16 and Q8_0 tensors",
                     quote(e.name), e.dtype_name);
            return dtype_.value_or(e.value_dtype());
        }
        if (dtype_ && e.supported() && is_float(e.value_dtype()) && e.dtype_name != dtype_name(*dtype_)) return dtype_;
        return std::nullopt;
    }

    // Called once per tensor, one at a time (on the writer's helper thread): the f32 buffer is
    // reused (no fresh pages per tensor).
    void produce(std::size_t file, const TensorEntry& e, DType type, std::vector<std::byte>& bytes) const override {
        std::vector<float>& w = weight_;
        e.to_f32(w);
        if (auto it = plan_.find({file, e.name}); it != plan_.end())
            for (const auto& c : it->second) apply(c, e, w);
        const linalg::DenseStats stats = linalg::dense_stats(w.data(), w.size());
        if (!stats.finite) fail(ErrorCode::bad_input, "the result holds NaN or infinite values");
        const double limit = dtype_finite_limit(dtype_name(type));
        if (limit > 0 && stats.max_abs > limit)
            fail(ErrorCode::bad_input, "a value of {:g} exceeds the largest finite {} ({:g}); bake to a wider --dtype "
                 "or lower the weights", static_cast<double>(stats.max_abs), dtype_name(type), limit);
        bytes.resize(w.size() * dtype_size(type));
        convert_from_f32(type, w, bytes);
    }

private:
    static void apply(const Contribution& c, const TensorEntry& e, std::vector<float>& w) {
        auto row_of = [&](std::int64_t p) { return c.where.rows.empty() ? p : c.where.rows[static_cast<std::size_t>(p)]; };
        if (c.dense) {
            // Rows of the parameter (all of them, or the module's rows of a fused tensor).
            const auto d = c.dense->to_f32();
            const std::int64_t rows = c.where.rows.empty() ? (e.shape.empty() ? 1 : e.shape[0]) : static_cast<std::int64_t>(c.where.rows.size());
            const std::int64_t cols = static_cast<std::int64_t>(d.size()) / rows;
            for (std::int64_t p = 0; p < rows; ++p)
                for (std::int64_t q = 0; q < cols; ++q) {
                    float& x = w[static_cast<std::size_t>(row_of(p) * cols + q)];
                    const double v = d[static_cast<std::size_t>(p * cols + q)];
                    x = static_cast<float>(c.assign ? v : x + c.coefficient * v);
                }
            return;
        }
        const LoraModule& m = *c.module;
        const std::int64_t out = m.out_features(), in = m.flat_in_features(), r = m.rank();
        if (c.bias) {
            const auto b = m.bias->to_f32();
            for (std::int64_t p = 0; p < out; ++p)
                w[static_cast<std::size_t>(row_of(p))] += static_cast<float>(c.coefficient * b[static_cast<std::size_t>(p)]);
            return;
        }
        const auto a = m.down.to_f32(), b = m.up.to_f32();
        if (c.where.rows.empty() && !c.where.transposed && !m.magnitude) {
            // W += c·B·A in place: the product accumulates straight into the weight.
            cblas_sgemm(101, 111, 111, static_cast<int>(out), static_cast<int>(in), static_cast<int>(r),
                        static_cast<float>(c.coefficient), b.data(), static_cast<int>(r), a.data(), static_cast<int>(in),
                        1.0f, w.data(), static_cast<int>(in));
            return;
        }
        std::vector<float> d(static_cast<std::size_t>(out * in));
        cblas_sgemm(101, 111, 111, static_cast<int>(out), static_cast<int>(in), static_cast<int>(r),
                    static_cast<float>(c.coefficient), b.data(), static_cast<int>(r), a.data(), static_cast<int>(in), 0.0f,
                    d.data(), static_cast<int>(in));
        const std::int64_t rows = c.where.transposed ? e.shape[1] : e.shape[0];
        auto at = [&](std::int64_t p, std::int64_t q) -> float& {
            const std::int64_t row = row_of(p);
            return c.where.transposed ? w[static_cast<std::size_t>(q * rows + row)] : w[static_cast<std::size_t>(row * in + q)];
        };
        if (!m.magnitude) {
            for (std::int64_t p = 0; p < out; ++p)
                for (std::int64_t q = 0; q < in; ++q) at(p, q) += d[static_cast<std::size_t>(p * in + q)];
            return;
        }
        // DoRA (PEFT's merge): W' = m / ‖W + ΔW‖ · (W + ΔW), the norm over each output row (or
        // each input column for an input-side magnitude).
        const auto magnitude = m.magnitude->to_f32();
        for (std::int64_t p = 0; p < out; ++p)
            for (std::int64_t q = 0; q < in; ++q) d[static_cast<std::size_t>(p * in + q)] += at(p, q);
        const bool by_rows = m.magnitude_axis == MagnitudeAxis::output_rows;
        const std::int64_t groups = by_rows ? out : in;
        if (static_cast<std::int64_t>(magnitude.size()) != groups)
            fail(ErrorCode::bad_input, "module {}: DoRA magnitude has {} values, expected {}", quote(m.name), magnitude.size(),
                 groups);
        std::vector<double> norm(static_cast<std::size_t>(groups), 0.0);
        for (std::int64_t p = 0; p < out; ++p)
            for (std::int64_t q = 0; q < in; ++q) {
                const double x = d[static_cast<std::size_t>(p * in + q)];
                norm[static_cast<std::size_t>(by_rows ? p : q)] += x * x;
            }
        for (std::int64_t p = 0; p < out; ++p)
            for (std::int64_t q = 0; q < in; ++q) {
                const std::size_t g = static_cast<std::size_t>(by_rows ? p : q);
                const double n = std::sqrt(norm[g]);
                at(p, q) = static_cast<float>(n > 0 ? magnitude[g] / n * d[static_cast<std::size_t>(p * in + q)] : 0.0);
            }
    }

    std::map<std::pair<std::size_t, std::string>, std::vector<Contribution>> plan_;
    std::optional<DType> dtype_;
    mutable std::vector<float> weight_;
};

}  // namespace

std::uint64_t parse_size(const std::string& text) {
    std::size_t used = 0;
    double value = 0;
    try {
        value = std::stod(text, &used);
    } catch (const std::exception&) {
        fail(ErrorCode::usage, "{} is not a size (e.g. 5GB, 500MB)", quote(text));
    }
    std::string unit = text.substr(used);
    for (char& ch : unit) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    static const std::pair<const char*, double> units[] = {{"", 1},       {"B", 1},       {"KB", 1e3},        {"MB", 1e6},
                                                           {"GB", 1e9},   {"TB", 1e12},   {"KIB", 1024.0},    {"MIB", 1048576.0},
                                                           {"GIB", 1073741824.0}, {"TIB", 1099511627776.0}};
    for (const auto& [name, factor] : units)
        if (unit == name) {
            const double bytes = value * factor;
            if (!(bytes >= 1) || bytes > 1.8e19) fail(ErrorCode::usage, "{} is not a usable size", quote(text));
            return static_cast<std::uint64_t>(bytes);
        }
    fail(ErrorCode::usage, "{}: unknown size unit {} (B, KB, MB, GB, KiB, MiB, GiB)", quote(text), quote(unit));
}

ToolResult run_bake(const Registry& registry, const BakeRequest& request, Progress& progress) {
    return guarded([&](ToolResult& result) {
        if (request.adapters.empty()) fail(ErrorCode::usage, "give at least one adapter");
        if (request.output.empty()) fail(ErrorCode::usage, "give -o OUT");
        if (request.dtype && !is_float(*request.dtype)) fail(ErrorCode::usage, "--dtype must be f32, f16, bf16 or q8_0");
        if (request.dtype && request.q8_0) fail(ErrorCode::usage, "give one --dtype");
        std::error_code ec;
        if (std::filesystem::exists(request.output, ec) && !request.force)
            fail(ErrorCode::usage, "{} exists (use --force to replace it)", quote(request.output));
        const auto checkpoint = registry.open_checkpoint(request.base);
        refuse_replacing(*checkpoint, "base", request.output);
        if (request.q8_0 && checkpoint->layout() != "gguf")
            fail(ErrorCode::usage, "--dtype q8_0 is a GGUF type; {} is a {} checkpoint", quote(request.base),
                 checkpoint->layout());
        const auto [adapters, given] = load_weighted_adapters(registry, request.adapters);
        std::vector<double> weights;
        for (const auto& weight : given) weights.push_back(weight.value_or(1.0));
        std::map<std::pair<std::size_t, std::string>, std::vector<Contribution>> plan;
        std::vector<std::string> unmatched;
        std::size_t baked = 0;
        std::size_t replaced = 0;
        for (std::size_t i = 0; i < adapters.size(); ++i) {
            const Adapter& a = adapters[i];
            bool noted_replace = false;
            // Full tensors: LyCORIS full and norm diffs (added with the weight alone, as LyCORIS
            // and ComfyUI apply them) and PEFT modules_to_save (loaded in place of the base's).
            auto add_full = [&](const std::string& module, const std::string& param, const Tensor& t, bool assign) {
                const auto where = with_context(fmt::format("{}: module {}", quote(a.source), quote(module)),
                                                [&] { return checkpoint->locate_parameter(module, param, t.shape()); });
                const std::string label = module + "." + param;
                if (!where) {
                    unmatched.push_back(label);
                    return;
                }
                if (assign && request.subtract)
                    fail(ErrorCode::unsupported, "{} replaces {} (PEFT modules_to_save) and cannot be subtracted",
                         quote(a.source), quote(label));
                Contribution c{nullptr, i, (request.subtract ? -1.0 : 1.0) * weights[i], *where, false};
                c.dense = &t;
                c.assign = assign;
                c.label = label;
                if (assign && weights[i] != 1.0 && !noted_replace) {
                    noted_replace = true;
                    result.note(fmt::format("{}: modules_to_save replace the base's tensors whatever the weight, as PEFT "
                                            "loads them", quote(a.source)));
                }
                plan[{where->file, where->entry->name}].push_back(std::move(c));
                ++replaced;
            };
            for (const auto& m : a.lycoris_modules) {
                const bool full = m.algorithm == "full", norm = m.algorithm == "norm";
                if (!full && !norm)
                    fail(ErrorCode::unsupported, "{} holds LyCORIS {} modules; convert them to LoRA first (lora-convert --rank)",
                         quote(request.adapters[i]), m.algorithm);
                for (const auto& t : m.tensors) {
                    if (t.name == (full ? "diff" : "w_norm")) add_full(m.name, "weight", t.tensor, false);
                    else if (t.name == (full ? "diff_b" : "b_norm")) add_full(m.name, "bias", t.tensor, false);
                    else fail(ErrorCode::bad_input, "module {}: unexpected LyCORIS {} tensor {}", quote(m.name), m.algorithm, quote(t.name));
                }
            }
            for (const auto& t : a.other_tensors)
                if (const auto saved = saved_parameter(a, t.name)) add_full(saved->first, saved->second, t.tensor, true);
            for (const auto& m : a.modules) {
                const auto where = with_context(fmt::format("{}: module {}", quote(a.source), quote(m.name)),
                                                [&] { return checkpoint->locate(m); });
                if (!where) {
                    unmatched.push_back(m.name);
                    continue;
                }
                const double c = (request.subtract ? -1.0 : 1.0) * weights[i] * m.scale();
                auto& list = plan[{where->file, where->entry->name}];
                if (m.magnitude && request.subtract)
                    fail(ErrorCode::unsupported, "module {}: DoRA renormalises the weight and cannot be subtracted", quote(m.name));
                list.push_back({&m, i, c, *where, false});
                ++baked;
                if (m.bias) {
                    const auto bias = with_context(fmt::format("{}: module {}", quote(a.source), quote(m.name)), [&] {
                        return checkpoint->locate_parameter(m.name, "bias", {m.out_features()});
                    });
                    if (!bias) fail(ErrorCode::unsupported, "module {} has a LoRA bias but the base has no bias for it", quote(m.name));
                    plan[{bias->file, bias->entry->name}].push_back({&m, i, c, *bias, true});
                }
            }
        }
        for (auto& [key, list] : plan) {
            for (const auto& c : list)
                if (list.size() > 1 && c.module && c.module->magnitude)
                    fail(ErrorCode::unsupported, "module {}: a DoRA module must be the only one baked into {}",
                         quote(c.module->name), quote(key.second));
            // Replacements first, so that other adapters' deltas add onto the replaced values.
            std::stable_partition(list.begin(), list.end(), [](const Contribution& c) { return c.assign; });
        }
        if (!unmatched.empty()) {
            std::vector<std::string> shown;
            for (std::size_t k = 0; k < std::min<std::size_t>(3, unmatched.size()); ++k) shown.push_back(quote(unmatched[k]));
            const std::string what = fmt::format("{} module(s) have no tensor in the base checkpoint ({}{})", unmatched.size(),
                                                 fmt::join(shown, ", "), unmatched.size() > 3 ? ", ..." : "");
            if (!request.allow_unmatched) fail(ErrorCode::bad_input, "{}; --allow-unmatched skips them", what);
            result.warning(what + "; skipped (--allow-unmatched)");
        }
        // The writer copies each tensor out while the next one is produced on a helper thread
        // (the checkpoint writers' ProducedAhead): the products get the other threads. With all
        // of them on the products, OpenBLAS's idle thread spun through every write and
        // conversion (a third of a bake's samples in sched_yield on 2 cores).
        const int threads = static_cast<int>(detail::worker_count(request.threads));
        linalg::set_blas_threads(std::max(1, threads - 1));
        BakeSource source(plan, request.dtype);
        CheckpointWriteOptions options;
        options.overwrite = request.force;
        options.shard_size = request.shard_size;
        options.keep_quantized = !request.dtype;
        options.produce_ahead = threads > 1;
        if (request.q8_0) options.gguf_type = "q8_0";
        else if (request.dtype)
            options.gguf_type = *request.dtype == DType::F32 ? "f32" : *request.dtype == DType::F16 ? "f16" : "bf16";
        checkpoint->write(request.output, source, options, progress);

        std::size_t tensors = 0;
        for (const auto& [key, list] : plan) tensors += list.empty() ? 0 : 1;
        if (request.json) {
            nlohmann::ordered_json j;
            j["base"] = request.base;
            j["layout"] = checkpoint->layout();
            j["output"] = request.output;
            nlohmann::ordered_json list = nlohmann::ordered_json::array();
            for (std::size_t i = 0; i < adapters.size(); ++i)
                list.push_back({{"path", adapters[i].source}, {"weight", weights[i]}});
            j["adapters"] = list;
            j["subtract"] = request.subtract;
            j["modules_baked"] = baked;
            j["full_tensors"] = replaced;
            j["modules_unmatched"] = unmatched;
            nlohmann::ordered_json changed = nlohmann::ordered_json::array();
            for (const auto& [key, l] : plan) {
                nlohmann::ordered_json modules = nlohmann::ordered_json::array();
                for (const auto& c : l) modules.push_back({{"adapter", c.adapter + 1}, {"module", c.name()},
                                                           {"target", c.where.describe()}, {"bias", c.bias}});
                changed.push_back({{"tensor", key.second}, {"modules", modules}});
            }
            j["tensors"] = changed;
            result.out = j.dump(2) + "\n";
        } else {
            result.out = fmt::format("{} {} module(s){} from {} adapter(s) {} {} tensor(s) of {}; wrote {}\n",
                                     request.subtract ? "subtracted" : "baked", baked,
                                     replaced ? fmt::format(" and {} full tensor(s)", replaced) : std::string(),
                                     adapters.size(), request.subtract ? "from" : "into", tensors, request.base, request.output);
        }
    });
}

}  // namespace lorakit
