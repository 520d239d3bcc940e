#pragma once
// Every failure patchwork reports is an exception derived from patchwork::Error.
// Messages name the module path and the offending shapes or values, so a user
// can find the faulty layer without a debugger.
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace patchwork {

class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// A tensor had the wrong shape for the module it was given to.
class ShapeError : public Error {
public:
    using Error::Error;
};

/// A file could not be read or written, or its contents are corrupt.
class IoError : public Error {
public:
    using Error::Error;
};

/// A configuration value (a learning rate, a rank, a split size) is invalid.
class ConfigError : public Error {
public:
    using Error::Error;
};

namespace detail {

template <class... Args>
std::string concat(Args&&... args) {
    std::ostringstream os;
    (os << ... << std::forward<Args>(args));
    return os.str();
}

/// Module paths are empty for a root module; show something readable instead.
inline std::string display_path(const std::string& path) {
    return path.empty() ? std::string("<root>") : path;
}

}  // namespace detail
}  // namespace patchwork
