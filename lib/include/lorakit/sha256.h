// SHA-256 (FIPS 180-4). Used for content hashes that other tools compare against (kohya's
// sshs_model_hash, per-tensor hashes in tests).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace lorakit {

class Sha256 {
public:
    Sha256();
    void update(std::span<const std::byte> bytes);
    std::array<std::uint8_t, 32> finish();
    // finish() as lower-case hex.
    std::string finish_hex();

private:
    std::array<std::uint32_t, 8> state_;
    std::array<std::uint8_t, 64> buffer_{};
    std::size_t buffered_ = 0;
    std::uint64_t length_ = 0;
};

// Lower-case hex digest of `bytes`.
std::string sha256_hex(std::span<const std::byte> bytes);

}  // namespace lorakit
