// Outputs written while they are computed: lora-resize and lora-merge make each module's new
// factors on worker threads in the order the writer takes them, so the writing overlaps the
// computing and only a few modules' factors are held at a time (not the whole output).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <vector>

#include "lorakit/progress.h"
#include "lorakit/tensor.h"

namespace lorakit::detail {

// Tensors made in groups (a module's down and up): `groups` groups of `per_group` tensors, the
// tensor `part` of group g having the id g * per_group + part (Tensor::deferred(..., id)).
// run() makes the groups on worker threads in the order of the writer's plan (TensorMaker::
// plan; the natural order when the first take comes without one), at most `window` groups made
// and not yet taken whole. A take of a group no worker has claimed makes it on the taker's
// thread, so takes in any order never wait on the window. make(g) returns the group's tensors;
// what it throws is kept, rethrown by takes (of any group) and by failure().
class TensorPipeline final : public TensorMaker {
public:
    using Make = std::function<std::vector<Tensor>(std::size_t group)>;
    TensorPipeline(std::size_t groups, std::size_t per_group, Make make, std::size_t window);

    void plan(std::span<const std::size_t> ids) override;
    Tensor take(std::size_t id) override;

    // Makes the planned groups on `threads` workers (0: all cores; this thread is one; BLAS
    // single-threaded meanwhile) until every planned group is claimed, a make failed, or
    // close() was called. progress.advance per group; the caller has begun the stage.
    void run(int threads, Progress& progress);
    // No more takes will come: run() returns once the groups being made are done.
    void close();
    // Whether group g was made without failing (once at least).
    bool made(std::size_t group) const;
    // The first failure of a make, or null.
    std::exception_ptr failure() const;

private:
    enum class State { waiting, making, made, failed };
    struct Group {
        State state = State::waiting;
        std::vector<Tensor> parts;
        std::vector<char> taken;
        std::size_t taken_count = 0;
        bool ever_made = false;
    };
    void set_plan(std::vector<std::size_t> order);  // with mutex_ held
    void make_group(std::size_t g);                  // claimed by the caller; without mutex_ held
    std::uint64_t work_one();

    std::size_t per_group_, window_;
    Make make_;
    mutable std::mutex mutex_;
    std::condition_variable changed_;
    std::vector<Group> groups_;
    std::vector<std::size_t> order_;  // groups in the order planned
    std::size_t next_ = 0;            // first entry of order_ not yet looked at by a worker
    std::size_t outstanding_ = 0;     // groups claimed and not yet taken whole
    bool planned_ = false, closed_ = false;
    std::exception_ptr failure_;
};

// A value shared between the makes of a pipeline, changed and read under its lock.
template <typename T>
struct Guarded {
    T value;
    std::mutex mutex;
    template <typename Change>
    void set(Change&& change) {
        std::lock_guard lock(mutex);
        change(value);
    }
    T get() {
        std::lock_guard lock(mutex);
        return value;
    }
};

// Runs write() (which writes an adapter whose deferred tensors `pipeline` makes) on its own
// thread while this thread runs the pipeline's workers, then rethrows the first failure: a
// make's (its own message, e.g. "module 'x': ...") before the writer's.
void write_while_made(TensorPipeline& pipeline, int threads, Progress& progress, const std::function<void()>& write);

}  // namespace lorakit::detail
