#pragma once
// The cascade of examples/cascade_search (also timed by benchmarks/search_step):
// enhancer 784 -> 256 -> 784, recogniser 784 -> 256 -> 10, understander
// 10 -> 32 -> 4, with every block searched over {Frozen, Adapter<16>, FineTune}.
#include <cstddef>

#include <patchwork/patchwork.hpp>

namespace cascade {

namespace pw = patchwork;

constexpr std::size_t kPixels = 784, kHidden = 256, kFine = 10, kIntentHidden = 32, kCoarse = 4;
/// Coarse intent of each Fashion-MNIST class: 0 top, 1 bottom, 2 footwear, 3 bag.
constexpr int kCoarseOf[kFine] = {0, 1, 0, 0, 0, 2, 0, 2, 3, 2};

// The pre-trained models.
using EnhBlock = pw::Sequential<pw::Linear, pw::Relu>;
using Enhancer = pw::Sequential<EnhBlock, pw::Linear>;
using RecBlock = pw::Sequential<pw::Linear, pw::LayerNorm, pw::Relu>;
using Recogniser = pw::Sequential<RecBlock, pw::Linear>;
using UndBlock = pw::Sequential<pw::Linear, pw::Relu>;
using Understander = pw::Sequential<UndBlock, pw::Linear>;

// Every block searched over the paper's three operations.
using Candidates = pw::Search<pw::Frozen, pw::Adapter<16>, pw::FineTune>;
template <class M>
using S = pw::Tune<M, Candidates>;
using Model = pw::Cascade<pw::Sequential<S<EnhBlock>, S<pw::Linear>>, pw::Sequential<S<RecBlock>, S<pw::Linear>>,
                          pw::Sequential<S<UndBlock>, S<pw::Linear>>>;
constexpr std::size_t kFrozen = 0, kAdapter = 1, kFineTune = 2, kModules = 6;

/// A cascade with freshly initialised stages (the benchmark's stand-in for pre-trained ones).
inline Model random_model() {
    using E = pw::Sequential<S<EnhBlock>, S<pw::Linear>>;
    using R = pw::Sequential<S<RecBlock>, S<pw::Linear>>;
    using U = pw::Sequential<S<UndBlock>, S<pw::Linear>>;
    Model m(E(S<EnhBlock>(pw::Linear(kPixels, kHidden), pw::Relu{}), S<pw::Linear>(kHidden, kPixels)),
            R(S<RecBlock>(pw::Linear(kPixels, kHidden), pw::LayerNorm(kHidden), pw::Relu{}), S<pw::Linear>(kHidden, kFine)),
            U(S<UndBlock>(pw::Linear(kFine, kIntentHidden), pw::Relu{}), S<pw::Linear>(kIntentHidden, kCoarse)));
    m.set_input_grad(false);
    return m;
}

}  // namespace cascade
