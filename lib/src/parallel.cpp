#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "lorakit/linalg.h"

namespace lorakit::detail {

std::size_t worker_count(int threads) noexcept {
    return threads > 0 ? static_cast<std::size_t>(threads) : std::max(1u, std::thread::hardware_concurrency());
}

void parallel_for(std::size_t count, int threads, Progress& progress,
                  const std::function<std::uint64_t(std::size_t)>& body) {
    std::atomic<std::size_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex mutex;
    std::exception_ptr failure;
    std::size_t done = 0;
    std::uint64_t done_bytes = 0;
    auto worker = [&] {
        for (;;) {
            const std::size_t i = next.fetch_add(1);
            if (i >= count || failed.load()) return;
            std::uint64_t bytes = 0;
            try {
                bytes = body(i);
            } catch (...) {
                std::lock_guard lock(mutex);
                if (!failure) failure = std::current_exception();
                failed.store(true);
                return;
            }
            std::lock_guard lock(mutex);
            done_bytes += bytes;
            progress.advance(++done, done_bytes);
        }
    };
    const int requested = static_cast<int>(worker_count(threads));
    threads = std::max(1, std::min<int>(requested, static_cast<int>(std::max<std::size_t>(count, 1))));
    // BLAS runs single-threaded inside our workers, and with -j 1 too (OpenBLAS's own threads
    // would take the cores the user kept free: a `lora-stack -j 1` spent 4 s of system time in
    // their sched_yield). A lone item may use every thread that was asked for.
    const int previous = linalg::blas_threads();
    const int blas = threads > 1 ? 1 : requested;
    if (blas != previous) linalg::set_blas_threads(blas);
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto& t : pool) t.join();
    if (blas != previous) linalg::set_blas_threads(previous);
    progress.end();
    if (failure) std::rethrow_exception(failure);
}

ReadAhead::ReadAhead(std::size_t count, std::uint64_t budget, std::function<std::uint64_t(std::size_t)> read)
    : count_(count), budget_(budget), read_(std::move(read)) {
    if (count_ > 0) thread_ = std::thread([this] { run(); });
}

ReadAhead::~ReadAhead() {
    {
        std::lock_guard lock(mutex_);
        stop_ = true;
    }
    changed_.notify_all();
    if (thread_.joinable()) thread_.join();
}

void ReadAhead::started(std::size_t i) {
    {
        std::lock_guard lock(mutex_);
        started_ = std::max(started_, i + 1);
        while (!ahead_.empty() && ahead_.front().first < started_) {
            ahead_bytes_ -= ahead_.front().second;
            ahead_.pop_front();
        }
    }
    changed_.notify_all();
}

void ReadAhead::run() {
    std::size_t i = 0;
    for (;;) {
        {
            std::unique_lock lock(mutex_);
            changed_.wait(lock, [&] { return stop_ || ahead_bytes_ < budget_; });
            i = std::max(i, started_);  // the workers passed it: reading it now would not help
            if (stop_ || i >= count_) return;
        }
        std::uint64_t bytes = 0;
        try {
            bytes = read_(i);
        } catch (...) {
        }
        std::lock_guard lock(mutex_);
        if (i >= started_) {
            ahead_.emplace_back(i, bytes);
            ahead_bytes_ += bytes;
        }
        ++i;
    }
}

}  // namespace lorakit::detail
