#include "lorakit/formats/gguf.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>

#include <immintrin.h>

#include <fmt/format.h>

#include "lorakit/dtype.h"
#include "lorakit/error.h"

namespace lorakit::formats {

namespace {

constexpr std::array<GgmlTypeInfo, 33> ggml_types{{
    {0, "F32", 1, 4},        {1, "F16", 1, 2},         {2, "Q4_0", 32, 18},      {3, "Q4_1", 32, 20},
    {6, "Q5_0", 32, 22},     {7, "Q5_1", 32, 24},      {8, "Q8_0", 32, 34},      {9, "Q8_1", 32, 36},
    {10, "Q2_K", 256, 84},   {11, "Q3_K", 256, 110},   {12, "Q4_K", 256, 144},   {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},  {15, "Q8_K", 256, 292},   {16, "IQ2_XXS", 256, 66}, {17, "IQ2_XS", 256, 74},
    {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50},  {20, "IQ4_NL", 32, 18},   {21, "IQ3_S", 256, 110},
    {22, "IQ2_S", 256, 82},  {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},         {25, "I16", 1, 2},
    {26, "I32", 1, 4},       {27, "I64", 1, 8},        {28, "F64", 1, 8},        {29, "IQ1_M", 256, 56},
    {30, "BF16", 1, 2},      {34, "TQ1_0", 256, 54},   {35, "TQ2_0", 256, 66},   {39, "MXFP4", 32, 17},
    {0xffffffffu, "", 0, 0},
}};

// The lorakit dtype a plain (unblocked) ggml type reads as, if any.
std::optional<DType> plain_dtype(std::uint32_t id) {
    switch (id) {
    case 0: return DType::F32;
    case 1: return DType::F16;
    case 24: return DType::I8;
    case 25: return DType::I16;
    case 26: return DType::I32;
    case 27: return DType::I64;
    case 28: return DType::F64;
    case 30: return DType::BF16;
    default: return std::nullopt;
    }
}

std::size_t scalar_size(GgufType type) {
    switch (type) {
    case GgufType::u8:
    case GgufType::i8:
    case GgufType::boolean: return 1;
    case GgufType::u16:
    case GgufType::i16: return 2;
    case GgufType::u32:
    case GgufType::i32:
    case GgufType::f32: return 4;
    case GgufType::u64:
    case GgufType::i64:
    case GgufType::f64: return 8;
    default: return 0;
    }
}

template <typename T>
T load(const char* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));  // little-endian hosts only (static_assert below)
    return v;
}
static_assert(std::endian::native == std::endian::little, "GGUF I/O assumes a little-endian host");

template <typename T>
void append(std::string& out, T value) {
    char bytes[sizeof(T)];
    std::memcpy(bytes, &value, sizeof(T));
    out.append(bytes, sizeof(T));
}

void append_string(std::string& out, std::string_view text) {
    append<std::uint64_t>(out, text.size());
    out.append(text);
}

std::string number_text(double value) { return fmt::format("{}", value); }

// A scalar of `type` at p, as a double (integers above 2^53 lose precision, for display only).
double scalar_number(GgufType type, const char* p) {
    switch (type) {
    case GgufType::u8: return load<std::uint8_t>(p);
    case GgufType::i8: return load<std::int8_t>(p);
    case GgufType::boolean: return load<std::uint8_t>(p) ? 1 : 0;
    case GgufType::u16: return load<std::uint16_t>(p);
    case GgufType::i16: return load<std::int16_t>(p);
    case GgufType::u32: return load<std::uint32_t>(p);
    case GgufType::i32: return load<std::int32_t>(p);
    case GgufType::f32: return load<float>(p);
    case GgufType::u64: return static_cast<double>(load<std::uint64_t>(p));
    case GgufType::i64: return static_cast<double>(load<std::int64_t>(p));
    case GgufType::f64: return load<double>(p);
    default: return 0;
    }
}

std::string scalar_text(GgufType type, const char* p) {
    switch (type) {
    case GgufType::boolean: return load<std::uint8_t>(p) ? "true" : "false";
    case GgufType::u64: return fmt::format("{}", load<std::uint64_t>(p));
    case GgufType::i64: return fmt::format("{}", load<std::int64_t>(p));
    case GgufType::f32: return fmt::format("{}", load<float>(p));
    default: return number_text(scalar_number(type, p));
    }
}

// Bounds-checked reading of the header.
class Cursor {
public:
    Cursor(std::span<const std::byte> bytes) : p_(reinterpret_cast<const char*>(bytes.data())), size_(bytes.size()) {}
    std::uint64_t position() const noexcept { return pos_; }
    std::uint64_t remaining() const noexcept { return size_ - pos_; }
    const char* here() const noexcept { return p_ + pos_; }

    template <typename T>
    T read(std::string_view what) {
        need(sizeof(T), what);
        T v = load<T>(p_ + pos_);
        pos_ += sizeof(T);
        return v;
    }
    void need(std::uint64_t n, std::string_view what) const {
        if (n > remaining())
            fail(ErrorCode::bad_input, "file ends inside {} (at byte {}, {} more bytes needed)", what, pos_, n - remaining());
    }
    std::string_view string(std::string_view what, std::uint64_t limit) {
        const auto n = read<std::uint64_t>(what);
        if (n > limit) fail(ErrorCode::bad_input, "{} has length {}, above the limit of {}", what, n, limit);
        need(n, what);
        std::string_view s(p_ + pos_, static_cast<std::size_t>(n));
        pos_ += n;
        return s;
    }
    void skip(std::uint64_t n, std::string_view what) {
        need(n, what);
        pos_ += n;
    }

private:
    const char* p_;
    std::uint64_t size_;
    std::uint64_t pos_ = 0;
};

constexpr std::uint64_t max_string = 1ull << 30;       // ggml: strings up to 1 GiB
constexpr std::uint64_t max_array = 1ull << 30;        // ggml: arrays up to 2^30 elements
constexpr std::uint32_t max_name = 63;                  // GGML_MAX_NAME 64 with the NUL
constexpr std::uint32_t max_dims = 4;

GgufType value_type(std::uint32_t raw, std::string_view key) {
    if (raw > static_cast<std::uint32_t>(GgufType::f64))
        fail(ErrorCode::bad_input, "key {} has unknown value type {}", quote(key), raw);
    return static_cast<GgufType>(raw);
}

GgufValue read_value(Cursor& c, std::string_view key) {
    GgufValue v;
    v.type = value_type(c.read<std::uint32_t>("a value type"), key);
    const std::string what = fmt::format("the value of {}", quote(key));
    if (v.type == GgufType::string) {
        v.data = std::string(c.string(what, max_string));
        return v;
    }
    if (v.type != GgufType::array) {
        const std::size_t n = scalar_size(v.type);
        c.need(n, what);
        v.data.assign(c.here(), n);
        c.skip(n, what);
        if (v.type == GgufType::boolean && static_cast<unsigned char>(v.data[0]) > 1)
            fail(ErrorCode::bad_input, "key {} holds a boolean of value {}", quote(key), static_cast<unsigned char>(v.data[0]));
        return v;
    }
    v.element_type = value_type(c.read<std::uint32_t>("an array type"), key);
    if (v.element_type == GgufType::array) fail(ErrorCode::bad_input, "key {} holds an array of arrays", quote(key));
    v.count = c.read<std::uint64_t>("an array length");
    if (v.count > max_array) fail(ErrorCode::bad_input, "key {} holds an array of {} elements, above 2^30", quote(key), v.count);
    if (v.element_type == GgufType::string) {
        // Each string is at least its 8-byte length: refuse counts the file cannot hold.
        if (v.count > c.remaining() / 8) c.need(v.count * 8, what);
        const std::uint64_t start = c.position();
        const char* begin = c.here();
        for (std::uint64_t i = 0; i < v.count; ++i) c.string(what, max_string);
        v.data.assign(begin, static_cast<std::size_t>(c.position() - start));
        return v;
    }
    const std::size_t n = scalar_size(v.element_type);
    if (v.count > c.remaining() / n) c.need(v.count * n, what);
    v.data.assign(c.here(), static_cast<std::size_t>(v.count * n));
    c.skip(v.count * n, what);
    if (v.element_type == GgufType::boolean)
        for (char b : v.data)
            if (static_cast<unsigned char>(b) > 1) fail(ErrorCode::bad_input, "key {} holds a boolean above 1", quote(key));
    return v;
}

std::uint64_t pad_to(std::uint64_t n, std::uint64_t alignment) { return (n + alignment - 1) / alignment * alignment; }

}  // namespace

std::string_view gguf_type_name(GgufType type) noexcept {
    static constexpr std::array<std::string_view, 13> names{"UINT8", "INT8",   "UINT16", "INT16", "UINT32",
                                                            "INT32", "FLOAT32", "BOOL",  "STRING", "ARRAY",
                                                            "UINT64", "INT64", "FLOAT64"};
    const auto i = static_cast<std::size_t>(type);
    return i < names.size() ? names[i] : "?";
}

std::optional<GgmlTypeInfo> ggml_type_info(std::uint32_t id) noexcept {
    for (const auto& t : ggml_types)
        if (t.id == id && t.block_elements) return t;
    return std::nullopt;
}

std::optional<GgmlTypeInfo> ggml_type_by_name(std::string_view name) noexcept {
    for (const auto& t : ggml_types)
        if (t.name == name && t.block_elements) return t;
    return std::nullopt;
}

// ---- values ---------------------------------------------------------------------------------

GgufValue GgufValue::string(std::string_view text) { return {GgufType::string, GgufType::u8, 0, std::string(text)}; }

#define LORAKIT_GGUF_SCALAR(fn, ctype, tag)                \
    GgufValue GgufValue::fn(ctype value) {                 \
        GgufValue v{GgufType::tag, GgufType::u8, 0, {}};   \
        append(v.data, value);                             \
        return v;                                          \
    }
LORAKIT_GGUF_SCALAR(u32, std::uint32_t, u32)
LORAKIT_GGUF_SCALAR(i32, std::int32_t, i32)
LORAKIT_GGUF_SCALAR(u64, std::uint64_t, u64)
LORAKIT_GGUF_SCALAR(f32, float, f32)
LORAKIT_GGUF_SCALAR(f64, double, f64)
#undef LORAKIT_GGUF_SCALAR

GgufValue GgufValue::boolean(bool value) {
    GgufValue v{GgufType::boolean, GgufType::u8, 0, {}};
    v.data.push_back(value ? '\1' : '\0');
    return v;
}

GgufValue GgufValue::strings(const std::vector<std::string>& values) {
    GgufValue v{GgufType::array, GgufType::string, values.size(), {}};
    for (const auto& s : values) append_string(v.data, s);
    return v;
}

GgufValue GgufValue::u32s(const std::vector<std::uint32_t>& values) {
    GgufValue v{GgufType::array, GgufType::u32, values.size(), {}};
    for (auto x : values) append(v.data, x);
    return v;
}

std::optional<std::string> GgufValue::as_string() const {
    if (type == GgufType::string) return data;
    return std::nullopt;
}

std::optional<double> GgufValue::as_number() const {
    if (type == GgufType::string || type == GgufType::array || data.size() != scalar_size(type)) return std::nullopt;
    return scalar_number(type, data.data());
}

std::string GgufValue::to_text() const {
    if (type == GgufType::string) return data;
    if (type != GgufType::array) return data.size() == scalar_size(type) ? scalar_text(type, data.data()) : "?";
    if (count > 16) return fmt::format("[{} x {}]", gguf_type_name(element_type), count);
    std::string out = "[";
    std::size_t at = 0;
    for (std::uint64_t i = 0; i < count; ++i) {
        if (i) out += ", ";
        if (element_type == GgufType::string) {
            std::uint64_t n = 0;
            if (at + 8 > data.size()) break;
            n = load<std::uint64_t>(data.data() + at);
            at += 8;
            if (n > data.size() - at) break;
            out += '"' + data.substr(at, static_cast<std::size_t>(n)) + '"';
            at += static_cast<std::size_t>(n);
        } else {
            const std::size_t n = scalar_size(element_type);
            if (at + n > data.size()) break;
            out += scalar_text(element_type, data.data() + at);
            at += n;
        }
    }
    return out + "]";
}

// ---- Q8_0 -----------------------------------------------------------------------------------

namespace {

// ggml's quantize_row_q8_0_ref: per block of 32, d = amax / 127 (stored as f16), and each value
// scaled by 1/d and rounded half away from zero (roundf).
void quantize_blocks_scalar(const float* values, std::size_t blocks, std::byte* out) {
    for (std::size_t b = 0; b < blocks; ++b) {
        const float* x = values + b * 32;
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const std::uint16_t dh = f32_to_f16(d);
        std::byte* block = out + b * 34;
        std::memcpy(block, &dh, 2);
        for (int j = 0; j < 32; ++j) block[2 + j] = static_cast<std::byte>(static_cast<std::int8_t>(std::round(x[j] * id)));
    }
}

// The same with AVX2: roundf as trunc plus one step away from zero when the dropped fraction is
// at least one half (both differences are exact in float). 6x the scalar loop, and identical
// bytes (tests/unit/test_gguf.cpp compares them).
__attribute__((target("avx2"))) void quantize_blocks_avx2(const float* values, std::size_t blocks, std::byte* out) {
    const __m256 sign = _mm256_set1_ps(-0.0f), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (std::size_t b = 0; b < blocks; ++b) {
        const float* x = values + b * 32;
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int k = 0; k < 4; ++k) {
            v[k] = _mm256_loadu_ps(x + 8 * k);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
        const float d = _mm_cvtss_f32(m) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const std::uint16_t dh = f32_to_f16(d);
        std::byte* block = out + b * 34;
        std::memcpy(block, &dh, 2);
        const __m256 scale = _mm256_set1_ps(id);
        __m256i q[4];
        for (int k = 0; k < 4; ++k) {
            const __m256 s = _mm256_mul_ps(v[k], scale);
            const __m256 t = _mm256_round_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            const __m256 away = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(s, t)), half, _CMP_GE_OQ);
            const __m256 step = _mm256_and_ps(away, _mm256_or_ps(_mm256_and_ps(s, sign), one));
            q[k] = _mm256_cvttps_epi32(_mm256_add_ps(t, step));
        }
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(block + 2), _mm256_permutevar8x32_epi32(packed, order));
    }
}

void quantize_blocks(const float* values, std::size_t blocks, std::byte* out) {
    static const bool avx2 = __builtin_cpu_supports("avx2");
    if (avx2) quantize_blocks_avx2(values, blocks, out);
    else quantize_blocks_scalar(values, blocks, out);
}

void dequantize_blocks(const std::byte* blocks, std::size_t count, float* values) {
    for (std::size_t b = 0; b < count; ++b) {
        const std::byte* block = blocks + b * 34;
        std::uint16_t dh;
        std::memcpy(&dh, block, 2);
        const float d = f16_to_f32(dh);
        std::int8_t q[32];
        std::memcpy(q, block + 2, 32);
        float* out = values + b * 32;
        for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(q[j]);
    }
}

}  // namespace

std::vector<std::byte> quantize_q8_0(const float* values, std::size_t count) {
    if (count % 32) fail(ErrorCode::internal, "Q8_0 needs a multiple of 32 values, got {}", count);
    std::vector<std::byte> out(count / 32 * 34);
    quantize_blocks(values, count / 32, out.data());
    // A block's scale amax / 127 is stored as f16: from a largest finite magnitude of 127 x 65520
    // on it would be infinite, and the block garbage. Refused (an infinity in the values is kept).
    for (std::size_t b = 0; b < count / 32; ++b) {
        std::uint16_t dh;
        std::memcpy(&dh, out.data() + b * 34, 2);
        if ((dh & 0x7fff) != 0x7c00) continue;
        const float* x = values + b * 32;
        if (std::all_of(x, x + 32, [](float v) { return std::isfinite(v); }))
            fail(ErrorCode::unsupported,
                 "a block of 32 values reaches magnitude {:g}, beyond what Q8_0's f16 block scale holds (127 x 65504); "
                 "write f16 or f32 instead",
                 static_cast<double>(std::abs(*std::max_element(x, x + 32, [](float a, float c) { return std::abs(a) < std::abs(c); }))));
    }
    return out;
}

void dequantize_q8_0(const std::byte* blocks, float* values, std::size_t count) { dequantize_blocks(blocks, count / 32, values); }

// ---- reading --------------------------------------------------------------------------------

GgufFile::GgufFile(std::shared_ptr<const MappedFile> file, std::uint32_t version,
                   std::vector<std::pair<std::string, GgufValue>> kv, std::vector<TensorEntry> entries,
                   std::vector<std::uint32_t> types, std::uint32_t alignment, std::uint64_t data_start)
    : file_(std::move(file)), version_(version), kv_(std::move(kv)), entries_(std::move(entries)), types_(std::move(types)),
      alignment_(alignment), data_start_(data_start) {
    for (const auto& [key, value] : kv_) metadata_[key] = value.to_text();
    build_index();
}

void GgufFile::prefetch(const TensorEntry& entry) const {
    file_->prefetch(static_cast<std::size_t>(data_start_ + entry.offset), static_cast<std::size_t>(entry.size));
}

void GgufFile::release(const TensorEntry& entry) const {
    file_->release(file_->bytes().subspan(static_cast<std::size_t>(data_start_ + entry.offset), static_cast<std::size_t>(entry.size)));
}

std::span<const std::byte> GgufFile::raw(std::size_t i) const {
    const TensorEntry& e = entries_.at(i);
    return file_->bytes().subspan(static_cast<std::size_t>(data_start_ + e.offset), static_cast<std::size_t>(e.size));
}

const GgufValue* GgufFile::find_kv(std::string_view key) const noexcept {
    for (const auto& [k, v] : kv_)
        if (k == key) return &v;
    return nullptr;
}

int GgufDriver::identify(std::span<const std::byte> head, const std::filesystem::path& path) const {
    if (head.size() >= 4 && std::memcmp(head.data(), "GGUF", 4) == 0) return 100;
    return path.extension() == ".gguf" ? 10 : 0;
}

std::unique_ptr<TensorFile> GgufDriver::open(std::shared_ptr<const MappedFile> file) const {
    return read_gguf(std::move(file));
}

std::unique_ptr<GgufFile> read_gguf(std::shared_ptr<const MappedFile> file) {
    const auto bytes = file->bytes();
    Cursor c(bytes);
    c.need(4, "the magic number");
    if (std::memcmp(bytes.data(), "GGUF", 4) != 0) fail(ErrorCode::bad_input, "not a GGUF file (bad magic number)");
    c.skip(4, "the magic number");
    const auto version = c.read<std::uint32_t>("the version");
    if (version == 0) fail(ErrorCode::bad_input, "GGUF version 0 is invalid");
    if ((version & 0xffffu) == 0) fail(ErrorCode::unsupported, "GGUF version {:#x}: a big-endian file", version);
    if (version == 1) fail(ErrorCode::unsupported, "GGUF version 1 is not supported (convert it with a newer llama.cpp)");
    if (version > 3) fail(ErrorCode::unsupported, "GGUF version {} is newer than lorakit knows (2 and 3)", version);
    const auto tensor_count = c.read<std::uint64_t>("the tensor count");
    const auto kv_count = c.read<std::uint64_t>("the key-value count");
    // Every pair takes at least 12 bytes and every tensor info at least 24: refuse counts the
    // file cannot hold before reserving anything for them.
    if (kv_count > c.remaining() / 12)
        fail(ErrorCode::bad_input, "{} key-value pairs cannot fit in the {} bytes left", kv_count, c.remaining());
    if (tensor_count > c.remaining() / 24)
        fail(ErrorCode::bad_input, "{} tensors cannot fit in the {} bytes left", tensor_count, c.remaining());

    std::vector<std::pair<std::string, GgufValue>> kv;
    kv.reserve(static_cast<std::size_t>(kv_count));
    std::set<std::string, std::less<>> keys;
    std::uint32_t alignment = gguf_default_alignment;
    for (std::uint64_t i = 0; i < kv_count; ++i) {
        std::string key(c.string(fmt::format("key {}", i), max_string));
        if (key.empty()) fail(ErrorCode::bad_input, "key-value pair {} has an empty key", i);
        if (!keys.insert(key).second) fail(ErrorCode::bad_input, "duplicate key {}", quote(key));
        GgufValue value = read_value(c, key);
        if (key == "general.alignment") {
            if (value.type != GgufType::u32)
                fail(ErrorCode::bad_input, "general.alignment is {}, not UINT32", gguf_type_name(value.type));
            alignment = load<std::uint32_t>(value.data.data());
            if (alignment == 0 || (alignment & (alignment - 1)) != 0)
                fail(ErrorCode::bad_input, "general.alignment {} is not a power of two", alignment);
        }
        kv.emplace_back(std::move(key), std::move(value));
    }

    struct Info {
        std::string name;
        Shape shape;  // NumPy order
        GgmlTypeInfo type;
        std::uint64_t offset, size;
    };
    std::vector<Info> infos;
    infos.reserve(static_cast<std::size_t>(tensor_count));
    std::set<std::string, std::less<>> names;
    std::uint64_t expected_offset = 0;
    for (std::uint64_t i = 0; i < tensor_count; ++i) {
        Info info;
        info.name = std::string(c.string(fmt::format("the name of tensor {}", i), max_string));
        const std::string who = fmt::format("tensor {}", quote(info.name));
        if (info.name.size() > max_name)
            fail(ErrorCode::bad_input, "{}: name of {} bytes, above ggml's limit of {}", who, info.name.size(), max_name);
        if (!names.insert(info.name).second) fail(ErrorCode::bad_input, "duplicate tensor name {}", quote(info.name));
        const auto n_dims = c.read<std::uint32_t>("a dimension count");
        if (n_dims > max_dims) fail(ErrorCode::bad_input, "{} has {} dimensions, above ggml's 4", who, n_dims);
        std::array<std::uint64_t, max_dims> ne{1, 1, 1, 1};
        for (std::uint32_t d = 0; d < n_dims; ++d) ne[d] = c.read<std::uint64_t>("a dimension");
        // The product of the non-zero dimensions must fit too: a zero dimension makes the
        // tensor empty, but code that multiplies the shape in another order must not overflow.
        std::uint64_t elements = 1, nonzero = 1;
        for (std::uint32_t d = 0; d < n_dims; ++d) {
            if (ne[d] > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
                fail(ErrorCode::bad_input, "{} has a negative dimension", who);
            if (ne[d] == 0) {
                elements = 0;
                continue;
            }
            if (nonzero > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / ne[d])
                fail(ErrorCode::bad_input, "{} has more elements than 64 bits can count", who);
            nonzero *= ne[d];
            elements *= ne[d];
        }
        for (std::uint32_t d = n_dims; d-- > 0;) info.shape.push_back(static_cast<std::int64_t>(ne[d]));
        const auto type_id = c.read<std::uint32_t>("a tensor type");
        const auto type = ggml_type_info(type_id);
        if (!type) fail(ErrorCode::unsupported, "{} has ggml type {}, which lorakit does not know", who, type_id);
        info.type = *type;
        if (ne[0] % type->block_elements)
            fail(ErrorCode::bad_input, "{}: row of {} elements is not a multiple of the {} block size {}", who, ne[0],
                 type->name, type->block_elements);
        const std::uint64_t blocks = elements / type->block_elements;
        if (blocks > std::numeric_limits<std::uint64_t>::max() / type->block_bytes / 2)
            fail(ErrorCode::bad_input, "{} is too large", who);
        info.size = blocks * type->block_bytes;
        info.offset = c.read<std::uint64_t>("a tensor offset");
        if (info.offset != expected_offset)
            fail(ErrorCode::bad_input, "{} has offset {}, expected {} (tensors must be packed in order)", who, info.offset,
                 expected_offset);
        expected_offset = pad_to(info.offset + info.size, alignment);
        infos.push_back(std::move(info));
    }
    const std::uint64_t data_start = tensor_count ? pad_to(c.position(), alignment) : c.position();
    if (data_start > bytes.size()) fail(ErrorCode::bad_input, "file ends before the data section (byte {})", data_start);
    const std::uint64_t data_size = bytes.size() - data_start;
    const std::uint64_t data_end = infos.empty() ? 0 : infos.back().offset + infos.back().size;
    if (data_end > data_size)
        fail(ErrorCode::bad_input, "file is truncated: the data section needs {} bytes, {} are there", data_end, data_size);
    // After the last tensor only its zero padding may follow (gguf-py also pads a file
    // without tensors after its header).
    const std::uint64_t allowed = infos.empty() ? alignment - 1 : expected_offset;
    if (data_size > allowed) fail(ErrorCode::bad_input, "{} unexpected bytes at the end of the file", data_size - data_end);
    for (std::uint64_t p = data_end; p < data_size; ++p)
        if (bytes[static_cast<std::size_t>(data_start + p)] != std::byte{0})
            fail(ErrorCode::bad_input, "non-zero padding after the last tensor");

    std::vector<TensorEntry> entries;
    std::vector<std::uint32_t> types;
    entries.reserve(infos.size());
    std::shared_ptr<const void> owner = file;
    for (auto& info : infos) {
        TensorEntry e;
        e.name = std::move(info.name);
        e.dtype_name = std::string(info.type.name);
        e.shape = info.shape;
        e.offset = info.offset;
        e.size = info.size;
        const auto span = bytes.subspan(static_cast<std::size_t>(data_start + info.offset), static_cast<std::size_t>(info.size));
        if (auto plain = plain_dtype(info.type.id)) {
            e.tensor = Tensor::alias(*plain, info.shape, span, owner);
        } else if (info.type.id == ggml_q8_0) {
            // Decoded when used, one tensor at a time: a Q8_0 model held in f32 would take
            // almost four times its file size.
            e.decode = [span, owner](std::span<float> out) { dequantize_q8_0(span.data(), out.data(), out.size()); };
        }
        types.push_back(info.type.id);
        entries.push_back(std::move(e));
    }
    return std::make_unique<GgufFile>(std::move(file), version, std::move(kv), std::move(entries), std::move(types), alignment,
                                      data_start);
}

// ---- writing --------------------------------------------------------------------------------

GgufTensorToWrite gguf_tensor(std::string name, const TensorView& tensor, std::uint32_t type) {
    GgufTensorToWrite t;
    t.name = std::move(name);
    t.type = type;
    t.shape = tensor.shape();
    const DType want = type == ggml_f16 ? DType::F16 : type == ggml_bf16 ? DType::BF16 : DType::F32;
    if (type != ggml_f32 && type != ggml_f16 && type != ggml_bf16 && type != ggml_q8_0)
        fail(ErrorCode::unsupported, "writing ggml type {} is not supported", type);
    if (type == ggml_q8_0) {
        if (t.shape.empty() || t.shape.back() % 32)
            fail(ErrorCode::unsupported, "tensor {}: Q8_0 needs rows of a multiple of 32 elements", quote(t.name));
        const auto values = tensor.to_f32();
        t.owned = quantize_q8_0(values.data(), values.size());
    } else if (tensor.dtype() == want) {
        t.view = tensor.bytes();
    } else {
        const auto values = tensor.to_f32();
        t.owned.resize(values.size() * dtype_size(want));
        convert_from_f32(want, values.data(), t.owned.data(), values.size());
    }
    return t;
}

namespace {

std::string gguf_header(const std::vector<std::pair<std::string, GgufValue>>& kv,
                        const std::vector<GgufTensorToWrite>& tensors, std::uint32_t& alignment) {
    alignment = gguf_default_alignment;
    std::set<std::string_view> keys, names;
    std::string out = "GGUF";
    append<std::uint32_t>(out, 3);
    append<std::uint64_t>(out, tensors.size());
    append<std::uint64_t>(out, kv.size());
    for (const auto& [key, value] : kv) {
        if (key.empty() || !keys.insert(key).second) fail(ErrorCode::internal, "empty or duplicate GGUF key {}", quote(key));
        if (key == "general.alignment") {
            if (value.type != GgufType::u32) fail(ErrorCode::internal, "general.alignment must be UINT32");
            alignment = load<std::uint32_t>(value.data.data());
            if (alignment == 0 || (alignment & (alignment - 1)) != 0) fail(ErrorCode::internal, "bad general.alignment");
        }
        append_string(out, key);
        append<std::uint32_t>(out, static_cast<std::uint32_t>(value.type));
        if (value.type == GgufType::array) {
            append<std::uint32_t>(out, static_cast<std::uint32_t>(value.element_type));
            append<std::uint64_t>(out, value.count);
        } else if (value.type == GgufType::string) {
            append<std::uint64_t>(out, value.data.size());
        }
        out += value.data;
    }
    std::uint64_t offset = 0;
    for (const auto& t : tensors) {
        if (t.name.size() > max_name || !names.insert(t.name).second)
            fail(ErrorCode::internal, "GGUF tensor name {} is too long or repeated", quote(t.name));
        if (t.shape.size() > max_dims) fail(ErrorCode::internal, "tensor {} has more than 4 dimensions", quote(t.name));
        const auto info = ggml_type_info(t.type);
        if (!info) fail(ErrorCode::internal, "unknown ggml type {}", t.type);
        std::uint64_t elements = 1;
        for (auto d : t.shape) elements *= static_cast<std::uint64_t>(d);
        if (elements / info->block_elements * info->block_bytes != t.size())
            fail(ErrorCode::internal, "tensor {}: {} bytes for {} elements of {}", quote(t.name), t.size(), elements,
                 info->name);
        append_string(out, t.name);
        append<std::uint32_t>(out, static_cast<std::uint32_t>(t.shape.size()));
        for (auto d = t.shape.size(); d-- > 0;) append<std::uint64_t>(out, static_cast<std::uint64_t>(t.shape[d]));
        append<std::uint32_t>(out, t.type);
        append<std::uint64_t>(out, offset);
        offset = pad_to(offset + t.size(), alignment);
    }
    if (!tensors.empty()) out.resize(static_cast<std::size_t>(pad_to(out.size(), alignment)), '\0');
    return out;
}

}  // namespace

void write_gguf_streamed(AtomicFile& out, const std::vector<std::pair<std::string, GgufValue>>& kv,
                         const std::vector<GgufTensorToWrite>& tensors,
                         const std::function<void(std::size_t, AtomicFile&)>& write_data) {
    std::uint32_t alignment = 0;
    out.write(gguf_header(kv, tensors, alignment));
    static const std::vector<std::byte> zeros(4096);
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        const std::uint64_t start = out.size(), size = tensors[i].size();
        write_data(i, out);
        if (out.size() - start != size)
            fail(ErrorCode::internal, "tensor {}: {} bytes written, {} announced", quote(tensors[i].name), out.size() - start, size);
        std::uint64_t padding = pad_to(size, alignment) - size;
        while (padding > 0) {
            const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(padding, zeros.size()));
            out.write(std::span(zeros.data(), n));
            padding -= n;
        }
    }
}

void write_gguf(AtomicFile& out, const std::vector<std::pair<std::string, GgufValue>>& kv,
                const std::vector<GgufTensorToWrite>& tensors) {
    write_gguf_streamed(out, kv, tensors, [&](std::size_t i, AtomicFile& file) { file.write(tensors[i].bytes()); });
}

std::vector<std::byte> serialize_gguf(const std::vector<std::pair<std::string, GgufValue>>& kv,
                                      const std::vector<GgufTensorToWrite>& tensors) {
    std::uint32_t alignment = 0;
    const std::string header = gguf_header(kv, tensors, alignment);
    std::vector<std::byte> out(reinterpret_cast<const std::byte*>(header.data()),
                               reinterpret_cast<const std::byte*>(header.data()) + header.size());
    for (const auto& t : tensors) {
        const auto data = t.bytes();
        out.insert(out.end(), data.begin(), data.end());
        out.resize(static_cast<std::size_t>(pad_to(out.size(), alignment)), std::byte{0});
    }
    return out;
}

void write_gguf(const std::filesystem::path& target, const std::vector<std::pair<std::string, GgufValue>>& kv,
                const std::vector<GgufTensorToWrite>& tensors, bool overwrite) {
    with_context(quote(target.string()), [&] {
        AtomicFile out(target, overwrite);
        write_gguf(out, kv, tensors);
        out.commit();
    });
}

}  // namespace lorakit::formats
