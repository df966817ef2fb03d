#include "flux_names.h"

#include <charconv>
#include <cstring>

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
    if (m.bias) fail(ErrorCode::unsupported, "module {}: a LoRA bias on a fused module is not split", quote(m.name));
    if (m.magnitude) fail(ErrorCode::unsupported, "module {}: a DoRA fused module cannot be split exactly", quote(m.name));
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
        if (m.bias) fail(ErrorCode::unsupported, "module {}: a LoRA bias on the final modulation", quote(m.name));
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

}  // namespace lorakit::formats
