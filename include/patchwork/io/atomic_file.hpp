#pragma once
// AtomicFile: how every file patchwork writes reaches the disk. The bytes go
// to a temporary file created beside the target (so the rename stays within
// one file system); commit() flushes, syncs and closes it, then renames it
// over the target. Until then the target is untouched, and a failure at any
// point (or an exception that skips commit) removes the temporary file, so a
// file is never lost or half-written. Errors are IoError
// "<format>: <target>: <what is wrong>".
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <string_view>
#include <system_error>

#if __has_include(<unistd.h>)
#include <unistd.h>
#define PATCHWORK_ATOMIC_FILE_HAVE_FSYNC 1
#endif

#include "patchwork/core/error.hpp"

namespace patchwork::detail {

class AtomicFile {
public:
    std::FILE* file = nullptr;  ///< the temporary file, open for binary writing

    /// `format` names the file kind in errors ("safetensors", "npy").
    AtomicFile(const std::filesystem::path& target, std::string_view format)
        : target_(target), name_(target.string()), format_(format) {
        const std::filesystem::path dir =
            target.parent_path().empty() ? std::filesystem::path(".") : target.parent_path();
        std::random_device rd;
        int err = 0;
        for (int attempt = 0; attempt < 16 && !file; ++attempt) {
            path_ = dir / concat(".", target.filename().string(), ".tmp.", std::hex, rd(), rd());
            errno = 0;
            file = std::fopen(path_.string().c_str(), "wbx");  // x: never reuse an existing file
            err = errno;
            if (!file && err != EEXIST) break;
        }
        if (!file)
            fail(concat("cannot create a temporary file in ", dir.string(), " (not writable?): ", std::strerror(err)));
    }
    AtomicFile(const AtomicFile&) = delete;
    AtomicFile& operator=(const AtomicFile&) = delete;
    ~AtomicFile() {
        if (file) std::fclose(file);
        if (!committed_) {
            std::error_code ignore;
            std::filesystem::remove(path_, ignore);
        }
    }

    /// Flush, sync and close the file, then rename it over the target; throws
    /// IoError (and the destructor removes the file) when anything failed.
    /// `written`: whether every write succeeded (`write_errno` says why not).
    void commit(bool written, int write_errno) {
        if (!written) fail(concat("write error: ", std::strerror(write_errno)));
        errno = 0;
        bool ok = std::fflush(file) == 0;
#ifdef PATCHWORK_ATOMIC_FILE_HAVE_FSYNC
        ok = ok && ::fsync(::fileno(file)) == 0;
#endif
        const int err = errno;
        const bool closed = std::fclose(file) == 0;
        file = nullptr;
        if (!ok || !closed) fail(concat("write error: ", std::strerror(err ? err : errno)));
        std::error_code ec;
        std::filesystem::rename(path_, target_, ec);
        if (ec) fail(concat("cannot replace the file with the finished temporary file: ", ec.message()));
        committed_ = true;
    }

private:
    [[noreturn]] void fail(const std::string& what) const { throw IoError(concat(format_, ": ", name_, ": ", what)); }

    std::filesystem::path target_;
    std::string name_;
    std::string format_;
    std::filesystem::path path_;
    bool committed_ = false;
};

}  // namespace patchwork::detail
