#include "lorakit/adapter.h"

#include <algorithm>
#include <cmath>

#include "lorakit/error.h"

namespace lorakit {

std::string_view module_kind_name(ModuleKind kind) noexcept {
    switch (kind) {
    case ModuleKind::linear: return "linear";
    case ModuleKind::conv: return "conv";
    case ModuleKind::embedding: return "embedding";
    }
    return "linear";
}

std::string_view scale_rule_name(ScaleRule rule) noexcept {
    switch (rule) {
    case ScaleRule::alpha_over_rank: return "alpha/r";
    case ScaleRule::alpha_over_sqrt_rank: return "alpha/sqrt(r)";
    case ScaleRule::fixed: return "fixed";
    }
    return "alpha/r";
}

std::int64_t LoraModule::flat_in_features() const {
    std::int64_t columns = 1;
    for (std::size_t i = 1; i < down.ndim(); ++i) columns *= down.dim(i);
    return columns;
}

Shape LoraModule::kernel_size() const {
    if (down.ndim() <= 2) return {};
    return Shape(down.shape().begin() + 2, down.shape().end());
}

double LoraModule::scale() const {
    switch (scale_rule) {
    case ScaleRule::fixed: return fixed_scale;
    case ScaleRule::alpha_over_rank:
        return alpha ? *alpha / static_cast<double>(rank()) : 1.0;
    case ScaleRule::alpha_over_sqrt_rank:
        return alpha ? *alpha / std::sqrt(static_cast<double>(rank())) : 1.0;
    }
    return 1.0;
}

void validate_module(const LoraModule& m) {
    with_context(fmt::format("module {}", quote(m.name)), [&] {
        const auto& a = m.down;
        const auto& b = m.up;
        if (a.ndim() != 2 && a.ndim() != 3 && a.ndim() != 4 && a.ndim() != 5)
            fail(ErrorCode::bad_input, "A (down) must be 2-D, or 3- to 5-D for a convolution, found shape {}",
                 format_shape(a.shape()));
        if (b.ndim() < 2)
            fail(ErrorCode::bad_input, "B (up) must be at least 2-D, found shape {}", format_shape(b.shape()));
        for (std::size_t i = 2; i < b.ndim(); ++i)
            if (b.dim(i) != 1)
                fail(ErrorCode::bad_input, "B (up) of a convolution must have a 1x1 kernel, found shape {}",
                     format_shape(b.shape()));
        if (a.dim(0) != b.dim(1))
            fail(ErrorCode::bad_input, "rank of A ({}, shape {}) differs from rank of B ({}, shape {})", a.dim(0),
                 format_shape(a.shape()), b.dim(1), format_shape(b.shape()));
        if (a.dim(0) == 0) fail(ErrorCode::bad_input, "rank is 0");
        if (a.ndim() > 2 && b.ndim() != a.ndim())
            fail(ErrorCode::bad_input, "A has shape {} but B has shape {}", format_shape(a.shape()),
                 format_shape(b.shape()));
        if (m.kind == ModuleKind::conv && a.ndim() < 3 && b.ndim() < 3)
            fail(ErrorCode::internal, "conv module with 2-D factors");
        if (!is_floating(a.dtype()) || !is_floating(b.dtype()))
            fail(ErrorCode::bad_input, "factors must be floating point, found {} and {}", dtype_name(a.dtype()),
                 dtype_name(b.dtype()));
        if (m.alpha && !std::isfinite(*m.alpha)) fail(ErrorCode::bad_input, "alpha is {}", *m.alpha);
        if (m.scale_rule == ScaleRule::fixed && !std::isfinite(m.fixed_scale))
            fail(ErrorCode::bad_input, "scale is {}", m.fixed_scale);
        if (m.bias) {
            if (m.bias->element_count() != b.dim(0))
                fail(ErrorCode::bad_input, "LoRA bias has shape {}, expected {} values", format_shape(m.bias->shape()),
                     b.dim(0));
        }
    });
}

std::optional<std::pair<std::string, std::string>> saved_parameter(const Adapter& adapter, std::string_view tensor_name) {
    constexpr std::string_view prefix = "base_model.model.";
    if (tensor_name.starts_with(prefix)) tensor_name.remove_prefix(prefix.size());
    const auto dot = tensor_name.rfind('.');
    if (dot == std::string_view::npos || dot == 0) return std::nullopt;
    std::string module(tensor_name.substr(0, dot));
    if (std::find(adapter.modules_to_save.begin(), adapter.modules_to_save.end(), module) == adapter.modules_to_save.end())
        return std::nullopt;
    return std::make_pair(std::move(module), std::string(tensor_name.substr(dot + 1)));
}

}  // namespace lorakit
