// Pieces shared by the key-convention readers: grouping tensors into modules, turning a
// group into a LoraModule (with the structural checks), config JSON parsing, PEFT's pattern
// matching, and the canonical-name helpers.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "lorakit/adapter.h"
#include "lorakit/registry.h"

namespace lorakit::formats {

using OrderedJson = nlohmann::ordered_json;

// What a tensor key contributes to its module.
enum class Role { down, up, alpha, magnitude, lora_bias, mid, lycoris };

// The tensors of one module, collected by key stem.
struct ModuleParts {
    std::string stem;  // the key without its role suffix, as in the file
    const TensorEntry* down = nullptr;
    const TensorEntry* up = nullptr;
    const TensorEntry* alpha = nullptr;
    const TensorEntry* magnitude = nullptr;
    const TensorEntry* bias = nullptr;
    const TensorEntry* mid = nullptr;
    std::vector<std::pair<std::string, const TensorEntry*>> lycoris;  // role -> tensor
    bool embedding = false;  // PEFT lora_embedding_A/B
};

// Groups tensors by stem, keeping the order in which stems first appear.
class ModuleCollector {
public:
    // Records `entry` under `stem` with `role`; a second tensor for the same role of the same
    // module is an error naming both keys.
    void add(const std::string& stem, Role role, const TensorEntry& entry, std::string_view lycoris_role = {});
    ModuleParts& parts(const std::string& stem);
    std::vector<ModuleParts>& all() { return modules_; }
    bool empty() const { return modules_.empty(); }

private:
    std::vector<ModuleParts> modules_;
    std::map<std::string, std::size_t, std::less<>> index_;
};

// Turns parts with both factors into a LoraModule named `name`: kind from the shapes,
// alpha read from a one-element tensor of any dtype. Throws bad_input naming the module
// when a factor is missing, the alpha is not a single value, or a tensor has an unsupported
// dtype. Leaves scale rule, magnitude axis and the other flags at their defaults.
LoraModule assemble_lora_module(const ModuleParts& parts, std::string name);

// Same for LyCORIS parts; the algorithm is named from the roles present.
LycorisModule assemble_lycoris_module(const ModuleParts& parts, std::string name);

// True when the parts hold LyCORIS tensors (or a LoCon Tucker mid) rather than a plain pair.
bool is_lycoris(const ModuleParts& parts);

// The magnitude axis implied by a DoRA magnitude's shape for a module with `out` rows and
// `in` columns ([out], [out,1], [out,1,1,1] -> rows; [1,in], [1,in,1,1] -> columns).
MagnitudeAxis magnitude_axis_for(const Shape& shape, std::int64_t out, std::int64_t in);

// Parses a config file's JSON (keeping key order); bad_input with the parser's message.
OrderedJson parse_config_json(const SidecarConfig& config);
OrderedJson parse_json_text(std::string_view text, std::string_view what);

// PEFT's rank_pattern / alpha_pattern lookup (get_pattern_key, PEFT >= 0.15): the first key,
// in the file's order, for which `(.*\.)?(KEY)$` matches the whole module name (Python
// re.match semantics). Returns the matched pattern key.
std::optional<std::string> match_peft_pattern(const OrderedJson& patterns, std::string_view module_name);
// target_modules: a list matches a name equal to an entry or ending in "." + entry; a string
// is a regular expression that must match the whole name; "all-linear" matches everything.
bool matches_peft_targets(const OrderedJson& targets, std::string_view module_name);

// kohya-style flattened names ("down_blocks_0_attentions_0_to_out_0") back to dotted module
// paths ("down_blocks.0.attentions.0.to_out.0"), using the vocabulary of identifiers that
// contain underscores in the models LoRAs target (UNets, CLIP, T5, Flux, SD3, LLMs).
std::string unflatten_module_path(std::string_view flat);

// The component a bare module path belongs to ("transformer" for DiT block names,
// "unet" for UNet block names, "text_encoder" for CLIP text_model paths), or "".
std::string_view infer_component(std::string_view path);

// A key split into its module stem and the role of its tensor.
struct KeyRole {
    std::string stem;
    Role role;
    bool embedding = false;
};
// PEFT-style suffixes (also used by current diffusers files): .lora_A.weight, .lora_B.weight,
// .lora_B.bias, .lora_embedding_A/B, .lora_magnitude_vector[.weight], and the raw in-memory
// spelling with the adapter name (.lora_A.default.weight) that some trainers save.
std::optional<KeyRole> classify_peft_key(std::string_view key);

// The sidecar config of `input` when `is_mine` accepts it, else an empty object;
// `owned` says which.
OrderedJson owned_config(const AdapterInput& input, bool (*is_mine)(const OrderedJson&), bool& owned);

// Reads a JSON number (or a numeric string) as double.
std::optional<double> json_number(const OrderedJson& value);

}  // namespace lorakit::formats
