#pragma once
// Helpers of the tests that write and read files: a fresh directory under the
// system temp dir, removed with its contents when the object goes out of scope,
// and CHECK_IO_ERROR, which checks that an IoError names the file and the problem.
#include <chrono>
#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <system_error>

#include <doctest/doctest.h>

#include "patchwork/core/error.hpp"

namespace patchwork::testing {

/// A fresh directory under the system temp dir, removed with its contents.
struct TempDir {
    std::filesystem::path path;
    explicit TempDir(const std::string& prefix = "patchwork_test") {
        std::random_device rd;
        const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
        path = std::filesystem::temp_directory_path() /
               (prefix + "_" + std::to_string(stamp) + "_" + std::to_string(rd()));
        std::filesystem::create_directories(path);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
    std::filesystem::path operator/(const std::string& name) const { return path / name; }
    /// The names of the files in the directory.
    [[nodiscard]] std::set<std::string> listing() const {
        std::set<std::string> names;
        for (const auto& e : std::filesystem::directory_iterator(path)) names.insert(e.path().filename().string());
        return names;
    }
};

/// The message of the IoError `f` throws (other exceptions propagate).
template <class F>
std::string io_error(F&& f) {
    try {
        f();
    } catch (const IoError& e) {
        return e.what();
    }
    return "(no IoError thrown)";
}

}  // namespace patchwork::testing

// The message must name the file and say what is wrong.
#define CHECK_IO_ERROR(expr, path, word)                                            \
    do {                                                                            \
        const std::string msg_ = patchwork::testing::io_error([&] { (void)(expr); }); \
        INFO("message: ", msg_);                                                    \
        CHECK(msg_.find((path).string()) != std::string::npos);                     \
        CHECK(msg_.find(word) != std::string::npos);                                \
    } while (0)
