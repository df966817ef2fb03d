// dtypes: every bit pattern of the 16- and 8-bit float formats decoded against an independent
// formula, encoding checked at every rounding boundary against an independent
// round-to-nearest-even reference, SIMD kernels bit-identical to the scalar ones, integers,
// and the dtype names.
#include <catch2/catch.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cfenv>
#include <cstring>
#include <limits>
#include <random>

#include "dtype_kernels.h"
#include "lorakit/dtype.h"
#include "lorakit/error.h"

using namespace lorakit;

namespace {

struct Format {
    const char* name;
    int exponent_bits;
    int mantissa_bits;
    int bias;
    bool finite_only;  // "fn" formats: no infinity, only all-ones is NaN (F8_E4M3)
    std::uint32_t (*encode)(float);
    float (*decode)(std::uint32_t);
};

const Format formats[] = {
    {"F16", 5, 10, 15, false, [](float x) -> std::uint32_t { return f32_to_f16(x); },
     [](std::uint32_t b) { return f16_to_f32(static_cast<std::uint16_t>(b)); }},
    {"BF16", 8, 7, 127, false, [](float x) -> std::uint32_t { return f32_to_bf16(x); },
     [](std::uint32_t b) { return bf16_to_f32(static_cast<std::uint16_t>(b)); }},
    {"F8_E4M3", 4, 3, 7, true, [](float x) -> std::uint32_t { return f32_to_f8e4m3(x); },
     [](std::uint32_t b) { return f8e4m3_to_f32(static_cast<std::uint8_t>(b)); }},
    {"F8_E5M2", 5, 2, 15, false, [](float x) -> std::uint32_t { return f32_to_f8e5m2(x); },
     [](std::uint32_t b) { return f8e5m2_to_f32(static_cast<std::uint8_t>(b)); }},
};

int total_bits(const Format& f) { return 1 + f.exponent_bits + f.mantissa_bits; }

// The value a bit pattern stands for, from the format's definition (NaN as quiet NaN).
double reference_decode(const Format& f, std::uint32_t bits) {
    const bool negative = (bits >> (f.exponent_bits + f.mantissa_bits)) & 1;
    const std::uint32_t e = (bits >> f.mantissa_bits) & ((1u << f.exponent_bits) - 1);
    const std::uint32_t m = bits & ((1u << f.mantissa_bits) - 1);
    const std::uint32_t e_max = (1u << f.exponent_bits) - 1;
    double v;
    if (f.finite_only && e == e_max && m == (1u << f.mantissa_bits) - 1) v = std::numeric_limits<double>::quiet_NaN();
    else if (!f.finite_only && e == e_max) v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
    else if (e == 0) v = std::ldexp(static_cast<double>(m), 1 - f.bias - f.mantissa_bits);
    else v = std::ldexp(1.0 + std::ldexp(static_cast<double>(m), -f.mantissa_bits), static_cast<int>(e) - f.bias);
    return negative ? -v : v;
}

struct Value {
    double value;
    std::uint32_t bits;
};

// Every finite non-negative value of the format with its pattern, ascending.
std::vector<Value> positive_values(const Format& f) {
    std::vector<Value> values;
    const std::uint32_t sign_bit = 1u << (f.exponent_bits + f.mantissa_bits);
    for (std::uint32_t b = 0; b < sign_bit; ++b) {
        const double v = reference_decode(f, b);
        if (std::isfinite(v)) values.push_back({v, b});
    }
    std::sort(values.begin(), values.end(), [](auto& a, auto& b) { return a.value < b.value; });
    return values;
}

// Round-to-nearest-even by search: the reference the encoders are checked against.
std::uint32_t reference_encode(const Format& f, const std::vector<Value>& table, float x) {
    const std::uint32_t sign = std::signbit(x) ? 1u << (f.exponent_bits + f.mantissa_bits) : 0u;
    const std::uint32_t nan_bits = f.finite_only ? 0x7f : 0;  // only used for E4M3
    const double a = std::fabs(static_cast<double>(x));
    const Value& top = table.back();
    const double half_ulp = std::ldexp(1.0, static_cast<int>(std::ilogb(top.value)) - f.mantissa_bits - 1);
    const double threshold = top.value + half_ulp;
    const std::uint32_t inf_bits = ((1u << f.exponent_bits) - 1) << f.mantissa_bits;
    if (std::isinf(a) || a > threshold) return sign | (f.finite_only ? nan_bits : inf_bits);
    if (a == threshold) return sign | (f.finite_only ? top.bits : inf_bits);  // ties to even
    auto hi = std::lower_bound(table.begin(), table.end(), a, [](const Value& v, double x) { return v.value < x; });
    if (hi == table.end()) return sign | top.bits;  // above the largest value, below the threshold
    if (hi->value == a) return sign | hi->bits;
    auto lo = hi - 1;
    const double down = a - lo->value, up = hi->value - a;
    if (down < up) return sign | lo->bits;
    if (up < down) return sign | hi->bits;
    return sign | ((lo->bits & 1) == 0 ? lo->bits : hi->bits);
}

bool is_nan_pattern(const Format& f, std::uint32_t bits) { return std::isnan(reference_decode(f, bits)); }

// f32 inputs that probe every rounding decision: each representable value, each midpoint
// between neighbours and the f32 values on either side of it, both signs, plus specials.
std::vector<float> probe_inputs(const std::vector<Value>& table) {
    std::vector<float> inputs;
    for (std::size_t i = 0; i + 1 < table.size(); ++i) {
        const double mid = 0.5 * (table[i].value + table[i + 1].value);
        const auto m = static_cast<float>(mid);
        REQUIRE(static_cast<double>(m) == mid);  // midpoints are exact in f32 for these formats
        for (float x : {static_cast<float>(table[i].value), m, std::nextafter(m, 0.0f),
                        std::nextafter(m, std::numeric_limits<float>::infinity())}) {
            inputs.push_back(x);
            inputs.push_back(-x);
        }
    }
    const float top = static_cast<float>(table.back().value);
    for (float x : {top, std::nextafter(top, 1e30f), top * 1.03125f, top * 1.0625f, top * 1.1f, 1e30f,
                    std::numeric_limits<float>::max(), std::numeric_limits<float>::infinity(),
                    std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(), 0.0f}) {
        inputs.push_back(x);
        inputs.push_back(-x);
    }
    std::mt19937 g(2024);
    for (int i = 0; i < 300000; ++i) inputs.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(g())));
    return inputs;
}

std::uint32_t bits_of(float x) { return std::bit_cast<std::uint32_t>(x); }

}  // namespace

TEST_CASE("every bit pattern decodes to the value its format defines", "[dtype]") {
    for (const auto& f : formats) {
        INFO(f.name);
        const std::uint32_t count = 1u << total_bits(f);
        for (std::uint32_t b = 0; b < count; ++b) {
            const double want = reference_decode(f, b);
            const float got = f.decode(b);
            if (std::isnan(want)) {
                CHECK(std::isnan(got));
                continue;
            }
            if (static_cast<double>(got) != want || std::signbit(got) != std::signbit(want)) {
                INFO("pattern " << b);
                CHECK(static_cast<double>(got) == want);
            }
        }
    }
}

TEST_CASE("every non-NaN pattern survives decode then encode; NaN stays NaN", "[dtype]") {
    for (const auto& f : formats) {
        INFO(f.name);
        const std::uint32_t count = 1u << total_bits(f);
        std::uint32_t mismatches = 0;
        for (std::uint32_t b = 0; b < count; ++b) {
            const std::uint32_t back = f.encode(f.decode(b));
            if (is_nan_pattern(f, b)) mismatches += is_nan_pattern(f, back) ? 0 : 1;
            else mismatches += back == b ? 0 : 1;
        }
        CHECK(mismatches == 0);
    }
}

TEST_CASE("encoding rounds to nearest even at every boundary, with each format's overflow rule", "[dtype]") {
    for (const auto& f : formats) {
        INFO(f.name);
        const auto table = positive_values(f);
        std::size_t wrong = 0, checked = 0;
        for (float x : probe_inputs(table)) {
            const std::uint32_t got = f.encode(x);
            if (std::isnan(x)) {
                wrong += is_nan_pattern(f, got) ? 0 : 1;
                continue;
            }
            const std::uint32_t want = reference_encode(f, table, x);
            if (got != want && !(is_nan_pattern(f, want) && is_nan_pattern(f, got))) {
                if (wrong < 5) WARN(f.name << ": " << std::hexfloat << x << " -> " << got << ", expected " << want);
                ++wrong;
            }
            ++checked;
        }
        CHECK(wrong == 0);
        CHECK(checked > 100000);
    }
}

TEST_CASE("overflow, infinities and NaN per format", "[dtype]") {
    const float inf = std::numeric_limits<float>::infinity();
    const float nan = std::numeric_limits<float>::quiet_NaN();
    CHECK(f32_to_f16(65504.0f) == 0x7bff);
    CHECK(f32_to_f16(65519.99f) == 0x7bff);
    CHECK(f32_to_f16(65520.0f) == 0x7c00);  // the midpoint to 65536 ties to infinity (even)
    CHECK(f32_to_f16(-inf) == 0xfc00);
    CHECK(std::isnan(f16_to_f32(f32_to_f16(nan))));
    CHECK(f32_to_f16(-0.0f) == 0x8000);
    CHECK(f32_to_bf16(inf) == 0x7f80);
    CHECK(f32_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);  // rounds up into infinity
    CHECK(f32_to_bf16(-nan) == 0xffc0);  // quiet NaN, sign kept
    // E4M3 "fn": largest finite 448; 464 ties to 448; anything larger, and infinity, is NaN.
    CHECK(f32_to_f8e4m3(448.0f) == 0x7e);
    CHECK(f32_to_f8e4m3(464.0f) == 0x7e);
    CHECK(f32_to_f8e4m3(464.5f) == 0x7f);
    CHECK(f32_to_f8e4m3(-inf) == 0xff);
    CHECK(std::isnan(f8e4m3_to_f32(0x7f)));
    CHECK(f8e4m3_to_f32(0x01) == 0x1p-9f);  // smallest subnormal
    // E5M2: IEEE-like, 57344 largest finite, 61440 ties to infinity.
    CHECK(f32_to_f8e5m2(57344.0f) == 0x7b);
    CHECK(f32_to_f8e5m2(61439.0f) == 0x7b);
    CHECK(f32_to_f8e5m2(61440.0f) == 0x7c);
    CHECK(std::isinf(f8e5m2_to_f32(0x7c)));
    CHECK(std::isnan(f8e5m2_to_f32(f32_to_f8e5m2(nan))));
}

TEST_CASE("every SIMD kernel is bit-identical to the scalar one", "[dtype]") {
    const auto& scalar = detail::scalar_kernels();
    INFO("kernels on this CPU: " << detail::available_kernel_count() << ", chosen: " << conversion_kernel_name());
    // Every 16-bit pattern.
    std::vector<std::uint16_t> patterns(65536);
    for (std::uint32_t i = 0; i < 65536; ++i) patterns[i] = static_cast<std::uint16_t>(i);
    const auto* pattern_bytes = reinterpret_cast<const std::byte*>(patterns.data());
    std::vector<float> want(65536), got(65536);
    // f32 inputs: every f16 and bf16 rounding boundary plus random patterns.
    std::vector<float> inputs = probe_inputs(positive_values(formats[0]));
    const auto more = probe_inputs(positive_values(formats[1]));
    inputs.insert(inputs.end(), more.begin(), more.end());
    std::vector<std::uint16_t> want16(inputs.size()), got16(inputs.size());
    for (std::size_t k = 0; k < detail::available_kernel_count(); ++k) {
        const auto& kernel = detail::available_kernel(k);
        INFO("kernel " << kernel.name);
        for (auto [reference, candidate] : {std::pair{scalar.f16_to_f32, kernel.f16_to_f32},
                                            std::pair{scalar.bf16_to_f32, kernel.bf16_to_f32}}) {
            reference(pattern_bytes, want.data(), 65536);
            candidate(pattern_bytes, got.data(), 65536);
            CHECK(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) == 0);
        }
        for (auto [reference, candidate] : {std::pair{scalar.f32_to_f16, kernel.f32_to_f16},
                                            std::pair{scalar.f32_to_bf16, kernel.f32_to_bf16}}) {
            reference(inputs.data(), reinterpret_cast<std::byte*>(want16.data()), inputs.size());
            candidate(inputs.data(), reinterpret_cast<std::byte*>(got16.data()), inputs.size());
            CHECK(want16 == got16);
        }
        // scale_f32: the f64 product rounded once, for factors that round, overflow, underflow
        // into subnormals and flip signs, over the same inputs and NaN/Inf/zero/subnormal ones.
        {
            std::vector<float> values = inputs;
            for (float special : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity(),
                                  std::numeric_limits<float>::infinity(), 0.0f, -0.0f,
                                  std::numeric_limits<float>::denorm_min(), -std::numeric_limits<float>::min(),
                                  std::numeric_limits<float>::max()})
                values.push_back(special);
            for (double factor : {0.5, 1.0 / 3.0, 0.3, -2.5, 1e30, 1e-30, 1e-45, 0.0, 3.0e38}) {
                INFO("factor " << factor);
                std::vector<float> a = values, b = values;
                scalar.scale_f32(a.data(), a.size(), factor);
                kernel.scale_f32(b.data(), b.size(), factor);
                CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
                CHECK(a[7] == static_cast<float>(static_cast<double>(values[7]) * factor));
                for (std::size_t n = 0; n <= 20; ++n) {  // tails; the element past n untouched
                    std::vector<float> x(values.begin() + 3, values.begin() + 3 + n + 1), y = x;
                    scalar.scale_f32(x.data(), n, factor);
                    kernel.scale_f32(y.data(), n, factor);
                    CHECK(std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0);
                    CHECK(std::memcmp(&y[n], &values[3 + n], sizeof(float)) == 0);
                }
            }
        }
        // Tails and unaligned pointers: every length 0..70 at byte offsets 0..3.
        std::vector<std::byte> source(2 * 80 + 8);
        for (std::size_t i = 0; i < source.size(); ++i) source[i] = static_cast<std::byte>((i * 37 + 11) & 0xff);
        std::vector<float> floats(80 + 4);
        for (std::size_t i = 0; i < floats.size(); ++i) floats[i] = inputs[i * 7];
        for (std::size_t offset = 0; offset < 4; ++offset)
            for (std::size_t n = 0; n <= 70; ++n) {
                std::vector<float> a(n + 1, -1.0f), b(n + 1, -1.0f);
                scalar.f16_to_f32(source.data() + offset, a.data(), n);
                kernel.f16_to_f32(source.data() + offset, b.data(), n);
                CHECK(std::memcmp(a.data(), b.data(), (n + 1) * sizeof(float)) == 0);
                scalar.bf16_to_f32(source.data() + offset, a.data(), n);
                kernel.bf16_to_f32(source.data() + offset, b.data(), n);
                CHECK(std::memcmp(a.data(), b.data(), (n + 1) * sizeof(float)) == 0);
                std::vector<std::byte> x(2 * n + 8, std::byte{0xaa}), y(2 * n + 8, std::byte{0xaa});
                const float* src = reinterpret_cast<const float*>(reinterpret_cast<const char*>(floats.data()) + 0) + offset;
                scalar.f32_to_f16(src, x.data() + offset, n);
                kernel.f32_to_f16(src, y.data() + offset, n);
                CHECK(x == y);
                scalar.f32_to_bf16(src, x.data() + offset, n);
                kernel.f32_to_bf16(src, y.data() + offset, n);
                CHECK(x == y);
            }
    }
}

TEST_CASE("integers round to nearest even, saturate, and map NaN to 0", "[dtype]") {
    auto to = [](DType type, float x) {
        std::vector<std::byte> out(dtype_size(type));
        convert_from_f32(type, &x, out.data(), 1);
        double back = 0;
        convert_to_f64(type, out.data(), &back, 1);
        return back;
    };
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    CHECK(to(DType::I32, 2.5f) == 2);
    CHECK(to(DType::I32, 3.5f) == 4);
    CHECK(to(DType::I32, -2.5f) == -2);
    CHECK(to(DType::I32, 1e10f) == 2147483647.0);
    CHECK(to(DType::I32, -1e10f) == -2147483648.0);
    CHECK(to(DType::I32, nan) == 0);
    CHECK(to(DType::I32, inf) == 2147483647.0);
    CHECK(to(DType::U8, -1.0f) == 0);
    CHECK(to(DType::U8, 300.0f) == 255);
    CHECK(to(DType::U8, 254.5f) == 254);
    CHECK(to(DType::U8, 253.5f) == 254);
    CHECK(to(DType::I8, -128.6f) == -128);
    CHECK(to(DType::U16, 70000.0f) == 65535);
    CHECK(to(DType::I16, -40000.0f) == -32768);
    CHECK(to(DType::U32, 5e9f) == 4294967295.0);
    CHECK(to(DType::I64, 9.3e18f) == 9223372036854775807.0);
    CHECK(to(DType::I64, -9.3e18f) == -9223372036854775808.0);
    CHECK(to(DType::I64, 0x1p62f) == 0x1p62);
    CHECK(to(DType::U64, 1.9e19f) == 18446744073709551615.0);
    CHECK(to(DType::U64, -5.0f) == 0);
    CHECK(to(DType::BOOL, 0.5f) == 1);
    CHECK(to(DType::BOOL, -0.0f) == 0);
    CHECK(to(DType::BOOL, nan) == 0);
    // Every integer type: small values survive both ways exactly.
    for (DType type : all_dtypes) {
        if (!is_integer(type) || type == DType::BOOL) continue;
        for (float x : {0.0f, 1.0f, 42.0f, 100.0f}) CHECK(to(type, x) == x);
    }
    // convert_to_f64 is exact where f64 can hold the value.
    const std::int64_t big = 9007199254740993LL;  // 2^53 + 1: not an f32, not an f64
    double as_double = 0;
    convert_to_f64(DType::I64, reinterpret_cast<const std::byte*>(&big), &as_double, 1);
    CHECK(as_double == 9007199254740992.0);  // rounds to nearest even in f64
}

TEST_CASE("narrow conversions ignore the floating-point rounding mode", "[dtype]") {
    // Regression: subnormal and integer rounding once went through std::nearbyint, whose
    // result follows fesetround(); a host program that changes the mode must not change
    // what lorakit writes.
    const std::vector<float> inputs{0x1.8p-24f, 0x1.4p-24f, 0x1.cp-24f, 0x1.8p-10f, 0x1.4p-17f, -0x1.8p-15f,
                                    2.5f, 3.5f, -2.5f, 0.5f, 1.5f, -0.5f, 254.5f};
    const std::vector<DType> types{DType::F16, DType::BF16, DType::F8_E4M3, DType::F8_E5M2,
                                   DType::I32, DType::I8, DType::U8, DType::I64};
    auto encode_all = [&] {
        std::vector<std::byte> bytes;
        for (DType type : types) {
            std::vector<std::byte> out(dtype_size(type) * inputs.size());
            convert_from_f32(type, inputs.data(), out.data(), inputs.size());
            bytes.insert(bytes.end(), out.begin(), out.end());
        }
        return bytes;
    };
    const auto nearest = encode_all();
    for (int mode : {FE_UPWARD, FE_DOWNWARD, FE_TOWARDZERO}) {
        INFO("rounding mode " << mode);
        REQUIRE(std::fesetround(mode) == 0);
        const auto other = encode_all();
        std::fesetround(FE_TONEAREST);
        CHECK(other == nearest);
    }
    // And the nearest-even answers themselves, for the integer path.
    std::int32_t ints[3];
    const float halves[3] = {2.5f, 3.5f, -2.5f};
    std::fesetround(FE_UPWARD);
    convert_from_f32(DType::I32, halves, reinterpret_cast<std::byte*>(ints), 3);
    std::fesetround(FE_TONEAREST);
    CHECK(ints[0] == 2);
    CHECK(ints[1] == 4);
    CHECK(ints[2] == -2);
}

TEST_CASE("f32 and f64 convert as IEEE casts", "[dtype]") {
    const double values[] = {0.1, 1e-40, 1e300, -3.5};
    for (double v : values) {
        float f = 0;
        convert_to_f32(DType::F64, reinterpret_cast<const std::byte*>(&v), &f, 1);
        CHECK(bits_of(f) == bits_of(static_cast<float>(v)));
    }
}

TEST_CASE("dtype names: every supported one round-trips, known others are refused as unsupported", "[dtype]") {
    for (DType type : all_dtypes) {
        CHECK(parse_dtype(dtype_name(type)) == type);
        CHECK(find_dtype(dtype_name(type)) == type);
    }
    CHECK(dtype_size(DType::BF16) == 2);
    CHECK(dtype_size(DType::F8_E5M2) == 1);
    CHECK(dtype_size(DType::U64) == 8);
    CHECK(is_floating(DType::F8_E4M3));
    CHECK_FALSE(is_floating(DType::BOOL));
    for (const char* name : {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"}) {
        INFO(name);
        CHECK(is_known_unsupported_dtype(name));
        CHECK_FALSE(find_dtype(name).has_value());
        try {
            parse_dtype(name);
            FAIL("accepted");
        } catch (const Error& e) {
            CHECK(e.code() == ErrorCode::unsupported);
            CHECK(std::string(e.what()) == std::string("unsupported dtype ") + name);
        }
    }
    try {
        parse_dtype("float16");
        FAIL("accepted");
    } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::bad_input);
        CHECK_THAT(e.what(), Catch::Contains("unknown dtype 'float16'"));
    }
}
