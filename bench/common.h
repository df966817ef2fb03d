// Timing helpers shared by the benchmarks: run a command (stdout to /dev/null), wall time and
// the child's peak RSS, median of repeated runs after a warm-up.
#pragma once

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace lorakit::bench {

struct Run {
    double seconds = 0;
    double peak_rss_mb = 0;
    int status = 0;
};

inline Run run(const std::vector<std::string>& argv) {
    const auto start = std::chrono::steady_clock::now();
    const pid_t pid = ::fork();
    if (pid == 0) {
        const int null = ::open("/dev/null", O_WRONLY);
        ::dup2(null, 1);
        ::dup2(null, 2);
        std::vector<char*> args;
        for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        ::execvp(args[0], args.data());
        ::_exit(127);
    }
    int status = 0;
    struct rusage usage {};
    ::wait4(pid, &status, 0, &usage);
    Run r;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    r.peak_rss_mb = static_cast<double>(usage.ru_maxrss) / 1024.0;
    r.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return r;
}

// Median of `repeats` runs after one warm-up; `before` runs ahead of each (e.g. removing outputs),
// then sync(), untimed: otherwise the previous run's hundreds of MB of dirty pages are written
// back during the next one, and a 0.2 s conversion measured anywhere from 0.2 to 0.6 s here.
template <typename Before>
Run median_of(const std::vector<std::string>& argv, int repeats, Before before) {
    before();
    ::sync();
    run(argv);
    std::vector<Run> runs;
    for (int i = 0; i < repeats; ++i) {
        before();
        ::sync();
        runs.push_back(run(argv));
    }
    std::sort(runs.begin(), runs.end(), [](const Run& a, const Run& b) { return a.seconds < b.seconds; });
    return runs[runs.size() / 2];
}

inline Run median_of(const std::vector<std::string>& argv, int repeats) {
    return median_of(argv, repeats, [] {});
}

// One command of an interleaved measurement, and what runs (untimed, followed by sync()) before
// each of its runs.
struct Timed {
    std::vector<std::string> argv;
    std::function<void()> before = [] {};
};

// The medians of `repeats` rounds after one warm-up round, a round running every command once in
// turn: the commands compared are timed in the same minutes instead of one series after another
// (this VM's write speed drifts 2-5x from one minute to the next). Result i is commands[i]'s.
inline std::vector<Run> interleaved_medians(const std::vector<Timed>& commands, int repeats) {
    std::vector<std::vector<Run>> runs(commands.size());
    for (int round = 0; round <= repeats; ++round)
        for (std::size_t i = 0; i < commands.size(); ++i) {
            commands[i].before();
            ::sync();
            const Run r = run(commands[i].argv);
            if (round > 0) runs[i].push_back(r);
        }
    std::vector<Run> medians;
    for (auto& r : runs) {
        std::sort(r.begin(), r.end(), [](const Run& a, const Run& b) { return a.seconds < b.seconds; });
        medians.push_back(r[r.size() / 2]);
    }
    return medians;
}

// Drops a file's pages from the page cache (posix_fadvise DONTNEED: clean pages only, no root
// needed), so that the next read comes from the disk.
inline void evict(const std::filesystem::path& path) {
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) return;
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
}

inline std::string tool(const char* self, const char* name) {
    return (std::filesystem::path(self).parent_path() / name).string();
}

template <typename F>
double seconds_of(F&& f) {
    const auto start = std::chrono::steady_clock::now();
    f();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace lorakit::bench
