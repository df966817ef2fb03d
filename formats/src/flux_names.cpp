#include "flux_names.h"

#include <charconv>
#include <algorithm>
#include <cstring>
#include <map>

#include <fmt/format.h>

#include "lorakit/error.h"

namespace lorakit::formats {

namespace {

// Rows [from, from + count) of B ([out, r], 2-D) as a new tensor.
Tensor rows_of(const Tensor& b, std::int64_t from, std::int64_t count) {
    const std::size_t row = static_cast<std::size_t>(b.dim(1)) * dtype_size(b.dtype());
    std::vector<std::byte> bytes(static_cast<std::size_t>(count) * row);
    std::memcpy(bytes.data(), b.bytes().data() + static_cast<std::size_t>(from) * row, bytes.size());
    return Tensor::own(b.dtype(), {count, b.dim(1)}, std::move(bytes));
}

std::vector<LoraModule> split_rows(const LoraModule& m, const std::string& prefix, const std::vector<std::string>& parts,
                                   const std::vector<std::int64_t>& dims) {
    std::int64_t total = 0;
    for (auto d : dims) total += d;
    if (m.up.ndim() != 2 || m.up.dim(0) != total)
        fail(ErrorCode::bad_input, "module {}: {} output rows cannot be split into {}", quote(m.name), m.up.dim(0),
             fmt::join(dims, "+"));
    if (m.bias) fail_lossy(Loss::lora_bias, {}, "module {}: a LoRA bias on a fused module is not split", quote(m.name));
    if (m.magnitude)
        fail_lossy(Loss::dora_magnitudes, {}, "module {}: a DoRA fused module cannot be split exactly", quote(m.name));
    std::vector<LoraModule> out;
    std::int64_t at = 0;
    for (std::size_t i = 0; i < parts.size(); ++i) {
        LoraModule part = m;
        part.name = "transformer." + prefix + parts[i];
        part.source_name.clear();
        part.up = rows_of(m.up, at, dims[i]);
        at += dims[i];
        out.push_back(std::move(part));
    }
    return out;
}

LoraModule renamed(const LoraModule& m, const std::string& path) {
    LoraModule r = m;
    r.name = "transformer." + path;
    r.source_name.clear();
    return r;
}

std::optional<int> block_index(std::string_view s) {
    int v = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || end != s.data() + s.size() || v < 0) return std::nullopt;
    return v;
}

}  // namespace

std::optional<std::vector<LoraModule>> bfl_to_diffusers_flux(const LoraModule& m) {
    constexpr std::string_view component = "transformer.";
    if (!m.name.starts_with(component)) return std::nullopt;
    const std::string_view path = std::string_view(m.name).substr(component.size());
    static const std::pair<std::string_view, std::string_view> singles[] = {
        {"img_in", "x_embedder"},
        {"txt_in", "context_embedder"},
        {"time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"},
        {"time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"},
        {"vector_in.in_layer", "time_text_embed.text_embedder.linear_1"},
        {"vector_in.out_layer", "time_text_embed.text_embedder.linear_2"},
        {"guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"},
        {"guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"},
        {"final_layer.linear", "proj_out"},
    };
    for (const auto& [bfl, diffusers] : singles)
        if (path == bfl) return std::vector<LoraModule>{renamed(m, std::string(diffusers))};
    if (path == "final_layer.adaLN_modulation.1") {
        // BFL orders the modulation [shift, scale]; diffusers' norm_out.linear [scale, shift].
        const std::int64_t out = m.up.dim(0);
        if (m.up.ndim() != 2 || out % 2) fail(ErrorCode::bad_input, "module {}: odd modulation size", quote(m.name));
        LoraModule r = renamed(m, "norm_out.linear");
        const Tensor shift = rows_of(m.up, 0, out / 2), scale = rows_of(m.up, out / 2, out / 2);
        std::vector<std::byte> bytes(scale.bytes().begin(), scale.bytes().end());
        bytes.insert(bytes.end(), shift.bytes().begin(), shift.bytes().end());
        r.up = Tensor::own(m.up.dtype(), m.up.shape(), std::move(bytes));
        if (m.bias) fail_lossy(Loss::lora_bias, {}, "module {}: a LoRA bias on the final modulation", quote(m.name));
        return std::vector<LoraModule>{std::move(r)};
    }
    const auto dot1 = path.find('.');
    if (dot1 == std::string_view::npos) return std::nullopt;
    const std::string_view kind = path.substr(0, dot1);
    const auto dot2 = path.find('.', dot1 + 1);
    if (dot2 == std::string_view::npos) return std::nullopt;
    const auto index = block_index(path.substr(dot1 + 1, dot2 - dot1 - 1));
    if (!index) return std::nullopt;
    const std::string_view rest = path.substr(dot2 + 1);
    if (kind == "double_blocks") {
        const std::string d = fmt::format("transformer_blocks.{}.", *index);
        static const std::pair<std::string_view, std::string_view> names[] = {
            {"img_attn.proj", "attn.to_out.0"},   {"img_mlp.0", "ff.net.0.proj"},
            {"img_mlp.2", "ff.net.2"},            {"img_mod.lin", "norm1.linear"},
            {"txt_attn.proj", "attn.to_add_out"}, {"txt_mlp.0", "ff_context.net.0.proj"},
            {"txt_mlp.2", "ff_context.net.2"},    {"txt_mod.lin", "norm1_context.linear"},
        };
        for (const auto& [bfl, diffusers] : names)
            if (rest == bfl) return std::vector<LoraModule>{renamed(m, d + std::string(diffusers))};
        const std::int64_t third = m.up.ndim() == 2 ? m.up.dim(0) / 3 : 0;
        if (rest == "img_attn.qkv") return split_rows(m, d, {"attn.to_q", "attn.to_k", "attn.to_v"}, {third, third, third});
        if (rest == "txt_attn.qkv")
            return split_rows(m, d, {"attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"}, {third, third, third});
        return std::nullopt;
    }
    if (kind == "single_blocks") {
        const std::string s = fmt::format("single_transformer_blocks.{}.", *index);
        if (rest == "linear2") return std::vector<LoraModule>{renamed(m, s + "proj_out")};
        if (rest == "modulation.lin") return std::vector<LoraModule>{renamed(m, s + "norm.linear")};
        if (rest == "linear1") {
            // linear1 is [q; k; v; mlp] over the hidden size (its input width).
            const std::int64_t h = m.in_features();
            return split_rows(m, s, {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"}, {h, h, h, m.up.dim(0) - 3 * h});
        }
        return std::nullopt;
    }
    return std::nullopt;
}

namespace {

struct Group {
    std::string name;                                // BFL canonical name
    std::vector<std::string> parts;                  // diffusers names, in row order
    std::vector<const LoraModule*> found;            // per part, or null
};

bool same_bytes(const Tensor& a, const Tensor& b) {
    return a.dtype() == b.dtype() && a.shape() == b.shape() &&
           std::equal(a.bytes().begin(), a.bytes().end(), b.bytes().begin());
}

LoraModule join(const Group& g) {
    const LoraModule* first = nullptr;
    for (const auto* m : g.found)
        if (m) {
            first = m;
            break;
        }
    // Row counts of missing parts: q/k/v share one size; proj_mlp is 4x the hidden size.
    std::vector<std::int64_t> rows(g.parts.size(), 0);
    for (std::size_t i = 0; i < g.parts.size(); ++i)
        if (g.found[i]) rows[i] = g.found[i]->out_features();
    const std::int64_t hidden = first->in_features();
    for (std::size_t i = 0; i < g.parts.size(); ++i)
        if (!g.found[i]) rows[i] = g.parts[i].ends_with("proj_mlp") ? 4 * hidden : hidden;
    bool shared = true;
    for (const auto* m : g.found)
        if (!m || !same_bytes(m->down, first->down) || m->scale() != first->scale() || m->scale_rule != first->scale_rule ||
            m->alpha != first->alpha)
            shared = false;
    LoraModule out = *first;
    out.name = g.name;
    out.source_name.clear();
    const DType type = first->up.dtype();
    if (shared) {
        std::vector<std::byte> b;
        for (const auto* m : g.found) b.insert(b.end(), m->up.bytes().begin(), m->up.bytes().end());
        std::int64_t total = 0;
        for (auto r : rows) total += r;
        out.up = Tensor::own(type, {total, first->rank()}, std::move(b));
        return out;
    }
    // Stacked A, block-diagonal B with each part's scale folded in; scale 1.
    std::int64_t rank = 0, total = 0;
    for (std::size_t i = 0; i < g.parts.size(); ++i) {
        rank += g.found[i] ? g.found[i]->rank() : 0;
        total += rows[i];
    }
    const std::int64_t in = hidden;
    std::vector<float> a(static_cast<std::size_t>(rank * in), 0.0f), b(static_cast<std::size_t>(total * rank), 0.0f);
    std::int64_t r0 = 0, o0 = 0;
    for (std::size_t i = 0; i < g.parts.size(); ++i) {
        if (const LoraModule* m = g.found[i]) {
            if (m->in_features() != in) fail(ErrorCode::bad_input, "module {}: input width differs from its group", quote(m->name));
            const auto da = m->down.to_f32(), ub = m->up.to_f32();
            const double s = m->scale();
            std::copy(da.begin(), da.end(), a.begin() + r0 * in);
            for (std::int64_t o = 0; o < rows[i]; ++o)
                for (std::int64_t k = 0; k < m->rank(); ++k)
                    b[static_cast<std::size_t>((o0 + o) * rank + r0 + k)] = static_cast<float>(s * ub[static_cast<std::size_t>(o * m->rank() + k)]);
            r0 += m->rank();
        }
        o0 += rows[i];
    }
    out.down = Tensor::from_f32(first->down.dtype(), {rank, in}, a);
    out.up = Tensor::from_f32(type, {total, rank}, b);
    out.alpha = static_cast<double>(rank);
    out.scale_rule = ScaleRule::alpha_over_rank;
    return out;
}

}  // namespace

std::vector<LoraModule> diffusers_to_bfl_flux(const std::vector<LoraModule>& modules, std::size_t& joined) {
    joined = 0;
    static const std::pair<std::string_view, std::string_view> singles[] = {
        {"x_embedder", "img_in"},
        {"context_embedder", "txt_in"},
        {"time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"},
        {"time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"},
        {"time_text_embed.text_embedder.linear_1", "vector_in.in_layer"},
        {"time_text_embed.text_embedder.linear_2", "vector_in.out_layer"},
        {"time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"},
        {"time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"},
        {"proj_out", "final_layer.linear"},
    };
    static const std::pair<std::string_view, std::string_view> double_names[] = {
        {"attn.to_out.0", "img_attn.proj"},   {"ff.net.0.proj", "img_mlp.0"},
        {"ff.net.2", "img_mlp.2"},            {"norm1.linear", "img_mod.lin"},
        {"attn.to_add_out", "txt_attn.proj"}, {"ff_context.net.0.proj", "txt_mlp.0"},
        {"ff_context.net.2", "txt_mlp.2"},    {"norm1_context.linear", "txt_mod.lin"},
    };
    std::vector<LoraModule> out;
    std::map<std::string, Group> groups;
    std::vector<std::string> group_order;
    auto add_to_group = [&](const std::string& name, std::vector<std::string> parts, const std::string& part, const LoraModule& m) {
        auto [it, fresh] = groups.try_emplace(name);
        if (fresh) {
            it->second.name = name;
            it->second.parts = std::move(parts);
            it->second.found.assign(it->second.parts.size(), nullptr);
            group_order.push_back(name);
        }
        for (std::size_t i = 0; i < it->second.parts.size(); ++i)
            if (it->second.parts[i] == part) it->second.found[i] = &m;
    };
    for (const auto& m : modules) {
        constexpr std::string_view component = "transformer.";
        if (!m.name.starts_with(component)) {
            out.push_back(m);
            continue;
        }
        const std::string path = m.name.substr(component.size());
        bool done = false;
        for (const auto& [diffusers, bfl] : singles)
            if (path == diffusers) {
                out.push_back(renamed(m, std::string(bfl)));
                done = true;
            }
        if (path == "norm_out.linear") {
            LoraModule r = renamed(m, "final_layer.adaLN_modulation.1");
            const std::int64_t rows = m.up.dim(0);
            const Tensor scale = rows_of(m.up, 0, rows / 2), shift = rows_of(m.up, rows / 2, rows / 2);
            std::vector<std::byte> bytes(shift.bytes().begin(), shift.bytes().end());
            bytes.insert(bytes.end(), scale.bytes().begin(), scale.bytes().end());
            r.up = Tensor::own(m.up.dtype(), m.up.shape(), std::move(bytes));
            out.push_back(std::move(r));
            done = true;
        }
        if (done) continue;
        const auto dot1 = path.find('.');
        const auto dot2 = dot1 == std::string::npos ? std::string::npos : path.find('.', dot1 + 1);
        const std::string kind = path.substr(0, dot1);
        const auto index = dot2 == std::string::npos ? std::nullopt : block_index(std::string_view(path).substr(dot1 + 1, dot2 - dot1 - 1));
        if (!index) {
            out.push_back(m);
            continue;
        }
        const std::string rest = path.substr(dot2 + 1);
        if (kind == "transformer_blocks") {
            const std::string d = fmt::format("transformer.double_blocks.{}.", *index);
            for (const auto& [diffusers, bfl] : double_names)
                if (rest == diffusers) {
                    out.push_back(renamed(m, d.substr(12) + std::string(bfl)));
                    done = true;
                }
            if (rest == "attn.to_q" || rest == "attn.to_k" || rest == "attn.to_v") {
                add_to_group(d + "img_attn.qkv", {"attn.to_q", "attn.to_k", "attn.to_v"}, rest, m);
                done = true;
            }
            if (rest == "attn.add_q_proj" || rest == "attn.add_k_proj" || rest == "attn.add_v_proj") {
                add_to_group(d + "txt_attn.qkv", {"attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"}, rest, m);
                done = true;
            }
        } else if (kind == "single_transformer_blocks") {
            const std::string s = fmt::format("transformer.single_blocks.{}.", *index);
            if (rest == "proj_out") {
                out.push_back(renamed(m, s.substr(12) + "linear2"));
                done = true;
            } else if (rest == "norm.linear") {
                out.push_back(renamed(m, s.substr(12) + "modulation.lin"));
                done = true;
            } else if (rest == "attn.to_q" || rest == "attn.to_k" || rest == "attn.to_v" || rest == "proj_mlp") {
                add_to_group(s + "linear1", {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"}, rest, m);
                done = true;
            }
        }
        if (!done) out.push_back(m);
    }
    for (const auto& name : group_order) {
        out.push_back(join(groups.at(name)));
        ++joined;
    }
    return out;
}

}  // namespace lorakit::formats
