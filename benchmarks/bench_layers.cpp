// Google Benchmark programs for the CPU: layers, the machine's GEMM peak, and
// one training step of the example model.
//
//   BM_Gemm/m:<m>/k:<k>/n:<n>        Eigen sgemm, C.noalias() = A * B (row-major): the squares
//                                    give the single-precision GEMM peak to read layer GFLOP/s against
//   <Layer>Forward/<B>/<in>/<out>    forward of a float layer at batch B
//   <Layer>Backward/<B>/<in>/<out>   backward (weight gradients that train and dX)
//   <LayerNorm|Relu><Forward|Backward>/<B>/256  the body's element-wise layers (items/s)
//   TrainStep<Policy>/<B>            forward, cross-entropy, backward, AdamW step
//
// Layers: Linear (all parameters train), Tune<Linear, Adapter<32>> and
// Tune<Linear, LoRA<8, 16>> (base frozen, as the policies leave it). Backward
// computes the input gradient too (a layer inside a network). The GFLOPS
// counter counts the multiply-adds of the GEMMs that actually run (2 flops
// each); element-wise work is not counted but is timed.
//
// Threads: BENCH_THREADS (default 2) for Eigen; OPENBLAS_NUM_THREADS for OpenBLAS.
#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common.hpp"
#include "example_model.hpp"
#include "train_step.hpp"

namespace {

namespace pw = patchwork;

using AdapterLinear = pw::Tune<pw::Linear, pw::Adapter<bench::kBottleneck>>;
using LoraLinear = bench::LoraLinear;

constexpr double kGiga = 1e9;

void set_gflops(benchmark::State& state, double flops_per_iteration) {
    state.counters["GFLOPS"] = benchmark::Counter(flops_per_iteration / kGiga, benchmark::Counter::kIsIterationInvariantRate);
}

// ---- GEMM peak -------------------------------------------------------------

void BM_Gemm(benchmark::State& state) {
    const auto m = static_cast<Eigen::Index>(state.range(0));
    const auto k = static_cast<Eigen::Index>(state.range(1));
    const auto n = static_cast<Eigen::Index>(state.range(2));
    using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    M a = M::Random(m, k), b = M::Random(k, n), c = M::Zero(m, n);
    for (auto _ : state) {
        c.noalias() = a * b;
        benchmark::DoNotOptimize(c.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, 2.0 * double(m) * double(k) * double(n));
}
// Squares for the peak; 1024 x 784 x 256 is the first body Linear's forward at batch 1024.
BENCHMARK(BM_Gemm)
    ->Args({1024, 1024, 1024})
    ->Args({2048, 2048, 2048})
    ->Args({1024, 784, 256})
    ->ArgNames({"m", "k", "n"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// ---- layers ----------------------------------------------------------------

struct Dims {
    double b, in, out;
};
Dims dims(const benchmark::State& state) {
    return {double(state.range(0)), double(state.range(1)), double(state.range(2))};
}

// Forward flops: the layer's own GEMM, plus the policy's.
double linear_forward_flops(Dims d) { return 2 * d.b * d.in * d.out; }
double adapter_forward_flops(Dims d) {  // h D^T and a U^T, bottleneck r on width out
    return linear_forward_flops(d) + 2 * 2 * d.b * d.out * double(bench::kBottleneck);
}
double lora_forward_flops(Dims d) {  // x A^T and u B^T
    return linear_forward_flops(d) + 2 * d.b * double(bench::kRank) * (d.in + d.out);
}
// Backward flops. Linear: dW and dX. Adapter (base frozen): dU, g U, dD, dz D and the
// base's dX. LoRA (base frozen): dB, g B, dA, (g B) A and the base's dX.
double linear_backward_flops(Dims d) { return 2 * 2 * d.b * d.in * d.out; }
double adapter_backward_flops(Dims d) {
    return 2 * d.b * d.in * d.out + 4 * 2 * d.b * d.out * double(bench::kBottleneck);
}
double lora_backward_flops(Dims d) {
    return 2 * d.b * d.in * d.out + 2 * 2 * d.b * double(bench::kRank) * (d.in + d.out);
}

template <class Layer>
Layer make_layer(const benchmark::State& state) {
    Layer layer(std::size_t(state.range(1)), std::size_t(state.range(2)));
    layer.set_input_grad(true);
    return layer;
}

template <class Layer>
Layer make_elementwise(std::size_t width) {
    if constexpr (std::is_same_v<Layer, pw::LayerNorm>) {
        Layer layer(width);
        layer.scale.set_trainable(false);
        layer.shift.set_trainable(false);
        layer.set_input_grad(true);
        return layer;
    } else {
        (void)width;
        Layer layer;
        layer.set_input_grad(true);
        return layer;
    }
}

template <class Layer>
void BM_Forward(benchmark::State& state, double (*flops)(Dims)) {
    auto layer = make_layer<Layer>(state);
    const auto x = bench::random_tensor({std::size_t(state.range(0)), std::size_t(state.range(1))}, 1);
    for (auto _ : state) {
        const auto& y = layer.forward(x);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, flops(dims(state)));
}

template <class Layer>
void BM_Backward(benchmark::State& state, double (*flops)(Dims)) {
    auto layer = make_layer<Layer>(state);
    const auto x = bench::random_tensor({std::size_t(state.range(0)), std::size_t(state.range(1))}, 1);
    const auto dy = bench::random_tensor({std::size_t(state.range(0)), std::size_t(state.range(2))}, 2);
    // Adapter and LoRA start as the identity (up-projection / B zero); give the
    // low-rank factors values so the backward multiplies real numbers.
    patchwork::Rng rng(3);
    layer.visit([&](auto& p) {
        if (p.trainable()) patchwork::init::uniform(p.value, rng, -0.05, 0.05);
    });
    layer.forward(x);
    for (auto _ : state) {
        const auto& dx = layer.backward(dy);  // accumulates into the trainable gradients
        benchmark::DoNotOptimize(dx.data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, flops(dims(state)));
}

void layer_args(benchmark::internal::Benchmark* b) {
    for (std::int64_t batch : {64, 1024})
        for (auto [in, out] : {std::pair<std::int64_t, std::int64_t>{784, 256}, {256, 256}}) b->Args({batch, in, out});
    b->ArgNames({"batch", "in", "out"})->Unit(benchmark::kMicrosecond)->UseRealTime();
}

// ---- element-wise layers of the example model -------------------------------
// LayerNorm(256) and ReLU at the body's width: no GEMM, so items/s (elements)
// instead of GFLOP/s. LayerNorm's scale and shift are frozen, as in the
// Adapter and LoRA bodies; backward computes the input gradient.

template <class Layer>
void BM_ElementwiseForward(benchmark::State& state) {
    const auto batch = std::size_t(state.range(0)), width = std::size_t(state.range(1));
    Layer layer = make_elementwise<Layer>(width);
    const auto x = bench::random_tensor({batch, width}, 1);
    for (auto _ : state) {
        const auto& y = layer.forward(x);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(std::int64_t(state.iterations()) * std::int64_t(batch * width));
}

template <class Layer>
void BM_ElementwiseBackward(benchmark::State& state) {
    const auto batch = std::size_t(state.range(0)), width = std::size_t(state.range(1));
    Layer layer = make_elementwise<Layer>(width);
    const auto x = bench::random_tensor({batch, width}, 1);
    const auto dy = bench::random_tensor({batch, width}, 2);
    layer.forward(x);
    for (auto _ : state) {
        const auto& dx = layer.backward(dy);
        benchmark::DoNotOptimize(dx.data());
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(std::int64_t(state.iterations()) * std::int64_t(batch * width));
}

void elementwise_args(benchmark::internal::Benchmark* b) {
    b->Args({64, 256})->Args({1024, 256})->ArgNames({"batch", "width"})->Unit(benchmark::kMicrosecond)->UseRealTime();
}

// ---- one training step of the example model ---------------------------------

template <class Model>
void BM_TrainStep(benchmark::State& state, Model (*make)()) {
    const auto batch = std::size_t(state.range(0));
    Model model = make();
    bench::TrainStep<Model> step(model, batch);
    for (int i = 0; i < 5; ++i) step.run();  // optimiser state allocated, buffers sized
    for (auto _ : state) benchmark::DoNotOptimize(step.run());
    state.counters["trainable"] = double(pw::trainable_count(model));
    state.SetItemsProcessed(std::int64_t(state.iterations()) * std::int64_t(batch));
}

void step_args(benchmark::internal::Benchmark* b) {
    b->Arg(64)->Arg(1024)->ArgName("batch")->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
    const int threads = bench::configure_threads();
    benchmark::AddCustomContext("patchwork_build", bench::build_info(threads));

    // Layers: names read <Layer>Forward/batch:B/in:I/out:O.
    auto layer = [](const char* name, auto fn, double (*flops)(Dims)) {
        layer_args(benchmark::RegisterBenchmark(name, fn, flops));
    };
    layer("LinearForward", BM_Forward<pw::Linear>, linear_forward_flops);
    layer("LinearBackward", BM_Backward<pw::Linear>, linear_backward_flops);
    layer("Adapter32Forward", BM_Forward<AdapterLinear>, adapter_forward_flops);
    layer("Adapter32Backward", BM_Backward<AdapterLinear>, adapter_backward_flops);
    layer("LoRA8Forward", BM_Forward<LoraLinear>, lora_forward_flops);
    layer("LoRA8Backward", BM_Backward<LoraLinear>, lora_backward_flops);

    // Element-wise layers: <Layer>Forward/batch:B/width:256.
    elementwise_args(benchmark::RegisterBenchmark("LayerNormForward", BM_ElementwiseForward<pw::LayerNorm>));
    elementwise_args(benchmark::RegisterBenchmark("LayerNormBackward", BM_ElementwiseBackward<pw::LayerNorm>));
    elementwise_args(benchmark::RegisterBenchmark("ReluForward", BM_ElementwiseForward<pw::Relu>));
    elementwise_args(benchmark::RegisterBenchmark("ReluBackward", BM_ElementwiseBackward<pw::Relu>));

    // Training steps of the example model: TrainStep<Policy>/batch:B.
    step_args(benchmark::RegisterBenchmark("TrainStepAdapter", BM_TrainStep<bench::AdapterModel>,
                                           bench::make_adapter_model));
    step_args(benchmark::RegisterBenchmark("TrainStepLoRA", BM_TrainStep<bench::LoraModel>, bench::make_lora_model));
    step_args(benchmark::RegisterBenchmark("TrainStepFineTune", BM_TrainStep<bench::FineTuneModel>,
                                           bench::make_finetune_model));
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
