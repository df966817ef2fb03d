// SHA-256: the FIPS 180-4 example vectors, streaming in arbitrary pieces, and agreement of
// the portable and accelerated block kernels.
#include <catch2/catch.hpp>

#include <algorithm>
#include <string>

#include <fmt/format.h>

#include "lorakit/sha256.h"
#include "sha256_kernels.h"

using namespace lorakit;

namespace {

std::span<const std::byte> bytes_of(std::string_view text) { return std::as_bytes(std::span(text.data(), text.size())); }

std::string hex_of(std::string_view text) { return sha256_hex(bytes_of(text)); }

std::string hex_of(const std::array<std::uint8_t, 32>& digest) {
    std::string out;
    for (auto b : digest) out += fmt::format("{:02x}", b);
    return out;
}

}  // namespace

TEST_CASE("SHA-256 matches the FIPS 180-4 examples", "[sha256]") {
    CHECK(hex_of("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    CHECK(hex_of("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    // The 448-bit message: its padding needs a second block.
    CHECK(hex_of("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
          "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    // The 896-bit message.
    CHECK(hex_of("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrs"
                 "mnopqrstnopqrstu") == "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
}

TEST_CASE("SHA-256 of one million 'a', fed in pieces of every kind", "[sha256]") {
    const std::string expected = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";
    const std::string million(1'000'000, 'a');
    CHECK(hex_of(million) == expected);
    // Pieces that straddle block boundaries in every way: 1, 63, 64, 65 and 1000 bytes.
    for (std::size_t piece : {1, 63, 64, 65, 1000}) {
        INFO("piece " << piece);
        Sha256 hash;
        for (std::size_t at = 0; at < million.size(); at += piece)
            hash.update(bytes_of(std::string_view(million).substr(at, piece)));
        CHECK(hex_of(hash.finish()) == expected);
    }
}

TEST_CASE("SHA-256 gives the same digest however the input is split", "[sha256]") {
    // Lengths around the padding boundaries (55, 56, 63, 64, 119, 120 bytes) are where an
    // off-by-one in the length block would show.
    std::string data(200, '\0');
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 37 + 11);
    for (std::size_t length : {0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 128, 200}) {
        const std::string_view message = std::string_view(data).substr(0, length);
        const std::string whole = hex_of(message);
        for (std::size_t split = 0; split <= length; ++split) {
            Sha256 hash;
            hash.update(bytes_of(message.substr(0, split)));
            hash.update(bytes_of(message.substr(split)));
            if (hex_of(hash.finish()) != whole) FAIL("length " << length << " split at " << split);
        }
    }
    // Known digests for two boundary lengths (Python hashlib on 55 and 56 bytes of 'a').
    CHECK(hex_of(std::string(55, 'a')) == "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318");
    CHECK(hex_of(std::string(56, 'a')) == "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a");
}

TEST_CASE("the SHA-256 kernels agree on every length and alignment", "[sha256]") {
    const auto accelerated = detail::sha256_blocks_accelerated();
    if (!accelerated) {
        WARN("no SHA extensions on this CPU: only the portable kernel runs");
        return;
    }
    std::vector<std::uint8_t> data(64 * 40 + 3);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::uint8_t>(i * 131 + 7);
    for (std::size_t offset = 0; offset < 3; ++offset)
        for (std::size_t blocks : {1, 2, 7, 40}) {
            std::uint32_t a[8] = {1, 2, 3, 4, 5, 6, 7, 8}, b[8] = {1, 2, 3, 4, 5, 6, 7, 8};
            detail::sha256_blocks_scalar(a, data.data() + offset, blocks);
            accelerated(b, data.data() + offset, blocks);
            CHECK(std::equal(a, a + 8, b));
        }
}
