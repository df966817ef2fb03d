// The core's small pieces: errors and their context, names, tensors, base-model guesses,
// the energy rule.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

#include "lorakit/base_model.h"
#include "lorakit/error.h"
#include "lorakit/inspect.h"
#include "lorakit/names.h"
#include "lorakit/tensor.h"

using namespace lorakit;

TEST_CASE("errors carry a code and context, outermost first", "[core][error]") {
    try {
        with_context("'a.safetensors'", [] {
            with_context("module 'x'", [] { fail(ErrorCode::bad_input, "rank {} is odd", 3); });
        });
        FAIL("no throw");
    } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::bad_input);
        CHECK(e.message() == "rank 3 is odd");
        CHECK(std::string(e.what()) == "'a.safetensors': module 'x': rank 3 is odd");
        CHECK(e.context().size() == 2);
    }
    // The same context twice in a row is not repeated.
    Error e(ErrorCode::io, "gone");
    e.add_context("'f'");
    e.add_context("'f'");
    CHECK(std::string(e.what()) == "'f': gone");
}

TEST_CASE("every error code maps to its documented exit code", "[core][error]") {
    CHECK(exit_code_for(ErrorCode::check_failed) == 1);
    CHECK(exit_code_for(ErrorCode::usage) == 2);
    CHECK(exit_code_for(ErrorCode::bad_input) == 3);
    CHECK(exit_code_for(ErrorCode::unsupported) == 3);
    CHECK(exit_code_for(ErrorCode::io) == 4);
    CHECK(exit_code_for(ErrorCode::internal) == 5);
}

TEST_CASE("quote keeps messages on one line", "[core][error]") {
    CHECK(quote("a\nb\tc") == "'a b c'");
    // Regression: other control bytes (ESC starts terminal escape sequences) are shown, not sent.
    CHECK(quote("x\x1b[2Jy\x7f") == "'x\\x1b[2Jy\\x7f'");
    CHECK(quote("caf\xc3\xa9") == "'caf\xc3\xa9'");
}

TEST_CASE("natural order compares digit runs by value", "[core][names]") {
    CHECK(natural_less("layers.2.q", "layers.10.q"));
    CHECK_FALSE(natural_less("layers.10.q", "layers.2.q"));
    CHECK(natural_less("a", "b"));
    CHECK(natural_less("x.1", "x.1.y"));
    CHECK_FALSE(natural_less("same", "same"));
    std::vector<std::string> names = {"b.10", "b.9", "a.100", "a.20", "b.09"};
    std::sort(names.begin(), names.end(), [](auto& a, auto& b) { return natural_less(a, b); });
    CHECK(names == std::vector<std::string>{"a.20", "a.100", "b.09", "b.9", "b.10"});
}

TEST_CASE("split, join and is_number", "[core][names]") {
    CHECK(split("a.b..c", '.') == std::vector<std::string_view>{"a", "b", "", "c"});
    CHECK(join({"a", "b"}, "_") == "a_b");
    CHECK(is_number("0123"));
    CHECK_FALSE(is_number(""));
    CHECK_FALSE(is_number("1a"));
}

TEST_CASE("element and byte counts are overflow-checked", "[core][tensor]") {
    CHECK(checked_element_count({}) == 1);
    CHECK(checked_element_count({0, 5}) == 0);
    CHECK(checked_element_count({3, 4, 5}) == 60);
    CHECK_THROWS_AS(checked_element_count({-1}), Error);
    CHECK_THROWS_AS(checked_element_count({1LL << 40, 1LL << 40}), Error);
    CHECK_THROWS_AS(checked_byte_count({1LL << 61}, DType::F64), Error);
    CHECK(checked_byte_count({2, 3}, DType::BF16) == 12);
    CHECK(format_shape({2, 3}) == "[2, 3]");
    CHECK(format_shape({}) == "[]");
}

TEST_CASE("tensors alias, own, convert, reshape and transpose", "[core][tensor]") {
    const std::vector<float> values = {1, 2, 3, 4, 5, 6};
    const Tensor t = Tensor::from_f32(DType::BF16, {2, 3}, values);
    CHECK(t.element_count() == 6);
    CHECK(t.bytes().size() == 12);
    CHECK(t.to_f32() == values);
    CHECK(t.transposed_2d().shape() == Shape{3, 2});
    CHECK(t.transposed_2d().to_f32() == std::vector<float>{1, 4, 2, 5, 3, 6});
    CHECK(t.reshaped({3, 2}).to_f32() == values);
    CHECK_THROWS_AS(t.reshaped({4}), Error);
    CHECK(t.converted(DType::F32).dtype() == DType::F32);
    auto owner = std::make_shared<int>(7);
    std::vector<std::byte> buffer(8);
    const Tensor a = Tensor::alias(DType::F32, {2}, buffer, owner);
    CHECK(a.bytes().data() == buffer.data());  // no copy
    CHECK(owner.use_count() == 2);              // the tensor keeps the owner alive
    CHECK(Tensor::zeros(DType::F16, {}).scalar_value() == 0.0);
    CHECK_THROWS_AS(Tensor::zeros(DType::F16, {2}).scalar_value(), Error);
}

TEST_CASE("a finite value that F16 or BF16 would make infinite is refused, an infinity is kept", "[core][tensor]") {
    const float inf = std::numeric_limits<float>::infinity();
    // 65519 rounds down to 65504; 65520 rounds to infinity.
    CHECK(Tensor::from_f32(DType::F16, {2}, std::vector<float>{65519.0f, -inf}).to_f32() == std::vector<float>{65504.0f, -inf});
    CHECK_THROWS_WITH(Tensor::from_f32(DType::F16, {3}, std::vector<float>{1.0f, -65520.0f, 7e5f}),
                      Catch::Contains("2 value(s) beyond F16's range (largest magnitude 7e+05)"));
    CHECK(largest_finite(DType::F16) == 65504.0f);
    CHECK(overflow_threshold(DType::F32) == inf);
    // BF16: FLT_MAX rounds to infinity; its largest finite value is kept.
    CHECK_THROWS(Tensor::from_f32(DType::BF16, {1}, std::vector<float>{std::numeric_limits<float>::max()}));
    CHECK(Tensor::from_f32(DType::BF16, {1}, std::vector<float>{largest_finite(DType::BF16)}).to_f32()[0] == largest_finite(DType::BF16));
    CHECK(std::nextafter(overflow_threshold(DType::BF16), 0.0f) < overflow_threshold(DType::BF16));
    CHECK_NOTHROW(Tensor::from_f32(DType::BF16, {1}, std::vector<float>{std::nextafter(overflow_threshold(DType::BF16), 0.0f)}));
    CHECK(Tensor::from_f32(DType::F32, {1}, std::vector<float>{std::numeric_limits<float>::max()}).to_f32()[0] ==
          std::numeric_limits<float>::max());
}

TEST_CASE("non-finite values are counted", "[core][tensor]") {
    const float inf = std::numeric_limits<float>::infinity();
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const Tensor t = Tensor::from_f32(DType::F16, {5}, std::vector<float>{1, inf, nan, -inf, 0});
    CHECK(t.view().count_nonfinite() == 3);
    CHECK(Tensor::zeros(DType::I32, {4}).view().count_nonfinite() == 0);
}

TEST_CASE("base model families from names", "[core][base_model]") {
    CHECK(family_from_model_name("Qwen/Qwen2.5-3B-Instruct") == "Qwen");
    CHECK(family_from_model_name("meta-llama/Meta-Llama-3-8B") == "Llama");
    CHECK(family_from_model_name("stable-diffusion-xl-v1-base/lora") == "SDXL");
    CHECK(family_from_model_name("sdxl_base_v1-0") == "SDXL");
    CHECK(family_from_model_name("sd_v1") == "SD1.5");
    CHECK(family_from_model_name("flux1") == "Flux");
    CHECK(family_from_model_name("gpt2") == "GPT-2");
    CHECK(family_from_model_name("EleutherAI/gpt-neo-125M") == "GPT-Neo");
    CHECK(family_from_model_name("mistralai/Mixtral-8x7B") == "Mixtral");
    CHECK(family_from_model_name("") == "");
    CHECK(family_from_model_name("my-own-model") == "");
}

TEST_CASE("effective rank by energy", "[core][inspect]") {
    CHECK(rank_for_energy({}, 0.9) == 0);
    CHECK(rank_for_energy({0, 0}, 0.9) == 0);
    CHECK(rank_for_energy({3, 1}, 0.9) == 1);     // 9 / 10 = 0.9 exactly
    CHECK(rank_for_energy({3, 1}, 0.99) == 2);
    CHECK(rank_for_energy({1, 1, 1, 1}, 0.9) == 4);
    CHECK(rank_for_energy({1, 1, 1, 1}, 0.75) == 3);
}
