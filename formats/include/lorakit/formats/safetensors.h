// The safetensors container (https://github.com/huggingface/safetensors), read as strictly as
// the reference Rust reader and written byte-for-byte the way its writer lays files out.
// Rules and sources: shared research/formats.md §1; docs/formats/safetensors.md.
#pragma once

#include <cstddef>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lorakit/atomic_file.h"
#include "lorakit/mapped_file.h"
#include "lorakit/registry.h"
#include "lorakit/tensor.h"

namespace lorakit::formats {

// The reference reader's limit on the JSON header (HeaderTooLarge).
inline constexpr std::uint64_t safetensors_max_header = 100'000'000;

class SafetensorsDriver final : public ContainerDriver {
public:
    std::string_view name() const override { return "safetensors"; }
    int identify(std::span<const std::byte> head, const std::filesystem::path& path) const override;
    std::unique_ptr<TensorFile> open(std::shared_ptr<const MappedFile> file) const override;
};

// Parses and validates a whole safetensors file. Throws ErrorCode::bad_input with a message
// naming the rule that failed (and the tensor, where there is one).
std::unique_ptr<TensorFile> read_safetensors(std::shared_ptr<const MappedFile> file);

struct TensorToWrite {
    std::string name;
    TensorView view;
    // Written as the view's values times `scale`, each rounded once to the view's dtype (through
    // f32, as formats::scaled): the writers fold a scale while writing, a tensor at a time,
    // instead of holding scaled copies of them all.
    double scale = 1.0;
    // Set for a tensor made while the file is written (Tensor::deferred): `view` then carries
    // its dtype and shape only, and the writer takes the bytes when the tensor's turn comes
    // (having told each source its order), holding one or two such tensors at a time.
    std::shared_ptr<const DeferredBytes> deferred = nullptr;

    // The tensor's size in bytes.
    std::size_t size() const;
};

// count values of `type` from src, times factor, into dst (same type): widened to f32, multiplied
// in f64, rounded to f32 and then once to `type`. src may equal dst (in place).
void scale_encoded(DType type, const std::byte* src, std::byte* dst, std::size_t count, double factor);

// The order tensors are laid out in, the reference writer's: by dtype, widest first in the
// reference enum's order (U64, I64, F64, F32, U32, I32, BF16, F16, U16, I16, F8_E4M3,
// F8_E5M2, I8, U8, BOOL), then by name compared as bytes.
void sort_for_safetensors(std::vector<TensorToWrite>& tensors);

// The complete file: the 8-byte length, the compact JSON header ("__metadata__" first with
// sorted keys, then tensors in layout order, fields dtype/shape/data_offsets) padded with
// spaces to a multiple of 8, then the data. Identical input gives identical bytes. Duplicate
// names throw ErrorCode::internal.
std::vector<std::byte> serialize_safetensors_header(std::vector<TensorToWrite>& tensors,
                                                    const std::map<std::string, std::string>& metadata);
std::vector<std::byte> serialize_safetensors(std::vector<TensorToWrite> tensors,
                                             const std::map<std::string, std::string>& metadata);

// Streams the file into `out` (header, then each tensor's bytes); the caller commits.
void write_safetensors(AtomicFile& out, std::vector<TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata);
// The same, with metadata[data_hash_key] (unless the key is empty) set to the lower-case hex
// SHA-256 of the data section, as kohya's sshs_model_hash; computed while the data is written.
void write_safetensors(AtomicFile& out, std::vector<TensorToWrite> tensors, std::map<std::string, std::string> metadata,
                       const std::string& data_hash_key);
// Writes `target` atomically; refuses to replace an existing file unless `overwrite`.
void write_safetensors(const std::filesystem::path& target, std::vector<TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata, bool overwrite,
                       const std::string& data_hash_key = {});

// A tensor of a file written in a stream: its data is produced by a callback when its turn
// comes, so a writer holds one tensor at a time (lora-bake). `index` is the caller's handle.
struct SafetensorsRecord {
    std::string name;
    DType dtype = DType::F32;
    Shape shape;
    std::uint64_t size = 0;  // bytes the callback will write
    std::size_t index = 0;
};
std::vector<std::byte> serialize_safetensors_header(std::vector<SafetensorsRecord>& records,
                                                    const std::map<std::string, std::string>& metadata);
// Header (records in layout order, as serialize_safetensors_header), then write_data(index, out)
// for each record in that order; each call must write exactly the record's size.
void write_safetensors_streamed(AtomicFile& out, std::vector<SafetensorsRecord> records,
                                const std::map<std::string, std::string>& metadata,
                                const std::function<void(std::size_t, AtomicFile&)>& write_data);

// SHA-256 of the data section only (everything after the header): kohya's sshs_model_hash
// and A1111's "addnet" hash. Hex, lower case.
std::string safetensors_data_sha256(std::span<const std::byte> file_bytes);

}  // namespace lorakit::formats
