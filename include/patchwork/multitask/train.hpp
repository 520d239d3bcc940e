#pragma once
// Joint multi-task training of a MultiTask model, and evaluation of one task.
//
//   std::vector<pw::VectorSource<float>> sources = {task0_batches, task1_batches};
//   pw::AdamW opt{pw::trainable_parameters(model), {.lr = 3e-3}};
//   pw::fit_multitask(model, opt, sources, {.epochs = 5, .sampling = pw::TaskSampling::proportional});
//
// Every step draws a task, takes that task's next batch, and runs one
// optimiser step on the loss of that single-task batch: the shared weights
// (when trainable) get gradients from every task over the run, each bank and
// head only from its own task's batches. An epoch is as many steps as all
// sources have batches together. Task choice per step:
//   round_robin   0, 1, ..., K-1, 0, 1, ...
//   proportional  task k with probability batches_k / sum_j batches_j
//   weighted      task k with probability weights_k / sum_j weights_j
// A task's batches are taken in order and wrap around within an epoch.
//
// Sequential transfer needs no special loop: add_task(head), train_only(k),
// set_active_task(k), then fit() as for any model.
//
// A model on the GPU (Device = Cuda) trains with the same call, as fit() does:
// host batches, each x copied to the device before its forward, the loss on
// the device output.
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iostream>
#include <span>
#include <string>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/random.hpp"
#include "patchwork/multitask/multitask.hpp"
#include "patchwork/train/batch.hpp"
#include "patchwork/train/loss.hpp"
#include "patchwork/train/metrics.hpp"
#include "patchwork/train/optimizer.hpp"
#include "patchwork/train/step.hpp"
#include "patchwork/train/trainer.hpp"

namespace patchwork {

enum class TaskSampling { round_robin, proportional, weighted };

/// Options of fit_multitask. Designated initialisers: `{.epochs = 3, .sampling = TaskSampling::weighted, .weights = {...}}`.
struct MultiTaskTrainOptions {
    std::size_t epochs = 1;
    TaskSampling sampling = TaskSampling::round_robin;
    std::vector<double> weights{};  ///< one per task, for TaskSampling::weighted
    std::uint64_t seed = 0;         ///< the task-sampling generator's seed
    bool verbose = false;           ///< one line per epoch
    std::ostream* out = nullptr;    ///< nullptr: std::cout
};

/// What fit_multitask did, per epoch and per task.
struct MultiTaskHistory {
    struct Epoch {
        std::vector<double> loss;        ///< mean training loss per task (0 where the task drew no step)
        std::vector<std::size_t> steps;  ///< steps per task
        double seconds = 0;
    };
    std::vector<Epoch> epochs;
    std::size_t steps = 0;
};

/// Train `model` jointly on one batch source per task. Throws ConfigError for a
/// source count other than the task count, an empty source, or bad weights.
template <class MT, Optimizer O, BatchSource S, class F = CrossEntropyLoss>
MultiTaskHistory fit_multitask(MT& model, O& opt, std::vector<S>& sources, const MultiTaskTrainOptions& options = {},
                               F loss_fn = {}) {
    using T = typename MT::Scalar;
    using D = device_of_t<MT>;
    const std::size_t k_tasks = model.tasks();
    if (sources.size() != k_tasks)
        throw ConfigError(detail::concat("fit_multitask: ", sources.size(), " batch sources for ", k_tasks,
                                         " tasks (one source per task)"));
    if (options.epochs == 0) throw ConfigError("fit_multitask: epochs must be positive, got epochs=0");
    std::vector<double> prob(k_tasks, 1.0);
    if (options.sampling == TaskSampling::weighted) {
        if (options.weights.size() != k_tasks)
            throw ConfigError(detail::concat("fit_multitask: ", options.weights.size(), " weights for ", k_tasks,
                                             " tasks"));
        double sum = 0;
        for (std::size_t k = 0; k < k_tasks; ++k) {
            if (!(options.weights[k] >= 0 && std::isfinite(options.weights[k])))
                throw ConfigError(detail::concat("fit_multitask: weight of task ", k, " must be finite and >= 0, got ",
                                                 options.weights[k]));
            sum += options.weights[k];
        }
        if (!(sum > 0)) throw ConfigError("fit_multitask: the task weights sum to 0");
        prob = options.weights;
    }
    Rng rng(options.seed);
    std::ostream& out = options.out ? *options.out : std::cout;
    MultiTaskHistory history;
    Tensor<T, D> staging;  // a device model's input batch
    // The first layer never needs dL/dx; the caller's setting comes back on every exit.
    const InputGradientOff<MT> no_input_grad(model);
    for (std::size_t epoch = 0; epoch < options.epochs; ++epoch) {
        const auto t0 = std::chrono::steady_clock::now();
        std::size_t total = 0;
        std::vector<std::size_t> next(k_tasks, 0);
        for (std::size_t k = 0; k < k_tasks; ++k) {
            sources[k].start_epoch(epoch);
            if (sources[k].batches() == 0)
                throw ConfigError(detail::concat("fit_multitask: the batch source of task ", k,
                                                 " has no batches in epoch ", epoch));
            total += sources[k].batches();
            if (options.sampling == TaskSampling::proportional) prob[k] = double(sources[k].batches());
        }
        double prob_sum = 0;
        for (double p : prob) prob_sum += p;
        MultiTaskHistory::Epoch stats{std::vector<double>(k_tasks, 0.0), std::vector<std::size_t>(k_tasks, 0), 0};
        std::vector<std::size_t> samples(k_tasks, 0);
        for (std::size_t step = 0; step < total; ++step) {
            std::size_t task = step % k_tasks;
            if (options.sampling != TaskSampling::round_robin) {
                double u = rng.uniform(0.0, prob_sum);
                task = 0;
                while (task + 1 < k_tasks && (u >= prob[task] || prob[task] == 0)) u -= prob[task++];
            }
            auto& src = sources[task];
            auto&& batch = src.batch(next[task]++ % src.batches());
            const Batch<batch_scalar_t<T>>& b = batch;
            const StepResult r = train_step(
                model, opt,
                [&]() -> const Tensor<T, D>& { return model.forward(detail::on_device_of(b.x, staging), int(task)); },
                [&](const Tensor<T, D>& y) { return detail::call_loss<T, D>(loss_fn, y, b); }, "fit_multitask",
                [&](double v) {
                    return detail::concat("fit_multitask: the loss of task ", task, " is ", v, " at epoch ", epoch,
                                          " step ", step);
                },
                std::vector<Parameter<T, D>*>{}, 0.0);
            const std::size_t n = detail::batch_samples(b);
            stats.loss[task] += r.loss * double(n);
            samples[task] += n;
            ++stats.steps[task];
            ++history.steps;
        }
        for (std::size_t k = 0; k < k_tasks; ++k)
            if (samples[k]) stats.loss[k] /= double(samples[k]);
        stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (options.verbose) {
            out << "epoch " << epoch + 1 << "/" << options.epochs << ":";
            for (std::size_t k = 0; k < k_tasks; ++k)
                out << " task" << k << " loss " << stats.loss[k] << " (" << stats.steps[k] << " steps)";
            out << " " << stats.seconds << " s\n";
        }
        history.epochs.push_back(std::move(stats));
    }
    return history;
}

/// evaluate() of task `task` (the model's active task is restored afterwards).
template <class MT, BatchSource S>
[[nodiscard]] Evaluation evaluate_task(MT& model, int task, S& source) {
    const int before = model.active_task();
    model.set_active_task(task);
    struct Restore {
        MT& m;
        int k;
        ~Restore() { m.set_active_task(k); }
    } restore{model, before};
    return evaluate(model, source);
}

}  // namespace patchwork
