// Helpers shared by the tests: running the built tools as processes, scratch directories,
// and locating the real third-party test files.
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace lorakit::test {

struct ProcessResult {
    int exit_code = -1;  // the exit status, or 128 + signal number
    std::string out;
    std::string err;
    bool timed_out = false;
};

// Runs `program` with `arguments` (no shell), feeding `input` on stdin, and collects both
// output streams. The process is killed after `timeout_seconds` (timed_out is then set).
ProcessResult run_process(const std::string& program, const std::vector<std::string>& arguments,
                          const std::string& input = {}, int timeout_seconds = 120,
                          const std::filesystem::path& working_directory = {});

// Forks a child that runs body(ready) with the runner's SIGTERM/SIGINT handlers reset (it behaves
// like a tool). The body calls ready() once it is mid-work and goes on working; the parent then
// sends `signal_number`. Returns how the child ended: 128 + the signal, or its exit status (3
// when the body returned). REQUIREs that ready() was called.
int kill_when_ready(const std::function<void(const std::function<void()>& ready)>& body, int signal_number);

// The path of a built tool, e.g. tool_path("lora-inspect").
std::string tool_path(const std::string& name);
ProcessResult run_tool(const std::string& name, const std::vector<std::string>& arguments, const std::string& input = {});

// ../shared/testdata/real (or $LORAKIT_TESTDATA). Empty when it does not exist.
std::filesystem::path real_testdata_dir();
// Skips the calling test with a visible warning when the real test data is absent.
#define LORAKIT_REQUIRE_REAL_TESTDATA()                                                          \
    do {                                                                                         \
        if (::lorakit::test::real_testdata_dir().empty()) {                                      \
            WARN("real test data not found (set LORAKIT_TESTDATA); skipping this test");         \
            return;                                                                              \
        }                                                                                        \
    } while (0)

// A fresh directory under the system temp dir, removed with its contents on destruction.
class ScratchDir {
public:
    ScratchDir();
    ~ScratchDir();
    ScratchDir(const ScratchDir&) = delete;
    ScratchDir& operator=(const ScratchDir&) = delete;
    const std::filesystem::path& path() const { return path_; }
    std::filesystem::path operator/(const std::string& name) const { return path_ / name; }
    // Names of the entries in the directory, sorted.
    std::vector<std::string> list() const;

private:
    std::filesystem::path path_;
};

std::string read_file(const std::filesystem::path& path);
void write_file(const std::filesystem::path& path, const std::string& bytes);

}  // namespace lorakit::test
