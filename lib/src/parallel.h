// The worker pool the per-module operations share (inspect, resize, merge).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

#include "lorakit/progress.h"

namespace lorakit::detail {

// Runs body(i) for every i in [0, count) on `threads` workers (0: all cores; never more than
// count), with BLAS single-threaded meanwhile (the workers are the parallelism), also when one
// worker was asked for; a lone item (count 1) lets BLAS use the threads asked for. After each
// item, progress.advance(items done, bytes done) with the bytes body returned; progress.end()
// when all is done (the caller has begun the stage). The first exception stops the remaining
// work and is rethrown once every worker has stopped.
// The workers `threads` asks for (0: all cores).
std::size_t worker_count(int threads) noexcept;

void parallel_for(std::size_t count, int threads, Progress& progress,
                  const std::function<std::uint64_t(std::size_t)>& body);

// A thread reading items ahead of parallel_for's workers (lora-stack's base tensors, so that a
// checkpoint read from the disk streams while earlier modules are computed): read(i), which
// returns the bytes it brought into memory, for each item in index order that no worker has
// started, while the items read and not yet started hold under `budget` bytes. The workers call
// started(i) as they begin item i. What read throws is ignored (only a read ahead: the worker
// meets the problem itself). The destructor stops the thread (after the read in progress).
class ReadAhead {
public:
    ReadAhead(std::size_t count, std::uint64_t budget, std::function<std::uint64_t(std::size_t)> read);
    ~ReadAhead();
    ReadAhead(const ReadAhead&) = delete;
    ReadAhead& operator=(const ReadAhead&) = delete;

    void started(std::size_t i);

private:
    void run();

    std::size_t count_;
    std::uint64_t budget_;
    std::function<std::uint64_t(std::size_t)> read_;
    std::mutex mutex_;
    std::condition_variable changed_;
    std::size_t started_ = 0;                                  // items [0, started_) have begun
    std::deque<std::pair<std::size_t, std::uint64_t>> ahead_;  // read and not yet begun: item, bytes
    std::uint64_t ahead_bytes_ = 0;
    bool stop_ = false;
    std::thread thread_;  // last: started once everything above exists
};

}  // namespace lorakit::detail
