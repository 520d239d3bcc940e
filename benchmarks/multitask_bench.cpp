// Mixed-task batches of a MultiTask model against splitting them per task.
//
// Backbones (shared weights frozen, per-task banks as the Tune policies choose):
//   mlp    Tune<Linear(784,256), LayerNorm(256), Relu, Linear(256,256), LayerNorm(256), Relu; NormPatch>,
//          input [64, 784], heads Linear(256, 10)
//   mlp-lora  Tune<Tune<Linear(784,256), LoRA<8>>, LayerNorm(256), Relu, Tune<Linear(256,256), LoRA<8>>,
//             LayerNorm(256), Relu; Frozen>: the LoRA factors per task, input [64, 784], heads Linear(256, 10)
//   conv   Tune<Conv2d(1,16,3,pad 1), BatchNorm2d(16), Relu, DepthwiseConv2d(16,3,pad 1), BatchNorm2d(16), Relu,
//               Conv2d(16,32,1), BatchNorm2d(32), Relu, GlobalAvgPool; DepthwisePatch, NormPatch>,
//          input [64, 28, 28, 1] (NHWC), heads Linear(32, 10)
// 8 tasks (8 banks, 8 heads). Cases, each one forward + backward (after
// zero_grad) of 64 rows in total:
//   mixed    forward(x, task_ids) on 64 rows, row r of task r % 8, then backward
//            (one backbone pass when the backbone supports it, see
//            MultiTask::one_pass_supported; the path taken is printed)
//   grouped  the same with set_one_pass(false): one backbone pass per task
//   split    the same 64 rows, already grouped by task: 8 calls forward(x_k, k)
//            + backward of 8 rows each
//   single   forward(x, 0) on 64 rows of one task, then backward
// The output gradient is fixed random data (no loss). Timing: the cases
// interleaved round by round (--rounds, each --steps steps per case after a
// warm-up), each step timed on its own with steady_clock; the median over all
// steps of a case is reported, with p10 and p90, and the ratios of the medians.
//
// usage: multitask_bench [--backbones mlp,mlp-lora,conv] [--steps N] [--rounds R]
// Threads: BENCH_THREADS (default 2) for Eigen, OMP_NUM_THREADS for OpenMP.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "common.hpp"
#include "patchwork/patchwork.hpp"

namespace pw = patchwork;

namespace {

constexpr std::size_t kRows = 64, kTasks = 8, kPerTask = kRows / kTasks, kClasses = 10;

using MlpBody = pw::Sequential<pw::Linear, pw::LayerNorm, pw::Relu, pw::Linear, pw::LayerNorm, pw::Relu>;
using MlpModel = pw::MultiTask<pw::Tune<MlpBody, pw::NormPatch>, pw::Linear>;
using LoraLinear = pw::Tune<pw::Linear, pw::LoRA<8>>;
using LoraBody = pw::Sequential<LoraLinear, pw::LayerNorm, pw::Relu, LoraLinear, pw::LayerNorm, pw::Relu>;
using LoraModel = pw::MultiTask<pw::Tune<LoraBody, pw::Frozen>, pw::Linear>;
using ConvBody = pw::Sequential<pw::Conv2d, pw::BatchNorm2d, pw::Relu, pw::DepthwiseConv2d, pw::BatchNorm2d, pw::Relu,
                                pw::Conv2d, pw::BatchNorm2d, pw::Relu, pw::GlobalAvgPool>;
using ConvModel = pw::MultiTask<pw::Tune<ConvBody, pw::DepthwisePatch, pw::NormPatch>, pw::Linear>;

std::vector<pw::Linear> make_heads(std::size_t in) {
    std::vector<pw::Linear> h;
    for (std::size_t k = 0; k < kTasks; ++k) h.emplace_back(in, kClasses);
    return h;
}

/// Banks start as copies of the backbone; give each its own values.
template <class M>
void randomize_banks(M& m) {
    pw::Rng rng(11);
    m.visit([&](pw::Parameter<float>& p) {
        if (p.task() != pw::shared_task && p.trainable()) pw::init::uniform(p.value, rng, 0.5, 1.5);
    });
}

/// Rows first, the rest of the shape as `row_shape`.
pw::Shape with_rows(std::size_t rows, const pw::Shape& row_shape) {
    switch (row_shape.rank()) {
        case 1: return pw::Shape{rows, row_shape[0]};
        case 2: return pw::Shape{rows, row_shape[0], row_shape[1]};
        default: return pw::Shape{rows, row_shape[0], row_shape[1], row_shape[2]};
    }
}

/// Rows [r0, r0 + n) of rows with stride `step`, copied into a new tensor.
pw::Tensor<float> take_rows(const pw::Tensor<float>& t, const pw::Shape& row_shape, std::size_t first,
                            std::size_t step, std::size_t n) {
    pw::Tensor<float> out(with_rows(n, row_shape));
    const std::size_t w = t.size() / t.dim(0);
    for (std::size_t i = 0; i < n; ++i)
        std::copy_n(t.data() + (first + i * step) * w, w, out.data() + i * w);
    return out;
}

template <class F>
double time_ms(F&& f) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

template <class Model>
void run(const char* name, Model& model, const pw::Shape& row_shape, std::size_t steps, std::size_t rounds) {
    model.set_input_grad(false);  // the input is data
    randomize_banks(model);
    const auto x = bench::random_tensor(with_rows(kRows, row_shape), 1);
    const auto dy = bench::random_tensor({kRows, kClasses}, 2);
    std::vector<int> ids(kRows);
    for (std::size_t r = 0; r < kRows; ++r) ids[r] = int(r % kTasks);
    // The split case: task k's rows (r = k, k + 8, ...), gathered once outside the timing.
    std::vector<pw::Tensor<float>> xs, dys;
    for (std::size_t k = 0; k < kTasks; ++k) {
        xs.push_back(take_rows(x, row_shape, k, kTasks, kPerTask));
        dys.push_back(take_rows(dy, pw::Shape{kClasses}, k, kTasks, kPerTask));
    }

    auto mixed = [&] {
        pw::zero_grad(model);
        model.forward(x, std::span<const int>(ids));
        model.backward(dy);
    };
    auto grouped = [&] {
        model.set_one_pass(false);
        pw::zero_grad(model);
        model.forward(x, std::span<const int>(ids));
        model.backward(dy);
        model.set_one_pass(true);
    };
    auto split = [&] {
        pw::zero_grad(model);
        for (std::size_t k = 0; k < kTasks; ++k) {
            model.forward(xs[k], int(k));
            model.backward(dys[k]);
        }
    };
    auto single = [&] {
        pw::zero_grad(model);
        model.forward(x, 0);
        model.backward(dy);
    };

    struct Case {
        const char* name;
        std::function<void()> fn;
        std::vector<double> times;
    };
    std::vector<Case> cases;
    cases.push_back({"mixed", mixed, {}});
    cases.push_back({"grouped", grouped, {}});
    cases.push_back({"split", split, {}});
    cases.push_back({"single", single, {}});
    for (auto& c : cases)
        for (int i = 0; i < 5; ++i) c.fn();
    mixed();
    std::printf("# backbone=%s mixed path=%s\n", name,
                model.last_mixed_pass() == pw::MixedPass::one_pass ? "one_pass" : "grouped");
    for (std::size_t r = 0; r < rounds; ++r)
        for (auto& c : cases)
            for (std::size_t s = 0; s < steps; ++s) c.times.push_back(time_ms(c.fn));

    for (const auto& c : cases)
        std::printf("MULTITASK backbone=%s case=%s rows=%zu tasks=%zu median_ms=%.4f p10_ms=%.4f p90_ms=%.4f steps=%zu\n",
                    name, c.name, kRows, c.name == std::string_view("single") ? std::size_t(1) : kTasks,
                    bench::median(c.times), bench::quantile(c.times, 0.1), bench::quantile(c.times, 0.9),
                    c.times.size());
    const double m = bench::median(cases[0].times), gr = bench::median(cases[1].times),
                 sp = bench::median(cases[2].times), si = bench::median(cases[3].times);
    std::printf("RATIO backbone=%s mixed/grouped=%.3f mixed/split=%.3f mixed/single=%.3f split/single=%.3f\n", name,
                m / gr, m / sp, m / si, sp / si);
    std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::string> backbones = {"mlp", "mlp-lora", "conv"};
    std::size_t steps = 50, rounds = 5;
    for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        if (i + 1 >= argc) {
            std::fprintf(stderr, "multitask_bench: %s needs a value\n", argv[i]);
            return 2;
        }
        if (a == "--backbones") {
            backbones.clear();
            std::stringstream ss(argv[++i]);
            for (std::string item; std::getline(ss, item, ',');) backbones.push_back(item);
        } else if (a == "--steps") {
            steps = std::stoul(argv[++i]);
        } else if (a == "--rounds") {
            rounds = std::stoul(argv[++i]);
        } else {
            std::fprintf(stderr, "usage: multitask_bench [--backbones mlp,mlp-lora,conv] [--steps N] [--rounds R]\n");
            return 2;
        }
    }
    const int threads = bench::configure_threads();
    std::printf("# %s\n", bench::build_info(threads).c_str());
    for (const auto& b : backbones) {
        if (b == "mlp") {
            MlpModel model(pw::Tune<MlpBody, pw::NormPatch>(MlpBody(pw::Linear(784, 256), pw::LayerNorm(256), pw::Relu{},
                                                                    pw::Linear(256, 256), pw::LayerNorm(256),
                                                                    pw::Relu{})),
                           make_heads(256));
            run("mlp", model, pw::Shape{784}, steps, rounds);
        } else if (b == "mlp-lora") {
            LoraModel model(pw::Tune<LoraBody, pw::Frozen>(LoraBody(LoraLinear(784, 256), pw::LayerNorm(256),
                                                                    pw::Relu{}, LoraLinear(256, 256),
                                                                    pw::LayerNorm(256), pw::Relu{})),
                            make_heads(256));
            run("mlp-lora", model, pw::Shape{784}, steps, rounds);
        } else if (b == "conv") {
            ConvModel model(pw::Tune<ConvBody, pw::DepthwisePatch, pw::NormPatch>(ConvBody(
                                pw::Conv2d(1, 16, 3, {.padding = 1}), pw::BatchNorm2d(16), pw::Relu{},
                                pw::DepthwiseConv2d(16, 3, {.padding = 1}), pw::BatchNorm2d(16), pw::Relu{},
                                pw::Conv2d(16, 32, 1), pw::BatchNorm2d(32), pw::Relu{}, pw::GlobalAvgPool{})),
                            make_heads(32));
            run("conv", model, pw::Shape{28, 28, 1}, steps, rounds);
        } else {
            std::fprintf(stderr, "multitask_bench: unknown backbone %s (mlp, mlp-lora, conv)\n", b.c_str());
            return 2;
        }
    }
    return 0;
}
