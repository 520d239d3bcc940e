// The README's tour as a program: a two-stage cascade of tuned blocks, trained
// end to end on a synthetic task, with its parameter report. Exits non-zero if
// training fails to reduce the loss.
#include <cstdio>
#include <iostream>

#include <patchwork/patchwork.hpp>

namespace pw = patchwork;

using Encoder = pw::Sequential<pw::Linear, pw::Relu, pw::Linear, pw::LayerNorm>;
using Head = pw::Sequential<pw::Linear, pw::Relu, pw::Linear>;

// Stage 0 keeps its weights frozen and learns through an adapter and its
// LayerNorm's scale and shift; stage 1 is fine-tuned.
using Model = pw::Cascade<pw::Tune<Encoder, pw::NormPatch, pw::Adapter<8>>,  //
                          pw::Tune<Head, pw::FineTune>>;

int main() {
    pw::manual_seed(42);
    Model model{pw::Tune<Encoder, pw::NormPatch, pw::Adapter<8>>(pw::Linear(16, 64), pw::Relu{}, pw::Linear(64, 32),
                                                                 pw::LayerNorm(32)),
                pw::Tune<Head, pw::FineTune>(pw::Linear(32, 32), pw::Relu{}, pw::Linear(32, 3))};

    // A synthetic 3-class problem: the class is the argmax of three fixed projections of x.
    pw::Rng rng(7);
    pw::Tensor<float> proj(pw::Shape{3, 16});
    pw::init::normal(proj, rng, 0, 1);
    pw::VectorSource<float> train;
    for (int b = 0; b < 20; ++b) {
        pw::Batch<float> batch{pw::Tensor<float>(pw::Shape{32, 16}), {}};
        pw::init::normal(batch.x, rng, 0, 1);
        const auto scores = pw::argmax_rows(pw::Tensor<float>([&] {
            pw::Tensor<float> s(pw::Shape{32, 3});
            s.matrix() = batch.x.matrix() * proj.matrix().transpose();
            return s;
        }()));
        batch.labels.assign(scores.begin(), scores.end());
        train.push_back(std::move(batch));
    }

    pw::AdamW opt{pw::trainable_parameters(model), {.lr = 3e-3}};
    const auto before = pw::evaluate(model, train);
    const auto history = pw::fit(model, opt, train, {.epochs = 15, .schedule = pw::WarmupCosine{20, 300}});
    const auto after = pw::evaluate(model, train);

    std::cout << pw::parameter_report(model);
    std::printf("loss %.4f -> %.4f, accuracy %.1f%% -> %.1f%% in %zu steps\n", before.loss, after.loss,
                100 * before.accuracy, 100 * after.accuracy, history.steps);
    return after.loss < 0.5 * before.loss ? 0 : 1;
}
