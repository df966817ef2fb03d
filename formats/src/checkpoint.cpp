// Base model checkpoints: the layouts lorakit opens and where each adapter module lands in them.
//
// Containers: one safetensors / GGUF / PyTorch file; a Hugging Face sharded checkpoint
// (model.safetensors.index.json: "weight_map" tensor -> shard file); a diffusers folder
// (model_index.json, one folder per component, each a file or a sharded index).
//
// Module paths (canonical, docs/conventions.md) to tensors:
//   Hugging Face transformers     "<path>.weight", also without the first path component or
//                                 with "model." in front (GPT-2's h.N, bare LlamaModel files)
//   diffusers folder              component folder = first component, "<rest>.weight"
//   SD1.x / SDXL single file      unet -> model.diffusion_model.<SGM path> (the checkpoint's own
//                                 keys mapped to diffusers names, so SD1.x and SDXL both work);
//                                 text_encoder -> cond_stage_model.transformer.* (SD1.x) or
//                                 conditioner.embedders.0.transformer.* (SDXL); text_encoder_2
//                                 -> conditioner.embedders.1.model.* (OpenCLIP: q/k/v are row
//                                 thirds of attn.in_proj_weight, out_proj, mlp.c_fc, mlp.c_proj)
//   Flux BFL file                 BFL paths as they are ("double_blocks.0.img_attn.qkv.weight",
//                                 optionally under model.diffusion_model.); diffusers-named
//                                 modules go to their rows of the fused qkv / linear1
//   GGUF model                    llama.cpp names (blk.N.attn_q.weight ...), q/k rows in llama.cpp's
//                                 rotary order for arch llama (head counts from the file);
//                                 token_embd holds the embedding as [vocab, dim]
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "conventions.h"
#include "flux_names.h"
#include "lorakit/checkpoint.h"
#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/formats/gguf.h"
#include "lorakit/formats/safetensors.h"
#include "lorakit/atomic_file.h"
#include "lorakit/names.h"
#include "made_ahead.h"
#include "sd_names.h"

namespace lorakit::formats {

namespace fs = std::filesystem;

namespace {

// The changed tensors of a checkpoint write, produced one ahead of the writer on a helper thread
// (MadeAhead, depth 1), so that one tensor's product overlaps the previous one's write instead of
// following it; at most two output buffers, recycled (fresh pages are slow to touch). Items are
// positions in the order the writer asks for them; needs(k) says whether item k is produced
// ahead (take() makes any other item on the caller's thread).
class ProducedAhead {
public:
    ProducedAhead(std::size_t count, const std::function<bool(std::size_t)>& needs,
                  std::function<void(std::size_t, std::vector<std::byte>&)> produce)
        : produce_(std::move(produce)), made_(count, needs, [this](std::size_t k) { return make(k); }, 1) {}

    // Item k's bytes; give them back with recycle() once written.
    std::vector<std::byte> take(std::size_t k) { return made_.take(k); }
    void recycle(std::vector<std::byte>&& bytes) {
        std::lock_guard lock(mutex_);
        if (free_.size() < 2) free_.push_back(std::move(bytes));
    }

private:
    std::vector<std::byte> make(std::size_t k) {
        std::vector<std::byte> bytes;
        {
            std::lock_guard lock(mutex_);
            if (!free_.empty()) {
                bytes = std::move(free_.back());
                free_.pop_back();
            }
        }
        produce_(k, bytes);
        return bytes;
    }

    std::function<void(std::size_t, std::vector<std::byte>&)> produce_;
    std::mutex mutex_;
    std::vector<std::vector<std::byte>> free_;
    MadeAhead<std::vector<std::byte>> made_;  // last: its helper stops before the members above go
};

struct Found {
    std::size_t file;
    const TensorEntry* entry;
};

// Tensors llama.cpp's converter writes in F32 whatever --outtype says (convert_hf_to_gguf.py,
// prepare_tensors): 1-D tensors, norms, and a few kinds ggml's kernels read as F32 only.
bool gguf_keeps_f32(std::string_view name, std::size_t dims) {
    if (dims <= 1 || name.ends_with("_norm.weight")) return true;
    for (std::string_view kind : {"ffn_gate_inp.", "position_embd.", "token_types.", "ssm_conv1d."})
        if (name.find(kind) != std::string_view::npos) return true;
    return false;
}

class FileCheckpoint final : public Checkpoint {
public:
    FileCheckpoint(std::string name, std::string layout, std::vector<std::unique_ptr<TensorFile>> files,
                   std::vector<std::string> components)
        : name_(std::move(name)), layout_(std::move(layout)), files_(std::move(files)), components_(std::move(components)) {
        for (std::size_t f = 0; f < files_.size(); ++f)
            for (const auto& e : files_[f]->entries()) {
                const std::string key = components_[f].empty() ? e.name : components_[f] + "/" + e.name;
                if (!index_.emplace(key, Found{f, &e}).second)
                    fail(ErrorCode::bad_input, "tensor {} is in more than one file of the checkpoint", quote(e.name));
            }
        classify();
    }

    const std::string& name() const override { return name_; }
    std::string_view layout() const override { return layout_; }
    const std::vector<std::unique_ptr<TensorFile>>& files() const override { return files_; }

    std::optional<WeightLocation> locate(const LoraModule& module) const override {
        auto where = find(module);
        if (where) check_shape(*where, module);
        return where;
    }

    void write(const fs::path& target, const TensorSource& source, const CheckpointWriteOptions& options,
               Progress& progress) const override;

    std::optional<WeightLocation> locate_parameter(const std::string& module, std::string_view param,
                                                   const Shape& shape) const override {
        if (param != "weight" && param != "bias") return std::nullopt;
        const std::int64_t count = checked_element_count(shape);
        const std::int64_t out = shape.empty() ? 1 : shape[0];
        if (out <= 0 || count % out) return std::nullopt;
        // A probe with the parameter's rows: where its module's weight is, then the parameter.
        LoraModule probe;
        probe.name = module;
        probe.up = Tensor::from_f32(DType::F32, {out, 1}, std::vector<float>(static_cast<std::size_t>(out), 0.0f));
        probe.down = Tensor::from_f32(DType::F32, {1, 1}, std::vector<float>{0.0f});
        auto where = find(probe);
        if (!where) return std::nullopt;
        where->transposed = false;
        if (param == "bias") {
            std::string key = where->entry->name;
            if (key.ends_with("in_proj_weight")) key = key.substr(0, key.size() - 6) + "bias";
            else if (key.ends_with(".weight")) key = key.substr(0, key.size() - 7) + ".bias";
            else return std::nullopt;
            where->entry = files_[where->file]->find(key);
            if (!where->entry) return std::nullopt;
        }
        const Shape& s = where->entry->shape;
        const bool fits = where->rows.empty()
                              ? s == shape
                              : !s.empty() && static_cast<std::int64_t>(where->rows.size()) == out &&
                                    checked_element_count(s) / s[0] == count / out &&
                                    std::all_of(where->rows.begin(), where->rows.end(), [&](std::int64_t r) { return r >= 0 && r < s[0]; });
        if (!fits)
            fail(ErrorCode::bad_input, "{} of module {} has shape {}, but base tensor {} has shape {}", param, quote(module),
                 format_shape(shape), quote(where->describe()), format_shape(s));
        return where;
    }

    std::optional<std::pair<std::string, std::string>> parameter_at(std::size_t file, const TensorEntry& e) const override {
        std::string stem, param;
        if (e.name.ends_with(".weight")) stem = e.name.substr(0, e.name.size() - 7), param = "weight";
        else if (e.name.ends_with(".bias")) stem = e.name.substr(0, e.name.size() - 5), param = "bias";
        else return std::nullopt;
        const auto names = names_at(file, stem + ".weight");
        if (names.size() != 1 || names.front().parts != 1) return std::nullopt;
        try {
            const auto where = locate_parameter(names.front().name, param, e.shape);
            if (!where || where->entry != &e || !where->rows.empty()) return std::nullopt;
        } catch (const Error&) {
            return std::nullopt;
        }
        return std::make_pair(names.front().name, param);
    }

    std::vector<LoraModule> modules_at(std::size_t file, const TensorEntry& e) const override {
        std::vector<LoraModule> found;
        const Shape& s = e.shape;
        if (s.size() != 2 && s.size() != 4) return found;
        for (const auto& [name, part, parts] : names_at(file, e.name)) {
            LoraModule m;
            m.name = name;
            std::int64_t out = s[0], in = s[1];
            Shape kernel;
            if (s.size() == 4) {
                m.kind = ModuleKind::conv;
                kernel = {s[2], s[3]};
            } else if (is_embedding(name)) {
                m.kind = ModuleKind::embedding;  // stored [num_embeddings, dim]: in = num_embeddings
                std::swap(out, in);
            } else if (!sd_ && is_conv1d(name)) {
                m.fan_in_fan_out = true;  // GPT-2 Conv1D stores [in, out]
                std::swap(out, in);
            }
            if (parts > 1) {
                if (out % parts != 0) continue;
                out /= parts;
            }
            Shape down{1, in}, up{out, 1};
            if (m.kind == ModuleKind::conv) down = {1, in, kernel[0], kernel[1]}, up = {out, 1, 1, 1};
            m.down = Tensor::zeros(DType::F32, down);
            m.up = Tensor::zeros(DType::F32, up);
            // Only what locate() maps back to this very tensor (and, for a part, to its rows).
            const auto where = find(m);
            if (!where || where->file != file || where->entry != &e) continue;
            if (parts > 1 && (where->rows.empty() || where->rows.front() != part * out)) continue;
            found.push_back(std::move(m));
        }
        return found;
    }

    BaseModelHint model_hint() const override { return hint_; }
    void write_gguf_model(const fs::path& target, const TensorSource& source, const CheckpointWriteOptions& options,
                          Progress& progress) const;
    void set_hint(BaseModelHint hint) { hint_ = std::move(hint); }

private:
    struct Candidate {
        std::string name;
        std::int64_t part = 0, parts = 1;  // row block `part` of `parts` equal blocks
    };
    // Canonical module names tensor `key` may hold (checked against find() by the caller).
    std::vector<Candidate> names_at(std::size_t file, const std::string& key) const {
        std::vector<Candidate> c;
        std::string stem = key;
        if (stem.ends_with(".weight")) stem.resize(stem.size() - 7);
        else if (!(sd_ && stem.ends_with(".attn.in_proj_weight"))) return c;
        if (gguf_) {
            if (auto hf = gguf_to_hf(stem)) c.push_back({*hf});
            return c;
        }
        if (layout_ == "diffusers") {
            if (!components_[file].empty()) c.push_back({components_[file] + "." + stem});
            return c;
        }
        if (flux_ && stem.starts_with(flux_prefix_)) {
            c.push_back({"transformer." + stem.substr(flux_prefix_.size())});
            return c;
        }
        if (sd_) {
            const std::string unet = "model.diffusion_model.";
            if (stem.starts_with(unet)) {
                if (auto d = sgm_to_diffusers_unet(stem.substr(unet.size()))) c.push_back({"unet." + *d});
                return c;
            }
            for (const std::string te : {"cond_stage_model.transformer.", "conditioner.embedders.0.transformer."})
                if (stem.starts_with(te)) {
                    c.push_back({"text_encoder." + stem.substr(te.size())});
                    return c;
                }
            const std::string clip = "conditioner.embedders.1.model.transformer.resblocks.";
            if (stem.starts_with(clip)) {
                const auto dot = stem.find('.', clip.size());
                if (dot == std::string::npos) return c;
                const std::string layer = "text_encoder_2.text_model.encoder.layers." + stem.substr(clip.size(), dot - clip.size()) + ".";
                const std::string tail = stem.substr(dot + 1);
                if (tail == "attn.in_proj_weight")
                    for (std::int64_t part = 0; part < 3; ++part)
                        c.push_back({layer + (part == 0 ? "self_attn.q_proj" : part == 1 ? "self_attn.k_proj" : "self_attn.v_proj"), part, 3});
                else if (tail == "attn.out_proj") c.push_back({layer + "self_attn.out_proj"});
                else if (tail == "mlp.c_fc") c.push_back({layer + "mlp.fc1"});
                else if (tail == "mlp.c_proj") c.push_back({layer + "mlp.fc2"});
            }
            return c;
        }
        c.push_back({stem});
        return c;
    }

    static std::string_view last_component(std::string_view name) {
        const auto dot = name.rfind('.');
        return dot == std::string_view::npos ? name : name.substr(dot + 1);
    }
    static bool is_embedding(std::string_view name) {
        static const std::string_view names[] = {"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
                                                 "token_type_embeddings", "token_embedding", "position_embedding",
                                                 "embed_positions", "embed_in", "shared"};
        const auto last = last_component(name);
        return std::find(std::begin(names), std::end(names), last) != std::end(names);
    }
    static bool is_conv1d(std::string_view name) {
        for (std::string_view tail : {".attn.c_attn", ".attn.c_proj", ".mlp.c_fc", ".mlp.c_proj", ".attn.q_attn"})
            if (name.ends_with(tail) && (name.find("h.") == 0 || name.find(".h.") != std::string_view::npos)) return true;
        return false;
    }

    const Found* key(const std::string& k) const {
        auto it = index_.find(k);
        return it == index_.end() ? nullptr : &it->second;
    }
    std::optional<WeightLocation> at(const std::string& k, std::vector<std::int64_t> rows = {}, bool transposed = false) const {
        const Found* f = key(k);
        if (!f) return std::nullopt;
        WeightLocation w;
        w.file = f->file;
        w.entry = f->entry;
        w.rows = std::move(rows);
        w.transposed = transposed;
        return w;
    }

    void classify() {
        for (const auto& [k, f] : index_) {
            (void)f;
            if (k.starts_with("model.diffusion_model.double_blocks.")) flux_prefix_ = "model.diffusion_model.", flux_ = true;
            else if (k.starts_with("double_blocks.")) flux_ = true;
            else if (k.starts_with("model.diffusion_model.")) sd_ = true;
            if (k.starts_with("conditioner.embedders.")) sdxl_ = true;
        }
        if (files_.size() == 1)
            if (const auto* g = dynamic_cast<const GgufFile*>(files_[0].get())) {
                gguf_ = true;
                if (const auto* v = g->find_kv("general.architecture"); v && v->as_string()) arch_ = *v->as_string();
                auto number = [&](const std::string& k) -> std::int64_t {
                    const auto* v = g->find_kv(k);
                    return v && v->as_number() ? static_cast<std::int64_t>(*v->as_number()) : 0;
                };
                heads_ = number(arch_ + ".attention.head_count");
                heads_kv_ = number(arch_ + ".attention.head_count_kv");
                if (heads_kv_ == 0) heads_kv_ = heads_;
            }
        hint_.evidence = "checkpoint keys";
        if (flux_) hint_.family = "Flux";
        else if (sd_) hint_.family = sdxl_ ? "SDXL" : "SD1.5";
        else if (gguf_) hint_.family = arch_;
        else if (layout_ == "diffusers") {
            const auto has = [&](std::string_view component) {
                return std::find(components_.begin(), components_.end(), component) != components_.end();
            };
            hint_.family = has("transformer") ? "Flux" : has("text_encoder_2") ? "SDXL" : has("unet") ? "SD1.5" : "diffusers";
        } else hint_.family = "transformers";
        if (sd_ && !flux_) {
            // The checkpoint's own UNet keys, by diffusers path: SD1.x and SDXL alike.
            const std::string prefix = "model.diffusion_model.";
            for (const auto& [k, f] : index_) {
                (void)f;
                if (!k.starts_with(prefix) || !k.ends_with(".weight")) continue;
                const std::string path = k.substr(prefix.size(), k.size() - prefix.size() - 7);
                if (auto d = sgm_to_diffusers_unet(path)) unet_map_.emplace(*d, k);
            }
        }
        if (flux_) {
            // Diffusers Flux names -> rows of the fused BFL tensors: split a probe module whose B
            // holds its own row numbers and read them back from each part.
            for (const auto& [k, f] : index_) {
                if (!k.starts_with(flux_prefix_) || !k.ends_with(".weight") || f.entry->shape.size() != 2) continue;
                const std::string path = k.substr(flux_prefix_.size(), k.size() - flux_prefix_.size() - 7);
                const std::int64_t out = f.entry->shape[0], in = f.entry->shape[1];
                LoraModule probe;
                probe.name = "transformer." + path;
                std::vector<float> rows(static_cast<std::size_t>(out));
                for (std::int64_t r = 0; r < out; ++r) rows[static_cast<std::size_t>(r)] = static_cast<float>(r);
                probe.up = Tensor::from_f32(DType::F32, {out, 1}, rows);
                probe.down = Tensor::from_f32(DType::F32, {1, in}, std::vector<float>(static_cast<std::size_t>(in), 0.0f));
                std::optional<std::vector<LoraModule>> parts;
                try {
                    parts = bfl_to_diffusers_flux(probe);
                } catch (const Error&) {
                    continue;
                }
                if (!parts) continue;
                for (const auto& part : *parts) {
                    const auto values = part.up.to_f32();
                    std::vector<std::int64_t> part_rows(values.begin(), values.end());
                    flux_map_.emplace(part.name, std::make_pair(k, std::move(part_rows)));
                }
            }
        }
    }

    std::optional<WeightLocation> find(const LoraModule& m) const {
        const std::string& n = m.name;
        const bool embedding = m.kind == ModuleKind::embedding;
        if (gguf_) {
            auto g = hf_to_gguf(n);
            if (!g) return std::nullopt;
            std::vector<std::int64_t> rows;
            if (permutes_qk(arch_) && (g->ends_with(".attn_q") || g->ends_with(".attn_k"))) {
                const std::int64_t heads = g->ends_with(".attn_k") ? heads_kv_ : heads_;
                if (heads <= 0)
                    fail(ErrorCode::bad_input, "the GGUF model records no {}.attention.head_count for its q/k rows", arch_);
                rows = with_context(fmt::format("module {}", quote(n)), [&] { return rotary_rows(m.out_features(), heads); });
            }
            return at(*g + ".weight", std::move(rows), embedding);
        }
        if (layout_ == "diffusers") {
            const auto dot = n.find('.');
            if (dot == std::string::npos) return std::nullopt;
            return at(n.substr(0, dot) + "/" + n.substr(dot + 1) + ".weight", {}, embedding);
        }
        const auto dot = n.find('.');
        const std::string component = dot == std::string::npos ? n : n.substr(0, dot);
        const std::string rest = dot == std::string::npos ? std::string() : n.substr(dot + 1);
        if (flux_ && component == "transformer") {
            if (auto w = at(flux_prefix_ + rest + ".weight")) return w;
            if (auto it = flux_map_.find(n); it != flux_map_.end()) return at(it->second.first, it->second.second);
            return std::nullopt;
        }
        if (sd_) {
            if (component == "unet") {
                if (auto w = at("model.diffusion_model." + rest + ".weight")) return w;  // SGM path already
                if (auto it = unet_map_.find(rest); it != unet_map_.end()) return at(it->second);
                return std::nullopt;
            }
            if (component == "text_encoder")
                return at((sdxl_ ? "conditioner.embedders.0.transformer." : "cond_stage_model.transformer.") + rest + ".weight",
                          {}, embedding);
            if (component == "text_encoder_2") return open_clip(rest, m);
        }
        // Hugging Face transformers (and single diffusers component files).
        for (const std::string& candidate : {n, rest, "model." + n, "model." + rest})
            if (!candidate.empty())
                if (auto w = at(candidate + ".weight", {}, embedding || m.fan_in_fan_out)) return w;
        return std::nullopt;
    }

    // SDXL's second text encoder is stored in OpenCLIP's layout.
    std::optional<WeightLocation> open_clip(const std::string& rest, const LoraModule& m) const {
        const std::string layers = "text_model.encoder.layers.";
        if (!rest.starts_with(layers)) return std::nullopt;
        const auto dot = rest.find('.', layers.size());
        if (dot == std::string::npos) return std::nullopt;
        const std::string index = rest.substr(layers.size(), dot - layers.size());
        const std::string tail = rest.substr(dot + 1);
        const std::string block = "conditioner.embedders.1.model.transformer.resblocks." + index + ".";
        static const std::pair<std::string_view, std::string_view> plain[] = {
            {"self_attn.out_proj", "attn.out_proj.weight"}, {"mlp.fc1", "mlp.c_fc.weight"}, {"mlp.fc2", "mlp.c_proj.weight"}};
        for (const auto& [hf, clip] : plain)
            if (tail == hf) return at(block + std::string(clip));
        static const std::string_view qkv[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"};
        for (std::int64_t part = 0; part < 3; ++part)
            if (tail == qkv[part]) {
                const std::int64_t d = m.out_features();
                std::vector<std::int64_t> rows(static_cast<std::size_t>(d));
                for (std::int64_t r = 0; r < d; ++r) rows[static_cast<std::size_t>(r)] = part * d + r;
                return at(block + "attn.in_proj_weight", std::move(rows));
            }
        return std::nullopt;
    }

    void check_shape(const WeightLocation& w, const LoraModule& m) const {
        const Shape& s = w.entry->shape;
        std::int64_t count = 1;
        for (auto d : s) count *= d;
        const std::int64_t out = m.out_features(), in = m.flat_in_features();
        std::int64_t rows = s.empty() ? 0 : (w.transposed ? (s.size() == 2 ? s[1] : 0) : s[0]);
        const bool fits = rows > 0 && count % rows == 0 && count / rows == in &&
                          (w.rows.empty() ? rows == out : static_cast<std::int64_t>(w.rows.size()) == out);
        bool in_range = true;
        for (auto r : w.rows) in_range &= r >= 0 && r < rows;
        if (!fits || !in_range)
            fail(ErrorCode::bad_input, "module {} ({} -> {}{}) does not fit base tensor {} of shape {}", quote(m.name), in,
                 out, m.kind == ModuleKind::conv ? " flattened" : "", quote(w.describe()), format_shape(s));
    }

    std::string name_, layout_;
    std::vector<std::unique_ptr<TensorFile>> files_;
    std::vector<std::string> components_;  // per file: the diffusers component, or ""
    std::map<std::string, Found, std::less<>> index_;
    bool sd_ = false, sdxl_ = false, flux_ = false, gguf_ = false;
    std::string flux_prefix_;
    std::string arch_;
    std::int64_t heads_ = 0, heads_kv_ = 0;
    std::map<std::string, std::string> unet_map_;
    std::map<std::string, std::pair<std::string, std::vector<std::int64_t>>> flux_map_;
    BaseModelHint hint_;
};

struct Planned {
    std::size_t file;
    const TensorEntry* entry;
    std::optional<DType> type;  // nullopt: copied as is
    std::uint64_t size;
};


// A GGUF model: the same key-value pairs and tensor order; untouched tensors copied as stored
// (any ggml type), changed ones encoded in the dtype the source asks for, and Q8_0 tensors
// requantized to Q8_0 when the source keeps dtypes (the blocks' f16 scales recomputed).
void FileCheckpoint::write_gguf_model(const fs::path& target, const TensorSource& source,
                                      const CheckpointWriteOptions& options, Progress& progress) const {
    if (options.shard_size > 0)
        fail(ErrorCode::usage, "a GGUF model is written as one file; --shard-size is for safetensors checkpoints");
    const auto& g = static_cast<const GgufFile&>(*files_[0]);
    const std::string& want = options.gguf_type;
    if (!want.empty() && want != "f32" && want != "f16" && want != "bf16" && want != "q8_0")
        fail(ErrorCode::usage, "GGUF output type {} (f32, f16, bf16 or q8_0)", quote(want));
    std::vector<GgufTensorToWrite> infos;
    std::vector<std::optional<DType>> produced;
    std::uint64_t total = 0;
    for (std::size_t i = 0; i < g.entries().size(); ++i) {
        const TensorEntry& e = g.entries()[i];
        const std::uint32_t stored = g.ggml_type(i);
        GgufTensorToWrite t;
        t.name = e.name;
        t.shape = e.shape;
        std::optional<DType> type = source.output_dtype(0, e);
        const std::uint64_t elements = static_cast<std::uint64_t>(checked_element_count(e.shape));
        // The ggml type written, and whether the source's values are needed (else: copied).
        std::uint32_t ggml = stored;
        bool values = type.has_value();
        const bool floating = stored == ggml_f32 || stored == ggml_f16 || stored == ggml_bf16 || stored == ggml_q8_0;
        if (!want.empty() && floating) {
            if (gguf_keeps_f32(e.name, e.shape.size())) ggml = ggml_f32;
            else if (want == "q8_0") ggml = e.shape.empty() || e.shape.back() % 32 ? ggml_f16 : ggml_q8_0;
            else ggml = want == "f32" ? ggml_f32 : want == "f16" ? ggml_f16 : ggml_bf16;
            values = values || ggml != stored;
        } else if (type) {
            if (stored == ggml_q8_0 && options.keep_quantized) ggml = ggml_q8_0;
            else if (*type == DType::F32 || *type == DType::F16 || *type == DType::BF16)
                ggml = *type == DType::F32 ? ggml_f32 : *type == DType::F16 ? ggml_f16 : ggml_bf16;
            else fail(ErrorCode::unsupported, "tensor {}: GGUF output takes F32, F16, BF16 or Q8_0", quote(e.name));
        }
        t.type = ggml;
        if (!values) {
            t.streamed_size = g.raw(i).size();
            type.reset();
        } else if (ggml == ggml_q8_0) {
            t.streamed_size = elements / 32 * 34;
            type = DType::F32;  // produced in f32, then quantized
        } else {
            type = ggml == ggml_f32 ? DType::F32 : ggml == ggml_f16 ? DType::F16 : DType::BF16;
            t.streamed_size = elements * dtype_size(*type);
        }
        total += t.size();
        infos.push_back(std::move(t));
        produced.push_back(type);
    }
    // llama.cpp's general.file_type (llama_ftype) names the type most tensors have.
    auto kv = g.kv();
    if (!want.empty()) {
        const std::uint32_t file_type = want == "f32" ? 0 : want == "f16" ? 1 : want == "q8_0" ? 7 : 32;
        auto it = std::find_if(kv.begin(), kv.end(), [](const auto& p) { return p.first == "general.file_type"; });
        if (it != kv.end()) it->second = GgufValue::u32(file_type);
        else kv.emplace_back("general.file_type", GgufValue::u32(file_type));
    }
    progress.begin("bake", infos.size(), total);
    std::uint64_t items = 0, bytes_done = 0;
    with_context(quote(target.string()), [&] {
        AtomicFile out(target, options.overwrite);
        ProducedAhead ahead(
            infos.size(), [&](std::size_t i) { return options.produce_ahead && produced[i].has_value(); },
            [&](std::size_t i, std::vector<std::byte>& bytes) {
                const TensorEntry& e = g.entries()[i];
                with_context(fmt::format("tensor {}", quote(e.name)), [&] { source.produce(0, e, *produced[i], bytes); });
            });
        write_gguf_streamed(out, kv, infos, [&](std::size_t i, AtomicFile& file) {
            const TensorEntry& e = g.entries()[i];
            if (!produced[i]) {
                file.write(g.raw(i));
            } else {
                std::vector<std::byte> buffer = ahead.take(i);
                if (infos[i].type == ggml_q8_0)
                    file.write(quantize_q8_0(reinterpret_cast<const float*>(buffer.data()), buffer.size() / sizeof(float)));
                else
                    file.write(buffer);
                ahead.recycle(std::move(buffer));
            }
            g.release(e);
            progress.advance(++items, bytes_done += infos[i].size());
        });
        out.commit();
    });
    progress.end();
}

std::optional<fs::path> single_weights_in(const fs::path& dir);

// A diffusers folder's files besides the weights lorakit writes (model_index.json, configs,
// tokenizer and scheduler files), copied into `out` at the same relative paths. Other weight
// files (fp16 variants, .bin twins) are left out: they would hold the weights before the bake,
// and loaders may prefer them. Hidden entries (.git, .cache) are left out too.
void copy_around_weights(const fs::path& folder, AtomicDirectory& out, const std::vector<std::string>& written,
                         const std::map<std::string, std::vector<std::size_t>>& indexes) {
    const std::set<std::string> skip(written.begin(), written.end());
    static constexpr std::string_view weight_suffixes[] = {".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf",
                                                           ".msgpack", ".h5", ".onnx", ".onnx_data", ".index.json"};
    auto it = fs::recursive_directory_iterator(folder, fs::directory_options::follow_directory_symlink);
    for (; it != fs::recursive_directory_iterator(); ++it) {
        const std::string leaf = it->path().filename().string();
        if (leaf.starts_with(".")) {
            if (it->is_directory()) it.disable_recursion_pending();
            continue;
        }
        if (!it->is_regular_file()) continue;
        const std::string rel = it->path().lexically_relative(folder).generic_string();
        if (skip.count(rel) || indexes.count(rel)) continue;
        if (std::any_of(std::begin(weight_suffixes), std::end(weight_suffixes), [&](std::string_view s) { return leaf.ends_with(s); }))
            continue;
        AtomicFile& copy = out.add(rel);
        const auto source = MappedFile::open(it->path());
        copy.write(source->bytes());
        copy.commit();
    }
}

void FileCheckpoint::write(const fs::path& target, const TensorSource& source, const CheckpointWriteOptions& options,
                           Progress& progress) const {
    if (gguf_) {
        write_gguf_model(target, source, options, progress);
        return;
    }
    for (const auto& f : files_)
        if (f->format_name() != "safetensors")
            fail(ErrorCode::unsupported, "writing a {} checkpoint is not implemented yet (safetensors files and sharded "
                 "safetensors checkpoints are)", f->format_name());
    const bool diffusers = layout_ == "diffusers";
    if (diffusers && options.shard_size > 0)
        fail(ErrorCode::usage, "a diffusers folder keeps its components' files; --shard-size is for transformers checkpoints");
    // A model folder (config.json, tokenizer, weights) given as the base is written back as a
    // folder with the same files, unless the output is named *.safetensors (then the weights only).
    std::error_code ec;
    const bool folder = !diffusers && fs::is_directory(name_, ec) &&
                        (files_.size() > 1 || options.shard_size > 0 ||
                         (target != "-" && !target.filename().string().ends_with(".safetensors")));
    if (diffusers || folder) {
        // The folder is copied around its weights: an output inside it would copy itself.
        std::error_code ec;
        const auto inside = fs::weakly_canonical(target, ec).lexically_relative(fs::weakly_canonical(name_, ec));
        if (!inside.empty() && *inside.begin() != "..")
            fail(ErrorCode::usage, "the output {} lies inside the {} folder {}", quote(target.string()),
                 diffusers ? "diffusers" : "model", quote(name_));
    }
    // The plan: every tensor's output dtype and size, before anything is written.
    std::vector<Planned> plan;
    std::uint64_t total = 0;
    for (std::size_t f = 0; f < files_.size(); ++f)
        for (const auto& e : files_[f]->entries()) {
            Planned p{f, &e, source.output_dtype(f, e), 0};
            if (!e.supported())
                fail(ErrorCode::unsupported, "tensor {} has dtype {}, which lorakit cannot copy", quote(e.name), e.dtype_name);
            p.size = p.type ? checked_byte_count(e.shape, *p.type) : e.tensor.bytes().size();
            total += p.size;
            plan.push_back(p);
        }
    // Output files: one, the input's shards, or new shards of at most shard_size bytes.
    std::vector<std::vector<std::size_t>> groups;
    std::vector<std::string> names;  // relative to the output directory
    const bool sharded = options.shard_size > 0 || files_.size() > 1 || diffusers || folder;
    if (options.shard_size > 0) {
        std::uint64_t used = 0;
        for (std::size_t i = 0; i < plan.size(); ++i) {
            if (groups.empty() || (used + plan[i].size > options.shard_size && used > 0)) {
                groups.emplace_back();
                used = 0;
            }
            groups.back().push_back(i);
            used += plan[i].size;
        }
        for (std::size_t g = 0; g < groups.size(); ++g)
            names.push_back(fmt::format("model-{:05d}-of-{:05d}.safetensors", g + 1, groups.size()));
    } else {
        groups.resize(files_.size());
        for (std::size_t i = 0; i < plan.size(); ++i) groups[plan[i].file].push_back(i);
        for (const auto& f : files_)
            names.push_back(diffusers ? fs::path(f->name()).lexically_relative(name_).generic_string()
                                      : fs::path(f->name()).filename().string());
    }
    progress.begin("bake", plan.size(), total);
    std::uint64_t items = 0, bytes_done = 0;
    auto write_file = [&](AtomicFile& out, const std::vector<std::size_t>& group, const std::map<std::string, std::string>& metadata) {
        std::vector<formats::SafetensorsRecord> records;
        for (auto i : group) {
            const Planned& p = plan[i];
            records.push_back({p.entry->name, p.type.value_or(p.entry->tensor.dtype()), p.entry->shape, p.size, i});
        }
        // The records are written in the group's order: position k is plan item group[k].
        ProducedAhead ahead(
            group.size(), [&](std::size_t k) { return options.produce_ahead && plan[group[k]].type.has_value(); },
            [&](std::size_t k, std::vector<std::byte>& bytes) {
                const Planned& p = plan[group[k]];
                with_context(fmt::format("tensor {}", quote(p.entry->name)), [&] { source.produce(p.file, *p.entry, *p.type, bytes); });
            });
        std::size_t position = 0;
        write_safetensors_streamed(out, std::move(records), metadata, [&](std::size_t i, AtomicFile& file) {
            const Planned& p = plan[i];
            const std::size_t k = position++;
            if (group[k] != i) fail(ErrorCode::internal, "tensor {} written out of order", quote(p.entry->name));
            if (p.type) {
                std::vector<std::byte> buffer = ahead.take(k);
                file.write(buffer);
                ahead.recycle(std::move(buffer));
            } else {
                file.write(p.entry->tensor.bytes());
            }
            files_[p.file]->release(*p.entry);  // streamed: the resident set stays one tensor deep
            progress.advance(++items, bytes_done += p.size);
        });
    };
    if (!sharded) {
        with_context(quote(target.string()), [&] {
            AtomicFile out(target, options.overwrite);
            write_file(out, groups[0], files_[0]->metadata());
            out.commit();
        });
    } else {
        with_context(quote(target.string()), [&] {
            AtomicDirectory dir(target, options.overwrite);
            // Index files to write: path relative to the output -> the groups its shards hold.
            std::map<std::string, std::vector<std::size_t>> indexes;
            if (diffusers) {
                for (std::size_t g = 0; g < groups.size(); ++g) {
                    const fs::path component = name_ / fs::path(names[g]).parent_path();
                    const auto weights = single_weights_in(component);
                    if (weights && weights->string().ends_with(".index.json"))
                        indexes[weights->lexically_relative(name_).generic_string()].push_back(g);
                }
                copy_around_weights(name_, dir, names, indexes);
            } else {
                // An index where the weights are (or become) shards: the input's own index name.
                if (options.shard_size > 0 || files_.size() > 1) {
                    std::string index = "model.safetensors.index.json";
                    const fs::path given = name_;
                    if (given.string().ends_with(".index.json")) index = given.filename().string();
                    else if (const auto weights = fs::is_directory(given, ec) ? single_weights_in(given) : std::nullopt;
                             weights && weights->string().ends_with(".index.json"))
                        index = weights->filename().string();
                    for (std::size_t g = 0; g < groups.size(); ++g) indexes[index].push_back(g);
                }
                if (folder) copy_around_weights(name_, dir, names, indexes);
            }
            for (std::size_t g = 0; g < groups.size(); ++g) {
                AtomicFile& out = dir.add(names[g]);
                const auto& metadata = options.shard_size > 0 ? files_[0]->metadata() : files_[g]->metadata();
                write_file(out, groups[g], metadata);
                out.commit();
            }
            for (const auto& [index_name, shards] : indexes) {
                std::map<std::string, std::string> sorted;
                std::uint64_t size = 0;
                for (auto g : shards)
                    for (auto i : groups[g]) {
                        sorted[plan[i].entry->name] = fs::path(names[g]).filename().string();
                        size += plan[i].size;
                    }
                nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
                for (const auto& [name, file] : sorted) weight_map[name] = file;
                nlohmann::ordered_json index;
                index["metadata"] = {{"total_size", size}};
                index["weight_map"] = weight_map;
                AtomicFile& out = dir.add(index_name);
                out.write(index.dump(2) + "\n");
                out.commit();
            }
            dir.commit();
        });
    }
    progress.end();
}

// The shard files of a Hugging Face index, in first-appearance order.
std::vector<fs::path> shards_of(const fs::path& index) {
    std::vector<fs::path> shards;
    for (const auto& name : parse_shard_index(read_text_file(index), index.string())) shards.push_back(index.parent_path() / name);
    return shards;
}

std::optional<fs::path> single_weights_in(const fs::path& dir) {
    std::vector<fs::path> candidates;
    for (const auto& e : fs::directory_iterator(dir)) {
        const auto name = e.path().filename().string();
        if (name.ends_with(".safetensors.index.json")) return e.path();
        if (e.is_regular_file() && (name.ends_with(".safetensors") || name.ends_with(".gguf") || name.ends_with(".bin")))
            candidates.push_back(e.path());
    }
    std::sort(candidates.begin(), candidates.end());
    for (const char* preferred : {"model.safetensors", "diffusion_pytorch_model.safetensors"})
        for (const auto& c : candidates)
            if (c.filename() == preferred) return c;
    if (candidates.size() == 1) return candidates.front();
    return std::nullopt;
}

void open_into(const Registry& registry, const fs::path& path, const std::string& component,
               std::vector<std::unique_ptr<TensorFile>>& files, std::vector<std::string>& components) {
    if (path.string().ends_with(".index.json")) {
        for (const auto& shard : shards_of(path)) {
            files.push_back(registry.open_tensor_file(shard));
            components.push_back(component);
        }
        return;
    }
    files.push_back(registry.open_tensor_file(path));
    components.push_back(component);
}

std::unique_ptr<Checkpoint> open_checkpoint(const Registry& registry, const fs::path& path) {
    std::vector<std::unique_ptr<TensorFile>> files;
    std::vector<std::string> components;
    std::error_code ec;
    std::string layout;
    if (fs::is_directory(path, ec)) {
        if (fs::exists(path / "model_index.json")) {
            layout = "diffusers";
            std::vector<fs::path> dirs;
            for (const auto& e : fs::directory_iterator(path))
                if (e.is_directory()) dirs.push_back(e.path());
            std::sort(dirs.begin(), dirs.end());
            for (const auto& dir : dirs)
                if (auto weights = single_weights_in(dir)) open_into(registry, *weights, dir.filename().string(), files, components);
            if (files.empty()) fail(ErrorCode::bad_input, "diffusers folder without component weights");
        } else {
            const auto weights = single_weights_in(path);
            if (!weights)
                fail(ErrorCode::bad_input, "directory holds no model weights (model.safetensors, an index.json or one weights file)");
            layout = weights->string().ends_with(".index.json") ? "sharded" : "file";
            open_into(registry, *weights, "", files, components);
        }
    } else {
        if (!fs::exists(path, ec)) fail(ErrorCode::io, "no such file or directory");
        layout = path.string().ends_with(".index.json") ? "sharded" : "file";
        open_into(registry, path, "", files, components);
    }
    if (layout == "file") layout = std::string(files[0]->format_name());
    auto checkpoint = std::make_unique<FileCheckpoint>(path.string(), layout, std::move(files), std::move(components));
    // A transformers model folder: its config names the family, and the folder is what a
    // loader (PEFT's base_model_name_or_path) takes.
    const fs::path folder = fs::is_directory(path, ec) ? path : path.parent_path();
    if (layout != "diffusers" && fs::is_regular_file(folder / "config.json", ec)) {
        BaseModelHint hint = checkpoint->model_hint();
        hint.name = folder.empty() ? "." : folder.string();
        try {
            const auto config = nlohmann::json::parse(read_text_file(folder / "config.json"));
            if (config.is_object() && config.contains("model_type") && config["model_type"].is_string()) {
                hint.family = config["model_type"].get<std::string>();
                hint.evidence = "config.json model_type";
            }
        } catch (const nlohmann::json::exception&) {
            // A config we cannot read only costs the hint.
        }
        checkpoint->set_hint(std::move(hint));
    }
    return checkpoint;
}

}  // namespace

Registry::CheckpointOpener checkpoint_opener() { return &open_checkpoint; }

std::vector<std::string> parse_shard_index(std::string_view text, const std::string& name) {
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
        fail(ErrorCode::bad_input, "{}: not JSON ({})", quote(name), e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
        fail(ErrorCode::bad_input, "{}: no \"weight_map\" object", quote(name));
    std::vector<std::string> shards;
    for (const auto& [tensor, file] : j["weight_map"].items()) {
        if (!file.is_string()) fail(ErrorCode::bad_input, "{}: weight_map[{}] is not a file name", quote(name), quote(tensor));
        const std::string shard = file.get<std::string>();
        const fs::path path = shard;
        if (shard.empty() || path.has_parent_path() || path.is_absolute() || shard == "." || shard == ".." ||
            shard.find('\0') != std::string::npos)
            fail(ErrorCode::bad_input, "{}: shard {} is not a file beside the index", quote(name), quote(shard));
        if (std::find(shards.begin(), shards.end(), shard) == shards.end()) shards.push_back(shard);
    }
    return shards;
}

}  // namespace lorakit::formats
