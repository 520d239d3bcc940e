// Where a training step's time goes: the step of step_compare split into its
// phases (zero_grad, forward, cross-entropy, backward, AdamW step), each timed
// on its own, median over many steps, per policy and batch.
//
//   step_phases [--batches 64,1024] [--policies adapter,lora,finetune] [--steps 200]
//
// Prints one line per configuration:
//   PHASES impl=patchwork-<gemm> policy=<p> batch=<b> zero_grad_ms=.. forward_ms=.. loss_ms=.. backward_ms=..
//          step_ms=.. total_ms=..
#include <chrono>
#include <cstdio>
#include <iostream>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "common.hpp"
#include "example_model.hpp"
#include "train_step.hpp"

namespace {

namespace pw = patchwork;

template <class Model>
void phases(Model& model, std::string_view policy, std::size_t batch, int steps) {
    // The same data and optimiser as TrainStep, driven phase by phase.
    bench::TrainStep<Model> reference(model, batch);
    for (int i = 0; i < 20; ++i) reference.run();  // warm-up: buffers, optimiser state
    auto& opt = reference.optimizer();
    std::vector<pw::Tensor<float>> xs;
    std::vector<std::vector<int>> ys;
    pw::Rng rng(5);
    const std::size_t pool = std::max<std::size_t>(1, bench::kPoolSamples / batch);
    for (std::size_t i = 0; i < pool; ++i) {
        xs.push_back(bench::random_tensor({batch, bench::kIn}, 200 + i));
        std::vector<int> y(batch);
        for (auto& l : y) l = int(rng.next() % bench::kClasses);
        ys.push_back(std::move(y));
    }
    using clock = std::chrono::steady_clock;
    auto ms = [](clock::time_point a, clock::time_point b) {
        return std::chrono::duration<double, std::milli>(b - a).count();
    };
    std::vector<double> zg, fw, ls, bw, st, total;
    const int n = std::max(20, int(std::size_t(steps) * 64 / batch));
    for (int s = 0; s < n; ++s) {
        const std::size_t i = std::size_t(s) % pool;
        const auto t0 = clock::now();
        opt.zero_grad();
        const auto t1 = clock::now();
        const auto& logits = model.forward(xs[i]);
        const auto t2 = clock::now();
        const auto loss = pw::cross_entropy(logits, std::span<const int>(ys[i]));
        const auto t3 = clock::now();
        model.backward(loss.grad);
        const auto t4 = clock::now();
        opt.step();
        const auto t5 = clock::now();
        zg.push_back(ms(t0, t1));
        fw.push_back(ms(t1, t2));
        ls.push_back(ms(t2, t3));
        bw.push_back(ms(t3, t4));
        st.push_back(ms(t4, t5));
        total.push_back(ms(t0, t5));
    }
    std::printf(
        "PHASES impl=patchwork-%s policy=%.*s batch=%zu zero_grad_ms=%.4f forward_ms=%.4f loss_ms=%.4f "
        "backward_ms=%.4f step_ms=%.4f total_ms=%.4f\n",
        bench::blas_name(), int(policy.size()), policy.data(), batch, bench::median(zg), bench::median(fw),
        bench::median(ls), bench::median(bw), bench::median(st), bench::median(total));
    std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::size_t> batches{64, 1024};
    std::vector<std::string> policies{"adapter", "lora", "finetune"};
    int steps = 200;
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string k = argv[i], v = argv[i + 1];
        if (k == "--batches") {
            batches.clear();
            for (const auto& b : bench::split(v)) batches.push_back(std::size_t(std::stoul(b)));
        } else if (k == "--policies") policies = bench::split(v);
        else if (k == "--steps") steps = std::stoi(v);
        else {
            std::cerr << "usage: step_phases [--batches 64,1024] [--policies adapter,lora,finetune] [--steps 200]\n";
            return 2;
        }
    }
    const int threads = bench::configure_threads();
    std::cerr << "# " << bench::build_info(threads) << "\n";
    for (const auto& policy : policies)
        for (std::size_t batch : batches) {
            pw::manual_seed(0);
            if (!bench::with_model(policy, [&](auto& m, std::string_view name) { phases(m, name, batch, steps); })) {
                std::cerr << "step_phases: unknown policy '" << policy << "'\n";
                return 2;
            }
        }
    return 0;
}
