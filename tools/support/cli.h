// Shared plumbing for every lorakit tool: option conventions, the one place where errors
// become exit codes and one-line messages, notes and the progress bar on stderr.
//
// Manners (the same for every tool): nothing but the result goes to stdout; notes and
// progress go to stderr, progress only on a terminal; --quiet silences notes; errors are one
// line "<tool>: error: <message>" with the exit codes of lorakit/error.h.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <CLI/CLI.hpp>

#include "lorakit/progress.h"
#include "lorakit/tool_result.h"

namespace lorakit::cli {

class Tool {
public:
    Tool(std::string name, std::string description);
    ~Tool();

    CLI::App& app() { return app_; }
    const std::string& name() const { return name_; }

    // Standard options; each tool adds those it supports.
    void add_output_option(std::string& output, std::string_view help = "write the result to FILE");
    void add_force_option(bool& force);
    void add_json_option(bool& json, std::string_view help = "print a machine-readable JSON report on stdout");
    void add_verbosity_options();

    // Parses argv, runs `body` and returns the process exit code. Every lorakit::Error,
    // CLI11 parse error and stray exception is reported here, once, as one line.
    int run(int argc, char** argv, const std::function<int()>& body);

    bool quiet() const { return quiet_; }
    bool verbose() const { return verbose_; }
    // A note on stderr ("<tool>: note: ..."): on a terminal or with --verbose, never with --quiet.
    void note(std::string_view message) const;
    // A warning on stderr, unless --quiet.
    void warn(std::string_view message) const;
    // Writes a library operation's result: its text to stdout (to stderr as a note when the
    // output itself goes to stdout, `-o -`), its diagnostics to stderr, and returns its exit code.
    int finish(const ToolResult& result) const;
    // Expands "@FILE" arguments into the lines of FILE (one argument per line; blank lines
    // and lines starting with '#' are skipped). "@-" reads standard input.
    static std::vector<std::string> expand_argument_files(const std::vector<std::string>& arguments);
    // A progress bar on stderr when stderr is a terminal and not --quiet; otherwise silent.
    Progress& progress();

private:
    std::string name_;
    CLI::App app_;
    bool quiet_ = false;
    bool verbose_ = false;
    const std::string* output_ = nullptr;  // the -o value, when the tool has one
    std::unique_ptr<Progress> progress_;
};

}  // namespace lorakit::cli
