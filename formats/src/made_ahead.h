// One item made ahead on a helper thread while the caller writes the previous ones (the GGUF
// LoRA writer and the safetensors writer fold, permute or encode tensors this way).
#pragma once

#include <cstddef>
#include <functional>
#include <future>
#include <utility>

namespace lorakit::formats {

// For items 0..count-1 written in order: those for which needs(i) holds are made by make(i),
// the next one on a helper thread as soon as the one before it is taken. take(i) (for an item
// that needs making, in increasing i) returns it, made ahead or now. The destructor waits for a
// helper still running, so the callbacks' data must outlive this object.
template <typename Made>
class MadeAhead {
public:
    MadeAhead(std::size_t count, std::function<bool(std::size_t)> needs, std::function<Made(std::size_t)> make)
        : count_(count), needs_(std::move(needs)), make_(std::move(make)) {
        start_from(0);
    }

    Made take(std::size_t i) {
        Made made = next_ == i ? ahead_.get() : make_(i);
        start_from(i + 1);
        return made;
    }

private:
    void start_from(std::size_t first) {
        next_ = count_;
        for (std::size_t j = first; j < count_; ++j)
            if (needs_(j)) {
                ahead_ = std::async(std::launch::async, make_, j);
                next_ = j;
                return;
            }
    }

    std::size_t count_;
    std::function<bool(std::size_t)> needs_;
    std::function<Made(std::size_t)> make_;
    std::size_t next_ = 0;
    std::future<Made> ahead_;  // last: destroyed (waiting for the helper) before the callbacks
};

}  // namespace lorakit::formats
