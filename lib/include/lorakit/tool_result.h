// What a command-line operation produces, so that tools stay thin and their behaviour can be
// tested in-process: the text for stdout, diagnostics for stderr, and the exit code.
#pragma once

#include <string>
#include <vector>

#include "lorakit/error.h"

namespace lorakit {

struct Diagnostic {
    enum class Severity { error, warning, note };
    Severity severity = Severity::error;
    std::string message;
};

struct ToolResult {
    std::string out;  // exactly what goes to stdout
    std::vector<Diagnostic> diagnostics;
    int exit_code = exit_codes::success;

    void error(std::string message, int code) {
        diagnostics.push_back({Diagnostic::Severity::error, std::move(message)});
        // The first failure decides the exit code; later ones are reported but do not mask it.
        if (exit_code == exit_codes::success) exit_code = code;
    }
    void warning(std::string message) { diagnostics.push_back({Diagnostic::Severity::warning, std::move(message)}); }
    void note(std::string message) { diagnostics.push_back({Diagnostic::Severity::note, std::move(message)}); }
};

// The common shape of every command: runs body(result), and a lorakit::Error thrown on the way
// becomes the result's error (stdout cleared, the exit code of the error's kind).
template <typename Body>
ToolResult guarded(Body&& body) {
    ToolResult result;
    try {
        body(result);
    } catch (const Error& e) {
        result.out.clear();
        result.error(e.what(), exit_code_for(e.code()));
    }
    return result;
}

}  // namespace lorakit
