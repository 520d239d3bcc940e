#pragma once
// NumPy .npy files: one array per file, as numpy.save writes and numpy.load
// reads them.
//
//   bytes 0-5   the magic "\x93NUMPY"
//   bytes 6-7   format version major, minor: 1.0, 2.0 or 3.0
//   then        the header length: 2 bytes (1.0) or 4 bytes (2.0, 3.0), little-endian
//   then        the header: a Python dict literal with exactly the keys
//                 'descr'         the dtype, e.g. '<f4' (byte order, kind, size)
//                 'fortran_order' True or False
//                 'shape'         a tuple of non-negative integers, () for a scalar
//               padded with spaces and ended by '\n' so the data starts at a
//               multiple of 64 bytes (ASCII; UTF-8 in version 3.0)
//   then        the data: numel elements, C order (or Fortran order), no padding
//
// load_npy<T>(path) reads float, integer and bool arrays (descr kinds f2/f4/f8,
// i1-i8, u1-u8, b1; either byte order) into a Tensor<T> (float or double),
// converting element by element; a Fortran-order array is transposed into
// patchwork's row-major order. Everything is validated before any value is
// used, and a problem is an IoError "npy: <file>: <what is wrong>": a short
// file, a bad magic string or version, a header length beyond the file, a
// header that is not such a dict (missing, repeated or unknown keys, a
// structured or object dtype, an unsupported dtype, a negative or non-integer
// dimension, more than Shape::max_rank dimensions), and a data section that
// does not hold exactly numel * element size bytes (truncated, or trailing
// bytes). save_npy writes version 1.0 (2.0 when the header needs it), '<f4'
// for float and '<f8' for double, through a temporary file renamed over the
// target when complete (io/atomic_file.hpp).
//
//   pw::save_npy("w.npy", layer.weight.value);     // np.load("w.npy") in Python
//   pw::Tensor<float> w = pw::load_npy<float>("w.npy");
//   auto view = pw::xt(w);                          // an xtensor view (core/xtensor.hpp)
#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/shape.hpp"
#include "patchwork/core/tensor.hpp"
#include "patchwork/io/atomic_file.hpp"

namespace patchwork {

/// What an .npy header says.
struct NpyHeader {
    char byte_order = '<';          ///< '<' little, '>' big, '|' not applicable (one byte)
    char kind = 'f';                ///< 'f' float, 'i' signed, 'u' unsigned, 'b' bool
    std::size_t item_size = 4;      ///< bytes per element
    bool fortran_order = false;
    std::vector<std::size_t> shape;  ///< empty for a scalar
    std::size_t data_offset = 0;    ///< where the data starts in the file
    [[nodiscard]] std::size_t numel() const {
        std::size_t n = 1;
        for (auto d : shape) n *= d;
        return n;
    }
};

namespace detail {

[[noreturn]] inline void npy_fail(std::string_view source, const std::string& what) {
    throw IoError(concat("npy: ", source, ": ", what));
}

/// A parser for the restricted Python literal of an .npy header.
class NpyHeaderParser {
public:
    NpyHeaderParser(std::string_view text, std::string_view source) : s_(text), source_(source) {}

    NpyHeader parse() {
        NpyHeader h;
        bool have_descr = false, have_order = false, have_shape = false;
        expect('{');
        while (true) {
            skip_space();
            if (peek() == '}') {
                ++i_;
                break;
            }
            const std::string key = string_literal();
            expect(':');
            skip_space();
            if (key == "descr") {
                if (have_descr) fail("the key 'descr' appears twice");
                if (peek() != '\'' && peek() != '"')
                    fail("'descr' is not a simple dtype string (structured dtypes are not supported)");
                parse_descr(string_literal(), h);
                have_descr = true;
            } else if (key == "fortran_order") {
                if (have_order) fail("the key 'fortran_order' appears twice");
                h.fortran_order = boolean();
                have_order = true;
            } else if (key == "shape") {
                if (have_shape) fail("the key 'shape' appears twice");
                h.shape = tuple();
                have_shape = true;
            } else {
                fail(concat("unknown key '", key, "' in the header"));
            }
            skip_space();
            if (peek() == ',') {
                ++i_;
                continue;
            }
            skip_space();
            if (peek() != '}') fail(concat("expected ',' or '}' at byte ", i_, " of the header"));
        }
        skip_space();
        if (i_ != s_.size()) fail("unexpected text after the header dict");
        if (!have_descr) fail("the header has no 'descr'");
        if (!have_order) fail("the header has no 'fortran_order'");
        if (!have_shape) fail("the header has no 'shape'");
        return h;
    }

private:
    [[noreturn]] void fail(const std::string& what) const { npy_fail(source_, concat("bad header: ", what)); }
    [[nodiscard]] char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
    void skip_space() {
        while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
    }
    void expect(char c) {
        skip_space();
        if (peek() != c) fail(concat("expected '", c, "' at byte ", i_, " of the header"));
        ++i_;
    }
    std::string string_literal() {
        skip_space();
        const char q = peek();
        if (q != '\'' && q != '"') fail(concat("expected a quoted string at byte ", i_, " of the header"));
        const std::size_t start = ++i_;
        while (i_ < s_.size() && s_[i_] != q) {
            if (s_[i_] == '\\') fail("escapes in header strings are not supported");
            ++i_;
        }
        if (i_ >= s_.size()) fail("unterminated string in the header");
        return std::string(s_.substr(start, i_++ - start));
    }
    bool boolean() {
        if (s_.substr(i_, 4) == "True") {
            i_ += 4;
            return true;
        }
        if (s_.substr(i_, 5) == "False") {
            i_ += 5;
            return false;
        }
        fail("'fortran_order' must be True or False");
    }
    std::vector<std::size_t> tuple() {
        std::vector<std::size_t> dims;
        expect('(');
        while (true) {
            skip_space();
            if (peek() == ')') {
                ++i_;
                return dims;
            }
            if (peek() < '0' || peek() > '9')
                fail(concat("'shape' must be a tuple of non-negative integers (at byte ", i_, ")"));
            std::size_t v = 0;
            while (peek() >= '0' && peek() <= '9') {
                const std::size_t digit = std::size_t(peek() - '0');
                if (v > (std::numeric_limits<std::size_t>::max() - digit) / 10) fail("a dimension overflows");
                v = v * 10 + digit;
                ++i_;
            }
            if (peek() == 'L') ++i_;  // Python 2 long suffix
            dims.push_back(v);
            skip_space();
            if (peek() == ',') {
                ++i_;
                continue;
            }
            skip_space();
            if (peek() != ')') fail(concat("expected ',' or ')' in 'shape' at byte ", i_));
        }
    }
    void parse_descr(const std::string& d, NpyHeader& h) const {
        if (d.size() < 3) fail(concat("unsupported dtype '", d, "'"));
        const char order = d[0], kind = d[1];
        std::size_t size = 0;
        for (std::size_t k = 2; k < d.size(); ++k) {
            if (d[k] < '0' || d[k] > '9') fail(concat("unsupported dtype '", d, "'"));
            size = size * 10 + std::size_t(d[k] - '0');
            if (size > 16) fail(concat("unsupported dtype '", d, "'"));
        }
        const bool order_ok = order == '<' || order == '>' || order == '|' || order == '=';
        const bool kind_ok = (kind == 'f' && (size == 2 || size == 4 || size == 8)) ||
                             ((kind == 'i' || kind == 'u') && (size == 1 || size == 2 || size == 4 || size == 8)) ||
                             (kind == 'b' && size == 1);
        if (!order_ok || !kind_ok)
            fail(concat("unsupported dtype '", d, "' (readable: float f2/f4/f8, integers i1-i8 and u1-u8, bool b1)"));
        h.byte_order = order == '=' ? (std::endian::native == std::endian::little ? '<' : '>') : order;
        h.kind = kind;
        h.item_size = size;
    }

    std::string_view s_;
    std::string_view source_;
    std::size_t i_ = 0;
};

/// IEEE half to float.
inline float npy_half_to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = std::uint32_t(h >> 15) << 31;
    const std::uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) {  // zero or subnormal: man * 2^-24
        const float v = std::ldexp(float(man), -24);
        return sign ? -v : v;
    }
    std::uint32_t bits;
    if (exp == 31) bits = sign | 0x7f800000u | (man << 13);  // inf, nan
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    return std::bit_cast<float>(bits);
}

/// One element at `p` (item_size bytes, byte order as given) as T.
template <class T>
T npy_element(const unsigned char* p, const NpyHeader& h) noexcept {
    unsigned char b[8];
    const bool swap = h.item_size > 1 && ((h.byte_order == '>') != (std::endian::native == std::endian::big));
    for (std::size_t k = 0; k < h.item_size; ++k) b[k] = swap ? p[h.item_size - 1 - k] : p[k];
    const auto as = [&]<class U>(U) {
        U v;
        std::memcpy(&v, b, sizeof(U));
        return T(v);
    };
    switch (h.kind) {
        case 'f':
            if (h.item_size == 2) {
                std::uint16_t v;
                std::memcpy(&v, b, 2);
                return T(npy_half_to_float(v));
            }
            return h.item_size == 4 ? as(float{}) : as(double{});
        case 'i':
            switch (h.item_size) {
                case 1: return as(std::int8_t{});
                case 2: return as(std::int16_t{});
                case 4: return as(std::int32_t{});
                default: return as(std::int64_t{});
            }
        case 'u':
            switch (h.item_size) {
                case 1: return as(std::uint8_t{});
                case 2: return as(std::uint16_t{});
                case 4: return as(std::uint32_t{});
                default: return as(std::uint64_t{});
            }
        default: return T(b[0] != 0);  // 'b'
    }
}

inline Shape npy_shape(const std::vector<std::size_t>& d) {
    switch (d.size()) {
        case 0: return Shape{};
        case 1: return Shape{d[0]};
        case 2: return Shape{d[0], d[1]};
        case 3: return Shape{d[0], d[1], d[2]};
        default: return Shape{d[0], d[1], d[2], d[3]};
    }
}

}  // namespace detail

/// Parses and validates the header of an .npy file held in `bytes`.
inline NpyHeader parse_npy_header(std::span<const unsigned char> bytes, std::string_view source) {
    static constexpr unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
    if (bytes.size() < 10) detail::npy_fail(source, detail::concat("file too short (", bytes.size(), " bytes)"));
    if (!std::equal(magic, magic + 6, bytes.begin()))
        detail::npy_fail(source, "not an .npy file (the magic string \\x93NUMPY is missing)");
    const unsigned major = bytes[6], minor = bytes[7];
    if (!((major == 1 || major == 2 || major == 3) && minor == 0))
        detail::npy_fail(source, detail::concat("unsupported format version ", major, ".", minor,
                                                " (readable: 1.0, 2.0, 3.0)"));
    std::size_t len = 0, start = 0;
    if (major == 1) {
        len = std::size_t(bytes[8]) | (std::size_t(bytes[9]) << 8);
        start = 10;
    } else {
        if (bytes.size() < 12) detail::npy_fail(source, "file too short for a version 2 or 3 header length");
        for (int k = 3; k >= 0; --k) len = (len << 8) | bytes[8 + std::size_t(k)];
        start = 12;
    }
    if (len > bytes.size() - start)
        detail::npy_fail(source, detail::concat("header length ", len, " runs past the end of the file (",
                                                bytes.size(), " bytes)"));
    const std::string_view text(reinterpret_cast<const char*>(bytes.data() + start), len);
    if (major < 3)
        for (char c : text)
            if (static_cast<unsigned char>(c) > 127) detail::npy_fail(source, "the header is not ASCII");
    NpyHeader h = detail::NpyHeaderParser(text, source).parse();
    if (h.shape.size() > Shape::max_rank)
        detail::npy_fail(source, detail::concat("the array has ", h.shape.size(), " dimensions; at most ",
                                                Shape::max_rank, " are supported"));
    h.data_offset = start + len;
    std::size_t n = 1;
    for (auto d : h.shape) {
        if (d != 0 && n > std::numeric_limits<std::size_t>::max() / d / h.item_size)
            detail::npy_fail(source, "the array size overflows");
        n *= d;
    }
    const std::size_t have = bytes.size() - h.data_offset, want = n * h.item_size;
    if (have < want)
        detail::npy_fail(source, detail::concat("truncated: the data section holds ", have, " bytes, the header ",
                                                "promises ", want, " (", n, " elements of ", h.item_size, " bytes)"));
    if (have > want)
        detail::npy_fail(source, detail::concat(have - want, " trailing bytes after the ", want,
                                                " bytes of data the header describes"));
    return h;
}

/// Parses an .npy file held in memory into a Tensor<T> (T float or double).
template <class T>
[[nodiscard]] Tensor<T> parse_npy(std::span<const unsigned char> bytes, std::string_view source) {
    static_assert(std::is_floating_point_v<T>, "patchwork::load_npy<T>: T must be float or double");
    const NpyHeader h = parse_npy_header(bytes, source);
    const Shape shape = detail::npy_shape(h.shape);
    Tensor<T> t(shape);
    const unsigned char* data = bytes.data() + h.data_offset;
    const std::size_t n = shape.numel(), r = h.shape.size();
    if (!h.fortran_order || r < 2) {
        for (std::size_t i = 0; i < n; ++i) t[i] = detail::npy_element<T>(data + i * h.item_size, h);
        return t;
    }
    // Fortran order: element (i0, ..., i_{r-1}) is at sum_k i_k prod_{j<k} d_j.
    std::vector<std::size_t> idx(r, 0), stride(r, 1);
    for (std::size_t k = 1; k < r; ++k) stride[k] = stride[k - 1] * h.shape[k - 1];
    for (std::size_t i = 0; i < n; ++i) {
        std::size_t off = 0;
        for (std::size_t k = 0; k < r; ++k) off += idx[k] * stride[k];
        t[i] = detail::npy_element<T>(data + off * h.item_size, h);
        for (std::size_t k = r; k-- > 0;) {  // next index in C order
            if (++idx[k] < h.shape[k]) break;
            idx[k] = 0;
        }
    }
    return t;
}

/// Reads and validates an .npy file. Throws IoError naming the path and the problem.
template <class T>
[[nodiscard]] Tensor<T> load_npy(const std::filesystem::path& path) {
    const std::string name = path.string();
    std::FILE* f = std::fopen(name.c_str(), "rb");
    if (!f) detail::npy_fail(name, detail::concat("cannot open: ", std::strerror(errno)));
    std::vector<unsigned char> bytes;
    unsigned char buf[1 << 16];
    std::size_t got = 0;
    while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) bytes.insert(bytes.end(), buf, buf + got);
    const bool failed = std::ferror(f) != 0;
    std::fclose(f);
    if (failed) detail::npy_fail(name, "read error");
    return parse_npy<T>(bytes, name);
}

/// Writes `t` as an .npy file ('<f4' for float, '<f8' for double, C order),
/// atomically: the target is replaced only by a complete file.
template <class T>
void save_npy(const std::filesystem::path& path, const Tensor<T>& t) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "patchwork::save_npy: the tensor must hold float or double");
    std::string header = detail::concat("{'descr': '<", std::is_same_v<T, float> ? "f4" : "f8",
                                        "', 'fortran_order': False, 'shape': (");
    for (std::size_t k = 0; k < t.rank(); ++k) header += detail::concat(t.dim(k), t.rank() == 1 ? "," : (k + 1 < t.rank() ? ", " : ""));
    header += "), }";
    const bool v2 = header.size() + 11 > 65535;
    const std::size_t prefix = v2 ? 12 : 10;
    const std::size_t total = (prefix + header.size() + 1 + 63) / 64 * 64;
    header.append(total - prefix - header.size() - 1, ' ');
    header += '\n';
    // One buffer, filled by offset: magic and version, header length, header, data.
    std::vector<unsigned char> out(total + t.size() * sizeof(T));
    const unsigned char magic[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<unsigned char>(v2 ? 2 : 1), 0};
    std::memcpy(out.data(), magic, 8);
    const std::size_t len = header.size();
    for (std::size_t k = 0; k < (v2 ? 4u : 2u); ++k) out[8 + k] = static_cast<unsigned char>((len >> (8 * k)) & 0xff);
    std::memcpy(out.data() + prefix, header.data(), len);
    unsigned char* data = out.data() + total;
    for (std::size_t i = 0; i < t.size(); ++i, data += sizeof(T)) {
        std::memcpy(data, &t[i], sizeof(T));
        if constexpr (std::endian::native == std::endian::big) std::reverse(data, data + sizeof(T));
    }
    detail::AtomicFile file(path, "npy");
    errno = 0;
    const bool written = std::fwrite(out.data(), 1, out.size(), file.file) == out.size();
    file.commit(written, errno);
}

}  // namespace patchwork
