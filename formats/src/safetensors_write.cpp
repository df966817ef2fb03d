// The safetensors writer: the reference writer's layout (huggingface/safetensors `prepare`),
// so that files are byte-identical run to run and kohya's data-section hash is reproducible.
#include <algorithm>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "lorakit/error.h"
#include "lorakit/formats/safetensors.h"
#include "lorakit/mapped_file.h"
#include "lorakit/sha256.h"

namespace lorakit::formats {

namespace {

// Position in the reference enum's descending order (widest types first).
int layout_rank(DType type) {
    switch (type) {
    case DType::U64: return 0;
    case DType::I64: return 1;
    case DType::F64: return 2;
    case DType::F32: return 3;
    case DType::U32: return 4;
    case DType::I32: return 5;
    case DType::BF16: return 6;
    case DType::F16: return 7;
    case DType::U16: return 8;
    case DType::I16: return 9;
    case DType::F8_E4M3: return 10;
    case DType::F8_E5M2: return 11;
    case DType::I8: return 12;
    case DType::U8: return 13;
    case DType::BOOL: return 14;
    }
    return 15;
}

// `what` names the string for the message ("tensor name", "metadata key").
std::string json_string(const std::string& text, std::string_view what) {
    // Escaped as serde_json does it (quote, backslash, control characters; \b \f \n \r \t
    // short, the rest \u00xx), other UTF-8 passes through; that is what nlohmann's dump does.
    try {
        return nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
    } catch (const nlohmann::json::exception&) {
        fail(ErrorCode::bad_input, "{} {} is not valid UTF-8 and cannot be written to a safetensors header", what,
             quote(text));
    }
}

}  // namespace

namespace {

template <typename T, typename Type>
void sort_records(std::vector<T>& items, Type type_of) {
    std::stable_sort(items.begin(), items.end(), [&](const T& a, const T& b) {
        const int ra = layout_rank(type_of(a)), rb = layout_rank(type_of(b));
        if (ra != rb) return ra < rb;
        return a.name < b.name;  // std::string compares as unsigned bytes, like Rust's String
    });
}

}  // namespace

void sort_for_safetensors(std::vector<TensorToWrite>& tensors) {
    sort_records(tensors, [](const TensorToWrite& t) { return t.view.dtype(); });
}

std::vector<std::byte> serialize_safetensors_header(std::vector<SafetensorsRecord>& tensors,
                                                    const std::map<std::string, std::string>& metadata) {
    sort_records(tensors, [](const SafetensorsRecord& t) { return t.dtype; });
    std::set<std::string_view> names;
    for (const auto& t : tensors)
        if (!names.insert(t.name).second) fail(ErrorCode::internal, "duplicate tensor name {} in output", quote(t.name));
    std::string header = "{";
    bool first = true;
    if (!metadata.empty()) {
        header += "\"__metadata__\":{";
        bool first_key = true;
        for (const auto& [key, value] : metadata) {
            if (!first_key) header += ',';
            header += json_string(key, "metadata key") + ":" + json_string(value, "metadata value");
            first_key = false;
        }
        header += '}';
        first = false;
    }
    std::uint64_t offset = 0;
    for (const auto& t : tensors) {
        if (!first) header += ',';
        first = false;
        header += fmt::format("{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}", json_string(t.name, "tensor name"),
                              dtype_name(t.dtype), fmt::join(t.shape, ","), offset, offset + t.size);
        offset += t.size;
    }
    header += '}';
    header.append((8 - header.size() % 8) % 8, ' ');
    if (header.size() > safetensors_max_header)
        fail(ErrorCode::bad_input, "the safetensors header would be {} bytes, over the {}-byte limit", header.size(),
             safetensors_max_header);
    std::vector<std::byte> out(8 + header.size());
    const std::uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
    std::memcpy(out.data() + 8, header.data(), header.size());
    return out;
}

std::vector<std::byte> serialize_safetensors_header(std::vector<TensorToWrite>& tensors,
                                                    const std::map<std::string, std::string>& metadata) {
    sort_for_safetensors(tensors);
    std::vector<SafetensorsRecord> records;
    for (const auto& t : tensors) records.push_back({t.name, t.view.dtype(), t.view.shape(), t.size(), 0});
    return serialize_safetensors_header(records, metadata);
}

void write_safetensors_streamed(AtomicFile& out, std::vector<SafetensorsRecord> records,
                                const std::map<std::string, std::string>& metadata,
                                const std::function<void(std::size_t, AtomicFile&)>& write_data) {
    out.write(serialize_safetensors_header(records, metadata));
    for (const auto& r : records) {
        const std::uint64_t before = out.size();
        write_data(r.index, out);
        if (out.size() - before != r.size)
            fail(ErrorCode::internal, "tensor {}: {} bytes written for a {}-byte record", quote(r.name), out.size() - before, r.size);
    }
}

std::size_t TensorToWrite::size() const {
    return deferred ? static_cast<std::size_t>(checked_byte_count(view.shape(), view.dtype())) : view.bytes().size();
}

namespace {

// A scaled tensor's bytes (TensorToWrite::scale), not zero-filled first.
struct ScaledBytes {
    std::unique_ptr<std::byte[]> data;
    std::size_t size = 0;
    std::span<const std::byte> bytes() const { return {data.get(), size}; }
};

ScaledBytes scaled_bytes(const TensorToWrite& t) {
    const Tensor held = t.deferred ? t.deferred->take() : Tensor();  // made now, dropped once scaled
    const std::span<const std::byte> in = t.deferred ? held.bytes() : t.view.bytes();
    ScaledBytes out{std::make_unique_for_overwrite<std::byte[]>(in.size()), in.size()};
    with_context(fmt::format("tensor {}", quote(t.name)), [&] {
        scale_encoded(t.view.dtype(), in.data(), out.data.get(), in.size() / dtype_size(t.view.dtype()), t.scale);
    });
    return out;
}

// Tells each source of deferred tensors the order the writer will take them in.
void plan_deferred(const std::vector<TensorToWrite>& tensors) {
    std::vector<std::pair<TensorMaker*, std::vector<std::size_t>>> plans;
    for (const auto& t : tensors) {
        if (!t.deferred) continue;
        TensorMaker* source = &t.deferred->source();
        auto at = std::find_if(plans.begin(), plans.end(), [&](const auto& p) { return p.first == source; });
        if (at == plans.end()) at = plans.insert(plans.end(), {source, {}});
        at->second.push_back(t.deferred->id());
    }
    for (auto& [source, ids] : plans) source->plan(ids);
}

// Writes the tensors' data in order (updating `hash` with it, when given); a scaled tensor is
// read (pread, for a mapped input), scaled and written a chunk at a time through one reused
// buffer (the scaling runs at memory speed: handing whole tensors to a helper thread cost more
// in fresh pages and wake-ups than it saved); a deferred one is taken from its source when its
// turn comes.
void write_data(AtomicFile& out, const std::vector<TensorToWrite>& tensors, Sha256* hash = nullptr) {
    plan_deferred(tensors);
    auto put = [&](std::span<const std::byte> bytes) {
        out.write(bytes);
        if (hash) hash->update(bytes);
    };
    constexpr std::size_t chunk_bytes = 64u << 10;
    std::vector<std::byte> chunk;
    for (const TensorToWrite& t : tensors) {
        const Tensor held = t.deferred ? t.deferred->take() : Tensor();
        const std::span<const std::byte> bytes = t.deferred ? held.bytes() : t.view.bytes();
        if (t.scale == 1.0) {
            put(bytes);
            continue;
        }
        const std::size_t width = dtype_size(t.view.dtype());
        if (chunk.empty()) chunk.resize(chunk_bytes);
        with_context(fmt::format("tensor {}", quote(t.name)), [&] {
            for (std::size_t at = 0; at < bytes.size(); at += chunk_bytes) {
                const std::size_t n = std::min(chunk_bytes, bytes.size() - at);
                read_bytes(bytes.subspan(at, n), chunk.data());  // pread from a mapped input
                scale_encoded(t.view.dtype(), chunk.data(), chunk.data(), n / width, t.scale);
                put({chunk.data(), n});
            }
        });
    }
}

// Replaces scaled tensors by views of their scaled bytes (kept in `store`), and deferred ones by
// views of their bytes made and kept, for the paths that read every tensor's bytes more than
// once (the data hash) or all at once.
void materialize_scaled(std::vector<TensorToWrite>& tensors, std::vector<ScaledBytes>& store) {
    for (auto& t : tensors) {
        if (t.deferred) {
            t.view = TensorView(t.view.dtype(), t.view.shape(), t.deferred->kept());
            t.deferred.reset();  // the tensor being written keeps its DeferredBytes alive
        }
        if (t.scale != 1.0) {
            store.push_back(scaled_bytes(t));
            t.view = TensorView(t.view.dtype(), t.view.shape(), store.back().bytes());
            t.scale = 1.0;
        }
    }
}

}  // namespace

std::vector<std::byte> serialize_safetensors(std::vector<TensorToWrite> tensors,
                                             const std::map<std::string, std::string>& metadata) {
    std::vector<ScaledBytes> store;
    materialize_scaled(tensors, store);
    std::vector<std::byte> out = serialize_safetensors_header(tensors, metadata);
    for (const auto& t : tensors) out.insert(out.end(), t.view.bytes().begin(), t.view.bytes().end());
    return out;
}

void write_safetensors(AtomicFile& out, std::vector<TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata) {
    out.write(serialize_safetensors_header(tensors, metadata));
    write_data(out, tensors);
}

void write_safetensors(AtomicFile& out, std::vector<TensorToWrite> tensors, std::map<std::string, std::string> metadata,
                       const std::string& data_hash_key) {
    if (data_hash_key.empty()) {
        write_safetensors(out, std::move(tensors), metadata);
        return;
    }
    const bool deferred = std::any_of(tensors.begin(), tensors.end(), [](const TensorToWrite& t) { return t.deferred; });
    std::vector<ScaledBytes> store;  // the hash and the write both read every tensor
    if (!deferred || !out.patchable()) materialize_scaled(tensors, store);
    sort_for_safetensors(tensors);
    auto hash_data = [&tensors] {
        // Bytes of a mapped input are read with pread through one buffer: faulting the mapping
        // in (and unmapping it) cost the hashing thread, the critical path here, ~15% more.
        Sha256 hash;
        std::vector<std::byte> chunk;
        for (const auto& t : tensors) {
            const std::span<const std::byte> bytes = t.view.bytes();
            if (!mapped_source(bytes)) {
                hash.update(bytes);
                continue;
            }
            if (chunk.empty()) chunk.resize(256u << 10);
            for (std::size_t at = 0; at < bytes.size(); at += chunk.size()) {
                const std::size_t n = std::min(chunk.size(), bytes.size() - at);
                read_bytes(bytes.subspan(at, n), chunk.data());
                hash.update({chunk.data(), n});
            }
        }
        return hash.finish_hex();
    };
    if (!out.patchable()) {  // standard output: hash first, then write
        metadata[data_hash_key] = hash_data();
        write_safetensors(out, std::move(tensors), metadata);
        return;
    }
    // The hash has a fixed length, so the header can be written with a placeholder and the
    // digest patched in once the data is out; the hashing runs beside the writing.
    const std::string placeholder(64, '0');
    metadata[data_hash_key] = placeholder;
    const std::vector<std::byte> header = serialize_safetensors_header(tensors, metadata);
    const std::string needle = nlohmann::json(data_hash_key).dump() + ":\"" + placeholder + "\"";
    const std::string_view text(reinterpret_cast<const char*>(header.data()), header.size());
    const std::size_t at = text.find(needle);
    if (at == std::string_view::npos) fail(ErrorCode::internal, "hash placeholder not found in the header");
    const std::size_t digest_at = at + needle.size() - 1 - placeholder.size();
    if (deferred) {  // tensors made as they are written: hashed as they are written
        Sha256 hash;
        out.write(header);
        write_data(out, tensors, &hash);
        const std::string hex = hash.finish_hex();
        out.patch(digest_at, std::as_bytes(std::span(hex.data(), hex.size())));
        return;
    }
    std::future<std::string> digest = std::async(std::launch::async, hash_data);
    try {
        out.write(header);
        for (const auto& t : tensors) out.write(t.view.bytes());
    } catch (...) {
        digest.wait();
        throw;
    }
    const std::string hex = digest.get();
    out.patch(digest_at, std::as_bytes(std::span(hex.data(), hex.size())));
}

void write_safetensors(const std::filesystem::path& target, std::vector<TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata, bool overwrite,
                       const std::string& data_hash_key) {
    with_context(quote(target.string()), [&] {
        AtomicFile out(target, overwrite);
        write_safetensors(out, std::move(tensors), metadata, data_hash_key);
        out.commit();
    });
}

std::string safetensors_data_sha256(std::span<const std::byte> file_bytes) {
    if (file_bytes.size() < 8) fail(ErrorCode::bad_input, "file is too short for a safetensors header");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint8_t>(file_bytes[i]);
    if (n > file_bytes.size() - 8) fail(ErrorCode::bad_input, "header length {} exceeds the file size", n);
    return sha256_hex(file_bytes.subspan(8 + static_cast<std::size_t>(n)));
}

}  // namespace lorakit::formats
