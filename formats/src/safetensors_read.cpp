// The safetensors reader: as strict as the reference (huggingface/safetensors tensor.rs,
// read_metadata + Metadata::validate), rule for rule and in its order, plus a refusal of
// duplicate keys, which the reference only catches indirectly. Sizes from the file are
// checked before use; tensor data is never copied (tensors alias the mapping).
#include <algorithm>
#include <cstring>
#include <limits>
#include <unordered_set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "lorakit/error.h"
#include "parsed_tensor_file.h"
#include "lorakit/formats/safetensors.h"

namespace lorakit::formats {

namespace {

using Json = nlohmann::json;

std::uint64_t load_u64_le(const std::byte* p) {
    std::uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<std::uint8_t>(p[i]);
    return v;
}

// Bits per element of every safetensors dtype name, supported or not; 0 for unknown names.
unsigned dtype_bits(std::string_view name) {
    if (auto type = find_dtype(name)) return static_cast<unsigned>(dtype_size(*type) * 8);
    if (name == "F4") return 4;
    if (name == "F6_E2M3" || name == "F6_E3M2") return 6;
    if (name == "F8_E8M0" || name == "F8_E4M3FNUZ" || name == "F8_E5M2FNUZ") return 8;
    if (name == "C64") return 64;
    return 0;
}

// Returns the offset of the first byte that breaks UTF-8, or npos.
std::size_t invalid_utf8_at(std::string_view text) {
    const auto* s = reinterpret_cast<const unsigned char*>(text.data());
    const std::size_t n = text.size();
    std::size_t i = 0;
    while (i < n) {
        // Headers are almost all ASCII: skip it eight bytes at a time.
        if (i + 8 <= n) {
            std::uint64_t word;
            std::memcpy(&word, s + i, 8);
            if ((word & 0x8080808080808080ull) == 0) {
                i += 8;
                continue;
            }
        }
        const unsigned char c = s[i];
        if (c < 0x80) {
            ++i;
            continue;
        }
        std::size_t length;
        std::uint32_t code;
        if ((c & 0xe0) == 0xc0) {
            length = 2;
            code = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            length = 3;
            code = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            length = 4;
            code = c & 0x07;
        } else {
            return i;
        }
        if (i + length > n) return i;
        for (std::size_t k = 1; k < length; ++k) {
            if ((s[i + k] & 0xc0) != 0x80) return i;
            code = (code << 6) | (s[i + k] & 0x3f);
        }
        // Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
        if ((length == 2 && code < 0x80) || (length == 3 && code < 0x800) || (length == 4 && code < 0x10000) ||
            code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff))
            return i;
        i += length;
    }
    return std::string_view::npos;
}

struct RawEntry {
    std::string name;
    std::string dtype;
    unsigned dtype_bits = 0;
    Shape shape;
    std::uint64_t begin = 0, end = 0;
    bool has_dtype = false, has_shape = false, has_offsets = false;
};

// Builds the entries straight from parser events, in header order, checking structure,
// repeated fields and repeated metadata keys as it goes. On a violation it records the
// message and stops the parse.
class HeaderHandler : public nlohmann::json_sax<Json> {
public:
    std::vector<RawEntry> entries;
    std::map<std::string, std::string> metadata;
    std::string error;

    bool null() override { return scalar(Kind::null); }
    bool boolean(bool) override { return scalar(Kind::other); }
    bool number_integer(number_integer_t value) override {
        if (value < 0) return number_negative();
        return number_unsigned(static_cast<number_unsigned_t>(value));
    }
    bool number_unsigned(number_unsigned_t value) override {
        if (skip_depth_) return true;
        if (state_ == State::shape) {
            if (value > static_cast<number_unsigned_t>(std::numeric_limits<std::int64_t>::max()))
                return stop(fmt::format("tensor {}: dimension {} is too large", quote(current().name), value));
            current().shape.push_back(static_cast<std::int64_t>(value));
            return true;
        }
        if (state_ == State::offsets) {
            if (offsets_seen_ == 0) current().begin = value;
            else if (offsets_seen_ == 1) current().end = value;
            ++offsets_seen_;
            return true;
        }
        return scalar(Kind::other);
    }
    bool number_float(number_float_t, const string_t& text) override {
        if (skip_depth_) return true;
        if (state_ == State::shape || state_ == State::offsets) {
            // The parser hands integers past 2^64-1 over as floats; say which it was.
            const bool integral = text.find_first_of(".eE") == string_t::npos;
            return stop(fmt::format("tensor {}: {} holds {}, {}", quote(current().name),
                                    state_ == State::shape ? "shape" : "data_offsets", text,
                                    integral ? "which does not fit in 64 bits" : "which is not an integer"));
        }
        return scalar(Kind::other);
    }
    bool string(string_t& value) override {
        if (skip_depth_) return true;
        if (state_ == State::metadata_value) {
            metadata.emplace(std::move(pending_key_), std::move(value));
            state_ = State::metadata;
            return true;
        }
        if (state_ == State::dtype) {
            current().dtype = std::move(value);
            current().has_dtype = true;
            state_ = State::tensor;
            return true;
        }
        return scalar(Kind::other);
    }
    bool binary(binary_t&) override { return scalar(Kind::other); }

    bool start_object(std::size_t) override {
        if (skip_depth_) {
            ++skip_depth_;
            return true;
        }
        switch (state_) {
        case State::top: state_ = State::root; return true;
        case State::root_value:
            if (pending_key_ == "__metadata__") {
                state_ = State::metadata;
                return true;
            }
            entries.push_back(RawEntry{});
            current().name = std::move(pending_key_);
            state_ = State::tensor;
            return true;
        case State::tensor_skip_value: skip_depth_ = 1; return true;
        default: return wrong_type("an object");
        }
    }
    bool end_object() override {
        if (skip_depth_) {
            if (--skip_depth_ == 0) state_ = State::tensor;
            return true;
        }
        switch (state_) {
        case State::root: state_ = State::done; return true;
        case State::metadata: state_ = State::root; return true;
        case State::tensor: {
            RawEntry& e = current();
            if (!e.has_dtype) return stop(fmt::format("tensor {} has no \"dtype\"", quote(e.name)));
            if (!e.has_shape) return stop(fmt::format("tensor {} has no \"shape\"", quote(e.name)));
            if (!e.has_offsets) return stop(fmt::format("tensor {} has no \"data_offsets\"", quote(e.name)));
            // The reference rejects an unknown dtype while deserializing, before any layout check.
            e.dtype_bits = dtype_bits(e.dtype);
            if (e.dtype_bits == 0)
                return stop(fmt::format("tensor {} has unknown dtype {}", quote(e.name), quote(e.dtype)));
            state_ = State::root;
            return true;
        }
        default: return stop("malformed header");
        }
    }
    bool start_array(std::size_t) override {
        if (skip_depth_) {
            ++skip_depth_;
            return true;
        }
        if (state_ == State::shape_value) {
            state_ = State::shape;
            current().shape.clear();
            return true;
        }
        if (state_ == State::offsets_value) {
            state_ = State::offsets;
            offsets_seen_ = 0;
            return true;
        }
        if (state_ == State::tensor_skip_value) {
            skip_depth_ = 1;
            return true;
        }
        return wrong_type("an array");
    }
    bool end_array() override {
        if (skip_depth_) {
            if (--skip_depth_ == 0) state_ = State::tensor;
            return true;
        }
        if (state_ == State::shape) {
            current().has_shape = true;
            state_ = State::tensor;
            return true;
        }
        if (state_ == State::offsets) {
            if (offsets_seen_ != 2)
                return stop(fmt::format("tensor {}: data_offsets must hold 2 numbers, found {}", quote(current().name),
                                        offsets_seen_));
            current().has_offsets = true;
            state_ = State::tensor;
            return true;
        }
        return stop("malformed header");
    }
    bool key(string_t& value) override {
        if (skip_depth_) return true;
        switch (state_) {
        case State::root:
            // Repeated tensor names are found after the parse (find_duplicate_name), which is
            // cheaper than a set of every name built while parsing.
            if (value == "__metadata__") {
                if (seen_metadata_) return stop("duplicate \"__metadata__\"");
                seen_metadata_ = true;
            }
            pending_key_ = std::move(value);
            state_ = State::root_value;
            return true;
        case State::metadata:
            if (metadata.count(value)) return stop(fmt::format("duplicate metadata key {}", quote(value)));
            pending_key_ = std::move(value);
            state_ = State::metadata_value;
            return true;
        case State::tensor: {
            // Like serde's derived struct: a repeated known field is an error; unknown fields,
            // repeated or not, are ignored.
            RawEntry& e = current();
            const bool repeated = (value == "dtype" && e.has_dtype) || (value == "shape" && e.has_shape) ||
                                  (value == "data_offsets" && e.has_offsets);
            if (repeated) return stop(fmt::format("tensor {}: duplicate field {}", quote(e.name), quote(value)));
            if (value == "dtype") state_ = State::dtype;
            else if (value == "shape") state_ = State::shape_value;
            else if (value == "data_offsets") state_ = State::offsets_value;
            else state_ = State::tensor_skip_value;
            return true;
        }
        default: return stop("malformed header");
        }
    }
    bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& e) override {
        if (error.empty()) {
            std::string what = e.what();
            // "[json.exception.parse_error.101] parse error at line 1, column 5: ..." -> the part after ": ".
            const auto colon = what.find(": ");
            error = fmt::format("invalid JSON in header at byte {}: {}", position,
                                colon == std::string::npos ? what : what.substr(colon + 2));
        }
        return false;
    }

private:
    enum class State {
        top, root, root_value, metadata, metadata_value, tensor, dtype, shape_value, shape, offsets_value, offsets,
        tensor_skip_value, done
    };
    enum class Kind { null, other };

    RawEntry& current() { return entries.back(); }

    bool stop(std::string message) {
        if (error.empty()) error = std::move(message);
        return false;
    }
    bool number_negative() {
        if (skip_depth_) return true;
        if (state_ == State::shape) return stop(fmt::format("tensor {}: negative dimension", quote(current().name)));
        if (state_ == State::offsets) return stop(fmt::format("tensor {}: negative data offset", quote(current().name)));
        return scalar(Kind::other);
    }
    bool scalar(Kind kind) {
        if (skip_depth_) return true;
        switch (state_) {
        case State::top: return stop("header is not a JSON object");
        case State::root_value:
            if (pending_key_ == "__metadata__" && kind == Kind::null) {
                state_ = State::root;  // MLX writes "__metadata__": null
                return true;
            }
            return pending_key_ == "__metadata__" ? stop("\"__metadata__\" is not an object of strings")
                                                  : stop(fmt::format("tensor {} is not an object", quote(pending_key_)));
        case State::metadata_value:
            return stop(fmt::format("metadata value of {} is not a string", quote(pending_key_)));
        case State::tensor_skip_value: state_ = State::tensor; return true;
        case State::dtype: return stop(fmt::format("tensor {}: \"dtype\" is not a string", quote(current().name)));
        case State::shape_value:
        case State::shape: return stop(fmt::format("tensor {}: \"shape\" is not an array of integers", quote(current().name)));
        case State::offsets_value:
        case State::offsets:
            return stop(fmt::format("tensor {}: \"data_offsets\" is not an array of integers", quote(current().name)));
        default: return stop("malformed header");
        }
    }
    bool wrong_type(const char* what) {
        switch (state_) {
        case State::metadata_value:
            return stop(fmt::format("metadata value of {} is {}, not a string", quote(pending_key_), what));
        case State::dtype: return stop(fmt::format("tensor {}: \"dtype\" is not a string", quote(current().name)));
        case State::shape:
        case State::shape_value:
            return stop(fmt::format("tensor {}: \"shape\" is not an array of integers", quote(current().name)));
        case State::offsets:
        case State::offsets_value:
            return stop(fmt::format("tensor {}: \"data_offsets\" is not an array of integers", quote(current().name)));
        case State::top: return stop("header is not a JSON object");
        case State::root_value:
            if (pending_key_ == "__metadata__")
                return stop(fmt::format("\"__metadata__\" is {}, not an object of strings", what));
            return stop(fmt::format("tensor {} is {}, not an object", quote(pending_key_), what));
        default: return stop("malformed header");
        }
    }

    State state_ = State::top;
    std::string pending_key_;
    bool seen_metadata_ = false;
    int offsets_seen_ = 0;
    int skip_depth_ = 0;
};

// The first name, in header order, that an earlier entry already has.
const std::string* find_duplicate_name(const std::vector<RawEntry>& entries) {
    std::unordered_set<std::string_view> names;
    names.reserve(entries.size());
    for (const auto& e : entries)
        if (!names.insert(e.name).second) return &e.name;
    return nullptr;
}


}  // namespace

int SafetensorsDriver::identify(std::span<const std::byte> head, const std::filesystem::path& path) const {
    const bool named = path.extension() == ".safetensors";
    if (head.size() >= 9) {
        const std::uint64_t n = load_u64_le(head.data());
        std::size_t i = 8;
        while (i < head.size() && (head[i] == std::byte{' '} || head[i] == std::byte{'\t'} ||
                                   head[i] == std::byte{'\n'} || head[i] == std::byte{'\r'}))
            ++i;
        if (n >= 2 && n <= safetensors_max_header && i < head.size() && head[i] == std::byte{'{'}) return 100;
    }
    // A broken .safetensors file should still reach this parser for a precise message.
    return named ? 10 : 0;
}

std::unique_ptr<TensorFile> SafetensorsDriver::open(std::shared_ptr<const MappedFile> file) const {
    return read_safetensors(std::move(file));
}

std::unique_ptr<TensorFile> read_safetensors(std::shared_ptr<const MappedFile> file) {
    const auto bytes = file->bytes();
    const std::uint64_t file_size = bytes.size();
    if (file_size < 8)
        fail(ErrorCode::bad_input, "file is too short for a safetensors header: {} bytes, need at least 8", file_size);
    const std::uint64_t n = load_u64_le(bytes.data());
    if (n > safetensors_max_header)
        fail(ErrorCode::bad_input, "header length {} exceeds the safetensors limit of {} bytes", n, safetensors_max_header);
    if (n > file_size - 8)
        fail(ErrorCode::bad_input, "header length {} exceeds the file size {} (truncated file?)", n, file_size);
    const std::string_view header(reinterpret_cast<const char*>(bytes.data() + 8), static_cast<std::size_t>(n));
    if (const auto bad = invalid_utf8_at(header); bad != std::string_view::npos)
        fail(ErrorCode::bad_input, "header is not valid UTF-8 (byte {} of the header)", bad);

    // nlohmann skips a leading byte order mark; serde_json, and so the reference, does not.
    if (header.starts_with("\xEF\xBB\xBF"))
        fail(ErrorCode::bad_input, "invalid JSON in header at byte 0: a UTF-8 byte order mark is not JSON");

    HeaderHandler handler;
    const bool parsed = Json::sax_parse(header.begin(), header.end(), &handler, nlohmann::detail::input_format_t::json, true);
    if (!parsed || !handler.error.empty())
        fail(ErrorCode::bad_input, "{}", handler.error.empty() ? std::string("invalid JSON in header") : handler.error);
    if (const std::string* name = find_duplicate_name(handler.entries))
        fail(ErrorCode::bad_input, "duplicate tensor name {}", quote(*name));

    // Validate in data order, exactly as the reference does.
    std::vector<std::size_t> order(handler.entries.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
        const auto& x = handler.entries[a];
        const auto& y = handler.entries[b];
        return std::pair(x.begin, x.end) < std::pair(y.begin, y.end);
    });
    std::uint64_t running_end = 0;
    const RawEntry* previous = nullptr;
    for (std::size_t index : order) {
        const RawEntry& e = handler.entries[index];
        if (e.begin != running_end) {
            if (!previous)
                fail(ErrorCode::bad_input, "tensor {}: data_offsets start at {}; the first tensor must start at 0",
                     quote(e.name), e.begin);
            if (e.begin < running_end)
                fail(ErrorCode::bad_input, "tensor {} starts at byte {}, inside tensor {} which ends at {}",
                     quote(e.name), e.begin, quote(previous->name), running_end);
            fail(ErrorCode::bad_input, "tensor {} starts at byte {} but the previous tensor {} ends at {} (a gap)",
                 quote(e.name), e.begin, quote(previous->name), running_end);
        }
        if (e.end < e.begin)
            fail(ErrorCode::bad_input, "tensor {}: data_offsets [{}, {}] end before they begin", quote(e.name), e.begin,
                 e.end);
        const unsigned bits = e.dtype_bits;
        // Like the reference, but the non-zero dimensions of an empty tensor must not overflow
        // either (code downstream multiplies them in any order, in int64).
        std::uint64_t elements = 1, nonzero = 1;
        for (std::int64_t d : e.shape) {
            const auto dim = static_cast<std::uint64_t>(d);
            if (dim == 0) {
                elements = 0;
                continue;
            }
            if (nonzero > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / dim)
                fail(ErrorCode::bad_input, "tensor {}: shape {} overflows the element count", quote(e.name),
                     format_shape(e.shape));
            nonzero *= dim;
            elements *= dim;
        }
        if (elements > std::numeric_limits<std::uint64_t>::max() / bits)
            fail(ErrorCode::bad_input, "tensor {}: shape {} of {} overflows the bit count", quote(e.name),
                 format_shape(e.shape), e.dtype);
        const std::uint64_t total_bits = elements * bits;
        if (total_bits % 8 != 0)
            fail(ErrorCode::bad_input, "tensor {}: {} elements of {} are not a whole number of bytes", quote(e.name),
                 elements, e.dtype);
        if (e.end - e.begin != total_bits / 8)
            fail(ErrorCode::bad_input, "tensor {}: data_offsets [{}, {}] hold {} bytes, but shape {} of {} needs {}",
                 quote(e.name), e.begin, e.end, e.end - e.begin, format_shape(e.shape), e.dtype, total_bits / 8);
        running_end = e.end;
        previous = &e;
    }
    const std::uint64_t data_size = file_size - 8 - n;
    if (running_end != data_size) {
        if (running_end > data_size)
            fail(ErrorCode::bad_input, "tensor data ends at byte {} of the data section but the file holds only {} (truncated file?)",
                 running_end, data_size);
        fail(ErrorCode::bad_input, "{} trailing bytes after the last tensor", data_size - running_end);
    }

    const std::span<const std::byte> data = bytes.subspan(8 + static_cast<std::size_t>(n));
    std::shared_ptr<const void> owner = file;
    std::vector<TensorEntry> entries;
    entries.reserve(handler.entries.size());
    for (auto& e : handler.entries) {
        TensorEntry entry;
        entry.name = std::move(e.name);
        entry.dtype_name = std::move(e.dtype);
        entry.shape = e.shape;
        entry.offset = e.begin;
        entry.size = e.end - e.begin;
        if (auto type = find_dtype(entry.dtype_name))
            entry.tensor = Tensor::alias(*type, std::move(e.shape),
                                         data.subspan(static_cast<std::size_t>(entry.offset), static_cast<std::size_t>(entry.size)),
                                         owner);
        entries.push_back(std::move(entry));
    }
    return std::make_unique<ParsedTensorFile>("safetensors", std::move(file), std::move(entries), std::move(handler.metadata));
}

}  // namespace lorakit::formats
