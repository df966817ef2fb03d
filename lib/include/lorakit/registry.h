// The interfaces formats plug into, and the registry that finds the right one.
//
// The core never names a specific format. A *container* driver turns bytes into named
// tensors (safetensors, GGUF, pickle); a *convention* driver turns named tensors plus an
// optional sidecar config into an Adapter (PEFT, kohya, diffusers, mlx-lm, ...). Drivers are
// registered explicitly (see lorakit/formats/builtin.h), never by static initialisers.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "lorakit/adapter.h"
#include "lorakit/mapped_file.h"
#include "lorakit/tensor.h"

namespace lorakit {

class Checkpoint;  // lorakit/checkpoint.h

// One tensor record of a container.
struct TensorEntry {
    std::string name;
    std::string dtype_name;    // as the file spells it
    Shape shape;
    std::uint64_t offset = 0;  // byte range of the data, relative to the container's data section
    std::uint64_t size = 0;
    Tensor tensor;             // the stored values; empty when the dtype is not a plain one
    // Block-quantized types lorakit computes with (GGUF Q8_0) are decoded on demand, one
    // tensor at a time, instead of being held in f32: `decode` fills `out` (element_count()
    // values) from the mapped bytes.
    std::function<void(std::span<float> out)> decode;

    bool supported() const noexcept { return !tensor.empty() || decode; }
    // The type its values compute in: the stored dtype, or F32 for decoded types.
    DType value_dtype() const noexcept { return decode ? DType::F32 : tensor.dtype(); }
    std::int64_t element_count() const;
    // The values as f32, into `out` (resized; its capacity is reused). Throws unsupported when
    // the dtype is one lorakit does not compute with.
    void to_f32(std::vector<float>& out) const;
    std::vector<float> to_f32() const;
    // The same into `out`, which must hold exactly element_count() values.
    void to_f32(std::span<float> out) const;
};

// A parsed container: its tensors in the order the file lists them, and its metadata.
class TensorFile {
public:
    virtual ~TensorFile() = default;

    virtual std::string_view format_name() const = 0;
    // The name for messages (the path as given).
    virtual const std::string& name() const = 0;
    virtual const std::vector<TensorEntry>& entries() const = 0;
    virtual const std::map<std::string, std::string>& metadata() const = 0;

    // Drops the entry's mapped pages from the process's memory after use (MappedFile::release);
    // a no-op for files whose tensors are not mapped.
    virtual void release(const TensorEntry&) const {}
    // Reads the entry's bytes into memory now, waiting for the disk (MappedFile::prefetch): a
    // thread reading ahead of the work calls it, so that reading a file from disk overlaps the
    // work on earlier tensors; a no-op for files whose tensors are not mapped.
    virtual void prefetch(const TensorEntry&) const {}

    const TensorEntry* find(std::string_view tensor_name) const;
    // The tensor named `tensor_name` (decoded into an F32 tensor for decoded types); throws
    // bad_input if absent and unsupported if its dtype is one lorakit does not compute with.
    Tensor tensor(std::string_view tensor_name) const;

protected:
    void build_index();

private:
    std::map<std::string, std::size_t, std::less<>> index_;
};

class ContainerDriver {
public:
    virtual ~ContainerDriver() = default;
    virtual std::string_view name() const = 0;
    // How sure the driver is that these are its bytes: 0 = not mine, 100 = certain. `head`
    // holds at most the first 64 bytes. Must be cheap and never throw.
    virtual int identify(std::span<const std::byte> head, const std::filesystem::path& path) const = 0;
    virtual std::unique_ptr<TensorFile> open(std::shared_ptr<const MappedFile> file) const = 0;
};

// A config file found beside (or inside the directory of) the weights.
struct SidecarConfig {
    std::filesystem::path path;
    std::string text;
};

// Facts about the base model a reader may need that the adapter file does not hold (e.g. the
// attention head counts that undo llama.cpp's rotary row order of q/k LoRAs).
struct ModelHints {
    std::string arch;                          // llama.cpp architecture name ("llama", "qwen2", ...)
    std::optional<std::int64_t> head_count;     // attention heads
    std::optional<std::int64_t> head_count_kv;  // key/value heads (GQA); default: head_count
};

struct AdapterInput {
    std::string source;  // the path the user gave
    const TensorFile& tensors;
    std::optional<SidecarConfig> config;
    ModelHints hints = {};
};

struct Detection {
    int score = 0;  // 0 = not this convention; higher wins
    std::string detail;
};

// Where an adapter directory keeps its files.
struct LocatedAdapter {
    std::filesystem::path weights;
    std::optional<std::filesystem::path> config;
};

struct WriteOptions {
    bool overwrite = false;
    ModelHints hints;          // for conventions that need the base model (GGUF: arch, q/k row order)
    std::string tensor_type;   // a container-specific tensor type ("q8_0" for GGUF); "" = the factors' own
};
inline WriteOptions write_options(bool overwrite) {
    WriteOptions o;
    o.overwrite = overwrite;
    return o;
}

class ConventionDriver {
public:
    virtual ~ConventionDriver() = default;
    virtual std::string_view name() const = 0;
    virtual std::string_view description() const = 0;

    // If `dir` is laid out as this convention's adapter directory, where its files are.
    virtual std::optional<LocatedAdapter> locate(const std::filesystem::path& dir) const;
    // File names this convention reads as a sidecar config next to a weights file.
    virtual std::vector<std::string> sidecar_config_names() const;
    // Called with the sidecar config before the weights are opened; a driver that owns the
    // config and finds it describes something lorakit cannot read (e.g. a PEFT prefix-tuning
    // adapter) throws here, so the user gets that message rather than a container error.
    virtual void precheck(const SidecarConfig& config) const;

    virtual Detection detect(const AdapterInput& input) const = 0;
    virtual Adapter read(const AdapterInput& input) const = 0;

    // Writes `adapter` in this convention to `target`: a file, or a directory for conventions
    // that store adapters as directories (writes_directory). What the writer had to adapt
    // (scales folded into B, ...) is appended to `notes`. Anything the convention cannot hold
    // is refused (ErrorCode::unsupported) naming what would be lost. Default: not writable.
    virtual bool writes_directory() const { return false; }
    virtual void write(const Adapter& adapter, const std::filesystem::path& target, const WriteOptions& options,
                       std::vector<std::string>& notes) const;
};

class Registry {
public:
    using CheckpointOpener = std::unique_ptr<Checkpoint> (*)(const Registry&, const std::filesystem::path&);

    void add(std::unique_ptr<ContainerDriver> driver);
    void add(std::unique_ptr<ConventionDriver> driver);
    // The function that opens base model checkpoints (formats/ supplies it).
    void set_checkpoint_opener(CheckpointOpener opener) { checkpoint_opener_ = opener; }
    // Opens a base model checkpoint (a file, a sharded checkpoint or a diffusers folder); errors
    // carry the path. usage error when no opener is registered.
    std::unique_ptr<Checkpoint> open_checkpoint(const std::filesystem::path& path) const;

    const std::vector<std::unique_ptr<ContainerDriver>>& containers() const { return containers_; }
    const std::vector<std::unique_ptr<ConventionDriver>>& conventions() const { return conventions_; }
    const ConventionDriver* convention(std::string_view name) const;

    // The container driver that claims `file` (highest identify() score); bad_input when none.
    const ContainerDriver& identify_container(const MappedFile& file) const;
    // Opens a tensor container, choosing the driver by identify(). "-" reads standard input.
    std::unique_ptr<TensorFile> open_tensor_file(const std::filesystem::path& path) const;
    std::unique_ptr<TensorFile> open_tensor_file(std::shared_ptr<const MappedFile> file) const;

    // The convention an output is written in: `requested` (--to) when given, else `input` (the
    // input's). The output's name must agree: "*.gguf" is a GGUF file, "*.safetensors" a single
    // safetensors file (not a directory convention such as peft or mlx), an existing directory
    // or a name ending in '/' a directory convention. Without --to, a name that disagrees with
    // the input's convention decides (*.gguf -> gguf, a directory -> peft), except a
    // *.safetensors name for an input whose convention is a directory or GGUF, which is refused
    // (usage error) with what to pass; with --to, a disagreeing name is refused. An empty
    // target (no output) or "-" (standard output) accepts any convention.
    std::string output_convention(std::string_view requested, std::string_view input,
                                  const std::filesystem::path& target) const;
    // Refuses, before any work is done, an output that write_adapter could not create: an
    // existing file or directory without `overwrite`, or a missing parent directory.
    void check_output(std::string_view convention, const std::filesystem::path& target, bool overwrite) const;

    // Writes an adapter in the named convention (see ConventionDriver::write).
    void write_adapter(const Adapter& adapter, std::string_view convention, const std::filesystem::path& target,
                       const WriteOptions& options, std::vector<std::string>& notes) const;

    // Loads an adapter from a weights file or an adapter directory, detecting the convention.
    // Errors carry the path as context.
    Adapter load_adapter(const std::filesystem::path& path, const ModelHints& hints = {}) const;
    // Detects and reads an adapter from an already opened container.
    Adapter read_adapter(const std::string& source, const TensorFile& tensors,
                         const std::optional<SidecarConfig>& config, const ModelHints& hints = {}) const;

private:
    std::optional<SidecarConfig> find_sidecar(const std::filesystem::path& weights) const;
    // The driver that writes `name` ("lycoris" is written by kohya's); usage error naming the
    // known conventions otherwise.
    const ConventionDriver& writer(std::string_view name) const;

    std::vector<std::unique_ptr<ContainerDriver>> containers_;
    std::vector<std::unique_ptr<ConventionDriver>> conventions_;
    CheckpointOpener checkpoint_opener_ = nullptr;
};

// "path:0.8" -> {"path", 0.8}; a suffix that is not a number stays part of the path.
std::pair<std::string, std::optional<double>> split_weight(const std::string& argument);

// Adapters given as "PATH" or "PATH:WEIGHT" (lora-stack, lora-bake), loaded in order; `weights`
// holds each argument's weight, nullopt where none was given.
struct WeightedAdapters {
    std::vector<Adapter> adapters;
    std::vector<std::optional<double>> weights;
};
WeightedAdapters load_weighted_adapters(const Registry& registry, const std::vector<std::string>& arguments);

// Loads every path (Registry::load_adapter), several at once on the machine's cores: reading a
// header and mapping its names costs tens of milliseconds per file (~25 ms for an SDXL kohya
// LoRA). The result is in the paths' order; when some fail, the first failure in that order
// is thrown, as a sequential loop would.
std::vector<Adapter> load_adapters(const Registry& registry, const std::vector<std::string>& paths);

// Reads a whole (small) text file such as a JSON config. Throws io on failure and bad_input
// above `max_bytes`.
std::string read_text_file(const std::filesystem::path& path, std::size_t max_bytes = 64u << 20);

}  // namespace lorakit
