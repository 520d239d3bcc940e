#pragma once
// WordNet 3.0 synsets with their glosses (Debian's wordnet-base, under
// /usr/share/wordnet), and four labelled text tasks built on them.
//
// A data file (data.noun, data.verb, data.adj, data.adv) starts with licence
// lines that begin with two spaces; every other line is one synset:
//
//   offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt
//       [ptr ...] [f_cnt + f_num w_num ...] | gloss
//
//   offset       8 decimal digits (the synset's byte offset in the file)
//   lex_filenum  2 decimal digits: the lexicographer file, i.e. the
//                supersense (names in wordnet_lexicographer_files)
//   ss_type      n, v, a, s (adjective satellite) or r
//   w_cnt        2 hexadecimal digits, then that many (word, lex_id) pairs;
//                words use '_' for spaces, adjectives may end in a syntactic
//                marker (a), (p) or (ip)
//   p_cnt        3 decimal digits, then that many pointers of 4 fields
//   f_cnt        verbs only: 2 decimal digits, then that many "+ f_num w_num"
//   gloss        after " | ": the definition and quoted examples, ';'-separated
//
// Lemmas are kept with spaces for '_' and without the marker; the gloss
// without its trailing blanks. Any line that does not parse, a lexicographer
// file that does not belong to the file's part of speech, or a missing file
// throws IoError naming the file and the line number.
//
// The tasks (all examples are synsets, text = Synset::text()):
//   noun_supersense  26 classes, noun.Tops .. noun.time (lex files 03-28)
//   verb_supersense  15 classes, verb.body .. verb.weather (29-43)
//   adjective_kind   2 classes, adj.all (00, satellites included) and
//                    adj.pert (01); the 60 adj.ppl (44) synsets are left out
//   part_of_speech   4 classes, noun, verb, adjective (a and s), adverb
// split by synset at random from a seed (not stratified): train, validation
// and test fractions, each part in file order.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/random.hpp"
#include "patchwork/io/dataset.hpp"

namespace patchwork {

/// Where Debian's wordnet-base installs the database.
inline constexpr const char* wordnet_default_dir = "/usr/share/wordnet";

/// The 45 lexicographer files of WordNet 3.0, indexed by lex_filenum.
inline constexpr std::array<std::string_view, 45> wordnet_lexicographer_files = {
    "adj.all",         "adj.pert",         "adv.all",           "noun.Tops",      "noun.act",
    "noun.animal",     "noun.artifact",    "noun.attribute",    "noun.body",      "noun.cognition",
    "noun.communication", "noun.event",    "noun.feeling",      "noun.food",      "noun.group",
    "noun.location",   "noun.motive",      "noun.object",       "noun.person",    "noun.phenomenon",
    "noun.plant",      "noun.possession",  "noun.process",      "noun.quantity",  "noun.relation",
    "noun.shape",      "noun.state",       "noun.substance",    "noun.time",      "verb.body",
    "verb.change",     "verb.cognition",   "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact",    "verb.creation",    "verb.emotion",      "verb.motion",    "verb.perception",
    "verb.possession", "verb.social",      "verb.stative",      "verb.weather",   "adj.ppl"};

enum class PartOfSpeech { noun, verb, adjective, adverb };

inline constexpr std::array<std::string_view, 4> part_of_speech_names = {"noun", "verb", "adjective", "adverb"};
/// The data file of each part of speech.
inline constexpr std::array<std::string_view, 4> wordnet_data_files = {"data.noun", "data.verb", "data.adj",
                                                                        "data.adv"};

struct Synset {
    std::uint32_t offset = 0;
    int lex_filenum = 0;
    char ss_type = 'n';  // n, v, a, s, r
    PartOfSpeech pos = PartOfSpeech::noun;
    std::vector<std::string> lemmas;
    std::string gloss;

    /// The task input: lemmas joined by ", ", then ": ", then the gloss.
    [[nodiscard]] std::string text() const {
        std::string t;
        for (std::size_t i = 0; i < lemmas.size(); ++i) {
            if (i) t += ", ";
            t += lemmas[i];
        }
        t += ": ";
        t += gloss;
        return t;
    }
    [[nodiscard]] std::string_view lexicographer_file() const {
        return wordnet_lexicographer_files[std::size_t(lex_filenum)];
    }
};

/// The synsets of the four data files, each in file order.
struct WordNet {
    std::array<std::vector<Synset>, 4> synsets;

    [[nodiscard]] const std::vector<Synset>& of(PartOfSpeech pos) const { return synsets[std::size_t(pos)]; }
    [[nodiscard]] std::size_t size() const noexcept {
        std::size_t n = 0;
        for (const auto& v : synsets) n += v.size();
        return n;
    }
};

namespace detail {

inline bool wordnet_lex_matches(PartOfSpeech pos, int lex) {
    switch (pos) {
        case PartOfSpeech::noun: return lex >= 3 && lex <= 28;
        case PartOfSpeech::verb: return lex >= 29 && lex <= 43;
        case PartOfSpeech::adjective: return lex == 0 || lex == 1 || lex == 44;
        case PartOfSpeech::adverb: return lex == 2;
    }
    return false;
}

inline bool wordnet_type_matches(PartOfSpeech pos, char t) {
    switch (pos) {
        case PartOfSpeech::noun: return t == 'n';
        case PartOfSpeech::verb: return t == 'v';
        case PartOfSpeech::adjective: return t == 'a' || t == 's';
        case PartOfSpeech::adverb: return t == 'r';
    }
    return false;
}

/// Space-separated fields of a synset line, read one at a time; failures name file and line.
class WordNetLine {
public:
    WordNetLine(std::string_view head, const std::string& file, std::size_t line)
        : head_(head), file_(file), line_(line) {}

    [[noreturn]] void fail(const std::string& what) const {
        throw IoError(concat(file_, ":", line_, ": ", what));
    }

    std::string_view field(const char* name) {
        while (pos_ < head_.size() && head_[pos_] == ' ') ++pos_;
        if (pos_ >= head_.size()) fail(concat("line ends before the ", name, " field"));
        const std::size_t end = std::min(head_.find(' ', pos_), head_.size());
        const std::string_view f = head_.substr(pos_, end - pos_);
        pos_ = end;
        return f;
    }

    /// A field of exactly `digits` digits (any count when 0) in `base`.
    unsigned long number(const char* name, std::size_t digits, int base) {
        const std::string_view f = field(name);
        if ((digits && f.size() != digits) || f.size() > 9)
            fail(concat(name, " '", f, "' should have ", digits, " digits"));
        unsigned long v = 0;
        for (const char c : f) {
            int d;
            if (c >= '0' && c <= '9')
                d = c - '0';
            else if (base == 16 && c >= 'a' && c <= 'f')
                d = c - 'a' + 10;
            else if (base == 16 && c >= 'A' && c <= 'F')
                d = c - 'A' + 10;
            else
                fail(concat(name, " '", f, "' is not a ", base == 16 ? "hexadecimal" : "decimal", " number"));
            v = v * unsigned(base) + unsigned(d);
        }
        return v;
    }

    [[nodiscard]] bool at_end() const {
        std::size_t p = pos_;
        while (p < head_.size() && head_[p] == ' ') ++p;
        return p >= head_.size();
    }

private:
    std::string_view head_;
    const std::string& file_;
    std::size_t line_;
    std::size_t pos_ = 0;
};

/// Parse one synset line (without its newline).
inline Synset parse_wordnet_line(std::string_view text, PartOfSpeech pos, const std::string& file, std::size_t line) {
    const std::size_t bar = text.find(" | ");
    const std::size_t bar_end = text.size() >= 2 && text.substr(text.size() - 2) == " |" ? text.size() - 2
                                                                                           : std::string_view::npos;
    const std::size_t split = bar != std::string_view::npos ? bar : bar_end;
    WordNetLine f(text.substr(0, split), file, line);
    if (split == std::string_view::npos) f.fail("no ' | ' before a gloss");
    Synset s;
    s.pos = pos;
    s.offset = std::uint32_t(f.number("synset offset", 8, 10));
    s.lex_filenum = int(f.number("lex_filenum", 2, 10));
    if (!wordnet_lex_matches(pos, s.lex_filenum))
        f.fail(concat("lex_filenum ", s.lex_filenum,
                      s.lex_filenum < int(wordnet_lexicographer_files.size())
                          ? concat(" (", wordnet_lexicographer_files[std::size_t(s.lex_filenum)], ")")
                          : std::string(),
                      " does not belong to the ", part_of_speech_names[std::size_t(pos)], " file"));
    const std::string_view type = f.field("ss_type");
    if (type.size() != 1 || !wordnet_type_matches(pos, type[0]))
        f.fail(concat("ss_type '", type, "' does not belong to the ", part_of_speech_names[std::size_t(pos)],
                      " file"));
    s.ss_type = type[0];
    const auto w_cnt = f.number("w_cnt", 2, 16);
    if (w_cnt == 0) f.fail("w_cnt is 0: a synset without words");
    for (unsigned long k = 0; k < w_cnt; ++k) {
        std::string word(f.field("word"));
        if (word.size() > 2 && word.back() == ')') {
            const std::size_t open = word.rfind('(');
            if (open != std::string::npos && open > 0) {
                const std::string marker = word.substr(open);
                if (marker != "(a)" && marker != "(p)" && marker != "(ip)")
                    f.fail(concat("word '", word, "' ends in an unknown marker ", marker));
                word.resize(open);
            }
        }
        std::replace(word.begin(), word.end(), '_', ' ');
        s.lemmas.push_back(std::move(word));
        (void)f.number("lex_id", 0, 16);
    }
    const auto p_cnt = f.number("p_cnt", 3, 10);
    for (unsigned long k = 0; k < p_cnt; ++k) {
        (void)f.field("pointer symbol");
        (void)f.number("pointer offset", 8, 10);
        (void)f.field("pointer part of speech");
        (void)f.number("pointer source/target", 4, 16);
    }
    if (pos == PartOfSpeech::verb && !f.at_end()) {
        const auto f_cnt = f.number("f_cnt", 2, 10);
        for (unsigned long k = 0; k < f_cnt; ++k) {
            if (f.field("frame '+'") != "+") f.fail("a verb frame does not start with '+'");
            (void)f.number("f_num", 2, 10);
            (void)f.number("w_num", 2, 16);
        }
    }
    if (!f.at_end()) f.fail("unexpected fields before the gloss");
    if (bar != std::string_view::npos) {
        std::string_view gloss = text.substr(bar + 3);
        while (!gloss.empty() && (gloss.back() == ' ' || gloss.back() == '\t' || gloss.back() == '\r'))
            gloss.remove_suffix(1);
        s.gloss = std::string(gloss);
    }
    return s;
}

}  // namespace detail

/// The synsets of one data file, in file order.
[[nodiscard]] inline std::vector<Synset> read_wordnet_data(const std::filesystem::path& path, PartOfSpeech pos) {
    const std::string file = path.string();
    std::ifstream in(path, std::ios::binary);
    if (!in) throw IoError(detail::concat(file, ": cannot open the WordNet data file"));
    std::vector<Synset> out;
    std::string line;
    std::size_t number = 0;
    bool header = true;
    while (std::getline(in, line)) {
        ++number;
        if (header && line.size() >= 2 && line[0] == ' ' && line[1] == ' ') continue;  // licence
        header = false;
        if (line.empty()) throw IoError(detail::concat(file, ":", number, ": empty line"));
        out.push_back(detail::parse_wordnet_line(line, pos, file, number));
    }
    if (in.bad()) throw IoError(detail::concat(file, ": read error after line ", number));
    if (out.empty()) throw IoError(detail::concat(file, ": no synsets"));
    return out;
}

/// All four data files of a WordNet directory.
[[nodiscard]] inline WordNet load_wordnet(const std::filesystem::path& dir = wordnet_default_dir) {
    WordNet wn;
    for (std::size_t p = 0; p < 4; ++p)
        wn.synsets[p] = read_wordnet_data(dir / std::string(wordnet_data_files[p]), PartOfSpeech(p));
    return wn;
}

enum class WordNetTask { noun_supersense, verb_supersense, adjective_kind, part_of_speech };

/// One labelled text: the synset it comes from and its class.
struct TextExample {
    std::string text;
    int label = 0;
    PartOfSpeech pos = PartOfSpeech::noun;
    std::uint32_t offset = 0;
};

struct TextSplits {
    std::vector<std::string> class_names;
    std::vector<TextExample> train, validation, test;
};

struct TextSplitOptions {
    double train = 0.8;
    double validation = 0.1;  // test: the rest
    std::uint64_t seed = 0;
};

/// The class names of a task, indexed by label.
[[nodiscard]] inline std::vector<std::string> wordnet_task_classes(WordNetTask task) {
    std::vector<std::string> names;
    auto range = [&](int lo, int hi) {
        for (int i = lo; i <= hi; ++i) names.emplace_back(wordnet_lexicographer_files[std::size_t(i)]);
    };
    switch (task) {
        case WordNetTask::noun_supersense: range(3, 28); break;
        case WordNetTask::verb_supersense: range(29, 43); break;
        case WordNetTask::adjective_kind: range(0, 1); break;
        case WordNetTask::part_of_speech:
            for (const auto n : part_of_speech_names) names.emplace_back(n);
            break;
    }
    return names;
}

/// A task's labelled texts, split at random by synset (see the header comment).
/// Throws ConfigError for fractions that are negative or sum past 1.
[[nodiscard]] inline TextSplits wordnet_task(const WordNet& wn, WordNetTask task, const TextSplitOptions& opt = {}) {
    if (!(opt.train >= 0 && opt.validation >= 0 && opt.train + opt.validation <= 1.0))
        throw ConfigError(detail::concat("wordnet_task: fractions train ", opt.train, " and validation ",
                                         opt.validation, " must be non-negative and sum to at most 1"));
    TextSplits out;
    out.class_names = wordnet_task_classes(task);
    std::vector<TextExample> all;
    auto add = [&](const Synset& s, int label) { all.push_back({s.text(), label, s.pos, s.offset}); };
    switch (task) {
        case WordNetTask::noun_supersense:
            for (const Synset& s : wn.of(PartOfSpeech::noun)) add(s, s.lex_filenum - 3);
            break;
        case WordNetTask::verb_supersense:
            for (const Synset& s : wn.of(PartOfSpeech::verb)) add(s, s.lex_filenum - 29);
            break;
        case WordNetTask::adjective_kind:
            for (const Synset& s : wn.of(PartOfSpeech::adjective))
                if (s.lex_filenum <= 1) add(s, s.lex_filenum);
            break;
        case WordNetTask::part_of_speech:
            for (std::size_t p = 0; p < 4; ++p)
                for (const Synset& s : wn.synsets[p]) add(s, int(p));
            break;
    }
    const std::size_t n = all.size();
    const auto n_train = std::size_t(double(n) * opt.train + 0.5);
    const auto n_val = std::min(n - n_train, std::size_t(double(n) * opt.validation + 0.5));
    std::vector<std::size_t> order(n);
    for (std::size_t i = 0; i < n; ++i) order[i] = i;
    Rng rng(detail::mix64(opt.seed));
    detail::shuffle_indices(order, rng);
    const auto b = order.begin();
    std::sort(b, b + std::ptrdiff_t(n_train));
    std::sort(b + std::ptrdiff_t(n_train), b + std::ptrdiff_t(n_train + n_val));
    std::sort(b + std::ptrdiff_t(n_train + n_val), order.end());
    for (std::size_t k = 0; k < n; ++k) {
        auto& part = k < n_train ? out.train : k < n_train + n_val ? out.validation : out.test;
        part.push_back(std::move(all[order[k]]));
    }
    return out;
}

}  // namespace patchwork
