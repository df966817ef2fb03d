// The one error type of lorakit.
//
// Library code reports every failure by throwing lorakit::Error. An Error carries a stable
// category (ErrorCode) that the tools map to their exit code in exactly one place
// (exit_code_for), a message saying what is wrong, and a chain of context added on the
// way up ("'a.safetensors'", "module 'x.q_proj'"), so the final one-line message names
// the file and the part of it that failed.
#pragma once

#include <exception>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/core.h>

namespace lorakit {

enum class ErrorCode {
    check_failed,  // the input is readable but a requested check did not pass
    usage,         // bad arguments, refused overwrite, impossible option combination
    bad_input,     // malformed, inconsistent or unrecognised input data
    unsupported,   // well-formed input using a feature lorakit does not handle
    io,            // the operating system refused a read or a write
    internal,      // a bug in lorakit
};

// Process exit codes shared by every tool. Documented in README.md ("Exit codes").
namespace exit_codes {
inline constexpr int success = 0;
inline constexpr int check_failed = 1;
inline constexpr int usage = 2;
inline constexpr int bad_input = 3;
inline constexpr int io = 4;
inline constexpr int internal = 5;
}  // namespace exit_codes

// What a refused conversion would have lost, for a caller that may accept the loss instead
// (lora-convert --allow-lossy drops those parts and writes the rest). none for every other error.
enum class Loss {
    none,
    dora_magnitudes,  // DoRA magnitude vectors (the modules become plain LoRAs)
    lora_bias,        // LoRA bias vectors (PEFT lora_bias)
    other_tensors,    // tensors that are not LoRA factors (textual-inversion embeddings, norms)
};

int exit_code_for(ErrorCode code) noexcept;
std::string_view error_code_name(ErrorCode code) noexcept;

class Error : public std::exception {
public:
    Error(ErrorCode code, std::string message);

    ErrorCode code() const noexcept { return code_; }
    // The innermost description of the problem, without context.
    const std::string& message() const noexcept { return message_; }
    // Context, outermost first.
    const std::vector<std::string>& context() const noexcept { return context_; }

    // Adds an outer layer of context ("'file.safetensors'"). Returns *this for rethrow.
    Error& add_context(std::string outer);

    Loss loss() const noexcept { return loss_; }
    // The tensors concerned, where the refusal names them (Loss::other_tensors); empty: all.
    const std::vector<std::string>& lost_names() const noexcept { return lost_names_; }
    Error& set_loss(Loss loss, std::vector<std::string> names = {}) {
        loss_ = loss;
        lost_names_ = std::move(names);
        return *this;
    }

    // "outer: inner: message".
    const char* what() const noexcept override { return full_.c_str(); }

private:
    void rebuild();

    ErrorCode code_;
    Loss loss_ = Loss::none;
    std::vector<std::string> lost_names_;
    std::string message_;
    std::vector<std::string> context_;
    std::string full_;
};

template <typename... Args>
[[noreturn]] void fail(ErrorCode code, fmt::format_string<Args...> format, Args&&... args) {
    throw Error(code, fmt::format(format, std::forward<Args>(args)...));
}

// A refusal to write something the target cannot hold (ErrorCode::unsupported), tagged with
// what writing without it would lose (`names`: the tensors concerned; empty: all of that kind).
template <typename... Args>
[[noreturn]] void fail_lossy(Loss loss, std::vector<std::string> names, fmt::format_string<Args...> format,
                             Args&&... args) {
    throw Error(ErrorCode::unsupported, fmt::format(format, std::forward<Args>(args)...)).set_loss(loss, std::move(names));
}

// Runs body(); an Error escaping it gets `context` added. Use for file and module scopes:
//   with_context(fmt::format("'{}'", path), [&] { ... });
template <typename Body>
decltype(auto) with_context(std::string_view context, Body&& body) {
    try {
        return std::forward<Body>(body)();
    } catch (Error& error) {
        error.add_context(std::string(context));
        throw;
    }
}

// "'path'" — the quoting used for file names in every message.
std::string quote(std::string_view text);

}  // namespace lorakit
