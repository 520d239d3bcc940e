// WordPieceTokenizer: rules on a small hand-made vocabulary, and id-for-id
// agreement with Hugging Face's Python BERT tokenizer on the fixture of
// tests/data/tokenizer (5,000 WordNet texts, edge cases, pairs, truncation,
// padding). The fixture cases need all-MiniLM-L6-v2's vocab.txt under
// $PATCHWORK_MODEL_DIR (default ~/.cache/patchwork/models, scripts/fetch-model)
// and report themselves skipped without it; the program exits 77 (skipped)
// when every case it ran was skipped.
#include <doctest/doctest.h>

#include <zlib.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "temp_dir.hpp"
#include "patchwork/io/wordnet.hpp"
#include "patchwork/text/wordpiece.hpp"

namespace pw = patchwork;
namespace fs = std::filesystem;
using Ids = std::vector<std::int32_t>;

namespace {

// ---- skipping ---------------------------------------------------------------

int cases_run = 0;
int cases_skipped = 0;

void skip(const std::string& why) {
    MESSAGE("skipped: ", why);
    ++cases_skipped;
}

/// Exit 77 (meson: skipped) when every case that ran was skipped.
struct SkipListener : doctest::IReporter {
    explicit SkipListener(const doctest::ContextOptions&) {}
    void report_query(const doctest::QueryData&) override {}
    void test_run_start() override {}
    void test_run_end(const doctest::TestRunStats& stats) override {
        if (cases_run > 0 && cases_skipped == cases_run && stats.numTestCasesFailed == 0)
            std::atexit([] {
                std::fflush(nullptr);
                std::_Exit(77);
            });
    }
    void test_case_start(const doctest::TestCaseData&) override { ++cases_run; }
    void test_case_reenter(const doctest::TestCaseData&) override {}
    void test_case_end(const doctest::CurrentTestCaseStats&) override {}
    void test_case_exception(const doctest::TestCaseException&) override {}
    void subcase_start(const doctest::SubcaseSignature&) override {}
    void subcase_end() override {}
    void log_assert(const doctest::AssertData&) override {}
    void log_message(const doctest::MessageData&) override {}
    void test_case_skipped(const doctest::TestCaseData&) override {}
};
REGISTER_LISTENER("skip_exit_77", 1, SkipListener);

// ---- the model's vocabulary and the fixture ---------------------------------

fs::path model_vocab() {
    const char* dir = std::getenv("PATCHWORK_MODEL_DIR");
    const char* home = std::getenv("HOME");
    const fs::path base = dir && *dir ? fs::path(dir) : fs::path(home ? home : "/root") / ".cache/patchwork/models";
    return base / "all-MiniLM-L6-v2" / "vocab.txt";
}

/// The model's tokenizer, or nullopt (and the case is reported skipped).
std::optional<pw::WordPieceTokenizer> model_tokenizer() {
    const fs::path vocab = model_vocab();
    if (!fs::exists(vocab)) {
        skip("no " + vocab.string() + " (run scripts/fetch-model or set PATCHWORK_MODEL_DIR)");
        return std::nullopt;
    }
    return pw::WordPieceTokenizer::from_vocab(vocab);
}

fs::path fixture_path() {
    const char* data = std::getenv("PATCHWORK_TEST_DATA");
    return fs::path(data ? data : "tests/data") / "tokenizer" / "fixture.jsonl.gz";
}

std::vector<nlohmann::json> read_fixture() {
    const fs::path p = fixture_path();
    gzFile f = gzopen(p.string().c_str(), "rb");
    REQUIRE_MESSAGE(f != nullptr, "cannot open ", p.string());
    std::string text;
    char buf[1 << 16];
    int n;
    while ((n = gzread(f, buf, sizeof buf)) > 0) text.append(buf, std::size_t(n));
    gzclose(f);
    REQUIRE(n == 0);
    std::vector<nlohmann::json> rows;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) rows.push_back(nlohmann::json::parse(line));
    return rows;
}

const pw::WordNet& wordnet() {
    static const pw::WordNet wn = pw::load_wordnet();
    return wn;
}

/// The text of a fixture reference: a literal string or {"wn": [pos, offset]}.
std::string resolve(const nlohmann::json& ref) {
    if (ref.is_string()) return ref.get<std::string>();
    static std::map<std::pair<std::string, std::uint32_t>, std::string> texts = [] {
        std::map<std::pair<std::string, std::uint32_t>, std::string> m;
        const char* names[] = {"noun", "verb", "adj", "adv"};
        for (std::size_t p = 0; p < 4; ++p)
            for (const pw::Synset& s : wordnet().synsets[p]) m[{names[p], s.offset}] = s.text();
        return m;
    }();
    const auto key = std::make_pair(ref["wn"][0].get<std::string>(), ref["wn"][1].get<std::uint32_t>());
    const auto it = texts.find(key);
    REQUIRE_MESSAGE(it != texts.end(), "no WordNet synset ", key.first, " ", key.second);
    return it->second;
}

std::string show(const pw::WordPieceTokenizer& tok, const Ids& ids) {
    std::string s;
    for (const std::int32_t id : ids) {
        if (!s.empty()) s += ' ';
        s += tok.id_to_token(id) + "(" + std::to_string(id) + ")";
    }
    return s;
}

/// Compares and prints the first `budget` mismatches in full.
struct Mismatches {
    const pw::WordPieceTokenizer& tok;
    int count = 0;
    int budget = 8;
    void check(const std::string& what, const Ids& expected, const Ids& got) {
        if (expected == got) return;
        ++count;
        if (count <= budget)
            std::cout << "MISMATCH " << what << "\n  expected: " << show(tok, expected) << "\n  got:      "
                      << show(tok, got) << "\n";
    }
};

Ids ids_of(const nlohmann::json& j) { return j.get<Ids>(); }

// ---- a small vocabulary written by hand -------------------------------------

pw::WordPieceTokenizer small_tokenizer() {
    return pw::WordPieceTokenizer::from_tokens({
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",                          // 0-4
        "un", "##aff", "##able", "hello", "world", ",", "!", ".", "'", "-",  // 5-14
        "caf", "##e", "naive", "a", "##a", "中", "文", "σ", "ς", "οδος",       // 15-24
        "i", "angstrom", "$", "the", "##s", "b", "α", "##ς", "##σ", "##α",     // 25-34
        "[", "]",                                                              // 35-36
    });
}

}  // namespace

TEST_CASE("tokenizer: greedy longest match, ## continuations, [UNK] for uncovered or overlong words") {
    const auto tok = small_tokenizer();
    using V = std::vector<std::string>;
    CHECK(tok.tokenize("unaffable") == V{"un", "##aff", "##able"});
    CHECK(tok.tokenize("UnAffable, Hello World!") == V{"un", "##aff", "##able", ",", "hello", "world", "!"});
    // One uncovered character makes the whole word one [UNK], not a partial split.
    CHECK(tok.tokenize("unaffablex hello") == V{"[UNK]", "hello"});
    CHECK(tok.tokenize("thes the") == V{"the", "##s", "the"});
    // 100 characters are split; 101 are one [UNK] (counted in code points, after lower-casing).
    const auto hundred = tok.tokenize(std::string(100, 'A'));
    REQUIRE(hundred.size() == 100);
    CHECK(hundred.front() == "a");
    CHECK(hundred.back() == "##a");
    CHECK(tok.tokenize(std::string(101, 'a')) == V{"[UNK]"});
    CHECK(tok.tokenize("") == V{});
    CHECK(tok.tokenize(" \t\r\n ") == V{});
}

TEST_CASE("tokenizer: cleaning, accents, CJK, punctuation and sigma as the reference does them") {
    const auto tok = small_tokenizer();
    using V = std::vector<std::string>;
    CHECK(tok.tokenize("Café NAÏVE") == V{"caf", "##e", "naive"});
    CHECK(tok.tokenize("Cafe\u0301") == V{"caf", "##e"});            // combining acute dropped
    CHECK(tok.tokenize("\u212Bngstrom") == V{"angstrom"});             // angstrom sign -> A + ring
    CHECK(tok.tokenize("he\u200Bllo wo\x01rld\x7f") == V{"hello", "world"});  // Cf and Cc dropped, not split
    CHECK(tok.tokenize("hello\u00A0world\u2028hello\u2029world") == V{"hello", "world", "hello", "world"});
    CHECK(tok.tokenize("a中文b") == V{"a", "中", "文", "b"});
    using namespace std::string_literals;
    CHECK(tok.tokenize("hello\uFFFD\0world"s) == V{"[UNK]"});  // "helloworld" is one uncovered word
    CHECK(tok.tokenize("$hello-world's.") == V{"$", "hello", "-", "world", "'", "[UNK]", "."});
    CHECK(tok.tokenize("\u0130") == V{"i"});  // Python lower(): i + combining dot, then the dot is dropped
    // Final sigma: at the end of a word after a cased letter; plain sigma elsewhere.
    CHECK(tok.tokenize("ΟΔΟΣ") == V{"οδος"});
    CHECK(tok.tokenize("Σ") == V{"σ"});
    CHECK(tok.tokenize("ΑΣ.") == V{"α", "##ς", "."});  // '.' is case-ignorable: still the end of the word
    CHECK(tok.tokenize("ΑΣΑ") == V{"α", "##σ", "##α"});
    CHECK(tok.tokenize("Α\u0301Σ") == V{"α", "##ς"});  // a mark between is skipped
    CHECK(tok.tokenize("ΑΣ\u200BΑ") == V{"α", "##σ", "##α"});  // U+200B is dropped before lower-casing
    CHECK(tok.tokenize("ΑΣ Α") == V{"α", "##ς", "α"});
    // Special tokens in the text are their ids unless split_special_tokens.
    CHECK(tok.tokenize("hello[MASK]world [SEP]") == V{"hello", "[MASK]", "world", "[SEP]"});
    CHECK(tok.tokenize("hello [mask]") == V{"hello", "[", "[UNK]", "]"});
    CHECK(tok.tokenize("[MASK]", true) == V{"[", "[UNK]", "]"});
}

TEST_CASE("tokenizer: invalid UTF-8 is a TextError naming the byte") {
    const auto tok = small_tokenizer();
    for (const std::string& bad : {std::string("ab\xC3"), std::string("\xC0\x80"), std::string("x\xED\xA0\x80"),
                                  std::string("\xF4\x90\x80\x80"), std::string("hello \x80"),
                                  std::string("\xE2\x82"), std::string("\xFF")}) {
        CAPTURE(bad);
        std::string msg;
        try {
            (void)tok.tokenize(bad);
        } catch (const pw::TextError& e) {
            msg = e.what();
        }
        CHECK(msg.find("invalid UTF-8 at byte") != std::string::npos);
    }
    try {
        (void)tok.encode("hello \x80 world");
        FAIL("no TextError");
    } catch (const pw::TextError& e) {
        CHECK(std::string(e.what()).find("byte 6") != std::string::npos);
        CHECK(std::string(e.what()).find("0x80") != std::string::npos);
    }
}

TEST_CASE("tokenizer: encode, pairs, truncation and padding") {
    const auto tok = small_tokenizer();
    const auto e = tok.encode("hello world");
    CHECK(e.ids == Ids{2, 8, 9, 3});
    CHECK(e.token_type_ids == Ids{0, 0, 0, 0});
    CHECK(e.attention_mask == Ids{1, 1, 1, 1});
    CHECK(tok.encode("hello world", {.add_special_tokens = false}).ids == Ids{8, 9});
    CHECK(tok.encode("hello world hello", {.max_length = 3}).ids == Ids{2, 8, 3});

    const auto p = tok.encode("hello", "world !");
    CHECK(p.ids == Ids{2, 8, 3, 9, 11, 3});
    CHECK(p.token_type_ids == Ids{0, 0, 0, 1, 1, 1});
    // Longest first: 4 + 2 word pieces into 6 - 3 = 3 slots: the longer side
    // loses 2 to reach 2 + 2, then 1 more, from the second side.
    const auto t = tok.encode("hello world hello world", "a b", {.max_length = 6});
    CHECK(t.ids == Ids{2, 8, 9, 3, 18, 3});
    const auto t2 = tok.encode("a b", "hello world hello world", {.max_length = 7});
    CHECK(t2.ids == Ids{2, 18, 30, 3, 8, 9, 3});
    const auto padded = tok.encode("hello", {.max_length = 6, .padding = pw::Padding::max_length});
    CHECK(padded.ids == Ids{2, 8, 3, 0, 0, 0});
    CHECK(padded.attention_mask == Ids{1, 1, 1, 0, 0, 0});
    CHECK_THROWS_AS((void)tok.encode("hello", {.max_length = 1}), pw::ConfigError);
    CHECK_THROWS_AS((void)tok.encode("a", "b", {.max_length = 2}), pw::ConfigError);
    CHECK_THROWS_AS((void)tok.encode("a", {.max_length = 0, .padding = pw::Padding::max_length}), pw::ConfigError);

    const std::vector<std::string> texts{"hello world !", "", "un"};
    const auto b = tok.encode_batch(texts);
    CHECK(b.shape() == std::array<std::size_t, 2>{3, 5});
    CHECK(b.lengths == std::vector<std::size_t>{5, 2, 3});
    CHECK(b.ids == Ids{2, 8, 9, 11, 3, /**/ 2, 3, 0, 0, 0, /**/ 2, 5, 3, 0, 0});
    CHECK(b.attention_mask == Ids{1, 1, 1, 1, 1, /**/ 1, 1, 0, 0, 0, /**/ 1, 1, 1, 0, 0});
    const auto fixed = tok.encode_batch(texts, {.max_length = 4, .padding = pw::Padding::max_length});
    CHECK(fixed.shape() == std::array<std::size_t, 2>{3, 4});
    CHECK(fixed.row_ids(0).size() == 4);
    CHECK(Ids(fixed.row_ids(0).begin(), fixed.row_ids(0).end()) == Ids{2, 8, 9, 3});
    const std::vector<std::string> seconds{"a", "b", "hello"};
    const auto pairs = tok.encode_batch(texts, seconds);
    CHECK(Ids(pairs.row_token_types(1).begin(), pairs.row_token_types(1).end()) == Ids{0, 0, 1, 1, 0, 0, 0});
    CHECK_THROWS_AS((void)tok.encode_batch(texts, std::vector<std::string>{"a"}), pw::ConfigError);
}

TEST_CASE("tokenizer: vocabulary files: line endings, repeated tokens, errors name the file") {
    pw::testing::TempDir dir("patchwork_test_tokenizer");
    const fs::path p = dir / "vocab.txt";
    auto write = [&](const std::string& s) {
        std::ofstream f(p, std::ios::binary);
        f << s;
    };
    write("[PAD]\r\n[UNK]\r[CLS]\n[SEP]\nhello\nhello\n");
    const auto tok = pw::WordPieceTokenizer::from_vocab(p);
    CHECK(tok.vocab_size() == 6);
    CHECK(tok.cls_id() == 2);
    CHECK(tok.mask_id() == -1);
    CHECK(tok.token_to_id("hello") == 5);  // the last line wins, as in a Python dict
    CHECK(tok.id_to_token(4) == "hello");
    CHECK_THROWS_AS((void)tok.id_to_token(6), pw::TextError);

    write("[PAD]\n[CLS]\n[SEP]\nhello\n");
    CHECK_IO_ERROR(pw::WordPieceTokenizer::from_vocab(p), p, "[UNK]");
    write("[PAD]\n[UNK]\n[CLS]\n[SEP]\nbad\xC3(\n");
    CHECK_IO_ERROR(pw::WordPieceTokenizer::from_vocab(p), p, "line 5");
    CHECK_IO_ERROR(pw::WordPieceTokenizer::from_vocab(dir / "missing.txt"), dir / "missing.txt", "cannot open");
}

TEST_CASE("tokenizer: the model's vocabulary: special ids") {
    const auto tok = model_tokenizer();
    if (!tok) return;
    CHECK(tok->vocab_size() == 30522);
    CHECK(tok->pad_id() == 0);
    CHECK(tok->unk_id() == 100);
    CHECK(tok->cls_id() == 101);
    CHECK(tok->sep_id() == 102);
    CHECK(tok->mask_id() == 103);
}

TEST_CASE("tokenizer: id for id the Python reference on the fixture") {
    const auto tok = model_tokenizer();
    if (!tok) return;
    if (!fs::exists(pw::wordnet_default_dir)) {
        skip("no WordNet under /usr/share/wordnet (Debian package wordnet-base)");
        return;
    }
    const auto rows = read_fixture();
    Mismatches bad{*tok};
    std::map<std::string, int> kinds;
    for (const auto& r : rows) {
        const std::string kind = r["kind"];
        ++kinds[kind];
        if (kind == "wordnet" || kind == "text") {
            const std::string text = kind == "text" ? r["text"].get<std::string>()
                                                    : resolve({{"wn", {r["pos"], r["offset"]}}});
            bad.check(kind + " " + nlohmann::json(text).dump(), ids_of(r["ids"]), tok->encode(text, {.max_length = 0}).ids);
        } else if (kind == "single") {
            const std::string a = resolve(r["a"]);
            bad.check("single max_length " + r["max_length"].dump() + " " + nlohmann::json(a).dump(), ids_of(r["ids"]),
                      tok->encode(a, {.max_length = r["max_length"]}).ids);
        } else if (kind == "pair") {
            const std::string a = resolve(r["a"]), b = resolve(r["b"]);
            const auto e = tok->encode(a, b, {.max_length = r["max_length"]});
            const std::string what =
                "pair max_length " + r["max_length"].dump() + " " + nlohmann::json(a).dump() + " / " + nlohmann::json(b).dump();
            bad.check(what, ids_of(r["ids"]), e.ids);
            bad.check(what + " (token types)", ids_of(r["type_ids"]), e.token_type_ids);
        } else if (kind == "batch") {
            std::vector<std::string> texts;
            for (const auto& t : r["texts"]) texts.push_back(resolve(t));
            const bool fixed = r["padding"] == "max_length";
            const std::size_t n = r["max_length"];
            const auto b = tok->encode_batch(
                texts, {.max_length = n, .padding = fixed ? pw::Padding::max_length : pw::Padding::longest});
            const auto expected = r["ids"].get<std::vector<Ids>>();
            const auto mask = r["mask"].get<std::vector<Ids>>();
            REQUIRE(b.batch == expected.size());
            for (std::size_t i = 0; i < b.batch; ++i) {
                CHECK(b.tokens == expected[i].size());
                const auto row = b.row_ids(i);
                const auto m = b.row_mask(i);
                bad.check("batch row " + std::to_string(i), expected[i], Ids(row.begin(), row.end()));
                bad.check("batch mask " + std::to_string(i), mask[i], Ids(m.begin(), m.end()));
            }
        } else {
            FAIL("unknown fixture kind ", kind);
        }
    }
    MESSAGE(rows.size(), " fixture cases: ", kinds["wordnet"], " WordNet texts, ", kinds["text"], " edge cases, ",
            kinds["single"] + kinds["pair"], " truncations, ", kinds["batch"], " batches; ", bad.count, " mismatches");
    CHECK(kinds["wordnet"] >= 5000);
    CHECK(kinds["text"] >= 50);
    CHECK(bad.count == 0);
}

TEST_CASE("tokenizer: concurrent use gives the same ids") {
    const auto tok = model_tokenizer();
    if (!tok) return;
    std::vector<std::string> texts;
    for (const pw::Synset& s : wordnet().of(pw::PartOfSpeech::verb)) texts.push_back(s.text());
    const auto reference = tok->encode_batch(texts);
    pw::BatchEncoding other[2];
    std::thread a([&] { other[0] = tok->encode_batch(texts); });
    std::thread b([&] { other[1] = tok->encode_batch(texts); });
    a.join();
    b.join();
    CHECK(other[0].ids == reference.ids);
    CHECK(other[1].ids == reference.ids);
}
