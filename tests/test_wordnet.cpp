#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "temp_dir.hpp"
#include "patchwork/io/wordnet.hpp"

namespace pw = patchwork;
namespace fs = std::filesystem;

namespace {

const fs::path wordnet_dir = pw::wordnet_default_dir;

bool have_wordnet() {
    if (fs::exists(wordnet_dir / "data.noun")) return true;
    MESSAGE("skipped: no WordNet under ", wordnet_dir.string(), " (Debian package wordnet-base)");
    return false;
}

// A licence header like the real files' (lines starting with two spaces).
const std::string header = "  1 This software and database is being provided\n  2 under a licence\n";

void write(const fs::path& p, const std::string& s) {
    std::ofstream f(p, std::ios::binary);
    f << s;
    REQUIRE(f.good());
}

const std::string noun_line =
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04431553 n 0000 | that which is perceived "
    "or known or inferred to have its own distinct existence (living or nonliving)  \n";
const std::string adj_line =
    "00020103 00 s 02 outback(a) 0 remote_area(ip) 0 001 & 00019874 a 0000 | inaccessible; \"sparsely populated\"  \n";
const std::string verb_line =
    "00001740 29 v 02 breathe 0 take_a_breath 0 001 $ 00002325 v 0000 02 + 02 00 + 08 00 | draw air into, and expel "
    "out of, the lungs  \n";

}  // namespace

TEST_CASE("wordnet: a small file parses: lemmas without markers, '_' as space, gloss without trailing blanks") {
    pw::testing::TempDir dir("patchwork_test_wordnet");
    write(dir / "data.noun", header + noun_line);
    write(dir / "data.adj", header + adj_line);
    write(dir / "data.verb", header + verb_line);

    const auto nouns = pw::read_wordnet_data(dir / "data.noun", pw::PartOfSpeech::noun);
    REQUIRE(nouns.size() == 1);
    CHECK(nouns[0].offset == 1740);
    CHECK(nouns[0].lex_filenum == 3);
    CHECK(nouns[0].lexicographer_file() == "noun.Tops");
    CHECK(nouns[0].lemmas == std::vector<std::string>{"entity"});
    CHECK(nouns[0].gloss ==
          "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)");

    const auto adjs = pw::read_wordnet_data(dir / "data.adj", pw::PartOfSpeech::adjective);
    REQUIRE(adjs.size() == 1);
    CHECK(adjs[0].ss_type == 's');
    CHECK(adjs[0].lemmas == std::vector<std::string>{"outback", "remote area"});
    CHECK(adjs[0].text() == "outback, remote area: inaccessible; \"sparsely populated\"");

    const auto verbs = pw::read_wordnet_data(dir / "data.verb", pw::PartOfSpeech::verb);
    REQUIRE(verbs.size() == 1);
    CHECK(verbs[0].lemmas == std::vector<std::string>{"breathe", "take a breath"});
    CHECK(verbs[0].lexicographer_file() == "verb.body");
    CHECK(verbs[0].gloss == "draw air into, and expel out of, the lungs");
}

TEST_CASE("wordnet: malformed lines and missing files are IoErrors naming the file and the line") {
    pw::testing::TempDir dir("patchwork_test_wordnet");
    const fs::path p = dir / "data.noun";
    auto noun_error = [&](const std::string& body, const std::string& where, const std::string& word) {
        write(p, header + noun_line + body);
        CHECK_IO_ERROR(pw::read_wordnet_data(p, pw::PartOfSpeech::noun), p, where);
        CHECK_IO_ERROR(pw::read_wordnet_data(p, pw::PartOfSpeech::noun), p, word);
    };
    // The bad line is line 4: two licence lines, one good synset.
    noun_error("00001930 03 n 01 physical_entity 0 000\n", ":4:", "gloss");
    noun_error("0000193x 03 n 01 physical_entity 0 000 | x\n", ":4:", "synset offset");
    noun_error("00001930 3 n 01 physical_entity 0 000 | x\n", ":4:", "lex_filenum");
    noun_error("00001930 29 n 01 physical_entity 0 000 | x\n", ":4:", "verb.body");
    noun_error("00001930 03 v 01 physical_entity 0 000 | x\n", ":4:", "ss_type");
    noun_error("00001930 03 n 0g physical_entity 0 000 | x\n", ":4:", "w_cnt");
    noun_error("00001930 03 n 02 physical_entity 0 000 | x\n", ":4:", "line ends before");
    noun_error("00001930 03 n 01 physical_entity 0 002 @ 00001740 n 0000 | x\n", ":4:", "pointer");
    noun_error("00001930 03 n 01 physical_entity 0 000 extra | x\n", ":4:", "unexpected fields");
    noun_error("00001930 03 n 01 physical_entity(q) 0 000 | x\n", ":4:", "marker");
    noun_error("\n", ":4:", "empty line");
    noun_error("00001930 03 n 00 000 | x\n", ":4:", "w_cnt is 0");

    write(p, header);
    CHECK_IO_ERROR(pw::read_wordnet_data(p, pw::PartOfSpeech::noun), p, "no synsets");
    CHECK_IO_ERROR(pw::read_wordnet_data(dir / "data.none", pw::PartOfSpeech::noun), dir / "data.none",
                   "cannot open");
    // load_wordnet names the first missing file.
    write(p, header + noun_line);
    CHECK_IO_ERROR(pw::load_wordnet(dir.path), dir / "data.verb", "cannot open");
}

TEST_CASE("wordnet: the real database has WordNet 3.0's synset counts") {
    if (!have_wordnet()) return;
    const pw::WordNet wn = pw::load_wordnet();
    CHECK(wn.of(pw::PartOfSpeech::noun).size() == 82115);
    CHECK(wn.of(pw::PartOfSpeech::verb).size() == 13767);
    CHECK(wn.of(pw::PartOfSpeech::adjective).size() == 18156);
    CHECK(wn.of(pw::PartOfSpeech::adverb).size() == 3621);
    CHECK(wn.size() == 117659);

    std::map<std::string, std::size_t> per_file;
    for (const auto& part : wn.synsets)
        for (const pw::Synset& s : part) {
            ++per_file[std::string(s.lexicographer_file())];
            REQUIRE(!s.lemmas.empty());
            REQUIRE(!s.gloss.empty());
            for (const std::string& l : s.lemmas) {
                REQUIRE(l.find('_') == std::string::npos);
                REQUIRE(l.find("(a)") == std::string::npos);
            }
        }
    // Class sizes from DATA.md.
    CHECK(per_file["noun.artifact"] == 11587);
    CHECK(per_file["noun.Tops"] == 51);
    CHECK(per_file["noun.motive"] == 42);
    CHECK(per_file["adj.ppl"] == 60);
    CHECK(per_file.size() == 45);
    // The first noun synset.
    const pw::Synset& first = wn.of(pw::PartOfSpeech::noun).front();
    CHECK(first.offset == 1740);
    CHECK(first.text().rfind("entity: that which is perceived", 0) == 0);
}

TEST_CASE("wordnet: tasks have their classes, seeded disjoint splits and the documented sizes") {
    if (!have_wordnet()) return;
    const pw::WordNet wn = pw::load_wordnet();
    struct Expect {
        pw::WordNetTask task;
        std::size_t classes;
        std::size_t total;
    };
    const std::size_t adj_all_pert = wn.of(pw::PartOfSpeech::adjective).size() - 60;
    for (const Expect e : {Expect{pw::WordNetTask::noun_supersense, 26, 82115},
                           Expect{pw::WordNetTask::verb_supersense, 15, 13767},
                           Expect{pw::WordNetTask::adjective_kind, 2, adj_all_pert},
                           Expect{pw::WordNetTask::part_of_speech, 4, 117659}}) {
        CAPTURE(int(e.task));
        const pw::TextSplits s = pw::wordnet_task(wn, e.task, {.train = 0.8, .validation = 0.1, .seed = 7});
        CHECK(s.class_names.size() == e.classes);
        CHECK(s.train.size() + s.validation.size() + s.test.size() == e.total);
        CHECK(s.train.size() == std::size_t(double(e.total) * 0.8 + 0.5));
        CHECK(s.validation.size() == std::size_t(double(e.total) * 0.1 + 0.5));
        std::set<std::pair<int, std::uint32_t>> seen;
        std::vector<std::size_t> counts(e.classes, 0);
        for (const auto* part : {&s.train, &s.validation, &s.test})
            for (const pw::TextExample& x : *part) {
                REQUIRE(x.label >= 0);
                REQUIRE(std::size_t(x.label) < e.classes);
                ++counts[std::size_t(x.label)];
                REQUIRE(seen.insert({int(x.pos), x.offset}).second);  // each synset once
            }
        for (std::size_t c = 0; c < e.classes; ++c) CHECK(counts[c] > 0);
        // The same seed gives the same split; another seed another one.
        const pw::TextSplits again = pw::wordnet_task(wn, e.task, {.train = 0.8, .validation = 0.1, .seed = 7});
        const pw::TextSplits other = pw::wordnet_task(wn, e.task, {.train = 0.8, .validation = 0.1, .seed = 8});
        bool same = true, differs = false;
        for (std::size_t i = 0; i < s.test.size(); ++i) {
            same = same && s.test[i].offset == again.test[i].offset && s.test[i].text == again.test[i].text;
            differs = differs || s.test[i].offset != other.test[i].offset;
        }
        CHECK(same);
        CHECK(differs);
    }
    // Labels follow the lexicographer files.
    const pw::TextSplits nouns = pw::wordnet_task(wn, pw::WordNetTask::noun_supersense);
    CHECK(nouns.class_names.front() == "noun.Tops");
    CHECK(nouns.class_names.back() == "noun.time");
    const pw::TextSplits pos = pw::wordnet_task(wn, pw::WordNetTask::part_of_speech);
    CHECK(pos.class_names == std::vector<std::string>{"noun", "verb", "adjective", "adverb"});
    const pw::TextSplits adj = pw::wordnet_task(wn, pw::WordNetTask::adjective_kind);
    std::size_t pert = 0;
    for (const auto* part : {&adj.train, &adj.validation, &adj.test})
        for (const pw::TextExample& x : *part) pert += x.label == 1;
    std::size_t pert_expected = 0;
    for (const pw::Synset& s : wn.of(pw::PartOfSpeech::adjective)) pert_expected += s.lex_filenum == 1;
    CHECK(pert == pert_expected);
    CHECK(pert > 0);

    CHECK_THROWS_AS((void)pw::wordnet_task(wn, pw::WordNetTask::part_of_speech, {.train = 0.9, .validation = 0.2}),
                    pw::ConfigError);
}
