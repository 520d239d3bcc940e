// Google Benchmark: WordPieceTokenizer on every WordNet gloss text (117,659
// texts of io/wordnet.hpp's Synset::text(), about 10 MB), one thread.
//
//   Tokenizer/encode         encode(text) per text: [CLS] ... [SEP], no truncation
//   Tokenizer/encode_batch   encode_batch over 128 texts at a time, truncated to 128
//                            tokens and padded to the longest row
//   Tokenizer/append_ids     the word pieces alone, appended to one reused vector
// Counters: texts/s (items_per_second), MB/s of UTF-8 input (bytes_per_second)
// and tokens per text. benchmarks/torch_tokenizer.py measures Hugging Face's
// tokenizers (Rust) on the same texts, one thread.
//
// Needs all-MiniLM-L6-v2's vocab.txt under $PATCHWORK_MODEL_DIR (default
// ~/.cache/patchwork/models; scripts/fetch-model) and WordNet under
// /usr/share/wordnet; without them it says so and exits 0.
#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <span>
#include <string>
#include <vector>

#include "patchwork/io/wordnet.hpp"
#include "patchwork/text/wordpiece.hpp"

namespace {

namespace pw = patchwork;
namespace fs = std::filesystem;

struct Corpus {
    std::vector<std::string> texts;
    std::size_t bytes = 0;
};

const Corpus* corpus = nullptr;
const pw::WordPieceTokenizer* tokenizer = nullptr;

void set_counters(benchmark::State& state, std::size_t tokens) {
    const auto n = std::int64_t(corpus->texts.size());
    state.SetItemsProcessed(state.iterations() * n);
    state.SetBytesProcessed(state.iterations() * std::int64_t(corpus->bytes));
    state.counters["tokens_per_text"] = double(tokens) / double(n);
    state.counters["tokens"] = double(tokens);
}

void encode(benchmark::State& state) {
    std::size_t tokens = 0;
    for (auto _ : state) {
        tokens = 0;
        for (const std::string& t : corpus->texts) {
            const pw::Encoding e = tokenizer->encode(t, {.max_length = 0});
            tokens += e.size();
            benchmark::DoNotOptimize(e.ids.data());
        }
    }
    set_counters(state, tokens);
}

void encode_batch(benchmark::State& state) {
    constexpr std::size_t batch = 128;
    const std::span<const std::string> all(corpus->texts);
    std::size_t tokens = 0;
    for (auto _ : state) {
        tokens = 0;
        for (std::size_t i = 0; i < all.size(); i += batch) {
            const auto b = tokenizer->encode_batch(all.subspan(i, std::min(batch, all.size() - i)),
                                                   {.max_length = 128, .padding = pw::Padding::longest});
            for (const std::size_t n : b.lengths) tokens += n;
            benchmark::DoNotOptimize(b.ids.data());
        }
    }
    set_counters(state, tokens);
}

void append_ids(benchmark::State& state) {
    std::vector<std::int32_t> ids;
    std::size_t tokens = 0;
    for (auto _ : state) {
        tokens = 0;
        for (const std::string& t : corpus->texts) {
            ids.clear();
            tokenizer->append_ids(t, ids);
            tokens += ids.size();
            benchmark::DoNotOptimize(ids.data());
        }
    }
    set_counters(state, tokens);
}

}  // namespace

int main(int argc, char** argv) {
    const char* dir = std::getenv("PATCHWORK_MODEL_DIR");
    const char* home = std::getenv("HOME");
    const fs::path vocab = (dir && *dir ? fs::path(dir) : fs::path(home ? home : "/root") / ".cache/patchwork/models") /
                           "all-MiniLM-L6-v2" / "vocab.txt";
    if (!fs::exists(vocab) || !fs::exists(fs::path(pw::wordnet_default_dir) / "data.noun")) {
        std::cout << "tokenizer_bench: skipped, needs " << vocab.string() << " (scripts/fetch-model) and WordNet under "
                  << pw::wordnet_default_dir << "\n";
        return 0;
    }
    const pw::WordPieceTokenizer tok = pw::WordPieceTokenizer::from_vocab(vocab);
    Corpus c;
    const pw::WordNet wn = pw::load_wordnet();
    for (const auto& part : wn.synsets)
        for (const pw::Synset& s : part) {
            c.texts.push_back(s.text());
            c.bytes += c.texts.back().size();
        }
    corpus = &c;
    tokenizer = &tok;
    benchmark::AddCustomContext("texts", std::to_string(c.texts.size()));
    benchmark::AddCustomContext("utf8_bytes", std::to_string(c.bytes));
    benchmark::AddCustomContext("threads", "1");
    benchmark::RegisterBenchmark("Tokenizer/encode", encode)->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("Tokenizer/encode_batch", encode_batch)->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("Tokenizer/append_ids", append_ids)->Unit(benchmark::kMillisecond);
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
