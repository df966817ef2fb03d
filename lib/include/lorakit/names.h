// Small text helpers: module and tensor names, sizes for people.
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

// "1.2 GB", "850.0 MB", "12 B" (decimal units, as file managers and `ls -h --si` show them).
std::string format_bytes(double bytes);

}  // namespace lorakit
