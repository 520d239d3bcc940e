// Google Benchmark: what overparameterised training (OverParam) costs per
// step, and that after collapse inference costs exactly the compact model.
//
//   TrainStep/width:W/expansion:E   one training step (zero_grad, forward,
//                                   cross-entropy, backward, AdamW step) at batch 128
//   Inference/width:W/expansion:E   one forward at batch 128
//
// The model is the compact MLP Linear(784, W) ReLU Linear(W, W) ReLU Linear(W, 10).
// E = 0 is the compact model trained directly (every parameter trains); E > 0
// replaces the two hidden Linears by Tune<Linear, FineTune, OverParam<>>
// (W = U M V, all factors shared, inner width E * min(in, out)); the head
// stays a plain Linear. For Inference with E > 0 the OverParam layers are
// collapsed first, so the forward runs the same Linear kernels on the same
// shapes as E = 0: the two timings should agree within noise.
//
// Threads: BENCH_THREADS (default 2), as for the other benchmark programs.
#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "common.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/over_param.hpp"
#include "patchwork/policies/tune.hpp"
#include "train_step.hpp"

namespace {

namespace pw = patchwork;

constexpr std::size_t kInputs = 784, kOutputs = 10, kBatch = 128;

using OpLinear = pw::Tune<pw::Linear, pw::FineTune, pw::OverParam<>>;
using DirectModel = pw::Sequential<pw::Linear, pw::Relu, pw::Linear, pw::Relu, pw::Linear>;
using OpModel = pw::Sequential<OpLinear, pw::Relu, OpLinear, pw::Relu, pw::Linear>;

DirectModel make_direct(std::size_t w) {
    pw::manual_seed(7);
    return DirectModel(pw::Linear(kInputs, w), {}, pw::Linear(w, w), {}, pw::Linear(w, kOutputs));
}

OpModel make_overparam(std::size_t w, std::size_t expansion) {
    pw::manual_seed(7);
    const pw::OverParamOptions o{.expansion = expansion};
    return OpModel(OpLinear(pw::Linear(kInputs, w), o), {}, OpLinear(pw::Linear(w, w), o), {},
                   pw::Linear(w, kOutputs));
}

template <class Model>
void train_steps(benchmark::State& state, Model& model) {
    model.set_input_grad(false);
    bench::TrainStep<Model> step(model, kBatch, kInputs, kOutputs);
    for (int i = 0; i < 3; ++i) step.run();  // allocate every buffer and optimiser state
    for (auto _ : state) benchmark::DoNotOptimize(step.run());
    state.counters["params"] = double(pw::parameter_count(model));
    state.SetItemsProcessed(std::int64_t(state.iterations()) * std::int64_t(kBatch));
}

template <class Model>
void forwards(benchmark::State& state, Model& model) {
    const auto x = bench::random_tensor({kBatch, kInputs}, 3);
    benchmark::DoNotOptimize(model.forward(x).data());
    for (auto _ : state) {
        benchmark::DoNotOptimize(model.forward(x).data());
        benchmark::ClobberMemory();
    }
    state.counters["params"] = double(pw::parameter_count(model));
    state.SetItemsProcessed(std::int64_t(state.iterations()) * std::int64_t(kBatch));
}

void BM_TrainStep(benchmark::State& state) {
    const auto w = std::size_t(state.range(0)), e = std::size_t(state.range(1));
    if (e == 0) {
        auto model = make_direct(w);
        train_steps(state, model);
    } else {
        auto model = make_overparam(w, e);
        train_steps(state, model);
    }
}

void BM_Inference(benchmark::State& state) {
    const auto w = std::size_t(state.range(0)), e = std::size_t(state.range(1));
    if (e == 0) {
        auto model = make_direct(w);
        forwards(state, model);
    } else {
        auto model = make_overparam(w, e);
        pw::collapse_overparam(model);
        forwards(state, model);
    }
}

void shapes(benchmark::internal::Benchmark* b) {
    for (std::int64_t w : {64, 256})
        for (std::int64_t e : {0, 2, 4}) b->Args({w, e});
    b->ArgNames({"width", "expansion"})->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_TrainStep)->Name("TrainStep")->Apply(shapes);
BENCHMARK(BM_Inference)->Name("Inference")->Apply(shapes);

int main(int argc, char** argv) {
    const int threads = bench::configure_threads();
    benchmark::AddCustomContext("patchwork_build", bench::build_info(threads));
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
