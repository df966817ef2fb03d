#include "pipeline.h"

#include <thread>
#include <utility>

#include "lorakit/error.h"
#include "parallel.h"

namespace lorakit::detail {

namespace {

// Rethrows a stored failure as a copy when it is an Error, so that the context the taker's
// callers add (with_context) does not change the stored one, which write_while_made rethrows.
[[noreturn]] void rethrow_copy(const std::exception_ptr& failure) {
    try {
        std::rethrow_exception(failure);
    } catch (const Error& error) {
        throw Error(error);
    }
}

}  // namespace

TensorPipeline::TensorPipeline(std::size_t groups, std::size_t per_group, Make make, std::size_t window)
    : per_group_(std::max<std::size_t>(per_group, 1)), window_(std::max<std::size_t>(window, 1)), make_(std::move(make)),
      groups_(groups) {}

void TensorPipeline::set_plan(std::vector<std::size_t> order) {
    order_ = std::move(order);
    planned_ = true;
    changed_.notify_all();
}

void TensorPipeline::plan(std::span<const std::size_t> ids) {
    std::lock_guard lock(mutex_);
    if (planned_) return;
    std::vector<char> seen(groups_.size(), 0);
    std::vector<std::size_t> order;
    for (std::size_t id : ids) {
        const std::size_t g = id / per_group_;
        if (g < groups_.size() && !seen[g]) {
            seen[g] = 1;
            order.push_back(g);
        }
    }
    set_plan(std::move(order));
}

void TensorPipeline::make_group(std::size_t g) {
    std::vector<Tensor> parts;
    std::exception_ptr error;
    try {
        parts = make_(g);
        if (parts.size() != per_group_)
            fail(ErrorCode::internal, "group {}: {} tensors made for {}", g, parts.size(), per_group_);
    } catch (...) {
        error = std::current_exception();
    }
    std::lock_guard lock(mutex_);
    Group& group = groups_[g];
    if (error) {
        group.state = State::failed;
        if (!failure_) failure_ = error;
    } else {
        group.state = State::made;
        group.ever_made = true;
        group.parts = std::move(parts);
        group.taken.assign(per_group_, 0);
        group.taken_count = 0;
    }
    changed_.notify_all();
}

std::uint64_t TensorPipeline::work_one() {
    std::unique_lock lock(mutex_);
    for (;;) {
        if (closed_ || failure_) return 0;
        if (planned_) {
            while (next_ < order_.size() && groups_[order_[next_]].state != State::waiting) ++next_;
            if (next_ == order_.size()) return 0;
            if (outstanding_ < window_) break;
        }
        changed_.wait(lock);
    }
    const std::size_t g = order_[next_++];
    groups_[g].state = State::making;
    ++outstanding_;
    lock.unlock();
    make_group(g);
    return 0;
}

Tensor TensorPipeline::take(std::size_t id) {
    const std::size_t g = id / per_group_, part = id % per_group_;
    if (g >= groups_.size()) fail(ErrorCode::internal, "deferred tensor {} of {} groups taken", id, groups_.size());
    auto make_again = [&] {
        std::vector<Tensor> parts = make_(g);
        if (parts.size() != per_group_)
            fail(ErrorCode::internal, "group {}: {} tensors made for {}", g, parts.size(), per_group_);
        return std::move(parts[part]);
    };
    std::unique_lock lock(mutex_);
    if (!planned_) {
        std::vector<std::size_t> natural(groups_.size());
        for (std::size_t i = 0; i < natural.size(); ++i) natural[i] = i;
        set_plan(std::move(natural));
    }
    Group& group = groups_[g];
    if (group.state == State::waiting && !failure_) {
        group.state = State::making;  // claimed here: no worker has it, so nothing to wait for
        ++outstanding_;
        lock.unlock();
        make_group(g);
        lock.lock();
    }
    changed_.wait(lock, [&] { return group.state != State::making || failure_; });
    if (failure_) rethrow_copy(failure_);
    if (group.state != State::made) fail(ErrorCode::internal, "group {} was not made", g);
    if (group.taken[part]) {  // taken before: made again, for this take alone
        lock.unlock();
        return make_again();
    }
    group.taken[part] = 1;
    Tensor t = std::move(group.parts[part]);
    if (++group.taken_count == per_group_) {
        group.parts.clear();
        --outstanding_;
        changed_.notify_all();
    }
    return t;
}

void TensorPipeline::run(int threads, Progress& progress) {
    parallel_for(groups_.size(), threads, progress, [this](std::size_t) { return work_one(); });
}

void TensorPipeline::close() {
    std::lock_guard lock(mutex_);
    closed_ = true;
    changed_.notify_all();
}

bool TensorPipeline::made(std::size_t group) const {
    std::lock_guard lock(mutex_);
    return groups_.at(group).ever_made;
}

std::exception_ptr TensorPipeline::failure() const {
    std::lock_guard lock(mutex_);
    return failure_;
}

void write_while_made(TensorPipeline& pipeline, int threads, Progress& progress, const std::function<void()>& write) {
    std::exception_ptr write_error;
    std::thread writer([&] {
        try {
            write();
        } catch (...) {
            write_error = std::current_exception();
        }
        pipeline.close();
    });
    try {
        pipeline.run(threads, progress);
    } catch (...) {
        pipeline.close();
        writer.join();
        throw;
    }
    writer.join();
    if (auto failure = pipeline.failure()) std::rethrow_exception(failure);
    if (write_error) std::rethrow_exception(write_error);
}

}  // namespace lorakit::detail
