#include "lorakit/error.h"

namespace lorakit {

int exit_code_for(ErrorCode code) noexcept {
    switch (code) {
    case ErrorCode::check_failed: return exit_codes::check_failed;
    case ErrorCode::usage: return exit_codes::usage;
    case ErrorCode::bad_input: return exit_codes::bad_input;
    case ErrorCode::unsupported: return exit_codes::bad_input;
    case ErrorCode::io: return exit_codes::io;
    case ErrorCode::internal: return exit_codes::internal;
    }
    return exit_codes::internal;
}

std::string_view error_code_name(ErrorCode code) noexcept {
    switch (code) {
    case ErrorCode::check_failed: return "check failed";
    case ErrorCode::usage: return "usage error";
    case ErrorCode::bad_input: return "bad input";
    case ErrorCode::unsupported: return "unsupported";
    case ErrorCode::io: return "I/O error";
    case ErrorCode::internal: return "internal error";
    }
    return "internal error";
}

Error::Error(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {
    rebuild();
}

Error& Error::add_context(std::string outer) {
    if (context_.empty() || context_.front() != outer) context_.insert(context_.begin(), std::move(outer));
    rebuild();
    return *this;
}

void Error::rebuild() {
    full_.clear();
    for (const auto& layer : context_) {
        full_ += layer;
        full_ += ": ";
    }
    full_ += message_;
}

std::string quote(std::string_view text) {
    std::string out;
    out.reserve(text.size() + 2);
    out += '\'';
    for (char c : text) {
        // Keep messages on one line, and keep a hostile name from sending terminal escape
        // sequences: whitespace controls become a space, every other control byte \xNN.
        const auto byte = static_cast<unsigned char>(c);
        if (c == '\n' || c == '\r' || c == '\t') out += ' ';
        else if (byte < 0x20 || byte == 0x7f) out += fmt::format("\\x{:02x}", byte);
        else out += c;
    }
    out += '\'';
    return out;
}

}  // namespace lorakit
