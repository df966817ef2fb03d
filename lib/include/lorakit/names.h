// Small helpers for module and tensor names.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace lorakit {

// Orders names as a person would: digit runs compare by value, so "layers.2" < "layers.10".
// A strict weak ordering; names differing only in leading zeros fall back to plain order.
bool natural_less(std::string_view a, std::string_view b) noexcept;

std::vector<std::string_view> split(std::string_view text, char separator);
std::string join(const std::vector<std::string_view>& parts, std::string_view separator);
bool starts_with(std::string_view text, std::string_view prefix) noexcept;
bool ends_with(std::string_view text, std::string_view suffix) noexcept;
// True when every character is a decimal digit (and there is at least one).
bool is_number(std::string_view text) noexcept;

}  // namespace lorakit
