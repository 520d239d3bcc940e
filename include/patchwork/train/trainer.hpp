#pragma once
// fit(): the training loop, and evaluate(): loss and accuracy over a source.
//
// Each step of fit, for a batch (x, labels) and global step s (0-based, over all epochs):
//   opt.set_lr_factor(schedule(s))            (when a schedule is given)
//   zero_grad(model)
//   y = model.forward(x);  {L, dL/dy} = loss_fn(y, batch)
//   model.backward(dL/dy)                     (the model's input gradient is off)
//   clip_grad_norm(model, clip_norm)          (when clip_norm > 0)
//   opt.step()
// (train_step of train/step.hpp, which fit_multitask and search::run share).
// The epoch loss is the sample-weighted mean of the batch losses, i.e. the mean
// over every sample of the epoch (each batch loss is a mean over its rows).
// When batches carry one label per output row, training accuracy (argmax) is
// recorded too.
//
//     pw::AdamW opt{pw::trainable_parameters(model), {.lr = 1e-3}};
//     auto history = pw::fit(model, opt, train_batches,
//                            {.epochs = 5, .schedule = pw::WarmupCosine{100, 5 * train_batches.batches()},
//                             .clip_norm = 1.0});
//     auto [loss, acc, n] = pw::evaluate(model, test_batches);
//
// The loss function is any callable `Loss<T>(const Tensor<T>& y, const Batch<T>& b)`
// or `Loss<T>(const Tensor<T>& y, std::span<const int> labels)`; the default
// is softmax cross-entropy.
//
// A model on the GPU (Device = Cuda) trains with the same call: the batches
// stay on the host (any BatchSource), each x is copied to the device before
// its forward, the loss takes the device output (Loss<T, Cuda>: the default
// cross-entropy runs its kernel with host labels), the optimiser and clipping
// run on the device, and only the loss value (and, for the accuracy, the
// logits) come back. A bf16 device model takes the same float batches
// (batch_scalar_t): each x is rounded to bf16 on the host before its copy.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <iostream>
#include <optional>
#include <ostream>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/module.hpp"
#include "patchwork/core/random.hpp"
#include "patchwork/train/batch.hpp"
#include "patchwork/train/clip.hpp"
#include "patchwork/train/loss.hpp"
#include "patchwork/train/metrics.hpp"
#include "patchwork/train/optimizer.hpp"
#include "patchwork/train/progress.hpp"
#include "patchwork/train/schedule.hpp"
#include "patchwork/train/step.hpp"

namespace patchwork {

/// The element type of the host batches a model of element type T trains
/// and evaluates on: T itself, and float for a bf16 (device) model, whose
/// inputs are rounded to bf16 on their way to the device.
template <class T>
using batch_scalar_t = std::conditional_t<std::is_same_v<T, bf16>, float, T>;

/// The default loss: mean softmax cross-entropy against the batch labels.
struct CrossEntropyLoss {
    template <class T, class D, class B>
    [[nodiscard]] Loss<T, D> operator()(const Tensor<T, D>& logits, const Batch<B>& batch) const {
        return cross_entropy(logits, std::span<const int>(batch.labels));
    }
};

/// A callable usable as fit's loss: takes the model output (on the model's
/// device D) and the batch (or its labels).
template <class F, class T, class D = Cpu>
concept LossFunction =
    std::is_invocable_r_v<Loss<T, D>, F&, const Tensor<T, D>&, const Batch<batch_scalar_t<T>>&> ||
    std::is_invocable_r_v<Loss<T, D>, F&, const Tensor<T, D>&, std::span<const int>>;

namespace detail {
template <class T, class D, class F>
Loss<T, D> call_loss(F& f, const Tensor<T, D>& y, const Batch<batch_scalar_t<T>>& b) {
    if constexpr (std::is_invocable_r_v<Loss<T, D>, F&, const Tensor<T, D>&, const Batch<batch_scalar_t<T>>&>)
        return std::invoke(f, y, b);
    else
        return std::invoke(f, y, std::span<const int>(b.labels));
}

/// The model input for batch x: x itself on the CPU; on the device, x copied
/// into `staging` (kept between steps, so its allocation is reused); for a
/// bf16 model, x rounded to bf16 (to nearest even) on the host first.
template <class B, class T, class D>
const Tensor<T, D>& on_device_of(const Tensor<B>& x, Tensor<T, D>& staging) {
    if constexpr (std::is_same_v<D, Cpu>) {
        static_assert(std::is_same_v<B, T>);
        return x;
    } else {
        staging.resize(x.shape());
        if constexpr (std::is_same_v<B, T>) copy(x, staging);
        else copy(cast<T>(x), staging);
        return staging;
    }
}

/// count_correct of logits on either device (device logits are read back; bf16 ones as float).
template <class T, class D>
std::size_t count_correct_any(const Tensor<T, D>& y, std::span<const int> labels) {
    if constexpr (std::is_same_v<D, Cpu>) return count_correct(y, labels);
    else if constexpr (std::is_same_v<T, bf16>) return count_correct(cast<float>(to_host(y)), labels);
    else return count_correct(to_host(y), labels);
}

/// Samples in a batch: one per label, else the leading dimension of x.
template <class T>
std::size_t batch_samples(const Batch<T>& b) {
    if (!b.labels.empty()) return b.labels.size();
    return b.x.rank() ? b.x.dim(0) : 0;
}

/// Whether accuracy can be measured: one label per output row.
template <class T, class D, class B>
bool has_class_labels(const Tensor<T, D>& y, const Batch<B>& b) {
    return !b.labels.empty() && y.rank() >= 1 && y.cols() >= 1 && y.rows() == b.labels.size();
}
}  // namespace detail

/// What one epoch of fit() did.
struct EpochStats {
    std::size_t epoch = 0;           ///< 0-based
    double loss = 0;                 ///< mean training loss over the epoch's samples
    std::optional<double> accuracy{};  ///< training accuracy in [0, 1], when batches have labels
    std::size_t steps = 0;
    std::size_t samples = 0;
    double seconds = 0;              ///< wall time of the epoch
    double samples_per_second = 0;
    double lr = 0;                   ///< the optimiser's effective rate (group 0) at the epoch's last step
    double max_grad_norm = 0;        ///< largest pre-clipping gradient norm seen (when clipping is on)
};

/// Options of fit(). Designated initialisers: `{.epochs = 3, .clip_norm = 1.0}`.
struct TrainOptions {
    std::size_t epochs = 1;
    /// Learning-rate factor per global step (WarmupCosine, Constant, any callable); empty: the optimiser's rate.
    std::function<double(std::size_t)> schedule{};
    double clip_norm = 0;                 ///< global gradient-norm limit; 0 disables clipping
    std::size_t log_every = 50;           ///< plain-log step lines every that many steps (0: epoch lines only)
    std::optional<std::uint64_t> seed{};  ///< when set, manual_seed(seed) before training (for default_rng users)
    bool verbose = true;                  ///< print progress at all
    std::ostream* out = nullptr;          ///< progress stream; nullptr: std::cout
    std::optional<bool> interactive{};    ///< force the progress bar on/off; nullopt: detect a terminal
    /// Called after each epoch with its stats (validation, checkpoints).
    std::function<void(const EpochStats&)> on_epoch_end{};
};

/// Everything fit() recorded.
struct History {
    std::vector<EpochStats> epochs;
    std::size_t steps = 0;  ///< optimiser steps over the run
    double seconds = 0;     ///< wall time of the run

    [[nodiscard]] const EpochStats& last() const {
        if (epochs.empty()) throw ConfigError("History::last: no epoch was recorded");
        return epochs.back();
    }
    /// The per-epoch mean losses, in order.
    [[nodiscard]] std::vector<double> losses() const {
        std::vector<double> out;
        out.reserve(epochs.size());
        for (const auto& e : epochs) out.push_back(e.loss);
        return out;
    }
};

/// Train `model` with `opt` on the batches of `source` for options.epochs epochs.
/// Throws ConfigError for invalid options or an empty source, ShapeError when the
/// loss gradient does not match the model output, and Error when the loss stops
/// being finite (naming the epoch and step).
template <Module M, Optimizer O, BatchSource S, class F>
    requires LossFunction<F, typename M::Scalar, device_of_t<M>>
History fit(M& model, O& opt, S& source, F&& loss_fn, const TrainOptions& options = {}) {
    using T = typename M::Scalar;
    using D = device_of_t<M>;
    using B = batch_scalar_t<T>;
    static_assert(std::is_same_v<typename S::Scalar, B>,
                  "patchwork::fit: the batch source and the model must use the same scalar type (float batches "
                  "for a bf16 model)");
    static_assert(std::is_same_v<typename O::Scalar, T>,
                  "patchwork::fit: the optimiser and the model must use the same scalar type");
    using clock = std::chrono::steady_clock;
    const auto seconds_since = [](clock::time_point t0) {
        return std::chrono::duration<double>(clock::now() - t0).count();
    };

    if (options.epochs == 0) throw ConfigError("fit: epochs must be positive, got epochs=0");
    if (!(std::isfinite(options.clip_norm) && options.clip_norm >= 0))
        throw ConfigError(detail::concat("fit: clip_norm must be non-negative and finite (0 = off), got clip_norm=",
                                         options.clip_norm));
    if (options.seed) manual_seed(*options.seed);

    std::optional<Progress> progress;
    if (options.verbose)
        progress.emplace(options.out ? *options.out : std::cout, options.interactive, options.log_every);

    const std::vector<Parameter<T, D>*> params = trainable_parameters(model);
    Tensor<T, D> staging;  // a device model's input batch
    // The first layer never needs dL/dx; the caller's setting comes back on every exit.
    const InputGradientOff<M> no_input_grad(model);

    History history;
    const auto run_start = clock::now();
    std::size_t global_step = 0;
    for (std::size_t epoch = 0; epoch < options.epochs; ++epoch) {
        source.start_epoch(epoch);
        const std::size_t steps = source.batches();
        if (steps == 0) throw ConfigError(detail::concat("fit: the batch source has no batches in epoch ", epoch));

        EpochStats stats;
        stats.epoch = epoch;
        double loss_sum = 0;
        std::size_t correct = 0, labelled = 0;
        const auto epoch_start = clock::now();
        for (std::size_t i = 0; i < steps; ++i, ++global_step) {
            if (options.schedule) opt.set_lr_factor(options.schedule(global_step));
            auto&& batch = source.batch(i);
            const Batch<B>& b = batch;
            const StepResult r = train_step(
                model, opt, [&]() -> const Tensor<T, D>& { return model.forward(detail::on_device_of(b.x, staging)); },
                [&](const Tensor<T, D>& y) {
                    Loss<T, D> loss = detail::call_loss<T, D>(loss_fn, y, b);
                    if (std::isfinite(double(loss.value)) && detail::has_class_labels(y, b)) {
                        correct += detail::count_correct_any(y, std::span<const int>(b.labels));
                        labelled += b.labels.size();
                    }
                    return loss;
                },
                "fit",
                [&](double v) {
                    return detail::concat("fit: the loss is ", v, " at epoch ", epoch, " step ", i, " (global step ",
                                          global_step, ", lr ", opt.lr(), ")");
                },
                params, options.clip_norm);
            const std::size_t n = detail::batch_samples(b);
            loss_sum += r.loss * double(n);
            stats.samples += n;
            if (options.clip_norm > 0) stats.max_grad_norm = std::max(stats.max_grad_norm, r.grad_norm);
            ++stats.steps;

            if (progress) {
                const double elapsed = seconds_since(epoch_start);
                progress->update({.epoch = epoch,
                                  .epochs = options.epochs,
                                  .step = i + 1,
                                  .steps = steps,
                                  .loss = stats.samples ? loss_sum / double(stats.samples) : r.loss,
                                  .samples_per_second = elapsed > 0 ? double(stats.samples) / elapsed : 0.0,
                                  .elapsed_seconds = elapsed});
            }
        }
        stats.seconds = seconds_since(epoch_start);
        stats.loss = stats.samples ? loss_sum / double(stats.samples) : 0.0;
        if (labelled) stats.accuracy = double(correct) / double(labelled);
        stats.samples_per_second = stats.seconds > 0 ? double(stats.samples) / stats.seconds : 0.0;
        stats.lr = opt.lr();
        if (progress)
            progress->end_epoch({.epoch = epoch,
                                 .epochs = options.epochs,
                                 .loss = stats.loss,
                                 .accuracy = stats.accuracy,
                                 .samples_per_second = stats.samples_per_second,
                                 .seconds = stats.seconds,
                                 .lr = stats.lr});
        history.epochs.push_back(stats);
        history.steps = global_step;
        if (options.on_epoch_end) options.on_epoch_end(history.epochs.back());
    }
    history.seconds = seconds_since(run_start);
    return history;
}

/// fit() with softmax cross-entropy as the loss.
template <Module M, Optimizer O, BatchSource S>
History fit(M& model, O& opt, S& source, const TrainOptions& options = {}) {
    return fit(model, opt, source, CrossEntropyLoss{}, options);
}

/// Mean loss and accuracy of a model over a source.
struct Evaluation {
    double loss = 0;      ///< mean over samples
    double accuracy = 0;  ///< in [0, 1]; 0 when the batches carry no class labels
    std::size_t samples = 0;
};

/// Forward passes only (no gradients, no parameter changes). Calls
/// source.start_epoch(0) first. Throws ConfigError for an empty source.
template <Module M, BatchSource S, class F>
    requires LossFunction<F, typename M::Scalar, device_of_t<M>>
[[nodiscard]] Evaluation evaluate(M& model, S& source, F&& loss_fn) {
    using T = typename M::Scalar;
    using D = device_of_t<M>;
    using B = batch_scalar_t<T>;
    Tensor<T, D> staging;
    static_assert(std::is_same_v<typename S::Scalar, B>,
                  "patchwork::evaluate: the batch source and the model must use the same scalar type (float "
                  "batches for a bf16 model)");
    source.start_epoch(0);
    const std::size_t steps = source.batches();
    if (steps == 0) throw ConfigError("evaluate: the batch source has no batches");
    Evaluation ev;
    double loss_sum = 0;
    std::size_t correct = 0, labelled = 0;
    for (std::size_t i = 0; i < steps; ++i) {
        auto&& batch = source.batch(i);
        const Batch<B>& b = batch;
        const Tensor<T, D>& y = model.forward(detail::on_device_of(b.x, staging));
        const Loss<T, D> loss = detail::call_loss<T, D>(loss_fn, y, b);
        const std::size_t n = detail::batch_samples(b);
        loss_sum += double(loss.value) * double(n);
        ev.samples += n;
        if (detail::has_class_labels(y, b)) {
            correct += detail::count_correct_any(y, std::span<const int>(b.labels));
            labelled += b.labels.size();
        }
    }
    ev.loss = ev.samples ? loss_sum / double(ev.samples) : 0.0;
    ev.accuracy = labelled ? double(correct) / double(labelled) : 0.0;
    return ev;
}

/// evaluate() with softmax cross-entropy.
template <Module M, BatchSource S>
[[nodiscard]] Evaluation evaluate(M& model, S& source) {
    return evaluate(model, source, CrossEntropyLoss{});
}

}  // namespace patchwork
