// Items made ahead on a helper thread while the caller writes the previous ones (the GGUF LoRA
// writer and the safetensors writer fold, permute or encode tensors this way).
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

namespace lorakit::formats {

// For items 0..count-1 written in order: those for which needs(i) holds are made by make(i) on
// one helper thread, in increasing i, at most `depth` made and not yet taken (so memory stays
// bounded by a few items). take(i) (for an item that needs making, in increasing i) returns it,
// rethrowing what make threw; an item the helper has passed or never had is made at once. The
// helper is one thread for the whole sequence: a thread per item cost ~50 us each (a kohya ->
// diffusers conversion of an SDXL LoRA folds ~1000 tensors). The destructor stops and joins the
// helper (after the item it is making), so the callbacks' data must outlive this object.
template <typename Made>
class MadeAhead {
public:
    MadeAhead(std::size_t count, const std::function<bool(std::size_t)>& needs, std::function<Made(std::size_t)> make,
              std::size_t depth = 2)
        : make_(std::move(make)), depth_(std::max<std::size_t>(depth, 1)) {
        for (std::size_t i = 0; i < count; ++i)
            if (needs(i)) order_.push_back(i);
        if (!order_.empty()) helper_ = std::thread([this] { run(); });
    }

    MadeAhead(const MadeAhead&) = delete;
    MadeAhead& operator=(const MadeAhead&) = delete;

    ~MadeAhead() {
        {
            std::lock_guard lock(mutex_);
            stop_ = true;
        }
        changed_.notify_all();
        if (helper_.joinable()) helper_.join();
    }

    Made take(std::size_t i) {
        if (!std::binary_search(order_.begin(), order_.end(), i)) return make_(i);
        std::unique_lock lock(mutex_);
        for (;;) {
            changed_.wait(lock, [&] { return !ready_.empty() || finished_; });
            if (ready_.empty()) break;            // the helper stopped (after a failure) before reaching i
            if (ready_.front().index > i) break;  // i was passed already; the queue stays for later takes
            Slot slot = std::move(ready_.front());
            ready_.pop_front();
            changed_.notify_all();
            if (slot.index < i) continue;  // made but never taken: skipped by the caller
            lock.unlock();
            if (slot.error) std::rethrow_exception(slot.error);
            return std::move(*slot.made);
        }
        lock.unlock();
        return make_(i);
    }

private:
    struct Slot {
        std::size_t index = 0;
        std::optional<Made> made;
        std::exception_ptr error;
    };

    void run() {
        for (std::size_t i : order_) {
            {
                std::unique_lock lock(mutex_);
                changed_.wait(lock, [&] { return stop_ || ready_.size() < depth_; });
                if (stop_) break;
            }
            Slot slot;
            slot.index = i;
            try {
                slot.made.emplace(make_(i));
            } catch (...) {
                slot.error = std::current_exception();
            }
            const bool failed = slot.error != nullptr;
            {
                std::lock_guard lock(mutex_);
                ready_.push_back(std::move(slot));
            }
            changed_.notify_all();
            if (failed) break;
        }
        {
            std::lock_guard lock(mutex_);
            finished_ = true;
        }
        changed_.notify_all();
    }

    std::function<Made(std::size_t)> make_;
    std::size_t depth_;
    std::vector<std::size_t> order_;  // the items that need making, increasing
    std::mutex mutex_;
    std::condition_variable changed_;
    std::deque<Slot> ready_;
    bool stop_ = false, finished_ = false;
    std::thread helper_;  // last: started once everything above exists
};

}  // namespace lorakit::formats
