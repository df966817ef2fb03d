#include "support.h"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

namespace lorakit::test {

namespace fs = std::filesystem;

int kill_when_ready(const std::function<void(const std::function<void()>& ready)>& body, int signal_number) {
    int pipe_fds[2];
    REQUIRE(::pipe(pipe_fds) == 0);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        ::close(pipe_fds[0]);
        ::signal(SIGTERM, SIG_DFL);
        ::signal(SIGINT, SIG_DFL);
        try {
            body([fd = pipe_fds[1]] { [[maybe_unused]] auto n = ::write(fd, "r", 1); });
        } catch (...) {
        }
        ::_exit(3);
    }
    ::close(pipe_fds[1]);
    char c = 0;
    const bool ready = ::read(pipe_fds[0], &c, 1) == 1;
    ::close(pipe_fds[0]);
    ::kill(pid, signal_number);
    int status = 0;
    ::waitpid(pid, &status, 0);
    REQUIRE(ready);
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

ProcessResult run_process(const std::string& program, const std::vector<std::string>& arguments,
                          const std::string& input, int timeout_seconds, const fs::path& working_directory) {
    int in_pipe[2], out_pipe[2], err_pipe[2];
    if (::pipe2(in_pipe, O_CLOEXEC) || ::pipe2(out_pipe, O_CLOEXEC) || ::pipe2(err_pipe, O_CLOEXEC))
        throw std::runtime_error("pipe failed");
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
        ::dup2(in_pipe[0], 0);
        ::dup2(out_pipe[1], 1);
        ::dup2(err_pipe[1], 2);
        if (!working_directory.empty() && ::chdir(working_directory.c_str()) != 0) ::_exit(126);
        std::vector<char*> argv;
        argv.push_back(const_cast<char*>(program.c_str()));
        for (const auto& a : arguments) argv.push_back(const_cast<char*>(a.c_str()));
        argv.push_back(nullptr);
        ::execv(program.c_str(), argv.data());
        ::_exit(127);
    }
    ::close(in_pipe[0]);
    ::close(out_pipe[1]);
    ::close(err_pipe[1]);
    ProcessResult result;
    std::size_t written = 0;
    ::signal(SIGPIPE, SIG_IGN);
    int in_fd = in_pipe[1];
    if (input.empty()) {
        ::close(in_fd);
        in_fd = -1;
    } else {
        ::fcntl(in_fd, F_SETFL, O_NONBLOCK);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_seconds);
    int fds_open[2] = {out_pipe[0], err_pipe[0]};
    std::string* sinks[2] = {&result.out, &result.err};
    char buffer[65536];
    while (fds_open[0] >= 0 || fds_open[1] >= 0) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) {
            ::kill(pid, SIGKILL);
            result.timed_out = true;
            break;
        }
        pollfd fds[3];
        int stream_of[3] = {-1, -1, -1};
        int n = 0;
        for (int i = 0; i < 2; ++i)
            if (fds_open[i] >= 0) {
                stream_of[n] = i;
                fds[n++] = {fds_open[i], POLLIN, 0};
            }
        const int input_slot = in_fd >= 0 ? n : -1;
        if (in_fd >= 0) fds[n++] = {in_fd, POLLOUT, 0};
        if (::poll(fds, n, static_cast<int>(std::min<long long>(left.count(), 1000))) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        for (int k = 0; k < n; ++k) {
            if (k == input_slot) {
                if (!(fds[k].revents & (POLLOUT | POLLERR | POLLHUP))) continue;
                const ssize_t put = ::write(in_fd, input.data() + written, input.size() - written);
                if (put > 0) written += static_cast<std::size_t>(put);
                if (put < 0 || written == input.size()) {
                    ::close(in_fd);
                    in_fd = -1;
                }
                continue;
            }
            if (!(fds[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            const int stream = stream_of[k];
            const ssize_t got = ::read(fds_open[stream], buffer, sizeof buffer);
            if (got > 0) {
                sinks[stream]->append(buffer, static_cast<std::size_t>(got));
            } else if (got == 0 || errno != EINTR) {
                ::close(fds_open[stream]);
                fds_open[stream] = -1;
            }
        }
    }
    out_pipe[0] = fds_open[0];
    err_pipe[0] = fds_open[1];
    if (in_fd >= 0) ::close(in_fd);
    if (out_pipe[0] >= 0) ::close(out_pipe[0]);
    if (err_pipe[0] >= 0) ::close(err_pipe[0]);
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
    else if (WIFSIGNALED(status)) result.exit_code = 128 + WTERMSIG(status);
    return result;
}

std::string tool_path(const std::string& name) { return std::string(LORAKIT_BINARY_DIR) + "/bin/" + name; }

ProcessResult run_tool(const std::string& name, const std::vector<std::string>& arguments, const std::string& input) {
    return run_process(tool_path(name), arguments, input);
}

fs::path real_testdata_dir() {
    if (const char* env = std::getenv("LORAKIT_TESTDATA"); env && *env) {
        std::error_code ec;
        return fs::is_directory(env, ec) ? fs::path(env) : fs::path();
    }
    std::error_code ec;
    const fs::path dir = fs::weakly_canonical(fs::path(LORAKIT_TESTDATA_DIR), ec);
    return fs::is_directory(dir, ec) ? dir : fs::path();
}

ScratchDir::ScratchDir() {
    std::random_device device;
    std::mt19937_64 engine(device());
    for (int attempt = 0; attempt < 100; ++attempt) {
        path_ = fs::temp_directory_path() / ("lorakit-test-" + std::to_string(engine() % 1000000000ULL));
        std::error_code ec;
        if (fs::create_directory(path_, ec)) return;
    }
    throw std::runtime_error("cannot create a scratch directory");
}

ScratchDir::~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
}

std::vector<std::string> ScratchDir::list() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(path_)) names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
}

std::string read_file(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

void write_file(const fs::path& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace lorakit::test
