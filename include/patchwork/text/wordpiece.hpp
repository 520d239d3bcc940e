#pragma once
// BERT's WordPiece tokenizer (uncased), id for id the same as Hugging Face's
// BertTokenizer with do_lower_case=true, tokenize_chinese_chars=true and
// strip_accents unset, from the model's vocab.txt.
//
//   WordPieceTokenizer tok = WordPieceTokenizer::from_vocab(dir / "vocab.txt");
//   std::vector<std::string> pieces = tok.tokenize("Café unaffable");  // cafe una ##ffa ##ble
//   Encoding e = tok.encode("a text", {.max_length = 128});         // [CLS] ... [SEP]
//   BatchEncoding b = tok.encode_batch(texts, {.max_length = 128}); // [batch, tokens], padded
//
// The pipeline, per text (each step as the reference does it):
//  1. Special tokens written in the text ([PAD], [UNK], [CLS], [SEP], [MASK],
//     exactly, case-sensitive) become their ids; the text between them is
//     tokenized on its own. EncodeOptions::split_special_tokens turns this off.
//  2. Cleaning: U+0000, U+FFFD and control characters (category C* but \t \n
//     \r: so also format characters such as U+200B and U+200D, private-use
//     and unassigned code points) are dropped; whitespace becomes a space.
//  3. CJK ideographs become words of their own.
//  4. Split into words at whitespace (also U+2028, U+2029, which Python's
//     str.split() treats as whitespace).
//  5. Per word: lower case (Python's str.lower(), not case folding, so ß stays
//     ß: the simple mapping, plus capital sigma becoming final sigma at the
//     end of a word), canonical decomposition (NFD), nonspacing marks (Mn)
//     dropped.
//  6. Punctuation (ASCII 33-47, 58-64, 91-96, 123-126, category P*) split off
//     as one-character words.
//  7. WordPiece: greedy longest match from the left, continuation pieces
//     looked up with the "##" prefix; a word with a character that no piece
//     covers, or longer than 100 code points, is one [UNK].
//  8. [CLS] A [SEP] (B [SEP]), truncation and padding (EncodeOptions).
//
// Where this differs from the Python reference, in cases built on purpose:
//  - utf8proc's Unicode version decides categories and mappings; code points
//    assigned after it (or after Python's) may be classed differently.
//  - The reference normalises the text to NFC before lower-casing and then
//    decomposes it again; here each character is lower-cased and decomposed
//    directly, which gives the same result except that canonical reordering
//    of marks that are not Mn is not done. Unicode 14 has 25 such marks (Mc
//    with a combining class: viramas of some scripts, musical-symbol stems);
//    none occurs in BERT's uncased vocabulary, so a word holding one is [UNK]
//    in any order and the ids cannot differ there.
// The fixture tests/data/tokenizer/ checks 5,000 WordNet texts, the edge cases
// listed in make_fixture.py and 1,000 random strings over 28 Unicode blocks
// against the reference, id for id. The Rust tokenizer (BertTokenizerFast) is
// not the reference: it differs on final sigma, unassigned and private-use
// code points, older Unicode tables and the odd token of pair truncation
// (fast_disagreements.txt beside the fixture).
//
// Invalid UTF-8 throws TextError with the byte offset (a Python str cannot
// hold it, so there is no reference behaviour to copy).
//
// Ids are std::int32_t (the vocabulary has 30,522 entries); patchwork's Tensor
// holds floating point only, so a batch is a row-major std::vector<int32_t>
// with its shape [batch, tokens] beside it (BatchEncoding).
//
// Speed: ASCII runs through a byte table; only other characters ask utf8proc.
// The vocabulary is an open-addressing hash table of string views, with the
// "##" pieces in a table of their own (keys without the prefix), so no
// string is built per lookup; a match is searched only up to the longest
// vocabulary entry. Nothing is cached between texts. All methods are const and
// may run concurrently from several threads.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/text/unicode.hpp"

namespace patchwork {

/// How encode_batch (and encode) pad.
enum class Padding {
    none,        // rows keep their own lengths (encode_batch still pads to the longest: a batch is rectangular)
    longest,     // to the longest row of the batch
    max_length,  // to EncodeOptions::max_length
};

struct EncodeOptions {
    /// Truncate to at most this many tokens, [CLS] and [SEP] included
    /// (0: never truncate). Pairs are truncated longest first: tokens come off
    /// the longer side until both are equal, then off both, the second side
    /// losing one more when the count is odd. Must be at least the number of
    /// special tokens (2 for one text, 3 for a pair).
    std::size_t max_length = 512;
    Padding padding = Padding::longest;
    /// [CLS] A [SEP] and [CLS] A [SEP] B [SEP]; off: the bare word pieces.
    bool add_special_tokens = true;
    /// Treat "[CLS]" and the other special tokens in the text as ordinary
    /// text (Hugging Face's split_special_tokens) instead of as their ids.
    bool split_special_tokens = false;
};

/// One encoded text (or pair): ids with their token types (0 for the first
/// text, 1 for the second) and attention mask (1 for a token, 0 for padding).
struct Encoding {
    std::vector<std::int32_t> ids;
    std::vector<std::int32_t> token_type_ids;
    std::vector<std::int32_t> attention_mask;

    [[nodiscard]] std::size_t size() const noexcept { return ids.size(); }
};

/// A padded batch: three row-major [batch, tokens] matrices of int32 and the
/// unpadded length of each row. Row i is ids[i * tokens, (i + 1) * tokens).
struct BatchEncoding {
    std::size_t batch = 0;
    std::size_t tokens = 0;
    std::vector<std::int32_t> ids;
    std::vector<std::int32_t> token_type_ids;
    std::vector<std::int32_t> attention_mask;
    std::vector<std::size_t> lengths;

    [[nodiscard]] std::array<std::size_t, 2> shape() const noexcept { return {batch, tokens}; }
    [[nodiscard]] std::span<const std::int32_t> row_ids(std::size_t i) const {
        return std::span<const std::int32_t>(ids).subspan(i * tokens, tokens);
    }
    [[nodiscard]] std::span<const std::int32_t> row_mask(std::size_t i) const {
        return std::span<const std::int32_t>(attention_mask).subspan(i * tokens, tokens);
    }
    [[nodiscard]] std::span<const std::int32_t> row_token_types(std::size_t i) const {
        return std::span<const std::int32_t>(token_type_ids).subspan(i * tokens, tokens);
    }
};

namespace detail {

/// String -> id, open addressing with linear probing over views into one
/// block of key bytes. Inserting a key again replaces its id (the reference
/// builds a Python dict from the file, so a repeated token keeps its last line).
class VocabTable {
public:
    void reserve(std::size_t n) {
        std::size_t cap = 16;
        while (cap < 2 * n) cap *= 2;
        slots_.assign(cap, Slot{});
        mask_ = cap - 1;
    }

    void insert(std::string_view key, std::int32_t id) {
        if (2 * (count_ + 1) > slots_.size()) grow();
        const std::uint64_t h = hash(key);
        for (std::size_t i = h & mask_;; i = (i + 1) & mask_) {
            Slot& s = slots_[i];
            if (s.id < 0) {
                s = Slot{h, id, std::uint32_t(keys_.size()), std::uint32_t(key.size())};
                keys_.append(key);
                ++count_;
                max_len_ = std::max(max_len_, key.size());
                return;
            }
            if (s.hash == h && view(s) == key) {
                s.id = id;
                return;
            }
        }
    }

    /// The id of `key`, or -1.
    [[nodiscard]] std::int32_t find(std::string_view key) const noexcept {
        if (slots_.empty()) return -1;
        const std::uint64_t h = hash(key);
        for (std::size_t i = h & mask_;; i = (i + 1) & mask_) {
            const Slot& s = slots_[i];
            if (s.id < 0) return -1;
            if (s.hash == h && s.len == key.size() && std::memcmp(keys_.data() + s.offset, key.data(), key.size()) == 0)
                return s.id;
        }
    }

    /// The longest key in bytes: no longer substring can match.
    [[nodiscard]] std::size_t max_key_length() const noexcept { return max_len_; }
    [[nodiscard]] std::size_t size() const noexcept { return count_; }

private:
    struct Slot {
        std::uint64_t hash = 0;
        std::int32_t id = -1;
        std::uint32_t offset = 0;
        std::uint32_t len = 0;
    };

    // FNV-1a over the bytes, then a final mix so the low bits (the slot) depend on every byte.
    static std::uint64_t hash(std::string_view s) noexcept {
        std::uint64_t h = 0xcbf29ce484222325ULL;
        for (const char c : s) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ULL;
        h ^= h >> 29;
        h *= 0xbf58476d1ce4e5b9ULL;
        return h ^ (h >> 32);
    }

    [[nodiscard]] std::string_view view(const Slot& s) const noexcept {
        return std::string_view(keys_).substr(s.offset, s.len);
    }

    void grow() {
        std::vector<Slot> old = std::move(slots_);
        const std::size_t cap = old.empty() ? 16 : old.size() * 2;
        slots_.assign(cap, Slot{});
        mask_ = cap - 1;
        for (const Slot& s : old) {
            if (s.id < 0) continue;
            std::size_t i = s.hash & mask_;
            while (slots_[i].id >= 0) i = (i + 1) & mask_;
            slots_[i] = s;
        }
    }

    std::vector<Slot> slots_;
    std::size_t mask_ = 0;
    std::size_t count_ = 0;
    std::size_t max_len_ = 0;
    std::string keys_;
};

}  // namespace detail

class WordPieceTokenizer {
public:
    /// The reference's limit: a longer word (in code points) is one [UNK].
    static constexpr std::size_t max_input_chars_per_word = 100;

    /// Read a vocab.txt: one token per line, id = line number from 0 (lines
    /// end in \n, \r\n or \r, as Python's universal newlines read them).
    /// Throws IoError naming the file for a missing or unreadable file, a line
    /// that is not UTF-8 (with its line number), or a missing special token.
    [[nodiscard]] static WordPieceTokenizer from_vocab(const std::filesystem::path& path) {
        std::ifstream f(path, std::ios::binary);
        if (!f) throw IoError(detail::concat(path.string(), ": cannot open the vocabulary file"));
        std::ostringstream buf;
        buf << f.rdbuf();
        if (f.bad()) throw IoError(detail::concat(path.string(), ": read error"));
        const std::string data = buf.str();
        std::vector<std::string> tokens;
        std::size_t begin = 0;
        while (begin < data.size()) {
            std::size_t end = data.find_first_of("\r\n", begin);
            if (end == std::string::npos) end = data.size();
            tokens.emplace_back(data, begin, end - begin);
            if (end < data.size() && data[end] == '\r' && end + 1 < data.size() && data[end + 1] == '\n') ++end;
            begin = end + 1;
        }
        try {
            return from_tokens(std::move(tokens));
        } catch (const TextError& e) {
            throw IoError(detail::concat(path.string(), ": ", e.what()));
        }
    }

    /// A tokenizer over the given tokens (id = position). Throws TextError for
    /// a token that is not UTF-8, when [PAD], [UNK], [CLS] or [SEP] is missing,
    /// or for more tokens than int32 ids hold.
    [[nodiscard]] static WordPieceTokenizer from_tokens(std::vector<std::string> tokens) {
        WordPieceTokenizer t;
        if (tokens.size() > std::size_t(INT32_MAX))
            throw TextError(detail::concat("vocabulary of ", tokens.size(), " tokens: too many for int32 ids"));
        t.tokens_ = std::move(tokens);
        t.whole_.reserve(t.tokens_.size());
        t.continuation_.reserve(t.tokens_.size() / 4 + 1);
        for (std::size_t i = 0; i < t.tokens_.size(); ++i) {
            const std::string& tok = t.tokens_[i];
            for (std::size_t k = 0; k < tok.size();) {
                std::size_t len;
                if (text::decode_utf8(tok, k, len) < 0)
                    throw TextError(detail::concat("line ", i + 1, " (token ", i, ") is not valid UTF-8 at byte ", k));
                k += len;
            }
            t.whole_.insert(tok, std::int32_t(i));
            if (tok.size() >= 2 && tok[0] == '#' && tok[1] == '#')
                t.continuation_.insert(std::string_view(tok).substr(2), std::int32_t(i));
        }
        auto special = [&](std::string_view name, bool required) {
            const std::int32_t id = t.whole_.find(name);
            if (id < 0 && required)
                throw TextError(detail::concat("the vocabulary (", t.tokens_.size(), " tokens) has no ", name,
                                               " token"));
            if (id >= 0) t.specials_.emplace_back(std::string(name), id);
            return id;
        };
        t.pad_ = special("[PAD]", true);
        t.unk_ = special("[UNK]", true);
        t.cls_ = special("[CLS]", true);
        t.sep_ = special("[SEP]", true);
        t.mask_ = special("[MASK]", false);
        return t;
    }

    [[nodiscard]] std::size_t vocab_size() const noexcept { return tokens_.size(); }
    [[nodiscard]] std::int32_t pad_id() const noexcept { return pad_; }
    [[nodiscard]] std::int32_t unk_id() const noexcept { return unk_; }
    [[nodiscard]] std::int32_t cls_id() const noexcept { return cls_; }
    [[nodiscard]] std::int32_t sep_id() const noexcept { return sep_; }
    /// -1 when the vocabulary has no [MASK].
    [[nodiscard]] std::int32_t mask_id() const noexcept { return mask_; }

    /// The id of a token exactly as written in the vocabulary, or nullopt.
    [[nodiscard]] std::optional<std::int32_t> token_to_id(std::string_view token) const noexcept {
        const std::int32_t id = whole_.find(token);
        return id < 0 ? std::nullopt : std::optional<std::int32_t>(id);
    }
    /// The token of an id; throws TextError for an id outside the vocabulary.
    [[nodiscard]] const std::string& id_to_token(std::int32_t id) const {
        if (id < 0 || std::size_t(id) >= tokens_.size())
            throw TextError(detail::concat("WordPieceTokenizer: id ", id, " outside the vocabulary of ",
                                           tokens_.size(), " tokens"));
        return tokens_[std::size_t(id)];
    }

    /// The word pieces of a text, without [CLS]/[SEP].
    [[nodiscard]] std::vector<std::string> tokenize(std::string_view text, bool split_special_tokens = false) const {
        std::vector<std::int32_t> ids;
        append_ids(text, ids, split_special_tokens);
        std::vector<std::string> out;
        out.reserve(ids.size());
        for (const std::int32_t id : ids) out.push_back(tokens_[std::size_t(id)]);
        return out;
    }

    /// Append the ids of a text's word pieces (no [CLS]/[SEP]) to `ids`.
    void append_ids(std::string_view text, std::vector<std::int32_t>& ids, bool split_special_tokens = false) const {
        text::check_utf8(text, "WordPieceTokenizer");
        Scratch s;
        if (split_special_tokens) {
            basic(text, ids, s);
            return;
        }
        // Special tokens are found in the raw text, left to right; the pieces
        // between them are tokenized on their own, as the reference does.
        std::size_t from = 0;
        std::size_t pos = 0;
        while ((pos = text.find('[', pos)) != std::string_view::npos) {
            std::int32_t hit = -1;
            std::size_t len = 0;
            for (const auto& [name, id] : specials_)
                if (text.substr(pos, name.size()) == name) {
                    hit = id;
                    len = name.size();
                    break;
                }
            if (hit < 0) {
                ++pos;
                continue;
            }
            basic(text.substr(from, pos - from), ids, s);
            ids.push_back(hit);
            pos += len;
            from = pos;
        }
        basic(text.substr(from), ids, s);
    }

    /// [CLS] text [SEP], truncated and padded as `options` say.
    [[nodiscard]] Encoding encode(std::string_view text, const EncodeOptions& options = {}) const {
        // Built in place: one allocation per vector for a typical text (English
        // averages well over two bytes per word piece).
        const std::size_t specials = options.add_special_tokens ? 2 : 0;
        if (options.max_length > 0 && options.max_length < specials)
            throw ConfigError(detail::concat("WordPieceTokenizer: max_length ", options.max_length,
                                             " is below the ", specials, " special tokens"));
        Encoding e;
        e.ids.reserve(text.size() / 2 + 3);
        if (options.add_special_tokens) e.ids.push_back(cls_);
        append_ids(text, e.ids, options.split_special_tokens);
        if (options.max_length > 0 && e.ids.size() + specials / 2 > options.max_length)
            e.ids.resize(options.max_length - specials / 2);  // keeps [CLS]: max_length >= 2 when it is there
        if (options.add_special_tokens) e.ids.push_back(sep_);
        e.token_type_ids.assign(e.ids.size(), 0);
        e.attention_mask.assign(e.ids.size(), 1);
        if (options.padding == Padding::max_length) pad(e, options.max_length, options);
        return e;
    }

    /// [CLS] first [SEP] second [SEP] with token types 0 then 1.
    [[nodiscard]] Encoding encode(std::string_view first, std::string_view second,
                                  const EncodeOptions& options = {}) const {
        std::vector<std::int32_t> a, b;
        append_ids(first, a, options.split_special_tokens);
        append_ids(second, b, options.split_special_tokens);
        Encoding e = assemble(std::move(a), &b, options);
        if (options.padding == Padding::max_length) pad(e, options.max_length, options);
        return e;
    }

    /// Encode texts (anything convertible to std::string_view) into one
    /// [batch, tokens] batch padded with [PAD] to the longest row or, with
    /// Padding::max_length, to max_length.
    template <class Range>
    [[nodiscard]] BatchEncoding encode_batch(const Range& texts, const EncodeOptions& options = {}) const {
        std::vector<Encoding> rows;
        for (const auto& t : texts) rows.push_back(encode(std::string_view(t), unpadded(options)));
        return stack(rows, options);
    }

    /// Encode pairs (first[i], second[i]) into one padded batch.
    template <class Range1, class Range2>
    [[nodiscard]] BatchEncoding encode_batch(const Range1& first, const Range2& second,
                                             const EncodeOptions& options = {}) const {
        if (std::size(first) != std::size(second))
            throw ConfigError(detail::concat("WordPieceTokenizer::encode_batch: ", std::size(first),
                                             " first texts but ", std::size(second), " second texts"));
        std::vector<Encoding> rows;
        auto it = std::begin(second);
        for (const auto& a : first) rows.push_back(encode(std::string_view(a), std::string_view(*it++), unpadded(options)));
        return stack(rows, options);
    }

private:
    WordPieceTokenizer() = default;

    struct Scratch {
        std::string word;        // the current word, lower-cased and decomposed
        std::size_t chars = 0;   // its length in code points
    };

    static EncodeOptions unpadded(EncodeOptions o) {
        if (o.padding == Padding::max_length && o.max_length == 0)
            throw ConfigError("WordPieceTokenizer: Padding::max_length needs a max_length above 0");
        o.padding = Padding::none;
        return o;
    }

    // Tokenize a text without special tokens in it: steps 2-7 of the header comment.
    void basic(std::string_view text, std::vector<std::int32_t>& ids, Scratch& s) const {
        s.word.clear();
        s.chars = 0;
        std::size_t word_begin = 0;  // byte where the current whitespace-delimited word began (for final sigma)
        const std::size_t n = text.size();
        for (std::size_t i = 0; i < n;) {
            const auto b = static_cast<unsigned char>(text[i]);
            if (b < 0x80) {
                switch (text::ascii_classes[b]) {
                    case text::AsciiClass::word:
                        s.word.push_back(char(b >= 'A' && b <= 'Z' ? b + 32 : b));
                        ++s.chars;
                        break;
                    case text::AsciiClass::punctuation:
                        flush(s, ids);
                        s.word.push_back(char(b));
                        s.chars = 1;
                        flush(s, ids);
                        break;
                    case text::AsciiClass::space:
                        flush(s, ids);
                        word_begin = i + 1;
                        break;
                    case text::AsciiClass::drop: break;
                }
                ++i;
                continue;
            }
            std::size_t len;
            const std::int32_t cp = text::decode_utf8(text, i, len);  // valid: checked by append_ids
            const std::size_t at = i;
            i += len;
            if (cp == 0xFFFD || text::is_control(cp)) continue;
            if (text::is_python_space(cp)) {
                flush(s, ids);
                word_begin = i;
                continue;
            }
            if (text::is_cjk_ideograph(cp)) {
                flush(s, ids);
                add_char(cp, s, ids);
                flush(s, ids);
                word_begin = i;
                continue;
            }
            const std::int32_t lower =
                cp == 0x03A3 ? (final_sigma(text, word_begin, at, i) ? 0x03C2 : 0x03C3) : utf8proc_tolower(cp);
            add_char(lower, s, ids);
        }
        flush(s, ids);
    }

    // Decompose a lower-cased character, drop its nonspacing marks and add the
    // rest to the current word, punctuation as words of their own.
    void add_char(std::int32_t cp, Scratch& s, std::vector<std::int32_t>& ids) const {
        std::int32_t parts[16];
        const std::size_t n = text::decompose_canonical(cp, parts, 16);
        for (std::size_t k = 0; k < n; ++k) {
            const std::int32_t c = parts[k];
            if (c < 0x80) {
                if (text::ascii_classes[std::size_t(c)] == text::AsciiClass::punctuation) {
                    flush(s, ids);
                    s.word.push_back(char(c));
                    s.chars = 1;
                    flush(s, ids);
                } else {
                    s.word.push_back(char(c));
                    ++s.chars;
                }
                continue;
            }
            const auto cat = utf8proc_category(c);
            if (cat == UTF8PROC_CATEGORY_MN) continue;
            if (text::is_category_p(cat)) {
                flush(s, ids);
                text::append_utf8(s.word, c);
                s.chars = 1;
                flush(s, ids);
            } else {
                text::append_utf8(s.word, c);
                ++s.chars;
            }
        }
    }

    // Python's str.lower() turns capital sigma into final sigma when a cased
    // letter precedes it (case-ignorable characters skipped) and none follows.
    // The context is the whitespace-delimited word, without the characters
    // cleaning drops. [at, next) is the sigma itself.
    static bool final_sigma(std::string_view text, std::size_t word_begin, std::size_t at, std::size_t next) {
        bool cased_before = false;
        for (std::size_t j = at; j > word_begin;) {
            std::size_t k = j - 1;
            while (k > word_begin && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
            std::size_t len;
            const std::int32_t c = text::decode_utf8(text, k, len);
            j = k;
            if (c == 0 || c == 0xFFFD || text::is_control(c) || text::is_case_ignorable(c)) continue;
            if (text::is_cjk_ideograph(c)) break;
            cased_before = text::is_cased(c);
            break;
        }
        if (!cased_before) return false;
        for (std::size_t j = next; j < text.size();) {
            std::size_t len;
            const std::int32_t c = text::decode_utf8(text, j, len);
            j += len;
            if (c == 0 || c == 0xFFFD || text::is_control(c) || text::is_case_ignorable(c)) continue;
            if (text::is_whitespace(c) || text::is_python_space(c) || text::is_cjk_ideograph(c)) return true;
            return !text::is_cased(c);
        }
        return true;
    }

    // WordPiece on the current word; greedy longest match from the left.
    void flush(Scratch& s, std::vector<std::int32_t>& ids) const {
        if (!s.word.empty()) wordpiece(s.word, s.chars, ids);
        s.word.clear();
        s.chars = 0;
    }

    void wordpiece(std::string_view w, std::size_t chars, std::vector<std::int32_t>& ids) const {
        if (chars > max_input_chars_per_word) {
            ids.push_back(unk_);
            return;
        }
        const std::size_t mark = ids.size();
        const std::size_t n = w.size();
        for (std::size_t start = 0; start < n;) {
            const detail::VocabTable& table = start == 0 ? whole_ : continuation_;
            std::size_t end = std::min(n, start + table.max_key_length());
            while (end < n && (static_cast<unsigned char>(w[end]) & 0xC0) == 0x80) --end;  // a character boundary
            std::int32_t id = -1;
            while (end > start) {
                id = table.find(w.substr(start, end - start));
                if (id >= 0) break;
                do --end;
                while (end > start && (static_cast<unsigned char>(w[end]) & 0xC0) == 0x80);
            }
            if (id < 0) {
                ids.resize(mark);
                ids.push_back(unk_);
                return;
            }
            ids.push_back(id);
            start = end;
        }
    }

    // [CLS] a [SEP] (b [SEP]) after longest-first truncation.
    Encoding assemble(std::vector<std::int32_t> a, std::vector<std::int32_t>* b, const EncodeOptions& o) const {
        const std::size_t specials = o.add_special_tokens ? (b ? 3 : 2) : 0;
        if (o.max_length > 0) {
            if (o.max_length < specials)
                throw ConfigError(detail::concat("WordPieceTokenizer: max_length ", o.max_length, " is below the ",
                                                 specials, " special tokens"));
            const std::size_t total = a.size() + (b ? b->size() : 0) + specials;
            if (total > o.max_length) {
                const std::size_t remove = total - o.max_length;
                if (!b) {
                    a.resize(a.size() - std::min(remove, a.size()));
                } else {
                    // The reference's arithmetic: the longer side first, then half each,
                    // the second side taking the odd one.
                    const std::size_t la = a.size(), lb = b->size();
                    const std::size_t first = std::min(la > lb ? la - lb : lb - la, remove);
                    const std::size_t second = remove - first;
                    std::size_t cut_a, cut_b;
                    if (la > lb) {
                        cut_a = first + second / 2;
                        cut_b = second - second / 2;
                    } else {
                        cut_a = second / 2;
                        cut_b = first + second - second / 2;
                    }
                    a.resize(la - std::min(cut_a, la));
                    b->resize(lb - std::min(cut_b, lb));
                }
            }
        }
        Encoding e;
        const std::size_t total = a.size() + (b ? b->size() : 0) + specials;
        e.ids.reserve(total);
        e.token_type_ids.reserve(total);
        if (o.add_special_tokens) e.ids.push_back(cls_);
        e.ids.insert(e.ids.end(), a.begin(), a.end());
        if (o.add_special_tokens) e.ids.push_back(sep_);
        e.token_type_ids.assign(e.ids.size(), 0);
        if (b) {
            e.ids.insert(e.ids.end(), b->begin(), b->end());
            if (o.add_special_tokens) e.ids.push_back(sep_);
            e.token_type_ids.resize(e.ids.size(), 1);
        }
        e.attention_mask.assign(e.ids.size(), 1);
        return e;
    }

    void pad(Encoding& e, std::size_t length, const EncodeOptions& o) const {
        if (o.max_length == 0)
            throw ConfigError("WordPieceTokenizer: Padding::max_length needs a max_length above 0");
        if (e.ids.size() >= length) return;
        e.ids.resize(length, pad_);
        e.token_type_ids.resize(length, 0);
        e.attention_mask.resize(length, 0);
    }

    BatchEncoding stack(const std::vector<Encoding>& rows, const EncodeOptions& o) const {
        BatchEncoding b;
        b.batch = rows.size();
        std::size_t longest = 0;
        for (const Encoding& e : rows) longest = std::max(longest, e.size());
        b.tokens = o.padding == Padding::max_length ? std::max(longest, o.max_length) : longest;
        b.ids.assign(b.batch * b.tokens, pad_);
        b.token_type_ids.assign(b.batch * b.tokens, 0);
        b.attention_mask.assign(b.batch * b.tokens, 0);
        b.lengths.reserve(b.batch);
        for (std::size_t i = 0; i < b.batch; ++i) {
            const Encoding& e = rows[i];
            std::copy(e.ids.begin(), e.ids.end(), b.ids.begin() + std::ptrdiff_t(i * b.tokens));
            std::copy(e.token_type_ids.begin(), e.token_type_ids.end(),
                      b.token_type_ids.begin() + std::ptrdiff_t(i * b.tokens));
            std::copy(e.attention_mask.begin(), e.attention_mask.end(),
                      b.attention_mask.begin() + std::ptrdiff_t(i * b.tokens));
            b.lengths.push_back(e.size());
        }
        return b;
    }

    std::vector<std::string> tokens_;
    detail::VocabTable whole_;
    detail::VocabTable continuation_;
    std::vector<std::pair<std::string, std::int32_t>> specials_;
    std::int32_t pad_ = -1, unk_ = -1, cls_ = -1, sep_ = -1, mask_ = -1;
};

}  // namespace patchwork
