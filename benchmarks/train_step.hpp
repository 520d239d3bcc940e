#pragma once
// One training step as every benchmark times it, the same as
// benchmarks/torch_step.py does in PyTorch:
//
//   opt.zero_grad(); logits = model.forward(x); {loss, g} = cross_entropy(logits, y);
//   model.backward(g); opt.step();            (AdamW, lr 1e-3, weight decay 0.01)
//
// The input is a pool of random samples (uniform in [-1, 1)) with random
// labels, held in memory and cycled batch by batch. A single repeated batch
// would be memorised within a few dozen steps, after which gradients and
// Adam's second moments underflow into denormals and every step slows down
// for reasons that have nothing to do with the library; with random labels
// over a pool the loss stays near ln(classes).
#include <cstddef>
#include <span>
#include <vector>

#include "common.hpp"
#include "example_model.hpp"
#include "patchwork/core/module.hpp"
#include "patchwork/core/random.hpp"
#include "patchwork/train/loss.hpp"
#include "patchwork/train/optimizer.hpp"

namespace bench {

/// Samples in the input pool of a step benchmark (as torch_step.py's POOL_SAMPLES).
inline constexpr std::size_t kPoolSamples = 16384;

template <class Model>
class TrainStep {
public:
    /// `pool_batches` = 0: kPoolSamples / batch batches (at least one).
    TrainStep(Model& model, std::size_t batch, std::size_t in = kIn, std::size_t classes = kClasses,
              std::size_t pool_batches = 0)
        : model_(model),
          opt_(patchwork::trainable_parameters(model), patchwork::AdamWOptions{.lr = 1e-3, .weight_decay = 1e-2}) {
        const std::size_t n = pool_batches ? pool_batches : (kPoolSamples / batch ? kPoolSamples / batch : 1);
        patchwork::Rng rng(11);
        for (std::size_t i = 0; i < n; ++i) {
            xs_.push_back(random_tensor({batch, in}, 100 + i));
            std::vector<int> y(batch);
            for (auto& label : y) label = int(rng.next() % classes);
            ys_.push_back(std::move(y));
        }
    }

    /// One step on the next batch of the pool; returns the loss.
    float run() {
        const std::size_t i = next_;
        next_ = (next_ + 1) % xs_.size();
        opt_.zero_grad();
        const auto& logits = model_.forward(xs_[i]);
        const auto loss = patchwork::cross_entropy(logits, std::span<const int>(ys_[i]));
        model_.backward(loss.grad);
        opt_.step();
        return loss.value;
    }

    [[nodiscard]] patchwork::AdamW& optimizer() noexcept { return opt_; }

private:
    Model& model_;
    patchwork::AdamW opt_;
    std::vector<patchwork::Tensor<float>> xs_;
    std::vector<std::vector<int>> ys_;
    std::size_t next_ = 0;
};

}  // namespace bench
