#pragma once
// IDX reader: the format of MNIST and Fashion-MNIST.
//
//   bytes 0-1   0x00 0x00
//   byte  2     element type (0x08 unsigned byte; 0x09 signed byte, 0x0B
//               int16, 0x0C int32, 0x0D float32, 0x0E float64 exist but are
//               not supported here)
//   byte  3     number of dimensions d
//   then        d dimensions, each a big-endian uint32
//   then        the elements, row-major, exactly the product of the dimensions
//
// Files are read through zlib (gzopen/gzread), so a gzip-compressed file and a
// plain one are read the same way. Every problem -- a missing or unreadable
// file, a bad magic, an unsupported element type, implausible dimensions,
// truncated data, trailing bytes, a corrupt gzip stream -- throws IoError whose
// message starts with the path and says what is wrong.
//
// One limit comes from zlib: bytes after the end of a gzip stream that do not
// form another gzip member are skipped by gzread without notice, so they are
// not reported. Trailing bytes inside the compressed data (or in a plain file)
// are.
#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include <zlib.h>

#include "patchwork/core/error.hpp"

namespace patchwork {

/// The contents of an IDX file: its dimensions and its bytes, row-major.
struct IdxArray {
    std::vector<std::size_t> dims;
    std::vector<std::uint8_t> data;

    /// Number of items: the first dimension (0 for an empty array).
    [[nodiscard]] std::size_t count() const noexcept { return dims.empty() ? 0 : dims.front(); }
    /// Elements per item: the product of every dimension but the first.
    [[nodiscard]] std::size_t item_size() const noexcept {
        std::size_t n = 1;
        for (std::size_t i = 1; i < dims.size(); ++i) n *= dims[i];
        return n;
    }
};

/// The largest payload read_idx accepts (4 GiB); larger dimensions are
/// reported as implausible rather than attempted.
inline constexpr std::uint64_t idx_max_bytes = std::uint64_t(1) << 32;
/// The most dimensions read_idx accepts.
inline constexpr std::size_t idx_max_rank = 8;

namespace detail {

/// Human name of an IDX element-type byte.
inline const char* idx_dtype_name(unsigned code) noexcept {
    switch (code) {
        case 0x08: return "unsigned byte";
        case 0x09: return "signed byte";
        case 0x0B: return "int16";
        case 0x0C: return "int32";
        case 0x0D: return "float32";
        case 0x0E: return "float64";
        default: return "unknown";
    }
}

inline std::string hex_byte(unsigned b) {
    static constexpr char digits[] = "0123456789abcdef";
    return std::string{'0', 'x', digits[(b >> 4) & 0xF], digits[b & 0xF]};
}

inline std::string dims_str(const std::vector<std::size_t>& dims) {
    std::string s = "[";
    for (std::size_t i = 0; i < dims.size(); ++i) {
        if (i) s += ", ";
        s += std::to_string(dims[i]);
    }
    return s + "]";
}

/// An open gzFile that closes itself, and reports problems against its path.
class GzReader {
public:
    explicit GzReader(const std::filesystem::path& path) : path_(path.string()) {
        std::error_code ec;
        const auto status = std::filesystem::status(path, ec);
        if (!std::filesystem::exists(status)) fail("no such file (missing)");
        if (std::filesystem::is_directory(status)) fail("is a directory, not a file (unreadable)");
        errno = 0;
        file_ = gzopen(path_.c_str(), "rb");
        if (!file_)
            fail(concat("cannot open (unreadable): ", errno ? std::strerror(errno) : "zlib could not allocate state"));
        gzbuffer(file_, 1u << 17);
    }
    GzReader(const GzReader&) = delete;
    GzReader& operator=(const GzReader&) = delete;
    ~GzReader() {
        if (file_) gzclose_r(file_);
    }

    /// Read up to n bytes; returns how many were read (fewer only at the end of
    /// the data). Throws on a read or gzip stream error.
    std::size_t read(void* dst, std::size_t n) {
        auto* out = static_cast<unsigned char*>(dst);
        std::size_t got = 0;
        while (got < n) {
            const auto chunk = unsigned(std::min<std::size_t>(n - got, std::size_t(1) << 30));
            errno = 0;
            const int r = gzread(file_, out + got, chunk);
            if (r < 0) fail(concat("read error (corrupt or unreadable): ", error_text()));
            if (r == 0) break;
            got += std::size_t(r);
        }
        return got;
    }

    /// The stream error after a short read ("unexpected end of file" for a
    /// truncated gzip stream), or an empty string when the data simply ended.
    std::string stream_error() {
        int errnum = Z_OK;
        const char* msg = gzerror(file_, &errnum);
        if (errnum == Z_OK) return {};
        if (errnum == Z_ERRNO) return std::strerror(errno);
        return strip_path(msg);
    }

    [[noreturn]] void fail(const std::string& what) const { throw IoError(concat("read_idx: ", path_, ": ", what)); }

private:
    std::string error_text() {
        int errnum = Z_OK;
        const char* msg = gzerror(file_, &errnum);
        if (errnum == Z_ERRNO) return concat("I/O error: ", std::strerror(errno));
        return concat("gzip: ", strip_path(msg));
    }

    /// zlib prefixes its messages with "<path>: "; ours already name the path.
    std::string strip_path(const char* msg) const {
        if (!msg || !*msg) return "unknown zlib error";
        std::string m = msg;
        if (m.size() > path_.size() + 2 && m.compare(0, path_.size(), path_) == 0 &&
            m.compare(path_.size(), 2, ": ") == 0)
            m.erase(0, path_.size() + 2);
        return m;
    }

    std::string path_;
    gzFile file_ = nullptr;
};

}  // namespace detail

/// Read an IDX file of unsigned bytes, gzip-compressed or plain.
/// Throws IoError naming the path and the problem for anything malformed.
[[nodiscard]] inline IdxArray read_idx(const std::filesystem::path& path) {
    detail::GzReader in(path);

    unsigned char magic[4];
    const std::size_t got_magic = in.read(magic, 4);
    if (got_magic < 4) {
        const std::string err = in.stream_error();
        in.fail(detail::concat("truncated header: ", got_magic, " of 4 magic bytes",
                               err.empty() ? "" : " (gzip: " + err + ")"));
    }
    if (magic[0] != 0 || magic[1] != 0)
        in.fail(detail::concat("bad magic ", detail::hex_byte(magic[0]), " ", detail::hex_byte(magic[1]), " ",
                               detail::hex_byte(magic[2]), " ", detail::hex_byte(magic[3]),
                               " (an IDX file starts with 0x00 0x00 <dtype> <ndims>)"));
    if (magic[2] != 0x08)
        in.fail(detail::concat("unsupported dtype ", detail::hex_byte(magic[2]), " (",
                               detail::idx_dtype_name(magic[2]), "); only 0x08 (unsigned byte) is supported"));
    const std::size_t rank = magic[3];
    if (rank == 0 || rank > idx_max_rank)
        in.fail(detail::concat("implausible dims: ", rank, " dimensions (expected 1 to ", idx_max_rank, ")"));

    IdxArray out;
    out.dims.resize(rank);
    std::uint64_t total = 1;
    for (std::size_t i = 0; i < rank; ++i) {
        unsigned char b[4];
        if (in.read(b, 4) < 4) {
            const std::string err = in.stream_error();
            in.fail(detail::concat("truncated header: ends inside dimension ", i, " of ", rank,
                                   err.empty() ? "" : " (gzip: " + err + ")"));
        }
        const std::uint64_t d = (std::uint64_t(b[0]) << 24) | (std::uint64_t(b[1]) << 16) |
                                (std::uint64_t(b[2]) << 8) | std::uint64_t(b[3]);
        out.dims[i] = std::size_t(d);
        if (d == 0) in.fail(detail::concat("implausible dims: dimension ", i, " is zero"));
        // Both factors are at most 2^32, so the product cannot overflow before the check.
        total *= d;
        if (total > idx_max_bytes)
            in.fail(detail::concat("implausible dims: more than ", idx_max_bytes,
                                   " bytes of data (dimensions so far ",
                                   detail::dims_str({out.dims.begin(), out.dims.begin() + std::ptrdiff_t(i) + 1}),
                                   ")"));
    }

    // Grow the buffer as data arrives, so a lying header cannot make us
    // allocate gigabytes for a small file.
    const std::size_t expected = std::size_t(total);
    constexpr std::size_t step = std::size_t(1) << 24;
    std::size_t have = 0;
    while (have < expected) {
        const std::size_t want = std::min(step, expected - have);
        out.data.resize(have + want);
        const std::size_t n = in.read(out.data.data() + have, want);
        have += n;
        if (n < want) break;
    }
    if (have < expected) {
        const std::string err = in.stream_error();
        in.fail(detail::concat("truncated data: dims ", detail::dims_str(out.dims), " need ", expected,
                               " bytes, found ", have, err.empty() ? "" : " (gzip: " + err + ")"));
    }

    // Reading past the end also makes zlib check the gzip trailer (CRC, length).
    unsigned char extra[64];
    const std::size_t trailing = in.read(extra, sizeof extra);
    if (trailing > 0)
        in.fail(detail::concat("trailing bytes after the ", expected, " bytes of data that dims ",
                               detail::dims_str(out.dims), " describe (", trailing == sizeof extra ? "at least " : "",
                               trailing, " more)"));
    if (const std::string err = in.stream_error(); !err.empty())
        in.fail(detail::concat("truncated or corrupt gzip stream after the data: ", err));
    return out;
}

}  // namespace patchwork
