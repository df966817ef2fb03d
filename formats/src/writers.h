// Writing adapters in each convention, and what the writers share.
#pragma once

#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "lorakit/adapter.h"
#include "lorakit/formats/safetensors.h"
#include "lorakit/registry.h"

namespace lorakit::formats {

void write_peft(const Adapter& adapter, const std::filesystem::path& target, const WriteOptions& options,
                std::vector<std::string>& notes);
void write_kohya(const Adapter& adapter, const std::filesystem::path& target, const WriteOptions& options,
                 std::vector<std::string>& notes);
void write_diffusers(const Adapter& adapter, const std::filesystem::path& target, const WriteOptions& options,
                     std::vector<std::string>& notes);
void write_mlx(const Adapter& adapter, const std::filesystem::path& target, const WriteOptions& options,
               std::vector<std::string>& notes);
void write_cloneofsimo(const Adapter& adapter, const std::filesystem::path& target, const WriteOptions& options,
                       std::vector<std::string>& notes);

// Tensors collected for one output file; keeps the tensors alive while their views are written.
class OutputTensors {
public:
    // `scale` != 1: written as tensor × scale, computed while the file is written (see
    // TensorToWrite::scale), so no scaled copy is held.
    void add(std::string name, Tensor tensor, double scale = 1.0);
    std::vector<TensorToWrite> views() const;
    std::size_t size() const { return items_.size(); }

private:
    struct Item {
        std::string name;
        Tensor tensor;
        double scale = 1.0;
    };
    std::vector<Item> items_;
    std::set<std::string> names_;
};

// `t` times `factor`, computed in f32 and rounded once to t's dtype (t itself when factor is 1).
Tensor scaled(const Tensor& t, double factor);
// A 0-d tensor holding `value` in `preferred` when that dtype holds it exactly, else F32.
Tensor scalar_tensor(double value, DType preferred);
// The DoRA magnitude of `m` as PEFT's per-output-row vector [out]; refuses per-column ones.
Tensor magnitude_as_rows(const LoraModule& m, std::string_view convention);

// "unet" for "unet.down_blocks...", "" for names without a pipeline component (LLM paths).
std::string component_of(const std::string& canonical_name);
std::set<std::string> components_of(const Adapter& adapter);

// Refusals shared by the writers: anything the target cannot hold.
void refuse_lycoris(const Adapter& adapter, std::string_view convention);
void refuse_bias(const Adapter& adapter, std::string_view convention);
void refuse_other_tensors(const Adapter& adapter, std::string_view convention);
// Modules still named by llama.cpp (a GGUF read without head counts) have no path in the target.
void refuse_llama_cpp_names(const Adapter& adapter, std::string_view convention);

// Writes a safetensors file atomically; a non-empty `data_hash_key` gets the SHA-256 of the
// data section into that metadata key (kohya's sshs_model_hash).
void write_tensor_file(const std::filesystem::path& path, const OutputTensors& tensors,
                       const std::map<std::string, std::string>& metadata, bool overwrite,
                       const std::string& data_hash_key = {});

// The most common value and the exceptions to it, in natural module order.
template <typename T>
T most_common(const std::vector<T>& values) {
    std::map<T, std::size_t> counts;
    for (const auto& v : values) ++counts[v];
    T best = values.front();
    std::size_t best_count = 0;
    for (const auto& [v, n] : counts)
        if (n > best_count) {
            best = v;
            best_count = n;
        }
    return best;
}

}  // namespace lorakit::formats
