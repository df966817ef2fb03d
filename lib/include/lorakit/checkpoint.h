// A base model checkpoint: one or several tensor files (a single safetensors or GGUF file, a
// Hugging Face sharded checkpoint, a diffusers folder's components), mapped, never loaded
// whole, and the knowledge of where each adapter module's ΔW lands in it. The layouts and their
// name maps live in formats/ (formats/src/checkpoint.cpp); the core sees this interface.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "lorakit/adapter.h"
#include "lorakit/progress.h"
#include "lorakit/registry.h"

namespace lorakit {

// Where one module's ΔW (out x flat_in, rows in the adapter's order) adds into a checkpoint tensor.
struct WeightLocation {
    std::size_t file = 0;        // index into Checkpoint::files()
    const TensorEntry* entry = nullptr;
    // The tensor rows that ΔW's rows add to, in order; empty = rows 0..out-1 (the whole tensor
    // when the shapes agree). Fused tensors (Flux qkv, OpenCLIP in_proj) and llama.cpp's
    // rotary row order of q/k give non-trivial lists.
    std::vector<std::int64_t> rows;
    bool transposed = false;     // the tensor holds ΔWᵀ's layout (GPT-2 Conv1D, embeddings)
    std::string describe() const;  // "name" or "name rows a..b"
};

// What a checkpoint writer asks of the operation that changes tensors (lora-bake).
class TensorSource {
public:
    virtual ~TensorSource() = default;
    // The dtype tensor `entry` of file `file` is written in, or nullopt to copy its bytes as
    // they are. Called once per tensor before anything is written.
    virtual std::optional<DType> output_dtype(std::size_t file, const TensorEntry& entry) const = 0;
    // Appends the tensor's new bytes (in the dtype output_dtype gave) to `bytes` (cleared first).
    // Called once per changed tensor, one at a time, in writing order, on a helper thread of the
    // writer while the tensors before it are written (CheckpointWriteOptions::produce_ahead).
    virtual void produce(std::size_t file, const TensorEntry& entry, DType type, std::vector<std::byte>& bytes) const = 0;
};

struct CheckpointWriteOptions {
    bool overwrite = false;
    std::uint64_t shard_size = 0;  // > 0: a sharded output directory with shards of at most this size
    // GGUF: a changed Q8_0 tensor is requantized to Q8_0 (false: written in the dtype the source gives).
    bool keep_quantized = true;
    // GGUF: the type the user asked every tensor in ("f32", "f16", "bf16", "q8_0"; "" keeps each
    // tensor's own). The writer applies llama.cpp's rules on top of the source's dtypes: tensors
    // llama.cpp always keeps in F32 (1-D, norms, MoE routers, position embeddings) stay F32, q8_0
    // quantizes the others (F16 where a row is not a multiple of 32), and general.file_type
    // follows.
    std::string gguf_type;
    // Changed tensors are produced on a helper thread, one ahead of the writer (false: on the
    // writer's thread, one thread in all: lora-bake -j 1).
    bool produce_ahead = true;
};

class Checkpoint {
public:
    virtual ~Checkpoint() = default;
    virtual const std::string& name() const = 0;  // the path as given
    virtual std::string_view layout() const = 0;  // "safetensors", "sharded", "diffusers", "sd-single-file", "gguf", ...
    virtual const std::vector<std::unique_ptr<TensorFile>>& files() const = 0;
    // Where `module` applies, or nullopt when the checkpoint has no tensor for it. Throws
    // bad_input when the tensor exists but its shape cannot hold the module's ΔW.
    virtual std::optional<WeightLocation> locate(const LoraModule& module) const = 0;
    // The reverse of locate(): the adapter modules tensor `entry` of file `file` holds, each as
    // a rank-1 module with zero factors (canonical name, kind and shape; fan_in_fan_out set for
    // GPT-2 Conv1D) that locate() maps back to this tensor. A fused tensor gives one module per
    // part (OpenCLIP's in_proj: q, k, v); tensors no LoRA targets (norms, biases, embeddings,
    // names the maps lack) give none.
    virtual std::vector<LoraModule> modules_at(std::size_t file, const TensorEntry& entry) const = 0;
    // A module's own parameter, for full tensors an adapter carries (LyCORIS full diffs
    // "diff"/"diff_b", PEFT modules_to_save): where parameter `param` ("weight" or "bias") of
    // canonical module `module` is, given the parameter's shape, or nullopt when the checkpoint
    // has no such tensor. Rows follow the module's weight (fused q/k/v parts, llama.cpp's q/k
    // order); the location is never transposed. Throws bad_input when the tensor exists but
    // its shape differs.
    virtual std::optional<WeightLocation> locate_parameter(const std::string& module, std::string_view param,
                                                           const Shape& shape) const = 0;
    // The reverse: the canonical module and parameter ("weight", "bias") tensor `entry` is,
    // when locate_parameter() maps them back to it whole (nullopt for fused tensors, rows in
    // another order, and names the maps lack).
    virtual std::optional<std::pair<std::string, std::string>> parameter_at(std::size_t file, const TensorEntry& entry) const = 0;
    // What the checkpoint's keys say about the model: family ("SD1.5", "SDXL", "Flux", the GGUF
    // architecture, "transformers"), and a name a loader can use (a Hugging Face model folder).
    virtual BaseModelHint model_hint() const = 0;
    // Writes the checkpoint to `target` in its own layout (a single safetensors or GGUF file, a
    // directory of shards and model.safetensors.index.json, written last, or a diffusers folder
    // with its other files copied and its other weight variants left out), one tensor at a time:
    // tensors `source` leaves alone are copied byte for byte, metadata is kept. Atomic: a failed
    // run leaves nothing at `target`. Throws unsupported for layouts it cannot write yet.
    virtual void write(const std::filesystem::path& target, const TensorSource& source,
                       const CheckpointWriteOptions& options, Progress& progress) const = 0;
};

// The dense base weight rows a module applies to, as out x flat_in row-major f32 (gathered
// through the location's rows, transposed back when the tensor holds ΔWᵀ's layout).
std::vector<float> gather_weight(const WeightLocation& where, const LoraModule& module);
// The same into the first out x flat_in values of `storage`, which only grows: a larger tensor
// after smaller ones costs no zero-filling of memory about to be overwritten (std::vector::resize
// would fill it). Returns those values.
std::span<float> gather_weight_into(const WeightLocation& where, const LoraModule& module, std::vector<float>& storage);

// The same rows without a copy, when the module uses a contiguous range of the tensor's rows
// as stored (not transposed) and the tensor holds F32, F16 or BF16 values: a view of the stored
// values (usually in the mapped file). nullopt otherwise (gather_weight_into then). Checks the
// shapes as gather_weight_into does.
std::optional<TensorView> weight_in_place(const WeightLocation& where, const LoraModule& module);

// Refuses (usage error) an output path that is the checkpoint or any of its files: inputs are
// never modified.
void refuse_replacing(const Checkpoint& checkpoint, std::string_view role, const std::string& output);

// The largest finite value of a dtype, by its container spelling ("F16": 65504), or 0 when the
// dtype is not a plain float type (quantized blocks: no simple range to check).
double dtype_finite_limit(std::string_view dtype_name) noexcept;

}  // namespace lorakit
