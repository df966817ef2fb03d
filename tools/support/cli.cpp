#include "support/cli.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <exception>

#include <fmt/format.h>

#include "lorakit/atomic_file.h"
#include "lorakit/error.h"
#include "lorakit/linalg.h"
#include "lorakit/version.h"
#include "support/progress_bar.h"

namespace lorakit::cli {

Tool::Tool(std::string name, std::string description) : name_(std::move(name)), app_(std::move(description), name_) {
    // Every mapped input keeps its descriptor open (for file-to-file copies): a stack or merge of
    // a thousand adapters must not hit the default soft limit of 1024 descriptors.
    if (rlimit limit{}; ::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        ::setrlimit(RLIMIT_NOFILE, &limit);
    }
    // OpenBLAS started its worker pool when it was loaded; its idle worker would spin beside us.
    linalg::stop_blas_pool();
    app_.set_version_flag("--version", fmt::format("{} (lorakit) {}", name_, LORAKIT_VERSION_STRING));
    app_.get_formatter()->column_width(34);
}

Tool::~Tool() = default;

void Tool::add_output_option(std::string& output, std::string_view help) {
    output_ = &output;
    app_.add_option("-o,--output", output, std::string(help))->type_name("FILE");
}

void Tool::add_force_option(bool& force) {
    app_.add_flag("-f,--force", force, "replace an existing output file");
    // Outputs are flushed to disk before they are named; a pipeline's scratch outputs may skip it.
    if (const char* env = std::getenv("LORAKIT_NO_SYNC"); env && *env && std::string_view(env) != "0")
        set_sync_outputs(false);
    app_.add_flag_callback(
        "--no-sync", [] { set_sync_outputs(false); },
        "do not flush the output to disk before naming it: faster, but a power loss may leave it "
        "empty (LORAKIT_NO_SYNC=1 does the same)");
}

void Tool::add_json_option(bool& json, std::string_view help) { app_.add_flag("--json", json, std::string(help)); }

void Tool::add_verbosity_options() {
    app_.add_flag("-q,--quiet", quiet_, "print no notes, warnings or progress on stderr (errors still are)");
    app_.add_flag("-v,--verbose", verbose_, "print notes on stderr even when it is not a terminal (a Makefile's log)");
}

// Notes are for a person at a terminal: a batch job's log gets them with --verbose only.
void Tool::note(std::string_view message) const {
    if (quiet_ || !(verbose_ || ::isatty(STDERR_FILENO))) return;
    fmt::print(stderr, "{}: note: {}\n", name_, message);
}

void Tool::warn(std::string_view message) const {
    if (quiet_) return;
    fmt::print(stderr, "{}: warning: {}\n", name_, message);
}

int Tool::finish(const ToolResult& result) const {
    if (output_ && *output_ == "-") {
        // Standard output holds the written file: the report must not follow it there.
        if (!result.out.empty() && !quiet_ && (verbose_ || ::isatty(STDERR_FILENO)))
            std::fwrite(result.out.data(), 1, result.out.size(), stderr);
    } else if (!result.out.empty()) {
        std::fwrite(result.out.data(), 1, result.out.size(), stdout);
    }
    std::fflush(stdout);
    for (const auto& d : result.diagnostics) {
        switch (d.severity) {
        case Diagnostic::Severity::error: fmt::print(stderr, "{}: error: {}\n", name_, d.message); break;
        case Diagnostic::Severity::warning: warn(d.message); break;
        case Diagnostic::Severity::note: note(d.message); break;
        }
    }
    return result.exit_code;
}

std::vector<std::string> Tool::expand_argument_files(const std::vector<std::string>& arguments) {
    std::vector<std::string> out;
    for (const auto& argument : arguments) {
        if (argument.size() < 2 || argument[0] != '@') {
            out.push_back(argument);
            continue;
        }
        const std::string list = argument.substr(1);
        std::FILE* file = list == "-" ? stdin : std::fopen(list.c_str(), "r");
        if (!file) fail(ErrorCode::io, "cannot open argument file {}: {}", quote(list), std::strerror(errno));
        std::string line;
        int c;
        auto flush = [&] {
            while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
            if (!line.empty() && line[0] != '#') out.push_back(line);
            line.clear();
        };
        while ((c = std::fgetc(file)) != EOF) {
            if (c == '\n') flush();
            else line += static_cast<char>(c);
        }
        flush();
        if (file != stdin) std::fclose(file);
    }
    return out;
}

Progress& Tool::progress() {
    if (!progress_) {
        if (!quiet_ && ::isatty(STDERR_FILENO)) progress_ = std::make_unique<TerminalProgress>(STDERR_FILENO);
        else return no_progress();
    }
    return *progress_;
}

int Tool::run(int argc, char** argv, const std::function<int()>& body) {
    try {
        app_.parse(argc, argv);
    } catch (const CLI::CallForHelp&) {
        fmt::print("{}", app_.help());
        return exit_codes::success;
    } catch (const CLI::CallForAllHelp&) {
        fmt::print("{}", app_.help("", CLI::AppFormatMode::All));
        return exit_codes::success;
    } catch (const CLI::CallForVersion&) {
        fmt::print("{}\n", app_.version());
        return exit_codes::success;
    } catch (const CLI::ParseError& e) {
        fmt::print(stderr, "{}: error: {} (see {} --help)\n", name_, e.what(), name_);
        return exit_codes::usage;
    }
    try {
        const int code = body();
        std::fflush(stdout);
        if (std::ferror(stdout)) {
            fmt::print(stderr, "{}: error: cannot write to standard output\n", name_);
            return exit_codes::io;
        }
        return code;
    } catch (const Error& e) {
        if (progress_) progress_->end();
        fmt::print(stderr, "{}: error: {}\n", name_, e.what());
        return exit_code_for(e.code());
    } catch (const std::bad_alloc&) {
        if (progress_) progress_->end();
        fmt::print(stderr, "{}: error: out of memory\n", name_);
        return exit_codes::io;
    } catch (const std::exception& e) {
        if (progress_) progress_->end();
        fmt::print(stderr, "{}: error: internal error: {}\n", name_, e.what());
        return exit_codes::internal;
    }
}

}  // namespace lorakit::cli
