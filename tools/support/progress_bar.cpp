#include "support/progress_bar.h"

#include <unistd.h>

#include <algorithm>

#include <fmt/format.h>

#include "lorakit/names.h"

namespace lorakit::cli {

TerminalProgress::TerminalProgress(int fd) : fd_(fd) {}

void TerminalProgress::begin(std::string_view stage, std::uint64_t total_items, std::uint64_t total_bytes) {
    std::lock_guard lock(mutex_);
    stage_ = stage;
    total_items_ = total_items;
    total_bytes_ = total_bytes;
    items_ = bytes_ = 0;
    start_ = last_draw_ = std::chrono::steady_clock::now();
    active_ = true;
}

void TerminalProgress::advance(std::uint64_t items, std::uint64_t bytes) {
    std::lock_guard lock(mutex_);
    items_ = items;
    bytes_ = bytes;
    draw(false);
}

void TerminalProgress::end() {
    std::lock_guard lock(mutex_);
    if (!active_) return;
    active_ = false;
    if (last_width_ > 0) {
        const std::string blank = fmt::format("\r{:{}}\r", "", last_width_);
        [[maybe_unused]] auto n = ::write(fd_, blank.data(), blank.size());
        last_width_ = 0;
    }
}

void TerminalProgress::draw(bool force) {
    const auto now = std::chrono::steady_clock::now();
    const double since_start = std::chrono::duration<double>(now - start_).count();
    // Short stages never draw at all; long ones redraw at most ten times a second.
    if (!force && (since_start < 0.3 || now - last_draw_ < std::chrono::milliseconds(100))) return;
    last_draw_ = now;
    const double fraction = total_bytes_ ? double(bytes_) / double(total_bytes_)
                            : total_items_ ? double(items_) / double(total_items_)
                                           : 0.0;
    constexpr int width = 24;
    const int filled = static_cast<int>(fraction * width + 0.5);
    std::string bar(static_cast<std::size_t>(std::clamp(filled, 0, width)), '=');
    bar.resize(width, ' ');
    std::string line = fmt::format("\r{} [{}] {}/{}", stage_, bar, items_, total_items_);
    if (total_bytes_) {
        line += fmt::format(" {}", format_bytes(double(bytes_)));
        if (since_start > 0) line += fmt::format(" {}/s", format_bytes(double(bytes_) / since_start));
    }
    if (fraction > 0.0 && fraction < 1.0) line += fmt::format(" ETA {:.0f}s", since_start * (1.0 / fraction - 1.0));
    const std::size_t visible = line.size() - 1;
    if (visible < last_width_) line += std::string(last_width_ - visible, ' ');
    last_width_ = visible;
    [[maybe_unused]] auto n = ::write(fd_, line.data(), line.size());
}

}  // namespace lorakit::cli
