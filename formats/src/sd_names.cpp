#include "sd_names.h"

#include <charconv>
#include <vector>

#include <fmt/format.h>

namespace lorakit::formats {

namespace {

constexpr int layers_per_block = 2;

std::vector<std::string_view> split(std::string_view s) {
    std::vector<std::string_view> parts;
    while (true) {
        const auto dot = s.find('.');
        parts.push_back(s.substr(0, dot));
        if (dot == std::string_view::npos) return parts;
        s.remove_prefix(dot + 1);
    }
}

std::optional<int> number(std::string_view s) {
    int v = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || end != s.data() + s.size() || v < 0) return std::nullopt;
    return v;
}

std::string join(const std::vector<std::string_view>& parts, std::size_t from) {
    std::string out;
    for (std::size_t i = from; i < parts.size(); ++i) {
        if (!out.empty()) out += '.';
        out += parts[i];
    }
    return out;
}

// Inside a ResBlock: in_layers.0/2, out_layers.0/3, emb_layers.1, skip_connection.
std::string resnet_child(const std::string& rest) {
    static const std::pair<std::string_view, std::string_view> names[] = {
        {"in_layers.0", "norm1"},   {"in_layers.2", "conv1"},        {"out_layers.0", "norm2"},
        {"out_layers.3", "conv2"},  {"emb_layers.1", "time_emb_proj"}, {"skip_connection", "conv_shortcut"},
    };
    for (const auto& [sgm, diffusers] : names)
        if (rest == sgm || rest.starts_with(std::string(sgm) + ".")) return std::string(diffusers) + rest.substr(sgm.size());
    return rest;
}

std::string with_rest(std::string head, const std::string& rest) { return rest.empty() ? head : head + "." + rest; }

std::string resnet_child_to_sgm(const std::string& rest) {
    static const std::pair<std::string_view, std::string_view> names[] = {
        {"norm1", "in_layers.0"},   {"conv1", "in_layers.2"},        {"norm2", "out_layers.0"},
        {"conv2", "out_layers.3"},  {"time_emb_proj", "emb_layers.1"}, {"conv_shortcut", "skip_connection"},
    };
    for (const auto& [diffusers, sgm] : names)
        if (rest == diffusers || rest.starts_with(std::string(diffusers) + "."))
            return std::string(sgm) + rest.substr(diffusers.size());
    return rest;
}

}  // namespace

std::optional<std::string> sgm_to_diffusers_unet(std::string_view path) {
    const auto p = split(path);
    if (p.empty()) return std::nullopt;
    const std::string rest2 = p.size() > 2 ? join(p, 2) : std::string();
    if (p[0] == "time_embed" && p.size() >= 2) {
        if (p[1] == "0") return with_rest("time_embedding.linear_1", join(p, 2));
        if (p[1] == "2") return with_rest("time_embedding.linear_2", join(p, 2));
        return std::nullopt;
    }
    if (p[0] == "label_emb" && p.size() >= 3 && p[1] == "0") {
        if (p[2] == "0") return with_rest("add_embedding.linear_1", join(p, 3));
        if (p[2] == "2") return with_rest("add_embedding.linear_2", join(p, 3));
        return std::nullopt;
    }
    if (p[0] == "out" && p.size() >= 2) {
        if (p[1] == "0") return with_rest("conv_norm_out", join(p, 2));
        if (p[1] == "2") return with_rest("conv_out", join(p, 2));
        return std::nullopt;
    }
    if (p.size() < 3) return std::nullopt;
    const auto i = number(p[1]), j = number(p[2]);
    if (p[0] == "middle_block" && i) {
        if (*i == 0) return with_rest("mid_block.resnets.0", resnet_child(join(p, 2)));
        if (*i == 1) return with_rest("mid_block.attentions.0", join(p, 2));
        if (*i == 2) return with_rest("mid_block.resnets.1", resnet_child(join(p, 2)));
        return std::nullopt;
    }
    if (!i || !j) return std::nullopt;
    const std::string rest = join(p, 3);
    constexpr int per = layers_per_block + 1;
    if (p[0] == "input_blocks") {
        if (*i == 0) return *j == 0 ? std::optional(with_rest("conv_in", rest)) : std::nullopt;
        const int block = (*i - 1) / per, layer = (*i - 1) % per;
        if (*j == 0 && (rest == "op" || rest.starts_with("op.")))
            return with_rest(fmt::format("down_blocks.{}.downsamplers.0.conv", block), rest.substr(2 + (rest.size() > 2)));
        if (*j == 0) return with_rest(fmt::format("down_blocks.{}.resnets.{}", block, layer), resnet_child(rest));
        if (*j == 1) return with_rest(fmt::format("down_blocks.{}.attentions.{}", block, layer), rest);
        return std::nullopt;
    }
    if (p[0] == "output_blocks") {
        const int block = *i / per, layer = *i % per;
        if (*j == 0) return with_rest(fmt::format("up_blocks.{}.resnets.{}", block, layer), resnet_child(rest));
        // An Upsample's only child with weights is its conv; a SpatialTransformer has none such.
        if (rest == "conv" || rest.starts_with("conv."))
            return with_rest(fmt::format("up_blocks.{}.upsamplers.0.conv", block), rest.substr(4 + (rest.size() > 4)));
        if (*j == 1) return with_rest(fmt::format("up_blocks.{}.attentions.{}", block, layer), rest);
        return std::nullopt;
    }
    return std::nullopt;
}

std::optional<std::string> diffusers_to_sgm_unet_sdxl(std::string_view path) {
    const auto p = split(path);
    auto tail = [&](std::size_t from) { return p.size() > from ? join(p, from) : std::string(); };
    static const std::pair<std::string_view, std::string_view> singles[] = {
        {"conv_in", "input_blocks.0.0"},           {"time_embedding.linear_1", "time_embed.0"},
        {"time_embedding.linear_2", "time_embed.2"}, {"add_embedding.linear_1", "label_emb.0.0"},
        {"add_embedding.linear_2", "label_emb.0.2"}, {"conv_out", "out.2"},
        {"conv_norm_out", "out.0"},
    };
    for (const auto& [diffusers, sgm] : singles)
        if (path == diffusers || path.starts_with(std::string(diffusers) + "."))
            return std::string(sgm) + std::string(path.substr(diffusers.size()));
    constexpr int per = layers_per_block + 1;
    if (p.size() >= 3 && p[0] == "mid_block") {
        const auto l = p.size() >= 3 ? number(p[2]) : std::nullopt;
        if (p[1] == "resnets" && l && *l <= 1) return with_rest(*l == 0 ? "middle_block.0" : "middle_block.2", resnet_child_to_sgm(tail(3)));
        if (p[1] == "attentions" && l && *l == 0) return with_rest("middle_block.1", tail(3));
        return std::nullopt;
    }
    if (p.size() < 4 || (p[0] != "down_blocks" && p[0] != "up_blocks")) return std::nullopt;
    const auto b = number(p[1]), l = number(p[3]);
    if (!b || !l) return std::nullopt;
    const bool down = p[0] == "down_blocks";
    if (p[2] == "resnets" && *l < per)
        return with_rest(fmt::format("{}.{}.0", down ? "input_blocks" : "output_blocks", down ? *b * per + *l + 1 : *b * per + *l),
                         resnet_child_to_sgm(tail(4)));
    if (p[2] == "attentions" && *l < per)
        return with_rest(fmt::format("{}.{}.1", down ? "input_blocks" : "output_blocks", down ? *b * per + *l + 1 : *b * per + *l),
                         tail(4));
    if (down && p[2] == "downsamplers" && *l == 0 && p.size() >= 5 && p[4] == "conv")
        return with_rest(fmt::format("input_blocks.{}.0.op", *b * per + per), tail(5));
    if (!down && p[2] == "upsamplers" && *l == 0 && p.size() >= 5 && p[4] == "conv")
        return with_rest(fmt::format("output_blocks.{}.2.conv", *b * per + per - 1), tail(5));
    return std::nullopt;
}

}  // namespace lorakit::formats
