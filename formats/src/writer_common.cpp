#include <algorithm>
#include <cmath>
#include <cstdint>

#include <fmt/format.h>

#include "lorakit/atomic_file.h"
#include "lorakit/error.h"
#include "writers.h"

namespace lorakit::formats {

void OutputTensors::add(std::string name, Tensor tensor, double scale) {
    if (!names_.insert(name).second) fail(ErrorCode::bad_input, "two tensors would be written as {}", quote(name));
    items_.push_back({std::move(name), std::move(tensor), scale});
}

std::vector<TensorToWrite> OutputTensors::views() const {
    std::vector<TensorToWrite> out;
    out.reserve(items_.size());
    for (const auto& item : items_) {
        if (const auto& deferred = item.tensor.deferred())
            out.push_back({item.name, TensorView(item.tensor.dtype(), item.tensor.shape(), {}), item.scale, deferred});
        else
            out.push_back({item.name, item.tensor.view(), item.scale, nullptr});
    }
    return out;
}

void scale_encoded(DType type, const std::byte* src, std::byte* dst, std::size_t count, double factor) {
    // Chunk by chunk through a small f32 buffer: no full-size f32 copy, whose fresh pages are
    // slow to touch.
    const std::size_t width = dtype_size(type);
    // The smallest magnitude that rounds to infinity in `type`: a finite value scaled past it
    // would be written as an infinity (a broken adapter), so that is refused.
    const float threshold = overflow_threshold(type);
    constexpr std::size_t chunk = 4096;
    float buffer[chunk];
    for (std::size_t at = 0; at < count; at += chunk) {
        const std::size_t n = std::min(chunk, count - at);
        convert_to_f32(type, src + at * width, buffer, n);
        scale_f32(buffer, n, factor);
        std::uint32_t beyond = 0;  // 32-bit: the loop vectorises without widening
        for (std::size_t i = 0; i < n; ++i) beyond += std::abs(buffer[i]) >= threshold;
        if (beyond > 0) {  // rare: refused unless those values were infinite already
            float original[chunk];
            convert_to_f32(type, src + at * width, original, n);
            std::uint32_t infinite = 0;
            for (std::size_t i = 0; i < n; ++i) infinite += std::isinf(original[i]);
            if (beyond > infinite)
                fail(ErrorCode::unsupported,
                     "folding the scale {:g} into a factor takes {} of its values beyond {}'s range; write wider factors "
                     "(lora-convert --dtype f32)",
                     factor, beyond - infinite, dtype_name(type));
        }
        convert_from_f32(type, buffer, dst + at * width, n);
    }
}

Tensor scaled(const Tensor& t, double factor) {
    if (factor == 1.0) return t;
    const std::size_t count = static_cast<std::size_t>(t.element_count()), width = dtype_size(t.dtype());
    std::vector<std::byte> out(count * width);
    scale_encoded(t.dtype(), t.bytes().data(), out.data(), count, factor);
    return Tensor::own(t.dtype(), t.shape(), std::move(out));
}

Tensor scalar_tensor(double value, DType preferred) {
    auto exact_in = [&](DType type) {
        const auto v = static_cast<float>(value);
        if (static_cast<double>(v) != value) return false;
        const Tensor t = Tensor::from_f32(type, {}, {&v, 1});
        return t.scalar_value() == value;
    };
    const DType type = exact_in(preferred) ? preferred : DType::F32;
    const auto v = static_cast<float>(value);
    return Tensor::from_f32(type, {}, {&v, 1});
}

Tensor magnitude_as_rows(const LoraModule& m, std::string_view convention) {
    if (m.magnitude_axis != MagnitudeAxis::output_rows)
        fail_lossy(Loss::dora_magnitudes, {},
                   "module {}: its DoRA magnitude normalises input columns, which {} cannot express (it would be lost)",
                   quote(m.name), convention);
    return m.magnitude->reshaped({m.magnitude->element_count()});
}

std::string component_of(const std::string& name) {
    for (const char* c : {"unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior",
                          "prior_text_encoder", "lycoris"}) {
        const std::string prefix = std::string(c) + ".";
        if (name.rfind(prefix, 0) == 0) return c;
    }
    return "";
}

std::set<std::string> components_of(const Adapter& adapter) {
    std::set<std::string> out;
    for (const auto& m : adapter.modules) out.insert(component_of(m.name));
    return out;
}

void refuse_lycoris(const Adapter& adapter, std::string_view convention) {
    if (!adapter.lycoris_modules.empty())
        fail(ErrorCode::unsupported,
             "{} LyCORIS module(s) ({}, ...) cannot be written as {}: convert them to LoRA first (lora-convert --rank)",
             adapter.lycoris_modules.size(), adapter.lycoris_modules.front().algorithm, convention);
}

void refuse_bias(const Adapter& adapter, std::string_view convention) {
    for (const auto& m : adapter.modules)
        if (m.bias)
            fail_lossy(Loss::lora_bias, {}, "module {} has a LoRA bias, which {} cannot hold", quote(m.name), convention);
}

void refuse_other_tensors(const Adapter& adapter, std::string_view convention) {
    if (adapter.other_tensors.empty()) return;
    std::vector<std::string> names;
    for (const auto& t : adapter.other_tensors) names.push_back(t.name);
    fail_lossy(Loss::other_tensors, std::move(names), "{} tensor(s) that are not LoRA factors ({}, ...) cannot be carried into {}",
               adapter.other_tensors.size(), quote(adapter.other_tensors.front().name), convention);
}

void refuse_llama_cpp_names(const Adapter& adapter, std::string_view convention) {
    for (const auto& m : adapter.modules)
        if (m.name.starts_with("blk.") || m.name == "token_embd" || m.name == "output")
            fail(ErrorCode::usage,
                 "module {} has a llama.cpp name (its q/k rows may be in llama.cpp's rotary order); give the head counts "
                 "(--head-count, --head-count-kv or --base) to map it to a Hugging Face path for {}",
                 quote(m.name), convention);
}

void write_tensor_file(const std::filesystem::path& path, const OutputTensors& tensors,
                       const std::map<std::string, std::string>& metadata, bool overwrite,
                       const std::string& data_hash_key) {
    write_safetensors(path, tensors.views(), metadata, overwrite, data_hash_key);
}

}  // namespace lorakit::formats
