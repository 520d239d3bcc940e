// One training step of the benchmarks' example model on the GPU (the patchwork
// side; `python3 benchmarks/torch_step.py --device cuda --policies finetune,head`
// is the PyTorch side, same output format):
//
//   body = Linear(784, 256), LayerNorm(256), ReLU, Linear(256, 256), LayerNorm(256), ReLU
//   head = Linear(256, 5)
//   finetune   Tune<Body, FineTune> + head: everything trains
//   head       Tune<Body, Frozen> + head: only the head trains (no backward through the body)
//   multitask  MultiTask over 32 tasks (per-task LoRA, adapter and LayerNorm patches, a head per task):
//              a single-task batch, a mixed batch in one backbone pass, and the mixed batch grouped by
//              task (policy=multitask32-single / -mixed / -grouped; the issue's target: mixed <= 1.15x single)
//
// One step = zero_grad, forward, softmax cross-entropy (its value comes back to
// the host: one synchronisation, as loss.item() would), backward, AdamW
// (lr 1e-3, weight decay 0.01). Inputs: a pool of 16384 random samples with
// random labels already on the device, cycled batch by batch. Timing: CUDA
// events around each step after --warmup steps; median, p10 and p90.
//
//   STEP impl=patchwork-cuda policy=<p> batch=<b> median_ms=<m> p10_ms=<a> p90_ms=<z> steps=<n> trainable=<t>
//        threads=0 loss=<last>
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "common.hpp"
#include "gpu/event_timing.hpp"
#include "patchwork/kernels/module_ops.cuh"
#include "patchwork/kernels/ops.cuh"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/multitask/multitask.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/norm_patch.hpp"
#include "patchwork/policies/bias_only.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/frozen.hpp"
#include "patchwork/policies/lora.hpp"
#include "patchwork/policies/scale_shift.hpp"
#include "patchwork/policies/tune.hpp"
#include "patchwork/train/loss.hpp"
#include "patchwork/train/optimizer.hpp"

namespace pw = patchwork;
using pw::Cuda;

namespace {

constexpr std::size_t kIn = 784, kHidden = 256, kClasses = 5, kPool = 16384;

using Linear = pw::BasicLinear<float, Cuda>;
using LayerNorm = pw::BasicLayerNorm<float, Cuda>;
using Relu = pw::BasicRelu<float, Cuda>;
using Body = pw::Sequential<Linear, LayerNorm, Relu, Linear, LayerNorm, Relu>;

Body make_body() {
    return Body(Linear(kIn, kHidden), LayerNorm(kHidden), Relu{}, Linear(kHidden, kHidden), LayerNorm(kHidden), Relu{});
}

struct Options {
    std::vector<std::size_t> batches{64, 1024};
    std::vector<std::string> policies{"finetune", "head", "multitask"};
    int warmup = 20;
    int steps = 200;
};

/// Per-step times (ms, CUDA events around each step) after o.warmup untimed steps.
template <class Step>
std::vector<double> time_steps(Step&& step, std::size_t batch, const Options& o) {
    const int want = std::max(20, int(std::size_t(o.steps) * 64 / batch));
    return bench::gpu_timed(step, want, o.warmup, "step_gpu");
}

/// The input pool: batches of random samples (on the device) with random labels.
struct Pool {
    std::vector<pw::Tensor<float, Cuda>> xs;
    std::vector<std::vector<int>> ys;
    explicit Pool(std::size_t batch) {
        const std::size_t nb = std::max<std::size_t>(1, kPool / batch);
        std::mt19937 rng(1);
        std::normal_distribution<float> nd;
        ys.assign(nb, std::vector<int>(batch));
        for (std::size_t b = 0; b < nb; ++b) {
            pw::Tensor<float> x(pw::Shape{batch, kIn});
            for (auto& v : x) v = nd(rng);
            xs.emplace_back(x);
            for (auto& y : ys[b]) y = int(rng() % kClasses);
        }
    }
};

void print_step(const std::string& policy, std::size_t batch, const std::vector<double>& ms, std::size_t trainable,
                float loss) {
    std::printf("STEP impl=patchwork-cuda policy=%s batch=%zu median_ms=%.4f p10_ms=%.4f p90_ms=%.4f steps=%zu "
                "trainable=%zu threads=0 loss=%.4f\n",
                policy.c_str(), batch, bench::quantile(ms, 0.5), bench::quantile(ms, 0.1), bench::quantile(ms, 0.9), ms.size(), trainable,
                double(loss));
    std::fflush(stdout);
}

/// One training step over the pool's next batch: zero_grad, forward (`forward(x)`), softmax cross-entropy
/// (its value read back: one synchronisation), backward, optimiser step; the loss goes to `loss`.
template <class Model, class Opt, class Forward>
auto training_step(Model& model, Opt& opt, const Pool& pool, float& loss, Forward forward) {
    return [&model, &opt, &pool, &loss, forward, it = std::size_t(0)]() mutable {
        const std::size_t i = it++ % pool.xs.size();
        opt.zero_grad();
        const auto l = pw::cross_entropy(forward(pool.xs[i]), std::span<const int>(pool.ys[i]));
        model.backward(l.grad);
        opt.step();
        loss = l.value;
    };
}

template <class Model>
void measure(Model& model, const std::string& policy, std::size_t batch, const Options& o) {
    model.set_input_grad(false);
    pw::BasicAdamW<float, Cuda> opt(pw::trainable_parameters(model), {.lr = 1e-3, .weight_decay = 0.01});
    const Pool pool(batch);
    float loss = 0;
    const auto ms = time_steps(training_step(model, opt, pool, loss, [&](const auto& x) -> decltype(auto) {
                                   return model.forward(x);
                               }),
                               batch, o);
    print_step(policy, batch, ms, pw::trainable_count(model), loss);
}

/// A multi-task model of kTasks tasks over the body with per-task patches (LoRA
/// on the first Linear, an adapter on the second, per-task LayerNorm scale and
/// shift; the pre-trained weights shared and frozen), one head per task. Three
/// batches of the same size: every row of task 0 ("single"), rows of all tasks
/// in one backbone pass ("mixed"), and the same grouped by task ("grouped").
constexpr int kTasks = 32;
using PatchedBody = pw::Sequential<pw::Tune<Linear, pw::LoRA<8>>, pw::Tune<LayerNorm, pw::NormPatch>, Relu,
                                   pw::Tune<Linear, pw::Adapter<16>>, pw::Tune<LayerNorm, pw::NormPatch>, Relu>;

void measure_multitask(std::size_t batch, const Options& o) {
    std::vector<Linear> heads;
    for (int k = 0; k < kTasks; ++k) heads.emplace_back(kHidden, kClasses);
    pw::MultiTask<PatchedBody, Linear> model(
        PatchedBody(pw::Tune<Linear, pw::LoRA<8>>(kIn, kHidden), pw::Tune<LayerNorm, pw::NormPatch>(kHidden), Relu{},
                    pw::Tune<Linear, pw::Adapter<16>>(kHidden, kHidden), pw::Tune<LayerNorm, pw::NormPatch>(kHidden),
                    Relu{}),
        std::move(heads));
    model.set_input_grad(false);
    pw::BasicAdamW<float, Cuda> opt(pw::trainable_parameters(model), {.lr = 1e-3, .weight_decay = 0.01});
    const Pool pool(batch);
    std::mt19937 rng(2);
    std::vector<int> mixed(batch), single(batch, 0);
    for (std::size_t i = 0; i < batch; ++i) mixed[i] = int(i % kTasks);
    std::shuffle(mixed.begin(), mixed.end(), rng);
    for (const char* mode : {"single", "mixed", "grouped"}) {
        const std::string m = mode;
        model.set_one_pass(m != "grouped");
        const std::vector<int>& ids = m == "single" ? single : mixed;
        float loss = 0;
        const auto ms = time_steps(training_step(model, opt, pool, loss, [&](const auto& x) -> decltype(auto) {
                                       return model.forward(x, std::span<const int>(ids));
                                   }),
                                   batch, o);
        print_step("multitask" + std::to_string(kTasks) + "-" + m, batch, ms, pw::trainable_count(model), loss);
    }
}

}  // namespace

int main(int argc, char** argv) try {
    Options o;
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string k = argv[i], v = argv[i + 1];
        if (k == "--batches") {
            o.batches.clear();
            for (const auto& b : bench::split(v)) o.batches.push_back(std::stoul(b));
        } else if (k == "--policies") o.policies = bench::split(v);
        else if (k == "--warmup") o.warmup = std::stoi(v);
        else if (k == "--steps") o.steps = std::stoi(v);
        else {
            std::cerr << "usage: step_gpu [--batches 64,1024] [--policies finetune,head,multitask] [--warmup 20] "
                         "[--steps 200]\n";
            return 2;
        }
    }
    if (pw::cuda::device_count() == 0) {
        std::cerr << "step_gpu: no CUDA device is available\n";
        return 77;
    }
    cudaDeviceProp prop{};
    pw::cuda::check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties", "step_gpu");
    std::cerr << "# device " << prop.name << "\n";
    for (const auto& policy : o.policies)
        for (std::size_t batch : o.batches) {
            pw::manual_seed(0);
            if (policy == "finetune") {
                pw::Sequential<pw::Tune<Body, pw::FineTune>, Linear> m(pw::Tune<Body, pw::FineTune>(make_body()),
                                                                       Linear(kHidden, kClasses));
                measure(m, policy, batch, o);
            } else if (policy == "multitask") {
                measure_multitask(batch, o);
            } else if (policy == "head") {
                pw::Sequential<pw::Tune<Body, pw::Frozen>, Linear> m(pw::Tune<Body, pw::Frozen>(make_body()),
                                                                     Linear(kHidden, kClasses));
                measure(m, policy, batch, o);
            } else {
                std::cerr << "step_gpu: unknown policy '" << policy << "' (finetune, head, multitask)\n";
                return 2;
            }
        }
    return 0;
} catch (const pw::Error& e) {
    std::cerr << "step_gpu: " << e.what() << "\n";
    return 1;
}
