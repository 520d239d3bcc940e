// patchwork side of the training-step comparison with PyTorch
// (benchmarks/torch_step.py is the other side; scripts/bench joins the two).
// Same model, policies, batches, optimiser, input pool, warm-up and timing
// rule as torch_step.py; prints, one line per configuration,
//
//   STEP impl=patchwork-<gemm> policy=<p> batch=<b> median_ms=<m> p10_ms=<a> p90_ms=<z> steps=<n>
//        trainable=<t> threads=<k> loss=<last loss>
//
// Options: --threads N (default BENCH_THREADS or 2), --batches 64,1024,
// --policies adapter,lora,finetune, --warmup 20, --steps 200 (timed steps at
// batch 64; batch b gets max(20, steps * 64 / b)), --min-time 2.0 (seconds of
// timed steps per configuration at least, up to 50x the step count).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "common.hpp"
#include "example_model.hpp"
#include "train_step.hpp"

namespace {

struct Options {
    std::vector<std::size_t> batches{64, 1024};
    std::vector<std::string> policies{"adapter", "lora", "finetune"};
    int warmup = 20;
    int steps = 200;
    double min_time = 2.0;
};

template <class Model>
void measure(Model& model, std::string_view policy, std::size_t batch, const Options& o, int threads) {
    bench::TrainStep<Model> step(model, batch);
    float loss = 0;
    for (int i = 0; i < o.warmup; ++i) loss = step.run();
    const std::size_t want = std::size_t(std::max(20, int(std::size_t(o.steps) * 64 / batch)));
    std::vector<double> ms;
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    auto elapsed = [&] { return std::chrono::duration<double>(clock::now() - start).count(); };
    while (ms.size() < want || (elapsed() < o.min_time && ms.size() < 50 * want)) {
        const auto t0 = clock::now();
        loss = step.run();
        ms.push_back(std::chrono::duration<double, std::milli>(clock::now() - t0).count());
    }
    std::printf(
        "STEP impl=patchwork-%s policy=%.*s batch=%zu median_ms=%.4f p10_ms=%.4f p90_ms=%.4f steps=%zu "
        "trainable=%zu threads=%d loss=%.4f\n",
        bench::blas_name(), int(policy.size()), policy.data(), batch, bench::median(ms), bench::quantile(ms, 0.1),
        bench::quantile(ms, 0.9), ms.size(), patchwork::trainable_count(model), threads, double(loss));
    std::fflush(stdout);
}

int usage() {
    std::cerr << "usage: step_compare [--threads N] [--batches 64,1024] [--policies adapter,lora,finetune]\n"
                 "                    [--warmup 20] [--steps 200] [--min-time 2.0]\n";
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; i += 2) {
        const std::string k = argv[i];
        if (i + 1 >= argc) return usage();
        const std::string v = argv[i + 1];
        if (k == "--threads") setenv("BENCH_THREADS", v.c_str(), 1);
        else if (k == "--batches") {
            o.batches.clear();
            for (const auto& b : bench::split(v)) o.batches.push_back(std::size_t(std::stoul(b)));
        } else if (k == "--policies") o.policies = bench::split(v);
        else if (k == "--warmup") o.warmup = std::stoi(v);
        else if (k == "--steps") o.steps = std::stoi(v);
        else if (k == "--min-time") o.min_time = std::stod(v);
        else return usage();
    }
    const int threads = bench::configure_threads();
    std::cerr << "# " << bench::build_info(threads) << "\n";
    for (const auto& policy : o.policies)
        for (std::size_t batch : o.batches) {
            patchwork::manual_seed(0);
            const bool known = bench::with_model(policy, [&](auto& model, std::string_view name) {
                measure(model, name, batch, o, threads);
            });
            if (!known) {
                std::cerr << "step_compare: unknown policy '" << policy << "'\n";
                return usage();
            }
        }
    return 0;
}
