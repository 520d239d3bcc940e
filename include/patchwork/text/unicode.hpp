#pragma once
// Unicode pieces of the text pipeline: strict UTF-8 decoding and encoding, and
// the character classes BERT's basic tokenizer uses, answered from utf8proc's
// tables (general category, bidirectional class, canonical combining class,
// simple lower-case mapping, canonical decomposition).
//
// The classes follow the reference tokenizer's definitions, which are not the
// textbook ones:
//   whitespace   space, \t, \n, \r and category Zs (BERT's _is_whitespace)
//   control      category C* (Cc, Cf, Cs, Co, Cn) except \t, \n, \r
//   punctuation  ASCII 33-47, 58-64, 91-96, 123-126 (so $, +, <, =, >, ^, `, |, ~
//                count although they are symbols) and category P*
//   separator    what Python's str.split() splits on: category Zs or the
//                bidirectional classes WS, B, S; after cleaning, this adds
//                U+2028 and U+2029 to the whitespace above
//   CJK          the CJK Unified Ideographs blocks BERT pads with spaces
//
// Invalid UTF-8 (a stray continuation byte, a truncated sequence, an overlong
// form, a surrogate, a value past U+10FFFF) throws TextError with the byte
// offset; nothing is replaced silently.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <utf8proc.h>

#include "patchwork/core/error.hpp"

namespace patchwork {

/// Text that is not valid UTF-8, or a vocabulary the tokenizer cannot use.
class TextError : public Error {
public:
    using Error::Error;
};

namespace text {

/// Decode one code point starting at byte `i` of `s` (which must be < s.size()).
/// Sets `len` to the sequence length. Returns -1 for an invalid sequence.
inline std::int32_t decode_utf8(std::string_view s, std::size_t i, std::size_t& len) noexcept {
    const auto b0 = static_cast<unsigned char>(s[i]);
    if (b0 < 0x80) {
        len = 1;
        return b0;
    }
    std::size_t n;
    std::int32_t cp;
    std::int32_t min;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        n = 2, cp = b0 & 0x1F, min = 0x80;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        n = 3, cp = b0 & 0x0F, min = 0x800;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        n = 4, cp = b0 & 0x07, min = 0x10000;
    } else {
        len = 1;
        return -1;  // continuation byte, 0xC0/0xC1 (always overlong) or 0xF5..0xFF
    }
    if (i + n > s.size()) {
        len = s.size() - i;
        return -1;
    }
    for (std::size_t k = 1; k < n; ++k) {
        const auto b = static_cast<unsigned char>(s[i + k]);
        if ((b & 0xC0) != 0x80) {
            len = k;
            return -1;
        }
        cp = (cp << 6) | (b & 0x3F);
    }
    len = n;
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return -1;
    return cp;
}

/// Append the UTF-8 form of a valid code point.
inline void append_utf8(std::string& out, std::int32_t cp) {
    if (cp < 0x80) {
        out.push_back(char(cp));
    } else if (cp < 0x800) {
        out.push_back(char(0xC0 | (cp >> 6)));
        out.push_back(char(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        out.push_back(char(0xE0 | (cp >> 12)));
        out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(char(0x80 | (cp & 0x3F)));
    } else {
        out.push_back(char(0xF0 | (cp >> 18)));
        out.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
        out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(char(0x80 | (cp & 0x3F)));
    }
}

/// The message for invalid UTF-8 at byte `offset` of `s`, naming `who`.
inline std::string invalid_utf8_message(std::string_view who, std::string_view s, std::size_t offset) {
    static constexpr char hex[] = "0123456789abcdef";
    std::string bytes;
    for (std::size_t k = offset; k < s.size() && k < offset + 4; ++k) {
        const auto b = static_cast<unsigned char>(s[k]);
        if (!bytes.empty()) bytes += ' ';
        bytes += "0x";
        bytes += hex[b >> 4];
        bytes += hex[b & 0xF];
    }
    return detail::concat(who, ": invalid UTF-8 at byte ", offset, " of a ", s.size(), "-byte text (bytes ", bytes,
                          ")");
}

/// Throws TextError unless `s` is valid UTF-8.
inline void check_utf8(std::string_view s, std::string_view who) {
    for (std::size_t i = 0; i < s.size();) {
        if (static_cast<unsigned char>(s[i]) < 0x80) {
            ++i;
            continue;
        }
        std::size_t len;
        if (decode_utf8(s, i, len) < 0) throw TextError(invalid_utf8_message(who, s, i));
        i += len;
    }
}

/// The class of an ASCII byte in BERT's basic tokenizer.
enum class AsciiClass : std::uint8_t {
    drop,         // NUL and the other control characters but \t \n \r (and DEL)
    space,        // ' ', \t, \n, \r
    punctuation,  // 33-47, 58-64, 91-96, 123-126
    word,         // letters and digits
};

inline constexpr std::array<AsciiClass, 128> ascii_classes = [] {
    std::array<AsciiClass, 128> t{};
    for (int c = 0; c < 128; ++c) {
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r')
            t[std::size_t(c)] = AsciiClass::space;
        else if (c < 32 || c == 127)
            t[std::size_t(c)] = AsciiClass::drop;
        else if ((c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126))
            t[std::size_t(c)] = AsciiClass::punctuation;
        else
            t[std::size_t(c)] = AsciiClass::word;
    }
    return t;
}();

inline bool is_category_c(utf8proc_category_t c) noexcept {
    return c == UTF8PROC_CATEGORY_CN || c == UTF8PROC_CATEGORY_CC || c == UTF8PROC_CATEGORY_CF ||
           c == UTF8PROC_CATEGORY_CS || c == UTF8PROC_CATEGORY_CO;
}

inline bool is_category_p(utf8proc_category_t c) noexcept {
    return c >= UTF8PROC_CATEGORY_PC && c <= UTF8PROC_CATEGORY_PO;
}

/// BERT's _is_control: category C* except \t, \n, \r.
inline bool is_control(std::int32_t cp) noexcept {
    if (cp == '\t' || cp == '\n' || cp == '\r') return false;
    return is_category_c(utf8proc_category(cp));
}

/// BERT's _is_whitespace: space, \t, \n, \r or category Zs.
inline bool is_whitespace(std::int32_t cp) noexcept {
    if (cp == ' ' || cp == '\t' || cp == '\n' || cp == '\r') return true;
    return utf8proc_category(cp) == UTF8PROC_CATEGORY_ZS;
}

/// What Python's str.split() treats as a separator (str.isspace): Zs or the
/// bidirectional classes WS, B, S.
inline bool is_python_space(std::int32_t cp) noexcept {
    const utf8proc_property_t* p = utf8proc_get_property(cp);
    return p->category == UTF8PROC_CATEGORY_ZS || p->bidi_class == UTF8PROC_BIDI_CLASS_WS ||
           p->bidi_class == UTF8PROC_BIDI_CLASS_B || p->bidi_class == UTF8PROC_BIDI_CLASS_S;
}

/// BERT's _is_punctuation: the ASCII ranges above or category P*.
inline bool is_punctuation(std::int32_t cp) noexcept {
    if (cp < 128) return ascii_classes[std::size_t(cp)] == AsciiClass::punctuation;
    return is_category_p(utf8proc_category(cp));
}

/// The CJK Unified Ideographs blocks (and compatibility ideographs) BERT
/// surrounds with spaces; Hangul, kana and other scripts are not among them.
inline bool is_cjk_ideograph(std::int32_t cp) noexcept {
    return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0x20000 && cp <= 0x2A6DF) ||
           (cp >= 0x2A700 && cp <= 0x2B73F) || (cp >= 0x2B740 && cp <= 0x2B81F) ||
           (cp >= 0x2B820 && cp <= 0x2CEAF) || (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

/// Unicode's Cased property, as far as utf8proc exposes it: letters of
/// categories Lu, Ll, Lt and anything with an upper- or lower-case mapping.
inline bool is_cased(std::int32_t cp) noexcept {
    const auto c = utf8proc_category(cp);
    return c == UTF8PROC_CATEGORY_LU || c == UTF8PROC_CATEGORY_LL || c == UTF8PROC_CATEGORY_LT ||
           utf8proc_islower(cp) || utf8proc_isupper(cp);
}

/// Unicode's Case_Ignorable property: categories Mn, Me, Cf, Lm, Sk and the
/// word-break classes MidLetter, MidNumLet and Single_Quote.
inline bool is_case_ignorable(std::int32_t cp) noexcept {
    switch (cp) {
        case 0x0027: case 0x002E: case 0x003A: case 0x00B7: case 0x0387: case 0x055F: case 0x05F4:
        case 0x2018: case 0x2019: case 0x2024: case 0x2027: case 0xFE13: case 0xFE52: case 0xFE55:
        case 0xFF07: case 0xFF0E: case 0xFF1A:
            return true;
        default: break;
    }
    const auto c = utf8proc_category(cp);
    return c == UTF8PROC_CATEGORY_MN || c == UTF8PROC_CATEGORY_ME || c == UTF8PROC_CATEGORY_CF ||
           c == UTF8PROC_CATEGORY_LM || c == UTF8PROC_CATEGORY_SK;
}

/// Canonical combining class (0 for starters).
inline int combining_class(std::int32_t cp) noexcept { return utf8proc_get_property(cp)->combining_class; }

/// Nonspacing mark (category Mn): what stripping accents removes.
inline bool is_nonspacing_mark(std::int32_t cp) noexcept {
    return utf8proc_category(cp) == UTF8PROC_CATEGORY_MN;
}

/// Canonical decomposition of one code point (no reordering) into `out`,
/// which must hold at least `capacity` entries. Returns the count written.
/// No canonical decomposition is longer than 4 code points, so a capacity of
/// 16 always suffices; a longer one would be cut at `capacity`.
inline std::size_t decompose_canonical(std::int32_t cp, std::int32_t* out, std::size_t capacity) noexcept {
    int boundclass = UTF8PROC_BOUNDCLASS_START;
    const auto n = utf8proc_decompose_char(cp, out, utf8proc_ssize_t(capacity), UTF8PROC_DECOMPOSE, &boundclass);
    return n < 0 ? 0 : std::min(std::size_t(n), capacity);
}

}  // namespace text
}  // namespace patchwork
