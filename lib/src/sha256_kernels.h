// SHA-256 block compression: a portable version and one using the x86 SHA extensions, chosen
// once at run time (the extensions make hashing multi-hundred-MB outputs, as kohya's
// sshs_model_hash needs, several times faster).
#pragma once

#include <cstddef>
#include <cstdint>

namespace lorakit::detail {

using Sha256Blocks = void (*)(std::uint32_t state[8], const std::uint8_t* data, std::size_t blocks) noexcept;

void sha256_blocks_scalar(std::uint32_t state[8], const std::uint8_t* data, std::size_t blocks) noexcept;
// nullptr when the CPU lacks the SHA extensions (or LORAKIT_FORCE_SCALAR=1).
Sha256Blocks sha256_blocks_accelerated() noexcept;
Sha256Blocks sha256_blocks() noexcept;

}  // namespace lorakit::detail
