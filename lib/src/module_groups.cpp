#include "module_groups.h"

#include <fmt/format.h>

#include "lorakit/error.h"

namespace lorakit::detail {

ModuleGroups group_modules(const std::vector<Adapter>& adapters, const std::vector<double>& weights) {
    ModuleGroups g;
    for (std::size_t i = 0; i < adapters.size(); ++i)
        for (const auto& m : adapters[i].modules) {
            auto& refs = g.by_name[m.name];
            if (refs.empty()) g.order.push_back(m.name);
            refs.push_back({&m, i, weights[i]});
        }
    return g;
}

void check_same_base(const std::vector<ModuleRef>& refs, std::string_view dora_refusal) {
    const LoraModule& first = *refs[0].module;
    for (const auto& ref : refs) {
        const LoraModule& m = *ref.module;
        if (m.out_features() != first.out_features() || m.in_features() != first.in_features() ||
            m.kernel_size() != first.kernel_size() || m.kind != first.kind)
            fail(ErrorCode::bad_input,
                 "input {} has a {} {} -> {} (kernel {}) but input {} a {} {} -> {} (kernel {}): adapters for "
                 "different base models?",
                 ref.adapter + 1, module_kind_name(m.kind), m.in_features(), m.out_features(),
                 format_shape(m.kernel_size()), refs[0].adapter + 1, module_kind_name(first.kind), first.in_features(),
                 first.out_features(), format_shape(first.kernel_size()));
        if (m.fan_in_fan_out != first.fan_in_fan_out) fail(ErrorCode::bad_input, "inputs disagree on fan_in_fan_out");
        if (m.magnitude)
            fail(ErrorCode::unsupported, "input {} is a DoRA module here: {}", ref.adapter + 1, dora_refusal);
    }
}

}  // namespace lorakit::detail
