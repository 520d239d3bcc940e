#pragma once
// safetensors: named tensors in one file (the file format; saving and loading
// a model's parameters by their dotted names is io/parameter_files.hpp).
//
//   bytes 0-7   N, the header length, unsigned 64-bit little-endian
//   bytes 8..   N bytes of JSON, one object:
//                 {"<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
//                  ...,
//                  "__metadata__": {"<key>": "<value>", ...}}      (optional)
//               padded with spaces so the data starts at a multiple of 8
//   then        the data section: each tensor's elements, row-major,
//               little-endian, at [begin, end) relative to its first byte
//
// Reading validates everything before any value is used and throws IoError
// "safetensors: <file>: <what is wrong>": a file shorter than 8 bytes, a
// header length beyond the file or above 100 MB, a header that is not a JSON
// object, duplicate keys, an unknown dtype, a shape that is not a list of
// non-negative integers, data_offsets that are not two integers begin <= end,
// an end beyond the data section, a byte range that does not hold exactly
// numel * element size bytes, and tensors that overlap, leave gaps or leave
// trailing bytes (the data section must be covered exactly, as the reference
// implementation requires). Every dtype of the format is recognised so a
// file with other tensors parses; values are read into Tensor<float>,
// Tensor<double> or Tensor<bf16> from F32, F64 or BF16, converting when the
// types differ (BF16 to float or double is exact; F32 or F64 to bf16 rounds to
// nearest even, from F64 through float).
//
// Writing stores each tensor in the type it holds (float: F32, double: F64,
// bf16: BF16),
// wider elements first and by name within a width (so every tensor starts at
// a multiple of its element size), into a temporary file in the target's
// directory that is renamed over the target only once it is complete.
// docs/safetensors.md describes the format, the rules and base/patch files.
#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>


#include <nlohmann/json.hpp>

#include "patchwork/core/error.hpp"
#include "patchwork/core/shape.hpp"
#include "patchwork/core/tensor.hpp"
#include "patchwork/io/atomic_file.hpp"

namespace patchwork {

/// The largest header read_safetensors accepts, as the reference implementation does.
inline constexpr std::uint64_t safetensors_max_header = 100'000'000;

/// The metadata key that tags files written by the model-level functions; its
/// value is the format version.
inline constexpr const char* safetensors_format_key = "patchwork";
inline constexpr const char* safetensors_format_version = "1";

/// Metadata: the `__metadata__` object, string to string.
using SafetensorsMetadata = std::map<std::string, std::string>;

/// One tensor as a file describes it. `shape` may have any rank; converting to
/// a patchwork Tensor needs rank <= Shape::max_rank.
struct SafetensorsEntry {
    std::string name;
    std::string dtype;                 ///< "F32", "F64", or another dtype of the format
    std::vector<std::uint64_t> shape;  ///< empty for a 0-d tensor (one element)
    std::uint64_t begin = 0;           ///< offsets relative to the start of the data section
    std::uint64_t end = 0;

    [[nodiscard]] std::uint64_t byte_size() const noexcept { return end - begin; }
    /// Product of the dimensions (1 for a 0-d tensor); validated not to overflow.
    [[nodiscard]] std::uint64_t numel() const noexcept {
        std::uint64_t n = 1;
        for (std::uint64_t d : shape) n *= d;
        return n;
    }
};

namespace detail {

/// Element size of every dtype the format defines; 0 for an unknown name.
inline std::size_t safetensors_dtype_size(std::string_view dtype) noexcept {
    struct Known {
        std::string_view name;
        std::size_t size;
    };
    static constexpr Known known[] = {
        {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
        {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},     {"I64", 8},     {"U64", 8}, {"F64", 8},
    };
    for (const Known& k : known)
        if (k.name == dtype) return k.size;
    return 0;
}

template <class T>
constexpr const char* safetensors_dtype_of() noexcept {
    if constexpr (std::is_same_v<T, float>) return "F32";
    else if constexpr (std::is_same_v<T, double>) return "F64";
    else return "BF16";
}

/// Copy `n` BF16 values stored little-endian at `src` into `dst` as To: the
/// 16 bits are the upper half of the float32 with the same value, so the
/// conversion to float (and double) is exact, and to bf16 a copy.
template <class To>
void safetensors_read_bf16(const std::byte* src, To* dst, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) {
        const auto lo = std::uint16_t(std::to_integer<unsigned>(src[2 * i]));
        const auto hi = std::uint16_t(std::to_integer<unsigned>(src[2 * i + 1]));
        const auto bits = std::uint16_t(lo | hi << 8);
        if constexpr (std::is_same_v<To, bf16>) dst[i] = std::bit_cast<bf16>(bits);
        else dst[i] = To(std::bit_cast<float>(std::uint32_t(bits) << 16));
    }
}

inline std::string safetensors_shape_str(std::span<const std::uint64_t> dims) {
    std::string s = "[";
    for (std::size_t i = 0; i < dims.size(); ++i) {
        if (i) s += ", ";
        s += std::to_string(dims[i]);
    }
    return s + "]";
}

/// Copy `n` scalars of type From stored little-endian at `src` into `dst` as To.
template <class From, class To>
void safetensors_read_le(const std::byte* src, To* dst, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) {
        std::byte b[sizeof(From)];
        std::memcpy(b, src + i * sizeof(From), sizeof(From));
        if constexpr (std::endian::native == std::endian::big) std::reverse(b, b + sizeof(From));
        From v;
        std::memcpy(&v, b, sizeof(From));
        if constexpr (std::is_same_v<To, bf16>) dst[i] = bf16(float(v));  // round to nearest even
        else dst[i] = static_cast<To>(v);
    }
}

/// A JSON value as text for an error message, cut short when long.
inline std::string safetensors_brief_json(const nlohmann::json& v) {
    std::string s = v.dump();
    if (s.size() > 80) s = s.substr(0, 77) + "...";
    return s;
}

[[noreturn]] inline void safetensors_fail(std::string_view source, const std::string& what) {
    throw IoError(concat("safetensors: ", source, ": ", what));
}

/// Throws on the first repeated key of any object while the header is parsed
/// (a JSON parser keeps the last of two equal keys without telling), and on
/// nesting no safetensors header has. The parser copies its callback, so the
/// callback refers to this object.
class SafetensorsKeyCheck {
public:
    explicit SafetensorsKeyCheck(std::string_view source) : source_(source) {}

    auto callback() {
        return [this](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
            return on_event(depth, event, parsed);
        };
    }

private:
    bool on_event(int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
        using E = nlohmann::json::parse_event_t;
        if (depth > max_depth)
            safetensors_fail(source_, concat("header nests deeper than ", max_depth, " levels (not a safetensors header)"));
        if (event == E::object_start) {
            keys_.emplace_back();
        } else if (event == E::object_end) {
            if (!keys_.empty()) keys_.pop_back();
        } else if (event == E::key && !keys_.empty()) {
            const auto& key = parsed.get_ref<const std::string&>();
            if (!keys_.back().insert(key).second)
                safetensors_fail(source_, concat("duplicate key \"", key, "\" in the header",
                                                 depth <= 1 ? " (two tensors with one name)" : ""));
        }
        return true;
    }

    static constexpr int max_depth = 16;
    std::string source_;
    std::vector<std::set<std::string>> keys_;
};

}  // namespace detail

class SafetensorsFile;
[[nodiscard]] inline SafetensorsFile parse_safetensors_owned(std::vector<std::byte> bytes, std::string_view source);

/// A parsed and validated safetensors file, held in memory.
class SafetensorsFile {
public:
    SafetensorsFile() = default;

    /// The path (or the name given to parse_safetensors) errors mention.
    [[nodiscard]] const std::string& source() const noexcept { return source_; }
    [[nodiscard]] const SafetensorsMetadata& metadata() const noexcept { return metadata_; }
    /// Every tensor, sorted by name.
    [[nodiscard]] const std::vector<SafetensorsEntry>& entries() const noexcept { return entries_; }
    [[nodiscard]] std::size_t size() const noexcept { return entries_.size(); }

    /// The entry called `name`, or nullptr.
    [[nodiscard]] const SafetensorsEntry* find(std::string_view name) const noexcept {
        const auto it = std::lower_bound(entries_.begin(), entries_.end(), name,
                                         [](const SafetensorsEntry& e, std::string_view n) { return e.name < n; });
        return it != entries_.end() && it->name == name ? &*it : nullptr;
    }
    [[nodiscard]] bool contains(std::string_view name) const noexcept { return find(name) != nullptr; }

    /// The raw little-endian bytes of an entry of this file.
    [[nodiscard]] std::span<const std::byte> bytes(const SafetensorsEntry& e) const noexcept {
        return {bytes_.data() + data_start_ + e.begin, std::size_t(e.byte_size())};
    }

    /// The entry's shape as a patchwork Shape; IoError when its rank is above Shape::max_rank.
    [[nodiscard]] Shape shape(const SafetensorsEntry& e) const {
        if (e.shape.size() > Shape::max_rank)
            detail::safetensors_fail(source_, detail::concat("tensor '", e.name, "' has rank ", e.shape.size(), " ",
                                                             detail::safetensors_shape_str(e.shape),
                                                             "; patchwork tensors have at most ", Shape::max_rank,
                                                             " dimensions"));
        const auto d = [&](std::size_t i) { return std::size_t(e.shape[i]); };
        switch (e.shape.size()) {
            case 0: return Shape{};
            case 1: return Shape{d(0)};
            case 2: return Shape{d(0), d(1)};
            case 3: return Shape{d(0), d(1), d(2)};
            default: return Shape{d(0), d(1), d(2), d(3)};
        }
    }

    /// Read the values of an F32, F64 or BF16 entry into `dst` (entry.numel() elements), converting to T
    /// (float, double or bf16).
    template <class T>
    void read_into(const SafetensorsEntry& e, T* dst) const {
        static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bf16>,
                      "safetensors: values are read as float, double or bf16");
        const std::byte* src = bytes_.data() + data_start_ + e.begin;
        const auto n = std::size_t(e.numel());
        if (e.dtype == "F32") detail::safetensors_read_le<float>(src, dst, n);
        else if (e.dtype == "F64") detail::safetensors_read_le<double>(src, dst, n);
        else if (e.dtype == "BF16") detail::safetensors_read_bf16(src, dst, n);
        else
            detail::safetensors_fail(source_, detail::concat("tensor '", e.name, "' has dtype ", e.dtype,
                                                             "; patchwork reads F32, F64 and BF16 (unsupported dtype)"));
    }

    /// The tensor called `name` as a Tensor<T> (float, double or bf16), converted from F32, F64 or BF16.
    template <class T>
    [[nodiscard]] Tensor<T> tensor(std::string_view name) const {
        const SafetensorsEntry* e = find(name);
        if (!e) detail::safetensors_fail(source_, detail::concat("no tensor named '", name, "' (missing)"));
        Tensor<T> t(shape(*e));
        read_into(*e, t.data());
        return t;
    }

private:
    friend SafetensorsFile parse_safetensors_owned(std::vector<std::byte> bytes, std::string_view source);

    std::string source_;
    std::vector<std::byte> bytes_;  ///< the whole file
    std::size_t data_start_ = 0;    ///< 8 + header length
    SafetensorsMetadata metadata_;
    std::vector<SafetensorsEntry> entries_;
};

/// Parse a whole file held in `bytes` (taken over), validating everything.
/// `source` names it in error messages.
[[nodiscard]] inline SafetensorsFile parse_safetensors_owned(std::vector<std::byte> bytes, std::string_view source) {
    using detail::concat;
    const auto fail = [&](const std::string& what) { detail::safetensors_fail(source, what); };
    using json = nlohmann::json;

    const std::uint64_t file_size = bytes.size();
    if (file_size < 8)
        fail(concat("file too short: ", file_size,
                    " bytes, but a safetensors file starts with an 8-byte header length"));
    std::uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | std::uint64_t(std::to_integer<unsigned>(bytes[i]));
    if (header_len > safetensors_max_header)
        fail(concat("header length ", header_len, " is too large (absurd: the limit is ", safetensors_max_header,
                    " bytes)"));
    if (header_len > file_size - 8)
        fail(concat("header length ", header_len, " exceeds the file: only ", file_size - 8,
                    " bytes follow the length (truncated file?)"));

    const auto* header_begin = reinterpret_cast<const char*>(bytes.data() + 8);
    json header;
    detail::SafetensorsKeyCheck duplicates(source);
    try {
        header = json::parse(header_begin, header_begin + header_len, duplicates.callback());
    } catch (const json::exception& e) {
        fail(concat("header is not valid JSON: ", e.what()));
    }
    if (!header.is_object()) fail(concat("header is not a JSON object (it is a JSON ", header.type_name(), ")"));

    SafetensorsFile out;
    out.source_ = std::string(source);
    out.data_start_ = std::size_t(8 + header_len);
    const std::uint64_t data_size = file_size - 8 - header_len;

    for (const auto& item : header.items()) {
        const std::string& name = item.key();  // not a structured binding: lambdas below capture it
        const json& value = item.value();
        if (name == "__metadata__") {
            if (!value.is_object()) fail(concat("__metadata__ is not a JSON object of strings (it is a ", value.type_name(), ")"));
            for (const auto& [key, v] : value.items()) {
                if (!v.is_string())
                    fail(concat("__metadata__ value of \"", key, "\" is not a string (it is a ", v.type_name(), ")"));
                out.metadata_.emplace(key, v.get<std::string>());
            }
            continue;
        }
        const auto what = [&](const std::string& problem) { fail(concat("tensor '", name, "': ", problem)); };
        if (!value.is_object()) what(concat("entry is not a JSON object (it is a ", value.type_name(), ")"));
        for (const char* key : {"dtype", "shape", "data_offsets"})
            if (!value.contains(key)) what(concat("missing \"", key, "\""));

        SafetensorsEntry e;
        e.name = name;
        const json& dtype = value.at("dtype");
        if (!dtype.is_string()) what(concat("dtype is not a string (unknown dtype ", detail::safetensors_brief_json(dtype), ")"));
        e.dtype = dtype.get<std::string>();
        const std::size_t elem = detail::safetensors_dtype_size(e.dtype);
        if (elem == 0) what(concat("unknown dtype \"", e.dtype, "\""));

        const json& shape = value.at("shape");
        if (!shape.is_array()) what(concat("shape ", detail::safetensors_brief_json(shape), " is not a list of non-negative integers"));
        for (const json& d : shape) {
            if (!d.is_number_unsigned())
                what(concat("shape ", detail::safetensors_brief_json(shape), " is not a list of non-negative integers"));
            e.shape.push_back(d.get<std::uint64_t>());
        }

        const json& offsets = value.at("data_offsets");
        if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
            !offsets[1].is_number_unsigned())
            what(concat("data_offsets ", detail::safetensors_brief_json(offsets), " are not two non-negative integers [begin, end]"));
        e.begin = offsets[0].get<std::uint64_t>();
        e.end = offsets[1].get<std::uint64_t>();
        if (e.begin > e.end) what(concat("data_offsets [", e.begin, ", ", e.end, "]: begin is after end"));
        if (e.end > data_size)
            what(concat("data_offsets [", e.begin, ", ", e.end, "] reach beyond the data section (", data_size,
                        " bytes)"));

        // numel * element size must equal the byte range, without overflowing on the way.
        const bool has_zero = std::find(e.shape.begin(), e.shape.end(), 0) != e.shape.end();
        std::uint64_t need = elem;
        bool overflow = false;
        if (has_zero) need = 0;
        else
            for (std::uint64_t d : e.shape) {
                if (need > std::numeric_limits<std::uint64_t>::max() / d) {
                    overflow = true;
                    break;
                }
                need *= d;
            }
        if (overflow || need != e.byte_size())
            what(concat("byte size mismatch: shape ", detail::safetensors_shape_str(e.shape), " of ", e.dtype, " needs ",
                        overflow ? std::string("more than 2^64") : std::to_string(need), " bytes, data_offsets [",
                        e.begin, ", ", e.end, "] hold ", e.byte_size()));
        out.entries_.push_back(std::move(e));
    }

    // The data section must be covered exactly: sorted by position, each
    // tensor starts where the previous one ended, and the last ends at the end.
    std::vector<const SafetensorsEntry*> by_offset;
    by_offset.reserve(out.entries_.size());
    for (const auto& e : out.entries_) by_offset.push_back(&e);
    std::sort(by_offset.begin(), by_offset.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
        return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    std::uint64_t covered = 0;
    const SafetensorsEntry* previous = nullptr;
    for (const SafetensorsEntry* e : by_offset) {
        if (e->begin < covered)
            fail(concat("tensors '", previous->name, "' [", previous->begin, ", ", previous->end, ") and '", e->name,
                        "' [", e->begin, ", ", e->end, ") overlap"));
        if (e->begin > covered)
            fail(concat("gap of ", e->begin - covered, " unused bytes in the data section before tensor '", e->name,
                        "' (at ", covered, ")"));
        covered = e->end;
        previous = e;
    }
    if (covered != data_size)
        fail(concat("trailing bytes: the tensors cover ", covered, " of the ", data_size,
                    " bytes of the data section"));

    std::sort(out.entries_.begin(), out.entries_.end(),
              [](const SafetensorsEntry& a, const SafetensorsEntry& b) { return a.name < b.name; });
    out.bytes_ = std::move(bytes);
    return out;
}

/// Parse a safetensors file held in memory (what the fuzzer calls).
[[nodiscard]] inline SafetensorsFile parse_safetensors(std::span<const std::byte> bytes, std::string_view name) {
    return parse_safetensors_owned(std::vector<std::byte>(bytes.begin(), bytes.end()), name);
}

/// Read and validate a safetensors file. Throws IoError naming the path and the problem.
[[nodiscard]] inline SafetensorsFile read_safetensors(const std::filesystem::path& path) {
    const std::string name = path.string();
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (!std::filesystem::exists(status)) detail::safetensors_fail(name, "no such file (missing)");
    if (std::filesystem::is_directory(status))
        detail::safetensors_fail(name, "is a directory, not a file (unreadable)");
    errno = 0;
    std::FILE* f = std::fopen(name.c_str(), "rb");
    if (!f) detail::safetensors_fail(name, detail::concat("cannot open (unreadable): ", std::strerror(errno)));
    std::vector<std::byte> bytes;
    std::byte buf[1 << 16];
    for (;;) {
        const std::size_t n = std::fread(buf, 1, sizeof buf, f);
        bytes.insert(bytes.end(), buf, buf + n);
        if (n < sizeof buf) break;
    }
    const bool failed = std::ferror(f) != 0;
    const int err = errno;
    std::fclose(f);
    if (failed) detail::safetensors_fail(name, detail::concat("read error (unreadable): ", std::strerror(err)));
    return parse_safetensors_owned(std::move(bytes), name);
}

/// Collects named tensors and metadata, then writes them as one safetensors
/// file. It keeps references: every added tensor must stay alive and unchanged
/// until serialize() or save() returns.
class SafetensorsWriter {
public:
    template <class T>
    void add(std::string name, const Tensor<T>& t) {
        static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bf16>,
                      "safetensors: tensors are written as F32 (float), F64 (double) or BF16 (bf16)");
        Item item;
        item.name = std::move(name);
        item.dtype = detail::safetensors_dtype_of<T>();
        item.elem = sizeof(T);
        item.shape.assign(t.shape().begin(), t.shape().end());
        item.data = reinterpret_cast<const std::byte*>(t.data());
        item.numel = t.size();
        items_.push_back(std::move(item));
    }
    void add_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }
    [[nodiscard]] const SafetensorsMetadata& metadata() const noexcept { return metadata_; }
    [[nodiscard]] std::size_t size() const noexcept { return items_.size(); }

    /// The whole file as bytes. `name` labels errors (a duplicate or reserved tensor name, a name or
    /// metadata that is not valid UTF-8).
    [[nodiscard]] std::vector<std::byte> serialize(std::string_view name = "<memory>") const {
        std::vector<std::byte> out;
        write_to(name, [&](const void* p, std::size_t n) {
            const auto* b = static_cast<const std::byte*>(p);
            out.insert(out.end(), b, b + n);
        });
        return out;
    }

    /// Write the file atomically: into a temporary file beside `path`, renamed
    /// over `path` once complete. On any error the temporary file is removed,
    /// an existing file at `path` is left as it was, and IoError names the path.
    void save(const std::filesystem::path& path) const {
        const std::string name = path.string();
        const auto order = validated_order(name);  // before anything touches the disk
        const std::string header = header_json(order, name);

        detail::AtomicFile tmp(path, "safetensors");
        bool ok = true;
        int err = 0;
        write_items(order, header, [&](const void* p, std::size_t n) {
            if (ok && n > 0 && std::fwrite(p, 1, n, tmp.file) != n) {
                ok = false;
                err = errno;
            }
        });
        tmp.commit(ok, err);
    }

private:
    struct Item {
        std::string name;
        const char* dtype = "F32";
        std::size_t elem = 4;
        std::vector<std::uint64_t> shape;
        const std::byte* data = nullptr;
        std::size_t numel = 0;
    };

    /// Items in file order: wider elements first, then by name; rejects repeated and reserved names.
    std::vector<const Item*> validated_order(std::string_view label) const {
        std::vector<const Item*> order;
        for (const Item& it : items_) order.push_back(&it);
        std::sort(order.begin(), order.end(), [](const Item* a, const Item* b) {
            return a->elem != b->elem ? a->elem > b->elem : a->name < b->name;
        });
        std::set<std::string_view> seen;
        for (const Item* it : order) {
            if (it->name == "__metadata__")
                detail::safetensors_fail(label, "\"__metadata__\" is reserved and cannot name a tensor");
            if (!seen.insert(it->name).second)
                detail::safetensors_fail(label, detail::concat("duplicate tensor name '", it->name, "'"));
        }
        return order;
    }

    std::string header_json(const std::vector<const Item*>& order, std::string_view label) const {
        nlohmann::ordered_json h = nlohmann::ordered_json::object();
        if (!metadata_.empty()) h["__metadata__"] = metadata_;
        std::uint64_t offset = 0;
        for (const Item* it : order) {
            const std::uint64_t bytes = std::uint64_t(it->numel) * it->elem;
            h[it->name] = {{"dtype", it->dtype}, {"shape", it->shape}, {"data_offsets", {offset, offset + bytes}}};
            offset += bytes;
        }
        std::string s;
        try {
            s = h.dump();
        } catch (const nlohmann::json::exception& e) {
            detail::safetensors_fail(label, detail::concat("cannot write the header: ", e.what()));
        }
        s.append((8 - s.size() % 8) % 8, ' ');  // data starts at a multiple of 8, as the reference writes
        return s;
    }

    template <class Sink>
    static void write_items(const std::vector<const Item*>& order, const std::string& header, Sink&& sink) {
        std::byte len[8];
        std::uint64_t n = header.size();
        for (auto& b : len) {
            b = std::byte(n & 0xFF);
            n >>= 8;
        }
        sink(len, 8);
        sink(header.data(), header.size());
        for (const Item* it : order) {
            if constexpr (std::endian::native == std::endian::little) {
                sink(it->data, it->numel * it->elem);
            } else {
                std::vector<std::byte> swapped(it->data, it->data + it->numel * it->elem);
                for (std::size_t i = 0; i < it->numel; ++i)
                    std::reverse(swapped.begin() + std::ptrdiff_t(i * it->elem),
                                 swapped.begin() + std::ptrdiff_t((i + 1) * it->elem));
                sink(swapped.data(), swapped.size());
            }
        }
    }

    template <class Sink>
    void write_to(std::string_view label, Sink&& sink) const {
        const auto order = validated_order(label);
        write_items(order, header_json(order, label), sink);
    }

    std::vector<Item> items_;
    SafetensorsMetadata metadata_;
};

}  // namespace patchwork
