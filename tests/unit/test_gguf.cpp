// The GGUF container: round trips, one test per rejection rule of ggml's reader, the real files
// in the test data. (Interop with the real gguf-py package is in test_interop.cpp.)
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <cstring>
#include <limits>
#include <functional>

#include "lorakit/error.h"
#include "lorakit/formats/builtin.h"
#include "lorakit/formats/gguf.h"
#include "support.h"

using namespace lorakit;
using namespace lorakit::formats;

namespace {

using Kv = std::vector<std::pair<std::string, GgufValue>>;

// A little-endian byte builder for hand-made (often broken) files.
struct Bytes {
    std::vector<std::byte> b;
    template <typename T>
    Bytes& put(T v) {
        std::byte bytes[sizeof(T)];
        std::memcpy(bytes, &v, sizeof(T));
        for (std::byte x : bytes) b.push_back(x);
        return *this;
    }
    Bytes& str(std::string_view s) {
        put<std::uint64_t>(s.size());
        const auto* p = reinterpret_cast<const std::byte*>(s.data());
        b.insert(b.end(), p, p + s.size());
        return *this;
    }
    Bytes& pad(std::size_t alignment) {
        while (b.size() % alignment) b.push_back(std::byte{0});
        return *this;
    }
    Bytes& zeros(std::size_t n) {
        b.insert(b.end(), n, std::byte{0});
        return *this;
    }
};

Bytes header(std::uint32_t version, std::uint64_t tensors, std::uint64_t kvs) {
    Bytes h;
    h.b = {std::byte{'G'}, std::byte{'G'}, std::byte{'U'}, std::byte{'F'}};
    h.put(version).put(tensors).put(kvs);
    return h;
}

std::unique_ptr<GgufFile> parse(const std::vector<std::byte>& bytes) {
    return read_gguf(MappedFile::from_bytes("test.gguf", bytes));
}

void expect_error(const std::vector<std::byte>& bytes, const std::string& fragment,
                  ErrorCode code = ErrorCode::bad_input) {
    INFO("expecting: " << fragment);
    try {
        parse(bytes);
        FAIL("accepted");
    } catch (const Error& e) {
        CHECK(e.code() == code);
        CHECK_THAT(e.what(), Catch::Contains(fragment));
    }
}

// One valid F32 tensor [2, 32] named "t".
Bytes one_tensor_file(std::uint32_t type = 0, std::uint64_t ne0 = 32, std::uint64_t offset = 0, std::size_t data = 256) {
    Bytes f = header(3, 1, 0);
    f.str("t").put<std::uint32_t>(2).put<std::uint64_t>(ne0).put<std::uint64_t>(2).put(type).put(offset);
    f.pad(32).zeros(data);
    return f;
}

}  // namespace

TEST_CASE("GGUF round trip: every value type, F32/F16/BF16/Q8_0 tensors, custom alignment", "[gguf]") {
    std::vector<float> a(4 * 64), b(8 * 4);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = std::sin(static_cast<float>(i)) * 0.5f;
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(i) / 7.0f - 2.0f;
    const Tensor ta = Tensor::from_f32(DType::F32, {4, 64}, a), tb = Tensor::from_f32(DType::F32, {8, 4}, b);
    for (std::uint32_t alignment : {32u, 64u, 8u}) {
        INFO("alignment " << alignment);
        Kv kv{{"general.architecture", GgufValue::string("llama")},
              {"general.alignment", GgufValue::u32(alignment)},
              {"f32", GgufValue::f32(16.5f)},
              {"f64", GgufValue::f64(-0.125)},
              {"i32", GgufValue::i32(-7)},
              {"u64", GgufValue::u64(1ull << 40)},
              {"flag", GgufValue::boolean(true)},
              {"names", GgufValue::strings({"x", "", "ünï"})},
              {"ids", GgufValue::u32s({1, 2, 3})}};
        std::vector<GgufTensorToWrite> tensors;
        tensors.push_back(gguf_tensor("a.f32", ta, ggml_f32));
        tensors.push_back(gguf_tensor("b.f16", tb, ggml_f16));
        tensors.push_back(gguf_tensor("b.bf16", tb, ggml_bf16));
        tensors.push_back(gguf_tensor("a.q8", ta, ggml_q8_0));
        const auto bytes = serialize_gguf(kv, tensors);
        // Deterministic, and the streaming writer gives the same bytes.
        CHECK(serialize_gguf(kv, tensors) == bytes);
        test::ScratchDir dir;
        write_gguf(dir / "x.gguf", kv, tensors, false);
        const auto mapped = MappedFile::open(dir / "x.gguf");
        CHECK(std::vector<std::byte>(mapped->bytes().begin(), mapped->bytes().end()) == bytes);

        const auto file = parse(bytes);
        CHECK(file->version() == 3);
        CHECK(file->alignment() == alignment);
        REQUIRE(file->kv().size() == kv.size());
        for (std::size_t i = 0; i < kv.size(); ++i) {
            CHECK(file->kv()[i].first == kv[i].first);
            CHECK(file->kv()[i].second == kv[i].second);
        }
        CHECK(file->metadata().at("names") == "[\"x\", \"\", \"ünï\"]");
        CHECK(file->metadata().at("f32") == "16.5");
        CHECK(file->metadata().at("u64") == "1099511627776");
        CHECK(file->find_kv("flag")->as_number() == 1.0);
        REQUIRE(file->entries().size() == 4);
        CHECK(file->entries()[0].shape == Shape{4, 64});
        CHECK(file->entries()[0].to_f32() == a);
        CHECK(file->entries()[1].dtype_name == "F16");
        CHECK(file->entries()[1].to_f32() == Tensor::from_f32(DType::F16, {8, 4}, b).to_f32());
        CHECK(file->entries()[2].to_f32() == Tensor::from_f32(DType::BF16, {8, 4}, b).to_f32());
        CHECK(file->entries()[3].dtype_name == "Q8_0");
        CHECK(file->ggml_type(3) == ggml_q8_0);
        // Decoded on demand (not held in f32), and TensorFile::tensor() decodes it too.
        CHECK(file->entries()[3].tensor.empty());
        CHECK(file->entries()[3].supported());
        CHECK(file->entries()[3].value_dtype() == DType::F32);
        const auto q = file->entries()[3].to_f32();
        CHECK(file->tensor("a.q8").to_f32() == q);
        CHECK(file->tensor("a.q8").shape() == Shape{4, 64});
        for (std::size_t i = 0; i < a.size(); ++i) CHECK(std::fabs(q[i] - a[i]) <= 0.5f / 127 * 0.5f + 0.5f / 1000);  // half a step, plus the f16 scale's rounding
        // Offsets are packed with the alignment.
        for (const auto& e : file->entries()) CHECK(e.offset % alignment == 0);
    }
}

TEST_CASE("Q8_0 quantization follows ggml: f16 scale amax/127, round half away from zero", "[gguf]") {
    std::vector<float> x(64, 0.0f);
    x[0] = 127.0f;   // d = 1
    x[1] = 2.5f;     // rounds away from zero to 3
    x[2] = -2.5f;    // -3
    x[3] = 0.49f;    // 0
    // Second block all zero: d = 0 and every q 0.
    const auto blocks = quantize_q8_0(x.data(), x.size());
    REQUIRE(blocks.size() == 68);
    std::uint16_t d;
    std::memcpy(&d, blocks.data(), 2);
    CHECK(d == 0x3c00);  // 1.0 in f16
    CHECK(static_cast<std::int8_t>(blocks[2]) == 127);
    CHECK(static_cast<std::int8_t>(blocks[3]) == 3);
    CHECK(static_cast<std::int8_t>(blocks[4]) == -3);
    CHECK(static_cast<std::int8_t>(blocks[5]) == 0);
    for (std::size_t i = 34; i < 68; ++i) CHECK(blocks[i] == std::byte{0});
    std::vector<float> back(64);
    dequantize_q8_0(blocks.data(), back.data(), 64);
    CHECK(back[0] == 127.0f);
    CHECK(back[1] == 3.0f);
    CHECK(back[40] == 0.0f);
    // The f16 scale overflows from amax = 127 x 65520 on: refused, naming the magnitude; just below
    // it the block is kept; an infinity in the values stays one.
    x[33] = -127.0f * 65520.0f;
    CHECK_THROWS_WITH(quantize_q8_0(x.data(), x.size()), Catch::Contains("8.32104e+06") && Catch::Contains("Q8_0"));
    x[33] = 127.0f * 65504.0f;
    CHECK_NOTHROW(quantize_q8_0(x.data(), x.size()));
    x[33] = std::numeric_limits<float>::infinity();
    CHECK_NOTHROW(quantize_q8_0(x.data(), x.size()));
}

TEST_CASE("Q8_0 quantization: the vectorised rounding is roundf's, value for value, and so are the scales", "[gguf]") {
    // Blocks whose scale is exactly 1 (amax 127), holding ties, near-ties and both signs, then
    // random blocks of every magnitude; each byte compared with the scalar reference.
    std::vector<float> x;
    for (int k = -126; k <= 126; ++k)
        for (float v : {k + 0.5f, std::nextafter(k + 0.5f, 0.0f), std::nextafter(k + 0.5f, 1000.0f), float(k)}) x.push_back(v);
    while (x.size() % 31) x.push_back(0.25f);
    std::vector<float> blocks;
    for (std::size_t i = 0; i < x.size(); i += 31) {
        blocks.push_back(127.0f);
        blocks.insert(blocks.end(), x.begin() + static_cast<std::ptrdiff_t>(i), x.begin() + static_cast<std::ptrdiff_t>(i + 31));
    }
    std::mt19937 g(12);
    std::normal_distribution<float> d;
    for (int b = 0; b < 2000; ++b) {
        const float scale = std::ldexp(1.0f, b % 40 - 20);
        for (int j = 0; j < 32; ++j) blocks.push_back(scale * d(g));
    }
    const auto got = quantize_q8_0(blocks.data(), blocks.size());
    for (std::size_t b = 0; b < blocks.size() / 32; ++b) {
        const float* v = blocks.data() + b * 32;
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
        const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
        std::uint16_t scale;
        std::memcpy(&scale, got.data() + b * 34, 2);
        if (scale != f32_to_f16(dd)) FAIL("block " << b << ": scale " << scale << " instead of " << f32_to_f16(dd));
        for (int j = 0; j < 32; ++j) {
            const auto want = static_cast<std::int8_t>(std::round(v[j] * id));
            const auto have = static_cast<std::int8_t>(got[b * 34 + 2 + static_cast<std::size_t>(j)]);
            if (want != have) FAIL("block " << b << " value " << v[j] << ": " << int(have) << " instead of " << int(want));
        }
    }
}

TEST_CASE("GGUF: a valid hand-made file parses, and each of ggml's rules is enforced", "[gguf][malformed]") {
    CHECK(parse(one_tensor_file().b)->entries().size() == 1);
    CHECK(parse(header(2, 0, 0).b)->version() == 2);
    // gguf-py pads a file without tensors after its header; that padding is accepted.
    CHECK(parse(header(3, 0, 0).pad(32).b)->entries().empty());

    expect_error({}, "file ends inside the magic number");
    expect_error(Bytes().put<std::uint32_t>(0x46554748).b, "bad magic number");
    expect_error(header(0, 0, 0).b, "version 0");
    expect_error(header(1, 0, 0).b, "version 1", ErrorCode::unsupported);
    expect_error(header(4, 0, 0).b, "version 4", ErrorCode::unsupported);
    expect_error(header(0x03000000, 0, 0).b, "big-endian", ErrorCode::unsupported);
    {
        auto h = header(3, 0, 0);
        h.b.erase(h.b.end() - 3, h.b.end());
        expect_error(h.b, "file ends inside the key-value count");
    }
    expect_error(header(3, 0, 1000).b, "1000 key-value pairs cannot fit");
    expect_error(header(3, 1ull << 60, 0).b, "tensors cannot fit");
    expect_error(header(3, 0, 1).str("").put<std::uint32_t>(4).put<std::uint32_t>(1).b, "empty key");
    expect_error(header(3, 0, 2).str("k").put<std::uint32_t>(4).put<std::uint32_t>(1).str("k").put<std::uint32_t>(4)
                     .put<std::uint32_t>(1).b,
                 "duplicate key 'k'");
    expect_error(header(3, 0, 1).str("k").put<std::uint32_t>(13).zeros(16).b, "unknown value type 13");
    expect_error(header(3, 0, 1).str("k").put<std::uint32_t>(9).put<std::uint32_t>(9).put<std::uint64_t>(0).zeros(8).b,
                 "array of arrays");
    expect_error(header(3, 0, 1).str("k").put<std::uint32_t>(9).put<std::uint32_t>(0).put<std::uint64_t>((1ull << 30) + 1)
                     .zeros(16).b,
                 "above 2^30");
    expect_error(header(3, 0, 1).str("k").put<std::uint32_t>(9).put<std::uint32_t>(4).put<std::uint64_t>(1000).zeros(16).b,
                 "file ends inside the value of 'k'");
    expect_error(header(3, 0, 1).str("k").put<std::uint32_t>(9).put<std::uint32_t>(8).put<std::uint64_t>(1ull << 29)
                     .zeros(16).b,
                 "file ends inside the value of 'k'");
    expect_error(header(3, 0, 1).str("k").put<std::uint32_t>(8).put<std::uint64_t>(1ull << 31).zeros(16).b,
                 "above the limit");
    expect_error(header(3, 0, 1).str("k").put<std::uint32_t>(7).put<std::uint8_t>(2).zeros(8).b, "boolean of value 2");
    expect_error(header(3, 0, 1).str("general.alignment").put<std::uint32_t>(10).put<std::uint64_t>(32).b,
                 "general.alignment is UINT64, not UINT32");
    expect_error(header(3, 0, 1).str("general.alignment").put<std::uint32_t>(4).put<std::uint32_t>(48).zeros(8).b,
                 "48 is not a power of two");
    expect_error(header(3, 0, 1).str("general.alignment").put<std::uint32_t>(4).put<std::uint32_t>(0).zeros(8).b,
                 "0 is not a power of two");
    {
        Bytes f = header(3, 1, 0);
        f.str(std::string(64, 'n')).put<std::uint32_t>(1).put<std::uint64_t>(32).put<std::uint32_t>(0).put<std::uint64_t>(0);
        f.pad(32).zeros(128);
        expect_error(f.b, "name of 64 bytes");
    }
    {
        Bytes f = header(3, 2, 0);
        for (int i = 0; i < 2; ++i)
            f.str("t").put<std::uint32_t>(1).put<std::uint64_t>(32).put<std::uint32_t>(0).put<std::uint64_t>(i * 128);
        f.pad(32).zeros(256);
        expect_error(f.b, "duplicate tensor name 't'");
    }
    {
        Bytes f = header(3, 1, 0);
        f.str("t").put<std::uint32_t>(5).zeros(64);
        expect_error(f.b, "5 dimensions");
    }
    {
        Bytes f = header(3, 1, 0);
        f.str("t").put<std::uint32_t>(1).put<std::uint64_t>(~0ull).put<std::uint32_t>(0).put<std::uint64_t>(0);
        expect_error(f.b, "negative dimension");
    }
    {
        Bytes f = header(3, 1, 0);
        f.str("t").put<std::uint32_t>(3).put<std::uint64_t>(1ull << 32).put<std::uint64_t>(1ull << 32)
            .put<std::uint64_t>(1ull << 32).put<std::uint32_t>(0).put<std::uint64_t>(0);
        expect_error(f.b, "more elements than 64 bits");
    }
    {
        // Regression (found by fuzz_gguf in CI): a zero dimension first used to hide the
        // overflow of the others, and reading a Q8_0 tensor then multiplied them in int64.
        Bytes f = header(3, 1, 0);
        f.str("t").put<std::uint32_t>(3).put<std::uint64_t>(0).put<std::uint64_t>(1ull << 40)
            .put<std::uint64_t>(1ull << 40).put<std::uint32_t>(8).put<std::uint64_t>(0);
        expect_error(f.b, "more elements than 64 bits");
    }
    expect_error(one_tensor_file(4).b, "ggml type 4", ErrorCode::unsupported);
    expect_error(one_tensor_file(99).b, "ggml type 99", ErrorCode::unsupported);
    expect_error(one_tensor_file(8, 33).b, "not a multiple of the Q8_0 block size 32");
    expect_error(one_tensor_file(0, 32, 32).b, "has offset 32, expected 0");
    expect_error(one_tensor_file(0, 32, 0, 100).b, "file is truncated: the data section needs 256 bytes, 100 are there");
    expect_error(one_tensor_file(0, 32, 0, 300).b, "unexpected bytes at the end");
    {
        // One F32 [1, 33]: 132 bytes, padding to 160 must be zero.
        Bytes f = header(3, 1, 0);
        f.str("t").put<std::uint32_t>(1).put<std::uint64_t>(33).put<std::uint32_t>(0).put<std::uint64_t>(0);
        f.pad(32).zeros(160);
        CHECK(parse(f.b)->entries()[0].shape == Shape{33});
        f.b.back() = std::byte{1};
        expect_error(f.b, "non-zero padding");
    }
    // A tensor of a type lorakit does not compute with is listed, with no values.
    {
        Bytes f = header(3, 1, 0);
        f.str("t").put<std::uint32_t>(1).put<std::uint64_t>(256).put<std::uint32_t>(12).put<std::uint64_t>(0);
        f.pad(32).zeros(144).pad(32);
        const auto file = parse(f.b);
        CHECK(file->entries()[0].dtype_name == "Q4_K");
        CHECK_FALSE(file->entries()[0].supported());
        CHECK(file->entries()[0].size == 144);
    }
}

TEST_CASE("GGUF: the real files in the test data parse", "[gguf]") {
    LORAKIT_REQUIRE_REAL_TESTDATA();
    const auto dir = test::real_testdata_dir();
    {
        const auto file = read_gguf(MappedFile::open(dir / "ollama/llama-2-tiny-random.gguf"));
        CHECK(file->version() == 3);
        CHECK(file->kv().size() == 18);
        CHECK(file->entries().size() == 12);
        CHECK(file->find_kv("general.architecture")->as_string() == "llama");
        CHECK(file->find("token_embd.weight") != nullptr);
    }
    {
        const auto file = read_gguf(MappedFile::open(dir / "llama-cpp/ggml-vocab-bert-bge.gguf"));
        CHECK(file->entries().empty());
        CHECK(file->find_kv("general.architecture")->as_string() == "bert");
        CHECK(file->find_kv("tokenizer.ggml.tokens")->count == 30522);
        CHECK(file->metadata().at("tokenizer.ggml.tokens") == "[STRING x 30522]");
    }
    // The registry picks the GGUF driver by its magic.
    const auto& registry = builtin_registry();
    CHECK(registry.open_tensor_file(dir / "ollama/llama-2-tiny-random.gguf")->format_name() == "gguf");
}
