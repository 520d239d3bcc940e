#pragma once
// What the transformer benchmarks share (bert_bench.cpp on the CPU,
// gpu/bert_gpu.cu on the device): the seeded random token batch and the JSON
// result line, so both sides time the same inputs and print the same format.
#include <cstdint>
#include <cstdio>
#include <string>

#include "patchwork/core/random.hpp"
#include "patchwork/layers/embedding.hpp"

namespace bench {

/// b sequences of t random token ids (1000..30521, from `seed`), token types 0, full mask.
inline patchwork::TokenBatch random_batch(std::size_t b, std::size_t t, std::uint64_t seed) {
    patchwork::Rng rng(seed);
    patchwork::TokenBatch x;
    x.batch = b;
    x.tokens = t;
    for (std::size_t i = 0; i < b * t; ++i) x.ids.push_back(std::int32_t(1000 + rng.next() % (30522 - 1000)));
    x.token_types.assign(b * t, 0);
    x.mask.assign(b * t, 1);
    return x;
}

/// One result as a JSON object on its own line.
inline void emit(const std::string& name, double value, const char* unit) {
    std::printf("{\"name\": \"%s\", \"value\": %.4f, \"unit\": \"%s\"}\n", name.c_str(), value, unit);
    std::fflush(stdout);
}

}  // namespace bench
