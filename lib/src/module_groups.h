// Modules of several adapters grouped by canonical name, as merge and stack consume them.
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "lorakit/adapter.h"

namespace lorakit::detail {

struct ModuleRef {
    const LoraModule* module;
    std::size_t adapter;  // index of the adapter it comes from
    double weight;        // that adapter's weight
};

struct ModuleGroups {
    std::vector<std::string> order;  // first appearance, the first adapter's order first
    std::map<std::string, std::vector<ModuleRef>> by_name;
};
ModuleGroups group_modules(const std::vector<Adapter>& adapters, const std::vector<double>& weights);

// Throws bad_input when the modules differ in kind, shape or fan_in_fan_out (adapters for
// different base models), unsupported when one is DoRA, saying `dora_refusal` after the
// adapter number ("... is a DoRA module here: <dora_refusal>").
void check_same_base(const std::vector<ModuleRef>& refs, std::string_view dora_refusal);

}  // namespace lorakit::detail
