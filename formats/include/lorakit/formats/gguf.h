// The GGUF container (ggml / llama.cpp), versions 2 and 3, little-endian. Read as strictly as
// ggml's own reader (src/gguf.cpp): counts, string lengths and tensor sizes are checked against
// the file size before anything is allocated, keys and tensor names must be unique, arrays may
// not nest, `general.alignment` must be a UINT32 power of two, and tensor data must be packed
// in info order with minimal padding. Written the way gguf-py's GGUFWriter lays files out.
// Rules and sources: shared research/formats.md §5.1-5.2.
#pragma once

#include <cstdint>
#include <functional>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "lorakit/atomic_file.h"
#include "lorakit/mapped_file.h"
#include "lorakit/registry.h"
#include "lorakit/tensor.h"

namespace lorakit::formats {

// gguf_type: the type of a metadata value.
enum class GgufType : std::uint32_t {
    u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7,
    string = 8, array = 9, u64 = 10, i64 = 11, f64 = 12,
};
std::string_view gguf_type_name(GgufType type) noexcept;

// One metadata value: its type and its little-endian encoding as stored in the file (for an
// array: the elements only, `count` of them of `element_type`).
struct GgufValue {
    GgufType type = GgufType::u32;
    GgufType element_type = GgufType::u8;
    std::uint64_t count = 0;
    std::string data;

    static GgufValue string(std::string_view text);
    static GgufValue u32(std::uint32_t value);
    static GgufValue i32(std::int32_t value);
    static GgufValue u64(std::uint64_t value);
    static GgufValue f32(float value);
    static GgufValue f64(double value);
    static GgufValue boolean(bool value);
    static GgufValue strings(const std::vector<std::string>& values);
    static GgufValue u32s(const std::vector<std::uint32_t>& values);

    std::optional<std::string> as_string() const;
    // Any numeric or boolean scalar, as a double.
    std::optional<double> as_number() const;
    // For messages and the metadata map: strings as they are, numbers in shortest form, short
    // arrays as a JSON-like list, long ones as "[<type> x N]".
    std::string to_text() const;
    bool operator==(const GgufValue&) const = default;
};

// ggml tensor types lorakit knows by id. Values, sizes and names from ggml's enum ggml_type.
struct GgmlTypeInfo {
    std::uint32_t id;
    std::string_view name;
    std::uint32_t block_elements;  // elements per block
    std::uint32_t block_bytes;     // bytes per block
};
// The type with this id, or nullopt for ids that are unknown or removed from ggml.
std::optional<GgmlTypeInfo> ggml_type_info(std::uint32_t id) noexcept;
std::optional<GgmlTypeInfo> ggml_type_by_name(std::string_view name) noexcept;
inline constexpr std::uint32_t ggml_f32 = 0, ggml_f16 = 1, ggml_q8_0 = 8, ggml_bf16 = 30;

inline constexpr std::uint32_t gguf_default_alignment = 32;

class GgufFile final : public TensorFile {
public:
    GgufFile(std::shared_ptr<const MappedFile> file, std::uint32_t version,
             std::vector<std::pair<std::string, GgufValue>> kv, std::vector<TensorEntry> entries,
             std::vector<std::uint32_t> types, std::uint32_t alignment, std::uint64_t data_start);
    std::string_view format_name() const override { return "gguf"; }
    const std::string& name() const override { return file_->name(); }
    const std::vector<TensorEntry>& entries() const override { return entries_; }
    // Every key's to_text() (see GgufValue).
    const std::map<std::string, std::string>& metadata() const override { return metadata_; }
    // By the stored byte range: decoded (Q8_0) and other quantized entries have no plain tensor.
    void release(const TensorEntry& entry) const override;
    void prefetch(const TensorEntry& entry) const override;

    std::uint32_t version() const noexcept { return version_; }
    std::uint32_t alignment() const noexcept { return alignment_; }
    // The key-value pairs in file order.
    const std::vector<std::pair<std::string, GgufValue>>& kv() const noexcept { return kv_; }
    const GgufValue* find_kv(std::string_view key) const noexcept;
    // The ggml type id of entries()[i] (entries' dtype_name is the ggml type name).
    std::uint32_t ggml_type(std::size_t i) const { return types_.at(i); }
    // The stored bytes of entries()[i], in its ggml type (Q8_0 blocks included).
    std::span<const std::byte> raw(std::size_t i) const;

private:
    std::shared_ptr<const MappedFile> file_;
    std::uint32_t version_;
    std::vector<std::pair<std::string, GgufValue>> kv_;
    std::map<std::string, std::string> metadata_;
    std::vector<TensorEntry> entries_;
    std::vector<std::uint32_t> types_;
    std::uint32_t alignment_;
    std::uint64_t data_start_;
};

class GgufDriver final : public ContainerDriver {
public:
    std::string_view name() const override { return "gguf"; }
    int identify(std::span<const std::byte> head, const std::filesystem::path& path) const override;
    std::unique_ptr<TensorFile> open(std::shared_ptr<const MappedFile> file) const override;
};

// Parses and validates a whole GGUF file. Tensors of type F32, F16, BF16, F64, I8..I64 are
// views into the mapped file; Q8_0 tensors are dequantized to owned F32 tensors; every other
// ggml type is listed (name, shape, bytes) with an empty tensor. Throws bad_input naming the
// rule that failed, unsupported for a version or type lorakit does not know.
std::unique_ptr<GgufFile> read_gguf(std::shared_ptr<const MappedFile> file);

struct GgufTensorToWrite {
    std::string name;
    std::uint32_t type = ggml_f32;  // ggml type id
    Shape shape;                    // NumPy order (ne reversed)
    std::vector<std::byte> owned;   // the data, encoded in `type` (or empty and `view` used)
    std::span<const std::byte> view;
    std::uint64_t streamed_size = 0;  // write_gguf_streamed: the bytes its callback will write
    std::span<const std::byte> bytes() const { return owned.empty() ? view : std::span<const std::byte>(owned); }
    std::uint64_t size() const { return streamed_size ? streamed_size : bytes().size(); }
};

// A tensor for the writer from an f32/f16/bf16 lorakit tensor, encoded as `type` (F32, F16,
// BF16 or Q8_0, which needs the last dimension to be a multiple of 32).
GgufTensorToWrite gguf_tensor(std::string name, const TensorView& tensor, std::uint32_t type);

// Q8_0 blocks of 32: f16 scale d = max|x|/127, q = round-half-away(x/d); as ggml's
// quantize_row_q8_0_ref. `count` must be a multiple of 32.
std::vector<std::byte> quantize_q8_0(const float* values, std::size_t count);
void dequantize_q8_0(const std::byte* blocks, float* values, std::size_t count);

// Version 3: header, the pairs in the given order, tensor infos in the given order (offsets
// packed with padding to the alignment: `general.alignment` when present, else 32), zero
// padding, then the data. Identical input gives identical bytes.
std::vector<std::byte> serialize_gguf(const std::vector<std::pair<std::string, GgufValue>>& kv,
                                      const std::vector<GgufTensorToWrite>& tensors);
void write_gguf(AtomicFile& out, const std::vector<std::pair<std::string, GgufValue>>& kv,
                const std::vector<GgufTensorToWrite>& tensors);
void write_gguf(const std::filesystem::path& target, const std::vector<std::pair<std::string, GgufValue>>& kv,
                const std::vector<GgufTensorToWrite>& tensors, bool overwrite);
// The same layout with each tensor's data written by write_data(index, out) when its turn comes
// (tensors carry name, type, shape and streamed_size only), so a writer holds one tensor at a
// time; each call must write exactly streamed_size bytes.
void write_gguf_streamed(AtomicFile& out, const std::vector<std::pair<std::string, GgufValue>>& kv,
                         const std::vector<GgufTensorToWrite>& tensors,
                         const std::function<void(std::size_t, AtomicFile&)>& write_data);

}  // namespace lorakit::formats
