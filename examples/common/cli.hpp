#pragma once
// Command-line helpers of the examples: a bad option is a patchwork::ConfigError
// whose message names the flag and the value, and ends in "(try --help)".
#include <charconv>
#include <cmath>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <string_view>

#include <patchwork/core/error.hpp>

namespace example_cli {

[[noreturn]] inline void bad(const std::string& what) {
    throw patchwork::ConfigError(what + " (try --help)");
}

/// A non-negative integer of at least `min`.
inline std::uint64_t parse_uint(std::string_view flag, const std::string& s, std::uint64_t min) {
    std::uint64_t v = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc{} || end != s.data() + s.size())
        bad(std::string(flag) + " needs a non-negative integer, got '" + s + "'");
    if (v < min) bad(std::string(flag) + " must be at least " + std::to_string(min) + ", got " + s);
    return v;
}

/// A positive finite number.
inline double parse_positive(std::string_view flag, const std::string& s) {
    double v = 0;
    try {
        std::size_t used = 0;
        v = std::stod(s, &used);
        if (used != s.size()) throw std::invalid_argument(s);
    } catch (const std::exception&) {
        bad(std::string(flag) + " needs a number, got '" + s + "'");
    }
    if (!(v > 0) || !std::isfinite(v)) bad(std::string(flag) + " must be positive and finite, got " + s);
    return v;
}

}  // namespace example_cli
