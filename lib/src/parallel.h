// The worker pool the per-module operations share (inspect, resize, merge).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "lorakit/progress.h"

namespace lorakit::detail {

// Runs body(i) for every i in [0, count) on `threads` workers (0: all cores; never more than
// count), with BLAS single-threaded meanwhile (the workers are the parallelism), also when one
// worker was asked for; a lone item (count 1) lets BLAS use the threads asked for. After each
// item, progress.advance(items done, bytes done) with the bytes body returned; progress.end()
// when all is done (the caller has begun the stage). The first exception stops the remaining
// work and is rethrown once every worker has stopped.
// The workers `threads` asks for (0: all cores).
std::size_t worker_count(int threads);

void parallel_for(std::size_t count, int threads, Progress& progress,
                  const std::function<std::uint64_t(std::size_t)>& body);

}  // namespace lorakit::detail
