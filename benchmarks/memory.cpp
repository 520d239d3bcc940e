// Peak memory of training a ~50M-parameter model under one policy, one policy
// per process (peak RSS is per process):
//
//   memory adapter  [--steps N] [--batch B] [--blocks K] [--width D]
//   memory finetune [...]
//
// Model: K (default 12) blocks Sequential<Linear(D, D), LayerNorm(D), ReLU>,
// D = 2048, then a Linear(D, 10) head: 12 (2048^2 + 2048 + 2 * 2048) + 20490
// = 50.44M parameters.
//   adapter   every block as Tune<Block, Adapter<32>> (base frozen), head trains
//   finetune  Tune<Repeat<Block>, FineTune>, head trains
// Each process runs N (default 5) AdamW steps (forward, cross-entropy,
// backward, step) at batch B (default 64) on random data and prints one line:
//   MEMORY policy=<p> params=<n> trainable=<t> batch=<b> steps=<s> rss_model_mb=<m> peak_rss_mb=<r> step_ms=<ms>
// rss_model_mb is the resident set after building the model, before
// training; peak_rss_mb is getrusage's ru_maxrss at exit (MiB).
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <string_view>
#include <vector>

#include "common.hpp"
#include "patchwork/compose/repeat.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/tune.hpp"
#include "train_step.hpp"

namespace {

namespace pw = patchwork;

using Block = pw::Sequential<pw::Linear, pw::LayerNorm, pw::Relu>;
using AdapterBlock = pw::Tune<Block, pw::Adapter<32>>;
using AdapterNet = pw::Sequential<pw::Repeat<AdapterBlock>, pw::Linear>;
using FineTuneNet = pw::Sequential<pw::Tune<pw::Repeat<Block>, pw::FineTune>, pw::Linear>;

constexpr std::size_t kClasses = 10;

Block make_block(std::size_t width) { return Block(pw::Linear(width, width), pw::LayerNorm(width), pw::Relu{}); }

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

/// Resident set now, from /proc/self/status (VmRSS, KiB).
double rss_now_mb() {
    std::ifstream f("/proc/self/status");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
    return 0;
}

double peak_rss_mb() {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return double(u.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
}

template <class Model>
int run(Model& model, std::string_view policy, std::size_t batch, int steps) {
    model.set_input_grad(false);
    const double rss_model = rss_now_mb();
    const std::size_t width = model.template get<1>().in_features();
    bench::TrainStep<Model> step(model, batch, width, kClasses, /*pool_batches=*/2);
    std::vector<double> ms;
    float loss = 0;
    for (int i = 0; i < steps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        loss = step.run();
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf(
        "MEMORY policy=%.*s params=%zu trainable=%zu batch=%zu steps=%d rss_model_mb=%.1f peak_rss_mb=%.1f "
        "param_mb=%.1f step_ms=%.1f loss=%.4f\n",
        int(policy.size()), policy.data(), pw::parameter_count(model), pw::trainable_count(model), batch, steps,
        rss_model, peak_rss_mb(), mib(4.0 * double(pw::parameter_count(model))), bench::median(ms), double(loss));
    return 0;
}

int usage() {
    std::cerr << "usage: memory adapter|finetune [--steps N] [--batch B] [--blocks K] [--width D]\n";
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) return usage();
    const std::string policy = argv[1];
    int steps = 5;
    std::size_t batch = 64, blocks = 12, width = 2048;
    for (int i = 2; i + 1 < argc; i += 2) {
        const std::string_view k = argv[i];
        const long v = std::atol(argv[i + 1]);
        if (v <= 0) return usage();
        if (k == "--steps") steps = int(v);
        else if (k == "--batch") batch = std::size_t(v);
        else if (k == "--blocks") blocks = std::size_t(v);
        else if (k == "--width") width = std::size_t(v);
        else return usage();
    }
    if (argc % 2 != 0) return usage();
    const int threads = bench::configure_threads();
    std::cerr << "# " << bench::build_info(threads) << "\n";

    pw::manual_seed(7);
    if (policy == "adapter") {
        AdapterNet model(pw::Repeat<AdapterBlock>(blocks, [&](std::size_t) { return AdapterBlock(make_block(width)); }),
                         pw::Linear(width, kClasses));
        return run(model, policy, batch, steps);
    }
    if (policy == "finetune") {
        FineTuneNet model(pw::Tune<pw::Repeat<Block>, pw::FineTune>(
                              pw::Repeat<Block>(blocks, [&](std::size_t) { return make_block(width); })),
                          pw::Linear(width, kClasses));
        return run(model, policy, batch, steps);
    }
    return usage();
}
