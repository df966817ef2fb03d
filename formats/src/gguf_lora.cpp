// llama.cpp GGUF LoRA adapters, as convert_lora_to_gguf.py writes them and llama.cpp loads them
// (research/formats.md §5.3-5.7):
//   KV general.architecture, general.type = "adapter", adapter.type = "lora",
//      adapter.lora.alpha (FLOAT32; absent or 0 means no alpha: scale 1)
//   tensors <gguf base name>.lora_a (NumPy [r, in]) and .lora_b ([out, r]); token_embd's
//      lora_a is Aᵀ ([vocab, r]); *_norm.weight tensors passed through whole.
// The scale llama.cpp applies is alpha / rank with one alpha per file and the rank of each
// tensor. For arch "llama" the q and k LoRAs have llama.cpp's rotary row order on lora_b: undoing
// it (and writing it) needs the head counts, which the adapter does not record.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "conventions.h"
#include "lorakit/error.h"
#include "lorakit/formats/gguf.h"
#include "lorakit/names.h"
#include "made_ahead.h"
#include "writers.h"

namespace lorakit::formats {

namespace {

// Hugging Face module path <-> llama.cpp tensor base name, for the Llama family (llama,
// mistral, qwen2, qwen3, gemma...: tensor_mapping.py's common names).
struct NamePair {
    std::string_view hf;    // after "model.layers.N."
    std::string_view gguf;  // after "blk.N."
};
constexpr NamePair layer_names[] = {
    {"self_attn.q_proj", "attn_q"},        {"self_attn.k_proj", "attn_k"},   {"self_attn.v_proj", "attn_v"},
    {"self_attn.o_proj", "attn_output"},   {"mlp.gate_proj", "ffn_gate"},    {"mlp.up_proj", "ffn_up"},
    {"mlp.down_proj", "ffn_down"},         {"input_layernorm", "attn_norm"}, {"post_attention_layernorm", "ffn_norm"},
    {"self_attn.q_norm", "attn_q_norm"},   {"self_attn.k_norm", "attn_k_norm"},
};
constexpr NamePair global_names[] = {
    {"model.embed_tokens", "token_embd"},
    {"model.norm", "output_norm"},
    {"lm_head", "output"},
};

// One direction of the name map: `forward` is Hugging Face -> GGUF.
std::optional<std::string> map_name(std::string_view name, bool forward) {
    for (const auto& p : global_names)
        if (name == (forward ? p.hf : p.gguf)) return std::string(forward ? p.gguf : p.hf);
    const std::string_view from = forward ? "model.layers." : "blk.", to = forward ? "blk." : "model.layers.";
    if (!name.starts_with(from)) return std::nullopt;
    const auto rest = name.substr(from.size());
    const auto dot = rest.find('.');
    if (dot == std::string_view::npos || dot == 0) return std::nullopt;
    const auto index = rest.substr(0, dot);
    for (char c : index)
        if (c < '0' || c > '9') return std::nullopt;
    for (const auto& p : layer_names)
        if (rest.substr(dot + 1) == (forward ? p.hf : p.gguf))
            return fmt::format("{}{}.{}", to, index, forward ? p.gguf : p.hf);
    return std::nullopt;
}

bool is_q_or_k(std::string_view gguf_base) {
    return gguf_base.ends_with(".attn_q") || gguf_base.ends_with(".attn_k");
}

std::int64_t heads_for(std::string_view gguf_base, const ModelHints& hints) {
    const bool k = gguf_base.ends_with(".attn_k");
    const std::int64_t heads = k ? hints.head_count_kv.value_or(*hints.head_count) : *hints.head_count;
    return heads;
}

// q and k share one head size (rows / heads): head counts that give them different ones do not
// belong to this model (a wrong --head-count, or a config.json of another model), and permuting
// with them would scramble the rows silently.
class HeadSizeCheck {
public:
    void check(std::string_view module, std::int64_t rows, std::int64_t heads, const ModelHints& hints) {
        if (heads <= 0 || rows % heads != 0) return;  // rotary_rows names that problem
        const std::int64_t size = rows / heads;
        if (!size_) {
            size_ = size;
            first_ = fmt::format("{} has {} rows for {} heads", quote(module), rows, heads);
            return;
        }
        if (size != *size_)
            fail(ErrorCode::usage,
                 "the head counts ({} heads, {} KV heads) do not fit this adapter: {} (head size {}), but {} has {} rows "
                 "for {} heads (head size {}); give the base model's --head-count and --head-count-kv",
                 *hints.head_count, hints.head_count_kv.value_or(*hints.head_count), first_, *size_, quote(module), rows,
                 heads, size);
    }

private:
    std::optional<std::int64_t> size_;
    std::string first_;
};

// Rows of B ([out, r]) between Hugging Face order and llama.cpp's rotary order:
// gguf row h·hd + 2j + s  <->  hf row h·hd + s·hd/2 + j.
Tensor permute_rows(const Tensor& b, std::int64_t heads, bool to_gguf, std::string_view name) {
    const std::int64_t out = b.dim(0), r = b.dim(1);
    const auto rows = with_context(fmt::format("module {}", quote(name)), [&] { return rotary_rows(out, heads); });
    const std::size_t row_bytes = static_cast<std::size_t>(r) * dtype_size(b.dtype());
    std::vector<std::byte> result(b.bytes().size());
    const std::byte* src = b.bytes().data();
    for (std::int64_t hf_row = 0; hf_row < out; ++hf_row) {
        const std::int64_t gguf_row = rows[static_cast<std::size_t>(hf_row)];
        const std::int64_t from = to_gguf ? hf_row : gguf_row, to = to_gguf ? gguf_row : hf_row;
        std::memcpy(result.data() + static_cast<std::size_t>(to) * row_bytes, src + static_cast<std::size_t>(from) * row_bytes,
                    row_bytes);
    }
    return Tensor::own(b.dtype(), b.shape(), std::move(result));
}

}  // namespace

std::optional<std::string> hf_to_gguf(std::string_view hf) { return map_name(hf, true); }
std::optional<std::string> gguf_to_hf(std::string_view gguf) { return map_name(gguf, false); }
bool permutes_qk(std::string_view arch) { return arch == "llama"; }

std::vector<std::int64_t> rotary_rows(std::int64_t out, std::int64_t heads) {
    if (heads <= 0 || out % heads != 0 || (out / heads) % 2 != 0)
        fail(ErrorCode::bad_input, "{} output rows do not split into {} heads of even size", out, heads);
    const std::int64_t hd = out / heads;
    std::vector<std::int64_t> rows(static_cast<std::size_t>(out));
    for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t j = 0; j < hd / 2; ++j)
            for (std::int64_t s = 0; s < 2; ++s) rows[static_cast<std::size_t>(h * hd + s * (hd / 2) + j)] = h * hd + 2 * j + s;
    return rows;
}

namespace {

std::string base_family(std::string_view arch) {
    if (arch == "llama") return "Llama";
    if (arch == "qwen2" || arch == "qwen3" || arch == "qwen2moe" || arch == "qwen3moe") return "Qwen";
    if (arch.starts_with("gemma")) return "Gemma";
    if (arch == "phi3") return "Phi";
    return std::string(arch);
}

class GgufLoraDriver final : public ConventionDriver {
public:
    std::string_view name() const override { return "gguf"; }
    std::string_view description() const override { return "llama.cpp GGUF LoRA adapter"; }

    Detection detect(const AdapterInput& input) const override {
        const auto* file = dynamic_cast<const GgufFile*>(&input.tensors);
        if (!file) return {};
        const auto* type = file->find_kv("general.type");
        const auto* adapter_type = file->find_kv("adapter.type");
        if (!type || type->as_string() != "adapter") return {};
        if (!adapter_type || adapter_type->as_string() != "lora") {
            fail(ErrorCode::unsupported, "a GGUF adapter of type {}, not a LoRA",
                 quote(adapter_type ? adapter_type->to_text() : "(none)"));
        }
        return {100, "general.type = adapter, adapter.type = lora"};
    }

    Adapter read(const AdapterInput& input) const override {
        const auto& file = dynamic_cast<const GgufFile&>(input.tensors);
        Adapter a;
        const auto* arch_value = file.find_kv("general.architecture");
        const std::string arch = arch_value && arch_value->as_string() ? *arch_value->as_string() : "";
        if (arch.empty()) a.warnings.push_back("no general.architecture: llama.cpp refuses to load this adapter");
        const auto* alpha_value = file.find_kv("adapter.lora.alpha");
        std::optional<double> alpha;
        if (alpha_value) {
            if (alpha_value->type != GgufType::f32)
                a.warnings.push_back(fmt::format("adapter.lora.alpha is {}, but llama.cpp reads it only as FLOAT32",
                                                 gguf_type_name(alpha_value->type)));
            if (auto v = alpha_value->as_number(); v && *v != 0) alpha = *v;
        }
        // Head counts: given by the caller, else recorded in the file (ollama writes them).
        ModelHints hints = input.hints;
        if (!hints.head_count)
            if (const auto* v = file.find_kv(arch + ".attention.head_count"); v && v->as_number() && *v->as_number() > 0) {
                hints.head_count = static_cast<std::int64_t>(*v->as_number());
                if (const auto* kv = file.find_kv(arch + ".attention.head_count_kv"); kv && kv->as_number() && *kv->as_number() > 0)
                    hints.head_count_kv = static_cast<std::int64_t>(*kv->as_number());
            }
        const bool permuted = permutes_qk(arch);
        const bool can_unpermute = permuted && hints.head_count.has_value();
        HeadSizeCheck head_sizes;
        // Names: Hugging Face paths where the map knows them, unless q/k rows would stay in
        // llama.cpp's order (then every module keeps its llama.cpp name, so nothing mixes).
        bool has_qk = false;
        for (const auto& e : file.entries()) has_qk |= is_q_or_k(e.name.substr(0, e.name.rfind(".weight")));
        const bool hf_names = !(permuted && has_qk && !can_unpermute);
        if (!hf_names)
            a.notes.push_back(
                "q/k LoRAs of a llama-architecture GGUF hold llama.cpp's rotary row order; give the head counts "
                "(--head-count, --head-count-kv) to convert them to Hugging Face order and names");

        for (std::size_t i = 0; i < file.entries().size(); ++i) {
            const TensorEntry& e = file.entries()[i];
            std::string_view n = e.name;
            const bool is_a = n.ends_with(".weight.lora_a"), is_b = n.ends_with(".weight.lora_b");
            if (!is_a && !is_b) {
                if (n.ends_with("_norm.weight")) {
                    a.other_tensors.push_back({e.name, input.tensors.tensor(e.name)});
                    continue;
                }
                a.warnings.push_back(fmt::format("tensor {} is neither .lora_a nor .lora_b: llama.cpp refuses it", quote(e.name)));
                a.other_tensors.push_back({e.name, input.tensors.tensor(e.name)});
                continue;
            }
            if (!is_a) continue;  // handled with its A
            const std::string base(n.substr(0, n.size() - std::string_view(".weight.lora_a").size()));
            const std::string b_name = base + ".weight.lora_b";
            const TensorEntry* b_entry = file.find(b_name);
            if (!b_entry) fail(ErrorCode::bad_input, "module {}: {} has no {}", quote(base), quote(e.name), quote(b_name));
            LoraModule m;
            m.source_name = base;
            const auto hf = gguf_to_hf(base);
            m.name = hf_names && hf ? *hf : base;
            Tensor down = input.tensors.tensor(e.name), up = input.tensors.tensor(b_name);
            if (down.ndim() != 2 || up.ndim() != 2)
                fail(ErrorCode::bad_input, "module {}: LoRA tensors must be 2-D", quote(base));
            if (base == "token_embd") {
                m.kind = ModuleKind::embedding;
                down = down.transposed_2d();  // stored [vocab, r]
            }
            if (permuted && is_q_or_k(base) && can_unpermute) {
                head_sizes.check(base, up.dim(0), heads_for(base, hints), hints);
                up = permute_rows(up, heads_for(base, hints), false, base);
            }
            m.down = std::move(down);
            m.up = std::move(up);
            m.alpha = alpha;
            m.alpha_dtype = DType::F32;
            m.scale_rule = ScaleRule::alpha_over_rank;
            a.modules.push_back(std::move(m));
        }
        for (const auto& e : file.entries())
            if (e.name.ends_with(".weight.lora_b") &&
                !file.find(e.name.substr(0, e.name.size() - 1) + "a"))
                fail(ErrorCode::bad_input, "{} has no matching lora_a", quote(e.name));
        a.base_model.family = arch.empty() ? "" : base_family(arch);
        if (!arch.empty()) a.base_model.evidence = "GGUF general.architecture = " + arch;
        if (const auto* name = file.find_kv("general.name"); name && name->as_string()) a.base_model.name = *name->as_string();
        a.metadata = file.metadata();
        a.metadata.erase("tokenizer.ggml.tokens");
        return a;
    }

    void write(const Adapter& adapter, const std::filesystem::path& target, const WriteOptions& options,
               std::vector<std::string>& notes) const override;
};

std::uint32_t ggml_type_for(const std::string& requested, DType factor) {
    if (requested == "q8_0") return ggml_q8_0;
    if (requested == "f32") return ggml_f32;
    if (requested == "f16") return ggml_f16;
    if (requested == "bf16") return ggml_bf16;
    if (!requested.empty()) fail(ErrorCode::usage, "GGUF tensor type {} is not one of f32, f16, bf16, q8_0", quote(requested));
    if (factor == DType::F16) return ggml_f16;
    if (factor == DType::BF16) return ggml_bf16;
    return ggml_f32;
}

std::string arch_for(const Adapter& adapter, const ModelHints& hints) {
    if (!hints.arch.empty()) return hints.arch;
    if (adapter.convention == "gguf") {
        if (auto it = adapter.metadata.find("general.architecture"); it != adapter.metadata.end()) return it->second;
    }
    const std::string& family = adapter.base_model.family;
    const std::string& name = adapter.base_model.name;
    std::string lowered = name;
    for (char& c : lowered) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    auto has = [&](std::string_view what) { return lowered.find(what) != std::string::npos; };
    if (family == "Llama" || family == "Mistral" || family == "Llama-family") {
        if (family == "Llama-family" && name.empty()) return "";
        return "llama";
    }
    if (family == "Qwen") return has("qwen3") ? "qwen3" : "qwen2";
    if (family == "Gemma") return has("gemma-3") || has("gemma3") ? "gemma3" : has("gemma-2") || has("gemma2") ? "gemma2" : "gemma";
    return "";
}

void GgufLoraDriver::write(const Adapter& a, const std::filesystem::path& target, const WriteOptions& options,
                           std::vector<std::string>& notes) const {
    refuse_lycoris(a, "gguf");
    refuse_bias(a, "gguf");
    std::vector<std::string> refused;
    for (const auto& t : a.other_tensors)
        if (!t.name.ends_with("_norm.weight") && !hf_to_gguf(t.name.substr(0, t.name.rfind(".weight"))))
            refused.push_back(t.name);
    if (!refused.empty())
        fail_lossy(Loss::other_tensors, refused,
                   "{} tensor(s) that are not LoRA factors ({}, ...): llama.cpp adapters hold only LoRAs and norms",
                   refused.size(), quote(refused.front()));
    const std::string arch = arch_for(a, options.hints);
    // Head counts: given, else those a GGUF source recorded.
    ModelHints hints = options.hints;
    if (!hints.head_count && a.convention == "gguf") {
        auto number = [&](const std::string& key) -> std::optional<std::int64_t> {
            const auto it = a.metadata.find(key);
            if (it == a.metadata.end()) return std::nullopt;
            try {
                const long long v = std::stoll(it->second);
                if (v > 0) return v;
            } catch (const std::exception&) {
            }
            return std::nullopt;
        };
        hints.head_count = number(arch + ".attention.head_count");
        if (hints.head_count) hints.head_count_kv = number(arch + ".attention.head_count_kv");
    }
    if (arch.empty())
        fail(ErrorCode::usage, "the base architecture is not known (base model {}); give --arch (llama, qwen2, qwen3, gemma, ...)",
             quote(a.base_model.family));
    const bool from_gguf_order = a.convention == "gguf";
    // One alpha for the file: the first module's alpha-equivalent; other scales folded into B.
    std::optional<double> alpha;
    if (!a.modules.empty()) {
        const LoraModule& first = a.modules.front();
        alpha = first.scale() * static_cast<double>(first.rank());
    }
    std::size_t folded = 0, permuted = 0, fallback = 0;
    HeadSizeCheck head_sizes;
    // Each tensor is produced when its turn comes in the file (write_gguf_streamed): unchanged
    // factors go straight from the input (file to file where it is mapped), the rest are folded,
    // permuted, transposed or encoded one at a time, so memory stays at the largest tensor.
    struct Pending {
        Tensor source;
        double factor = 1.0;     // scale folded into the values (1: none)
        std::int64_t heads = 0;  // q/k rows to llama.cpp's rotary order (0: none)
        bool transpose = false;  // embedding lora_a: [in, r] -> [r, in]
        std::string module;
    };
    std::vector<GgufTensorToWrite> tensors;
    std::vector<Pending> pending;
    auto add = [&](std::string name, Pending p, std::uint32_t type) {
        GgufTensorToWrite t;
        t.name = std::move(name);
        t.type = type;
        t.shape = p.source.shape();
        if (p.transpose) std::reverse(t.shape.begin(), t.shape.end());
        // The checks gguf_tensor makes when the data is encoded, made here before the header is out.
        if (type != ggml_f32 && type != ggml_f16 && type != ggml_bf16 && type != ggml_q8_0)
            fail(ErrorCode::unsupported, "writing ggml type {} is not supported", type);
        if (type == ggml_q8_0 && (t.shape.empty() || t.shape.back() % 32))
            fail(ErrorCode::unsupported, "tensor {}: Q8_0 needs rows of a multiple of 32 elements", quote(t.name));
        const GgmlTypeInfo info = *ggml_type_info(type);
        t.streamed_size = static_cast<std::uint64_t>(p.source.element_count()) / info.block_elements * info.block_bytes;
        tensors.push_back(std::move(t));
        pending.push_back(std::move(p));
    };
    for (const auto& m : a.modules) {
        if (m.magnitude) fail_lossy(Loss::dora_magnitudes, {}, "module {} is DoRA; llama.cpp has no DoRA adapters", quote(m.name));
        if (m.kind == ModuleKind::conv) fail(ErrorCode::unsupported, "module {} is a convolution", quote(m.name));
        if (m.fan_in_fan_out)
            fail(ErrorCode::unsupported, "module {} is a Conv1D (fan_in_fan_out) LoRA, which this converter does not map",
                 quote(m.name));
        std::string base;
        if (from_gguf_order && !m.source_name.empty()) base = m.source_name;
        else if (auto g = hf_to_gguf(m.name)) base = *g;
        else if (m.name.starts_with("blk.") || m.name == "token_embd" || m.name == "output") base = m.name;
        else
            fail(ErrorCode::unsupported, "module {} has no llama.cpp tensor name (known: the Llama-family layer paths)",
                 quote(m.name));
        // llama.cpp applies alpha / rank, or 1 when alpha is 0.
        const double wanted = m.scale(), applied = *alpha != 0 ? *alpha / static_cast<double>(m.rank()) : 1.0;
        Pending up{m.up, 1.0, 0, false, m.name};
        if (std::abs(wanted - applied) > 1e-12 * std::abs(wanted)) {
            up.factor = wanted / applied;
            ++folded;
        }
        // Rows already in llama.cpp order stay; Hugging Face ones are permuted for "llama".
        const bool hf_order = !(from_gguf_order && m.name == base);
        if (permutes_qk(arch) && is_q_or_k(base) && hf_order) {
            if (!hints.head_count)
                fail(ErrorCode::usage,
                     "writing q/k LoRAs for arch llama needs the attention head counts (--head-count, --head-count-kv): "
                     "llama.cpp permutes their rows");
            head_sizes.check(m.name, m.up.dim(0), heads_for(base, hints), hints);
            up.heads = heads_for(base, hints);
            ++permuted;
        }
        Pending down{m.down, 1.0, 0, m.kind == ModuleKind::embedding, m.name};
        for (auto [suffix, p] : {std::pair{".weight.lora_a", &down}, std::pair{".weight.lora_b", &up}}) {
            std::uint32_t type = ggml_type_for(options.tensor_type, p->source.dtype());
            const std::int64_t last = p->transpose ? p->source.dim(0) : p->source.shape().back();
            if (type == ggml_q8_0 && last % 32 != 0) {
                type = ggml_f16;  // as gguf-py does (QuantError -> F16)
                ++fallback;
            }
            add(base + suffix, std::move(*p), type);
        }
    }
    for (const auto& t : a.other_tensors) {
        std::string name = t.name;
        if (auto g = hf_to_gguf(t.name.substr(0, t.name.rfind(".weight")))) name = *g + ".weight";
        add(std::move(name), Pending{t.tensor, 1.0, 0, false, t.name}, ggml_f32);
    }
    // A tensor that needs work is made on a helper thread while the ones before it are written,
    // so the folding and permuting overlap the kernel's copying.
    auto direct = [&](std::size_t i) {
        const Pending& p = pending[i];
        const std::uint32_t type = tensors[i].type;
        const DType want = type == ggml_f16 ? DType::F16 : type == ggml_bf16 ? DType::BF16 : DType::F32;
        return p.factor == 1.0 && p.heads == 0 && !p.transpose && type != ggml_q8_0 && p.source.dtype() == want;
    };
    struct Made {
        Tensor values;          // keeps the bytes `encoded` may view
        GgufTensorToWrite encoded;
    };
    auto make = [&](std::size_t i) {
        const Pending& p = pending[i];
        Made made{p.source, {}};
        if (p.factor != 1.0)
            made.values = with_context(fmt::format("tensor {}", quote(tensors[i].name)), [&] { return scaled(made.values, p.factor); });
        if (p.heads) made.values = permute_rows(made.values, p.heads, true, p.module);
        if (p.transpose) made.values = made.values.transposed_2d();
        made.encoded = gguf_tensor(tensors[i].name, made.values.view(), tensors[i].type);
        return made;
    };
    MadeAhead<Made> made(pending.size(), [&](std::size_t i) { return !direct(i); }, make);
    auto produce = [&](std::size_t i, AtomicFile& out) {
        if (direct(i)) out.write(pending[i].source.bytes());
        else out.write(made.take(i).encoded.bytes());
    };
    std::vector<std::pair<std::string, GgufValue>> kv{
        {"general.architecture", GgufValue::string(arch)},
        {"general.type", GgufValue::string("adapter")},
        {"adapter.type", GgufValue::string("lora")},
    };
    if (!a.base_model.name.empty()) kv.emplace_back("general.name", GgufValue::string(a.base_model.name));
    kv.emplace_back("adapter.lora.alpha", GgufValue::f32(static_cast<float>(alpha.value_or(0.0))));
    // llama_ftype of the factors: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q8_0 7, MOSTLY_BF16 32.
    std::uint32_t file_type = 0;
    for (const auto& t : tensors) {
        if (t.type == ggml_q8_0) file_type = 7;
        else if (file_type != 7 && t.type == ggml_bf16) file_type = 32;
        else if (file_type == 0 && t.type == ggml_f16) file_type = 1;
    }
    kv.emplace_back("general.file_type", GgufValue::u32(file_type));
    if (hints.head_count) {
        kv.emplace_back(arch + ".attention.head_count", GgufValue::u32(static_cast<std::uint32_t>(*hints.head_count)));
        kv.emplace_back(arch + ".attention.head_count_kv",
                        GgufValue::u32(static_cast<std::uint32_t>(hints.head_count_kv.value_or(*hints.head_count))));
    }
    kv.emplace_back("general.quantization_version", GgufValue::u32(2));
    if (alpha && static_cast<double>(static_cast<float>(*alpha)) != *alpha)
        notes.push_back(fmt::format("alpha {} rounded to FLOAT32 {}", *alpha, static_cast<float>(*alpha)));
    if (folded)
        notes.push_back(fmt::format("{} module(s) have a scale other than alpha/rank with alpha {}: folded into lora_b",
                                    folded, alpha.value_or(0.0)));
    if (permuted) notes.push_back(fmt::format("{} q/k lora_b tensor(s) permuted to llama.cpp's rotary row order", permuted));
    if (fallback) notes.push_back(fmt::format("{} tensor(s) have rows not a multiple of 32: written F16, not Q8_0", fallback));
    with_context(quote(target.string()), [&] {
        AtomicFile out(target, options.overwrite);
        write_gguf_streamed(out, kv, tensors, produce);
        out.commit();
    });
}

}  // namespace

std::unique_ptr<ConventionDriver> make_gguf_lora_driver() { return std::make_unique<GgufLoraDriver>(); }

}  // namespace lorakit::formats
