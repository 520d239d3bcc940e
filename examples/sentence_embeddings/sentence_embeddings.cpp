// Sentence embeddings with the pre-trained all-MiniLM-L6-v2: tokenize a few
// sentences, run the 6-layer BERT, mean-pool over the real tokens, normalise,
// and print the cosine similarity of every pair.
//
//   scripts/fetch-model                       # once: caches the model
//   build/examples/sentence_embeddings/sentence_embeddings [model-dir] ["sentence" ...]
//
// Exit status 77 (and a message) when the model is not there.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <patchwork/patchwork.hpp>
#include <patchwork/text/wordpiece.hpp>
#include <patchwork/transformer/bert.hpp>
#include <patchwork/transformer/hf_checkpoint.hpp>

namespace pw = patchwork;
namespace fs = std::filesystem;

int main(int argc, char** argv) {
    fs::path dir;
    if (argc > 1) dir = argv[1];
    else dir = pw::hf::model_cache_dir();
    if (!fs::exists(dir / "model.safetensors")) {
        std::printf("no model at %s: run scripts/fetch-model first\n", dir.string().c_str());
        return 77;
    }
    std::vector<std::string> sentences = {
        "A man is playing a guitar.",
        "Someone plays an instrument on stage.",
        "The stock market fell sharply today.",
        "Share prices dropped at the close of trading.",
        "A cat sleeps on the warm windowsill.",
    };
    if (argc > 2) sentences.assign(argv + 2, argv + argc);

    try {
        using Model = pw::BertModel<pw::BertEncoder<>>;  // frozen: inference only
        Model model = pw::hf::load_bert<Model>(dir);
        const auto tokenizer = pw::WordPieceTokenizer::from_vocab(dir / "vocab.txt");
        const pw::TokenBatch batch = pw::TokenBatch::from(tokenizer.encode_batch(sentences, {.max_length = 256}));
        pw::Pooler pool;  // mean over the real tokens, as sentence-transformers does
        pw::Tensor<float> e = pool.forward(model.forward(batch), batch);
        const std::size_t n = e.dim(0);
        for (std::size_t i = 0; i < n; ++i) e.matrix().row(Eigen::Index(i)).normalize();
        std::printf("%zu sentences, %zu x %zu tokens, embeddings of %zu\n", n, batch.batch, batch.tokens, e.dim(1));
        for (std::size_t i = 0; i < n; ++i) std::printf("  [%zu] %s\n", i, sentences[i].c_str());
        std::printf("cosine similarity:\n      ");
        for (std::size_t j = 0; j < n; ++j) std::printf("  [%zu] ", j);
        std::printf("\n");
        for (std::size_t i = 0; i < n; ++i) {
            std::printf("  [%zu]", i);
            for (std::size_t j = 0; j < n; ++j)
                std::printf(" %5.2f", double(e.matrix().row(Eigen::Index(i)).dot(e.matrix().row(Eigen::Index(j)))));
            std::printf("\n");
        }
    } catch (const pw::Error& err) {
        std::fprintf(stderr, "sentence_embeddings: %s\n", err.what());
        return 1;
    }
    return 0;
}
