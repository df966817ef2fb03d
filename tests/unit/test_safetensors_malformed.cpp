// One test per rejection rule of the safetensors reader, each broken file generated here
// from a header string, each expecting ErrorCode::bad_input and its specific message; and the
// unusual-but-valid files real writers produce, which must be accepted.
#include <catch2/catch.hpp>

#include <cstring>

#include "lorakit/error.h"
#include "lorakit/formats/safetensors.h"

using namespace lorakit;

namespace {

// 8-byte little-endian length + header + `data_bytes` bytes of data.
std::vector<std::byte> file_of(std::string_view header, std::size_t data_bytes, std::uint64_t declared_length = ~0ull) {
    const std::uint64_t n = declared_length == ~0ull ? header.size() : declared_length;
    std::vector<std::byte> out(8 + header.size() + data_bytes, std::byte{0});
    for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
    std::memcpy(out.data() + 8, header.data(), header.size());
    for (std::size_t i = 0; i < data_bytes; ++i) out[8 + header.size() + i] = static_cast<std::byte>(i & 0xff);
    return out;
}

std::unique_ptr<TensorFile> parse(const std::vector<std::byte>& bytes) {
    return formats::read_safetensors(MappedFile::from_bytes("test.safetensors", bytes));
}

std::string rejection(const std::vector<std::byte>& bytes) {
    try {
        parse(bytes);
    } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::bad_input);
        return e.what();
    }
    FAIL("the file was accepted");
    return {};
}

}  // namespace

TEST_CASE("safetensors rejects each broken layout with its own message", "[safetensors][malformed]") {
    struct Case {
        const char* rule;
        std::vector<std::byte> bytes;
        const char* message;
    };
    const std::string ok_entry = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
    std::vector<Case> cases = {
        {"shorter than the length field", std::vector<std::byte>(5), "too short for a safetensors header: 5 bytes"},
        {"header length over the 100 MB limit", file_of("{}", 0, 100'000'001), "exceeds the safetensors limit"},
        {"header length beyond the file", file_of("{}", 0, 4096), "header length 4096 exceeds the file size 10"},
        {"header not UTF-8", file_of("{\"\xff\":1}", 0), "not valid UTF-8 (byte 2"},
        {"overlong UTF-8", file_of("{\"\xc0\xaf\":{}}", 0), "not valid UTF-8"},
        {"UTF-8 surrogate", file_of("{\"\xed\xa0\x80\":{}}", 0), "not valid UTF-8"},
        {"not JSON", file_of("{nope}", 0), "invalid JSON in header"},
        {"JSON but not an object", file_of("[1,2]", 0), "header is not a JSON object"},
        {"a bare string", file_of("\"x\"", 0), "header is not a JSON object"},
        {"garbage after the object", file_of("{} x", 0), "invalid JSON in header"},
        {"truncated JSON", file_of("{\"a\":{\"dtype\":", 0), "invalid JSON in header"},
        {"entry not an object", file_of(R"({"a":5})", 0), "tensor 'a' is not an object"},
        {"entry an array", file_of(R"({"a":[1]})", 0), "tensor 'a' is an array, not an object"},
        {"missing dtype", file_of(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8), "tensor 'a' has no \"dtype\""},
        {"missing shape", file_of(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", 8), "tensor 'a' has no \"shape\""},
        {"missing data_offsets", file_of(R"({"a":{"dtype":"F32","shape":[2]}})", 8), "has no \"data_offsets\""},
        {"dtype not a string", file_of(R"({"a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8), "\"dtype\" is not a string"},
        {"shape not an array", file_of(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8), "\"shape\" is not an array"},
        {"shape of strings", file_of(R"({"a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", 8), "\"shape\" is not an array"},
        {"nested shape", file_of(R"({"a":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}})", 8), "\"shape\" is not an array"},
        {"fractional dimension", file_of(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", 8), "shape holds 2.5, which is not an integer"},
        {"negative dimension", file_of(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "negative dimension"},
        {"dimension over 2^63", file_of(R"({"a":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]}})", 8), "is too large"},
        {"one data offset", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8]}})", 8), "must hold 2 numbers, found 1"},
        {"three data offsets", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", 8), "must hold 2 numbers, found 3"},
        {"negative offset", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-1,8]}})", 8), "negative data offset"},
        {"begin after end", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 8), "tensor 'b': data_offsets [8, 4] end before they begin"},
        {"first tensor not at 0", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12), "the first tensor must start at 0"},
        {"a gap between tensors", file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12), "(a gap)"},
        {"overlapping tensors", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "inside tensor"},
        {"size differs from shape x dtype", file_of(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "hold 8 bytes, but shape [3] of F32 needs 12"},
        {"trailing bytes", file_of("{" + ok_entry + "}", 12), "4 trailing bytes after the last tensor"},
        {"missing bytes", file_of("{" + ok_entry + "}", 6), "truncated file"},
        {"element count overflow", file_of(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,8]}})", 8), "overflows the element count"},
        // Regression: an empty tensor's other dimensions must not overflow either.
        {"element count overflow behind a zero", file_of(R"({"a":{"dtype":"F32","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}})", 0), "overflows the element count"},
        {"bit count overflow", file_of(R"({"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}})", 8), "overflows the bit count"},
        {"non-whole byte count", file_of(R"({"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2), "not a whole number of bytes"},
        {"unknown dtype", file_of(R"({"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}})", 16), "unknown dtype 'F128'"},
        {"duplicate tensor name", file_of("{" + ok_entry + "," + ok_entry + "}", 8), "duplicate tensor name 'a'"},
        {"duplicate field in an entry", file_of(R"({"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}})", 8), "duplicate field 'dtype'"},
        {"duplicate metadata key", file_of(R"({"__metadata__":{"k":"1","k":"2"}})", 0), "duplicate metadata key 'k'"},
        {"duplicate __metadata__", file_of(R"({"__metadata__":{},"__metadata__":{}})", 0), "duplicate \"__metadata__\""},
        {"metadata value not a string", file_of(R"({"__metadata__":{"k":1}})", 0), "metadata value of 'k' is not a string"},
        {"metadata value an object", file_of(R"({"__metadata__":{"k":{}}})", 0), "metadata value of 'k' is an object"},
        {"metadata not an object", file_of(R"({"__metadata__":"x"})", 0), "\"__metadata__\" is not an object of strings"},
        {"metadata an array", file_of(R"({"__metadata__":["x"]})", 0), "\"__metadata__\" is an array, not an object of strings"},
        {"metadata true", file_of(R"({"__metadata__":true})", 0), "\"__metadata__\" is not an object of strings"},
        {"header length exactly the limit, beyond the file", file_of("{}", 0, 100'000'000), "header length 100000000 exceeds the file size 10"},
        {"empty header", file_of("", 0), "invalid JSON in header"},
        {"header of whitespace only", file_of("        ", 0), "invalid JSON in header"},
        {"UTF-8 cut off at the end of the header", file_of("{}\xc3", 0), "not valid UTF-8 (byte 2"},
        {"a byte order mark", file_of("\xef\xbb\xbf{}", 0), "byte order mark"},
        {"JSON null", file_of("null", 0), "header is not a JSON object"},
        {"a second object after the first", file_of("{}{}", 0), "invalid JSON in header"},
        {"comments are not JSON", file_of("{/* c */}", 0), "invalid JSON in header"},
        {"entry null", file_of(R"({"a":null})", 0), "tensor 'a' is not an object"},
        {"dtype an object", file_of(R"({"a":{"dtype":{},"shape":[2],"data_offsets":[0,8]}})", 8), "\"dtype\" is not a string"},
        {"shape null", file_of(R"({"a":{"dtype":"F32","shape":null,"data_offsets":[0,8]}})", 8), "\"shape\" is not an array"},
        {"data_offsets an object", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":{}}})", 8), "\"data_offsets\" is not an array"},
        {"data_offsets of strings", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":["0","8"]}})", 8), "\"data_offsets\" is not an array"},
        {"offset past 2^64-1", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551616]}})", 8), "data_offsets holds 18446744073709551616, which does not fit in 64 bits"},
        {"offset written as a float", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8e0]}})", 8), "data_offsets holds 8e0, which is not an integer"},
        {"offsets past 2^53 are read exactly", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,9007199254740993]}})", 8), "hold 9007199254740993 bytes, but shape [2] of F32 needs 8"},
        {"numbers too large for a double", file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,1e999]}})", 8), "invalid JSON in header"},
        {"unknown dtype is reported before layout problems", file_of(R"({"a":{"dtype":"f32","shape":[1],"data_offsets":[4,8]}})", 8), "unknown dtype 'f32'"},
        {"size of a zero-size tensor", file_of(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,4]}})", 4), "hold 4 bytes, but shape [0] of F32 needs 0"},
        {"scalar holding two elements", file_of(R"({"a":{"dtype":"F16","shape":[],"data_offsets":[0,4]}})", 4), "hold 4 bytes, but shape [] of F16 needs 2"},
    };
    for (const auto& c : cases) {
        INFO("rule: " << c.rule);
        CHECK_THAT(rejection(c.bytes), Catch::Contains(c.message));
    }
}

TEST_CASE("safetensors accepts what real writers produce", "[safetensors][malformed]") {
    SECTION("\"__metadata__\": null, no padding, keys out of data order, fields in another order (MLX)") {
        const auto t = parse(file_of(
            R"({"__metadata__":null,"z":{"data_offsets":[0,4],"dtype":"F32","shape":[1]},"a":{"data_offsets":[4,6],"dtype":"F16","shape":[]}})",
            6));
        REQUIRE(t->entries().size() == 2);
        CHECK(t->entries()[0].name == "z");  // header order is kept
        CHECK(t->entries()[1].shape.empty());
        CHECK(t->metadata().empty());
    }
    SECTION("leading and trailing whitespace around the object") {
        const auto t = parse(file_of(" \n\t{\"__metadata__\":{\"a\":\"b\"}}  \r\n ", 0));
        CHECK(t->metadata().at("a") == "b");
    }
    SECTION("unknown extra fields in an entry are ignored") {
        const auto t = parse(
            file_of(R"({"a":{"dtype":"U8","shape":[3],"extra":{"x":[1,{"y":null}]},"data_offsets":[0,3],"more":true}})", 3));
        CHECK(t->entries().at(0).size == 3);
    }
    SECTION("unknown fields may repeat, as serde ignores them too") {
        const auto t = parse(file_of(R"({"a":{"x":1,"dtype":"U8","x":[2],"shape":[1],"data_offsets":[0,1]}})", 1));
        CHECK(t->entries().size() == 1);
    }
    SECTION("deeply nested unknown fields are skipped without recursion") {
        const std::string deep = std::string(200'000, '[') + std::string(200'000, ']');
        const auto t = parse(file_of(R"({"a":{"x":)" + deep + R"(,"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1));
        CHECK(t->entries().size() == 1);
    }
    SECTION("\"__metadata__\" after the tensors, and JSON escapes in names and values") {
        const auto t = parse(file_of(
            R"({"a\u00e9\n\"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"__metadata__":{"k\t":"v\u20ac"}})", 1));
        CHECK(t->entries().at(0).name == "a\xc3\xa9\n\"");
        CHECK(t->metadata().at("k\t") == "v\xe2\x82\xac");
    }
    SECTION("zero-size tensors and scalars") {
        const auto t = parse(file_of(
            R"({"e":{"dtype":"F32","shape":[0,5],"data_offsets":[0,0]},"s":{"dtype":"BF16","shape":[],"data_offsets":[0,2]}})", 2));
        CHECK(t->tensor("e").element_count() == 0);
        CHECK(t->tensor("s").element_count() == 1);
    }
    SECTION("an empty file: {} padded") {
        const auto t = parse(file_of("{}      ", 0));
        CHECK(t->entries().empty());
    }
    SECTION("recognised but unsupported dtypes are listed, and refused on use") {
        const auto t = parse(file_of(R"({"q":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}})", 2));
        REQUIRE(t->entries().size() == 1);
        CHECK_FALSE(t->entries()[0].supported());
        try {
            t->tensor("q");
            FAIL("expected unsupported");
        } catch (const Error& e) {
            CHECK(e.code() == ErrorCode::unsupported);
            CHECK_THAT(e.what(), Catch::Contains("unsupported dtype F4"));
        }
    }
    SECTION("every dtype lorakit does not compute with is still sized by its bit width") {
        // 4 elements: F4 2 bytes, F6 3 bytes, 8-bit types 4 bytes, C64 32 bytes.
        const auto t = parse(file_of(
            R"({"a":{"dtype":"F4","shape":[2,2],"data_offsets":[0,2]},)"
            R"("b":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[2,5]},"c":{"dtype":"F6_E3M2","shape":[4],"data_offsets":[5,8]},)"
            R"("d":{"dtype":"F8_E8M0","shape":[4],"data_offsets":[8,12]},"e":{"dtype":"F8_E4M3FNUZ","shape":[4],"data_offsets":[12,16]},)"
            R"("f":{"dtype":"F8_E5M2FNUZ","shape":[4],"data_offsets":[16,20]},"g":{"dtype":"C64","shape":[4],"data_offsets":[20,52]}})",
            52));
        REQUIRE(t->entries().size() == 7);
        for (const auto& e : t->entries()) CHECK_FALSE(e.supported());
        CHECK(t->find("g")->size == 32);
    }
    SECTION("unaligned data start: values still read correctly") {
        const std::string header = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
        REQUIRE((8 + header.size()) % 4 != 0);  // the float sits at an unaligned address
        auto bytes = file_of(header, 4);
        const float value = 1.5f;
        std::memcpy(bytes.data() + bytes.size() - 4, &value, 4);
        const auto t = parse(bytes);
        CHECK(t->tensor("a").to_f32() == std::vector<float>{1.5f});
    }
}
