// Progress reporting from long operations. Operations take a Progress& and call it; the
// tools supply a terminal progress bar (tools/support) or nothing. The library never
// prints anything itself.
#pragma once

#include <cstdint>
#include <string_view>

namespace lorakit {

class Progress {
public:
    virtual ~Progress() = default;
    // Starts a stage of `total_items` items (tensors, modules) and `total_bytes` bytes
    // (0 when unknown).
    virtual void begin(std::string_view stage, std::uint64_t total_items, std::uint64_t total_bytes) = 0;
    // `items` and `bytes` done so far in the stage; may be called from any one thread at a time.
    virtual void advance(std::uint64_t items, std::uint64_t bytes) = 0;
    virtual void end() = 0;
};

// Reports nowhere.
class NoProgress final : public Progress {
public:
    void begin(std::string_view, std::uint64_t, std::uint64_t) override {}
    void advance(std::uint64_t, std::uint64_t) override {}
    void end() override {}
};

NoProgress& no_progress() noexcept;

}  // namespace lorakit
