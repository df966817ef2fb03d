// The two faces of an inspect report: JSON (the documented schema) and text for people.
#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "lorakit/inspect.h"
#include "lorakit/names.h"

namespace lorakit {

namespace {

using Json = nlohmann::ordered_json;

Json optional_number(const std::optional<double>& value) {
    if (!value || !std::isfinite(*value)) return nullptr;
    return *value;
}

Json optional_integer(const std::optional<std::int64_t>& value) {
    if (!value) return nullptr;
    return *value;
}

// "8", "0.5", "1e-05": the shortest form that reads back as the same double.
std::string number_key(double value) { return fmt::format("{}", value); }

template <typename T, typename Key>
Json histogram(const std::vector<T>& items, Key key) {
    std::map<double, std::int64_t> counts;
    std::int64_t missing = 0;
    for (const auto& item : items) {
        const std::optional<double> k = key(item);
        if (k) ++counts[*k];
        else ++missing;
    }
    Json out = Json::object();
    for (const auto& [k, n] : counts) out[number_key(k)] = n;
    if (missing) out["none"] = missing;
    return out;
}

Json shape_json(const Shape& shape) {
    Json out = Json::array();
    for (auto d : shape) out.push_back(d);
    return out;
}

}  // namespace

nlohmann::ordered_json to_json(const InspectReport& r) {
    Json j;
    j["path"] = r.path;
    j["container"] = r.container;
    j["convention"] = r.convention;
    j["convention_detail"] = r.convention_detail;
    j["base_model"] = {{"family", r.base_model.family},
                       {"name", r.base_model.name.empty() ? Json(nullptr) : Json(r.base_model.name)},
                       {"evidence", r.base_model.evidence}};
    j["module_count"] = r.modules.size();
    j["lycoris_module_count"] = r.lycoris_modules.size();
    j["parameter_count"] = r.parameter_count;
    j["tensor_bytes"] = r.tensor_bytes;
    Json dtypes = Json::object();
    for (const auto& [name, n] : r.dtypes) dtypes[name] = n;
    j["dtypes"] = dtypes;
    j["ranks"] = histogram(r.modules, [](const ModuleReport& m) { return std::optional<double>(double(m.rank)); });
    j["alphas"] = histogram(r.modules, [](const ModuleReport& m) { return m.alpha; });
    j["scales"] = histogram(r.modules, [](const ModuleReport& m) { return std::optional<double>(m.scale); });
    j["nonfinite"] = r.nonfinite;
    j["check_passed"] = r.check_passes();
    Json metadata = Json::object();
    for (const auto& [k, v] : r.metadata) metadata[k] = v;
    j["metadata"] = metadata;
    if (r.config_json.empty()) {
        j["config"] = nullptr;
    } else {
        try {
            j["config"] = Json::parse(r.config_json);
        } catch (const nlohmann::json::exception&) {
            j["config"] = r.config_json;
        }
    }
    j["config_path"] = r.config_path.empty() ? Json(nullptr) : Json(r.config_path);
    j["warnings"] = r.warnings;
    j["notes"] = r.notes;
    Json others = Json::array();
    for (const auto& t : r.other_tensors)
        others.push_back({{"name", t.name}, {"dtype", t.dtype}, {"shape", shape_json(t.shape)}, {"nonfinite", t.nonfinite}});
    j["other_tensors"] = others;
    Json modules = Json::array();
    for (const auto& m : r.modules) {
        Json o;
        o["name"] = m.name;
        o["source_name"] = m.source_name;
        o["kind"] = module_kind_name(m.kind);
        o["rank"] = m.rank;
        o["alpha"] = optional_number(m.alpha);
        o["scale"] = m.scale;
        o["scale_rule"] = scale_rule_name(m.scale_rule);
        o["in_features"] = m.in_features;
        o["out_features"] = m.out_features;
        o["kernel_size"] = shape_json(m.kernel_size);
        o["dtype"] = m.dtype;
        o["dora"] = m.dora;
        o["lora_bias"] = m.lora_bias;
        o["parameter_count"] = m.parameter_count;
        o["fro_norm"] = optional_number(m.fro_norm);
        o["spectral_norm"] = optional_number(m.spectral_norm);
        o["effective_rank"] = {{"90", optional_integer(m.effective_rank_90)},
                               {"99", optional_integer(m.effective_rank_99)}};
        o["singular_values"] = m.singular_values;
        o["nonfinite"] = m.nonfinite;
        modules.push_back(std::move(o));
    }
    j["modules"] = modules;
    Json lycoris = Json::array();
    for (const auto& m : r.lycoris_modules) {
        Json tensors = Json::array();
        for (const auto& [role, view] : m.tensors)
            tensors.push_back({{"role", role}, {"dtype", dtype_name(view.dtype())}, {"shape", shape_json(view.shape())}});
        lycoris.push_back({{"name", m.name},
                           {"algorithm", m.algorithm},
                           {"alpha", optional_number(m.alpha)},
                           {"tensors", tensors},
                           {"parameter_count", m.parameter_count},
                           {"nonfinite", m.nonfinite}});
    }
    j["lycoris_modules"] = lycoris;
    return j;
}

nlohmann::ordered_json to_json(const RawReport& r) {
    Json j;
    j["path"] = r.path;
    j["container"] = r.container;
    Json metadata = Json::object();
    for (const auto& [k, v] : r.metadata) metadata[k] = v;
    j["metadata"] = metadata;
    Json tensors = Json::array();
    for (const auto& t : r.tensors)
        tensors.push_back({{"name", t.name},
                           {"dtype", t.dtype},
                           {"shape", shape_json(t.shape)},
                           {"data_offsets", {t.offset, t.offset + t.size}}});
    j["tensor_count"] = r.tensors.size();
    j["tensors"] = tensors;
    return j;
}

// ---- text -------------------------------------------------------------------------------------

namespace {

std::string grouped(std::int64_t n) {
    std::string digits = std::to_string(n < 0 ? -n : n);
    std::string out;
    for (std::size_t i = 0; i < digits.size(); ++i) {
        if (i && (digits.size() - i) % 3 == 0) out += ',';
        out += digits[i];
    }
    return n < 0 ? "-" + out : out;
}

// "4 (x72)" or "4 (x40), 8 (x32)"; at most `limit` distinct values, then "...".
template <typename T, typename Key>
std::string spread(const std::vector<T>& items, Key key, std::size_t limit = 6) {
    std::map<double, std::int64_t> counts;
    std::int64_t missing = 0;
    for (const auto& item : items) {
        if (auto k = key(item)) ++counts[*k];
        else ++missing;
    }
    std::vector<std::string> parts;
    for (const auto& [k, n] : counts) {
        if (parts.size() == limit) {
            parts.push_back(fmt::format("... {} distinct values", counts.size()));
            break;
        }
        parts.push_back(fmt::format("{:g} (x{})", k, n));
    }
    if (missing) parts.push_back(fmt::format("none (x{})", missing));
    return fmt::format("{}", fmt::join(parts, ", "));
}

double median(std::vector<double> values) {
    if (values.empty()) return 0;
    std::sort(values.begin(), values.end());
    const std::size_t mid = values.size() / 2;
    return values.size() % 2 ? values[mid] : 0.5 * (values[mid - 1] + values[mid]);
}

std::string shorten(std::string_view text, std::size_t width) {
    std::string out;
    for (char c : text) out += (c == '\n' || c == '\r' || c == '\t') ? ' ' : c;
    if (out.size() <= width) return out;
    return out.substr(0, width - 3) + "...";
}

void line(std::string& out, std::string_view label, std::string_view value) {
    out += fmt::format("  {:<12} {}\n", label, value);
}

}  // namespace

std::string render_text(const InspectReport& r, bool modules_table) {
    std::string out = fmt::format("{}\n", r.path);
    line(out, "convention", r.convention_detail.empty() ? r.convention : fmt::format("{}: {}", r.convention, r.convention_detail));
    std::string base = r.base_model.family;
    if (!r.base_model.name.empty()) base += fmt::format("  {}", r.base_model.name);
    if (!r.base_model.evidence.empty()) base += fmt::format("  [from {}]", r.base_model.evidence);
    line(out, "base model", base);

    std::map<std::string, std::int64_t> kinds;
    for (const auto& m : r.modules) ++kinds[std::string(module_kind_name(m.kind))];
    std::vector<std::string> kind_parts;
    for (const auto& [k, n] : kinds) kind_parts.push_back(fmt::format("{} {}", n, k));
    std::string modules = fmt::format("{}", r.modules.size());
    if (!kind_parts.empty()) modules += fmt::format(" ({})", fmt::join(kind_parts, ", "));
    if (!r.lycoris_modules.empty()) {
        std::map<std::string, std::int64_t> algorithms;
        for (const auto& m : r.lycoris_modules) ++algorithms[m.algorithm];
        std::vector<std::string> parts;
        for (const auto& [a, n] : algorithms) parts.push_back(fmt::format("{} {}", n, a));
        modules += fmt::format(" + {} LyCORIS ({})", r.lycoris_modules.size(), fmt::join(parts, ", "));
    }
    line(out, "modules", modules);
    if (!r.modules.empty()) {
        line(out, "ranks", spread(r.modules, [](const ModuleReport& m) { return std::optional<double>(double(m.rank)); }));
        line(out, "alphas", spread(r.modules, [](const ModuleReport& m) { return m.alpha; }));
        std::map<std::string, std::int64_t> rules;
        for (const auto& m : r.modules) ++rules[std::string(scale_rule_name(m.scale_rule))];
        std::vector<std::string_view> rule_names;
        for (const auto& [k, n] : rules) rule_names.push_back(k);
        line(out, "scales", fmt::format("{}  [{}]",
                                        spread(r.modules, [](const ModuleReport& m) { return std::optional<double>(m.scale); }),
                                        fmt::join(rule_names, ", ")));
    }
    std::vector<std::string> dtype_parts;
    for (const auto& [d, n] : r.dtypes) dtype_parts.push_back(fmt::format("{} x{}", d, n));
    line(out, "tensors", fmt::format("{}; {} parameters, {}", fmt::join(dtype_parts, ", "), grouped(r.parameter_count),
                                     format_bytes(double(r.tensor_bytes))));

    std::vector<double> fro, spectral, r90, r99;
    const ModuleReport* largest = nullptr;
    for (const auto& m : r.modules) {
        if (!m.fro_norm) continue;
        fro.push_back(*m.fro_norm);
        spectral.push_back(*m.spectral_norm);
        r90.push_back(double(*m.effective_rank_90));
        r99.push_back(double(*m.effective_rank_99));
        if (!largest || *m.fro_norm > *largest->fro_norm) largest = &m;
    }
    if (!fro.empty()) {
        line(out, "|dW|_F", fmt::format("median {:.4g}, max {:.4g} ({})", median(fro),
                                        *std::max_element(fro.begin(), fro.end()), largest->name));
        line(out, "|dW|_2", fmt::format("median {:.4g}, max {:.4g}", median(spectral),
                                        *std::max_element(spectral.begin(), spectral.end())));
        line(out, "eff. rank", fmt::format("median {:g} at 90% energy, {:g} at 99%", median(r90), median(r99)));
    } else if (!r.spectra && !r.modules.empty()) {
        line(out, "norms", "not computed (--no-spectra)");
    }
    line(out, "NaN/Inf", r.nonfinite ? fmt::format("{} values", grouped(r.nonfinite)) : "none");
    if (!r.other_tensors.empty()) {
        std::vector<std::string> names;
        for (const auto& t : r.other_tensors) {
            if (names.size() == 3) {
                names.push_back("...");
                break;
            }
            names.push_back(t.name);
        }
        line(out, "other", fmt::format("{} tensors ({})", r.other_tensors.size(), fmt::join(names, ", ")));
    }
    if (!r.config_path.empty()) line(out, "config", r.config_path);
    if (!r.metadata.empty()) {
        std::size_t shown = 0;
        for (const auto& [k, v] : r.metadata) {
            if (shown == 8) {
                line(out, "", fmt::format("... {} more keys (see --json)", r.metadata.size() - shown));
                break;
            }
            line(out, shown == 0 ? "metadata" : "", fmt::format("{} = {}", k, shorten(v, 60)));
            ++shown;
        }
    }
    for (const auto& n : r.notes) out += fmt::format("  note: {}\n", n);
    for (const auto& w : r.warnings) out += fmt::format("  warning: {}\n", w);

    if (modules_table && (!r.modules.empty() || !r.lycoris_modules.empty())) {
        std::size_t width = 6;
        for (const auto& m : r.modules) width = std::max(width, m.name.size());
        for (const auto& m : r.lycoris_modules) width = std::max(width, m.name.size());
        out += fmt::format("\n  {:<{}}  {:<9} {:>5} {:>7} {:>9} {:>17} {:>10} {:>10} {:>4} {:>4} {:>6}\n", "module", width,
                           "kind", "rank", "alpha", "scale", "in -> out", "|dW|_F", "|dW|_2", "r90", "r99", "nan");
        for (const auto& m : r.modules) {
            auto num = [](const std::optional<double>& v) { return v ? fmt::format("{:.4g}", *v) : std::string("-"); };
            auto integer = [](const std::optional<std::int64_t>& v) { return v ? std::to_string(*v) : std::string("-"); };
            out += fmt::format("  {:<{}}  {:<9} {:>5} {:>7} {:>9.4g} {:>17} {:>10} {:>10} {:>4} {:>4} {:>6}\n", m.name,
                               width, module_kind_name(m.kind), m.rank, num(m.alpha), m.scale,
                               fmt::format("{} -> {}", m.in_features, m.out_features), num(m.fro_norm),
                               num(m.spectral_norm), integer(m.effective_rank_90), integer(m.effective_rank_99),
                               m.nonfinite);
        }
        for (const auto& m : r.lycoris_modules)
            out += fmt::format("  {:<{}}  {:<9} {:>5} {:>7}\n", m.name, width, m.algorithm, "-",
                               m.alpha ? fmt::format("{:.4g}", *m.alpha) : "-");
    }
    return out;
}

std::string render_text(const RawReport& r) {
    std::string out = fmt::format("{}  ({}, {} tensors)\n", r.path, r.container, r.tensors.size());
    std::size_t width = 4;
    for (const auto& t : r.tensors) width = std::max(width, t.name.size());
    for (const auto& t : r.tensors)
        out += fmt::format("  {:<{}}  {:<8} {:<20} {}\n", t.name, width, t.dtype, format_shape(t.shape),
                           format_bytes(double(t.size)));
    for (const auto& [k, v] : r.metadata) out += fmt::format("  metadata {} = {}\n", k, shorten(v, 80));
    return out;
}

}  // namespace lorakit
