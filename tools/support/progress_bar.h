// A one-line progress bar on stderr for terminals: items, bytes, rate and ETA, redrawn at
// most ten times a second and erased when the stage ends.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

#include "lorakit/progress.h"

namespace lorakit::cli {

class TerminalProgress final : public Progress {
public:
    explicit TerminalProgress(int fd);
    void begin(std::string_view stage, std::uint64_t total_items, std::uint64_t total_bytes) override;
    void advance(std::uint64_t items, std::uint64_t bytes) override;
    void end() override;

private:
    void draw(bool force);

    int fd_;
    std::mutex mutex_;
    std::string stage_;
    std::uint64_t total_items_ = 0, total_bytes_ = 0, items_ = 0, bytes_ = 0;
    std::chrono::steady_clock::time_point start_, last_draw_;
    bool active_ = false;
    std::size_t last_width_ = 0;
};

}  // namespace lorakit::cli
