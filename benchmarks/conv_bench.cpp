// Google Benchmark: patchwork's Conv2d and DepthwiseConv2d against a direct
// nested-loop convolution written here, in the same run.
//
//   <Layer>/<Mode>/<impl>/hw:<H>   Layer: Conv3x3_16_32 (16->32, 3x3, stride 1, pad 1),
//                                         Depthwise3x3_32 (32 channels, 3x3, stride 1, pad 1),
//                                         Conv1x1_32_64 (32->64, 1x1)
//                                  Mode:  Forward, Backward (weight, bias and input gradients,
//                                         after one forward), ForwardBackward (both per iteration)
//                                  impl:  patchwork or direct (the baseline below)
// Batch 64, NHWC input of H x H (28 or 14), weight [C_out, k, k, C_in / groups]
// as in patchwork. The GFLOPS counter counts 2 x multiply-adds of the
// convolution: forward once, backward twice (dW and dX).
//
// The baseline: one output element at a time, summing over the taps and the
// input channels of its group (forward); the weight gradient loops over output
// channels (one thread each) and the input gradient scatters every output
// gradient back into the taps it came from (one image per thread). Both use
// OpenMP when the build has it, so both sides have the same threads. Before
// timing, the program checks that the baseline and patchwork agree (largest
// absolute difference of y, dW, db and dX, in the context line "max_abs_diff").
//
// MobileNet-style blocks (patchwork only; torch_conv.py times the same blocks):
//
//   MobileNetBlock_<C>_<E>/<Mode>/patchwork/hw:<H>
//       Sequential<Conv2d(C, E, 1), BatchNorm2d(E), ReLU6, DepthwiseConv2d(E, 3, pad 1), BatchNorm2d(E),
//                  ReLU6, Conv2d(E, C, 1), BatchNorm2d(C)>, convolutions without bias, BatchNorm2d in
//       training mode (batch statistics), input gradient on: C = 24, E = 144 at 56 x 56 and C = 32,
//       E = 192 at 28 x 28 (MobileNetV2's expansion 6). Mode: Forward or ForwardBackward. GFLOPS counts
//       the three convolutions only.
//
// Threads: BENCH_THREADS (default 2) for Eigen and OMP_NUM_THREADS for OpenMP.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "common.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/batch_norm.hpp"
#include "patchwork/layers/conv2d.hpp"

#if defined(_OPENMP)
#define PW_BENCH_OMP_FOR _Pragma("omp parallel for schedule(static)")
#else
#define PW_BENCH_OMP_FOR
#endif

namespace {

namespace pw = patchwork;

constexpr std::size_t kBatch = 64;

struct ConvSpec {
    const char* name;
    std::size_t in, out, kernel, padding, groups;
};

constexpr ConvSpec kSpecs[] = {
    {"Conv3x3_16_32", 16, 32, 3, 1, 1},
    {"Depthwise3x3_32", 32, 32, 3, 1, 32},
    {"Conv1x1_32_64", 32, 64, 1, 0, 1},
};
constexpr std::size_t kSizes[] = {28, 14};

std::size_t out_size(const ConvSpec& s, std::size_t hw) { return hw + 2 * s.padding - s.kernel + 1; }

double forward_flops(const ConvSpec& s, std::size_t hw) {
    const double o = double(out_size(s, hw));
    return 2.0 * double(kBatch) * o * o * double(s.out) * double(s.kernel * s.kernel) * double(s.in / s.groups);
}

/// Direct convolution, stride 1, NHWC, weight [C_out, k, k, C_in / groups].
class DirectConv {
public:
    DirectConv(const ConvSpec& s, std::size_t hw)
        : s_(s), h_(hw), o_(out_size(s, hw)), cig_(s.in / s.groups), cog_(s.out / s.groups),
          w_(s.out * s.kernel * s.kernel * cig_), b_(s.out), dw_(w_.size()), db_(s.out),
          y_(kBatch * o_ * o_ * s.out), dx_(kBatch * h_ * h_ * s.in) {}

    std::vector<float>& weight() { return w_; }
    std::vector<float>& bias() { return b_; }
    const std::vector<float>& y() const { return y_; }
    const std::vector<float>& dw() const { return dw_; }
    const std::vector<float>& db() const { return db_; }
    const std::vector<float>& dx() const { return dx_; }

    const std::vector<float>& forward(const float* x) {
        const std::size_t k = s_.kernel, cin = s_.in, cout = s_.out;
        const auto n_batch = static_cast<std::ptrdiff_t>(kBatch);
        PW_BENCH_OMP_FOR
        for (std::ptrdiff_t n = 0; n < n_batch; ++n) {
            for (std::size_t oh = 0; oh < o_; ++oh)
                for (std::size_t ow = 0; ow < o_; ++ow) {
                    float* yp = &y_[((std::size_t(n) * o_ + oh) * o_ + ow) * cout];
                    for (std::size_t co = 0; co < cout; ++co) {
                        const std::size_t g = co / cog_;
                        float acc = b_[co];
                        for (std::size_t kh = 0; kh < k; ++kh) {
                            const std::ptrdiff_t ih = std::ptrdiff_t(oh + kh) - std::ptrdiff_t(s_.padding);
                            if (ih < 0 || ih >= std::ptrdiff_t(h_)) continue;
                            for (std::size_t kw = 0; kw < k; ++kw) {
                                const std::ptrdiff_t iw = std::ptrdiff_t(ow + kw) - std::ptrdiff_t(s_.padding);
                                if (iw < 0 || iw >= std::ptrdiff_t(h_)) continue;
                                const float* xp = x + ((std::size_t(n) * h_ + std::size_t(ih)) * h_ + std::size_t(iw)) * cin + g * cig_;
                                const float* wp = &w_[((co * k + kh) * k + kw) * cig_];
                                for (std::size_t ci = 0; ci < cig_; ++ci) acc += xp[ci] * wp[ci];
                            }
                        }
                        yp[co] = acc;
                    }
                }
        }
        return y_;
    }

    /// Accumulates dW and db, and writes dX.
    const std::vector<float>& backward(const float* x, const float* dy) {
        const std::size_t k = s_.kernel, cin = s_.in, cout = s_.out;
        // dW and db: one output channel per thread.
        const auto n_out = static_cast<std::ptrdiff_t>(cout);
        PW_BENCH_OMP_FOR
        for (std::ptrdiff_t c = 0; c < n_out; ++c) {
            const auto co = std::size_t(c);
            const std::size_t g = co / cog_;
            float bsum = 0;
            for (std::size_t n = 0; n < kBatch; ++n)
                for (std::size_t oh = 0; oh < o_; ++oh)
                    for (std::size_t ow = 0; ow < o_; ++ow) {
                        const float gy = dy[((n * o_ + oh) * o_ + ow) * cout + co];
                        bsum += gy;
                        for (std::size_t kh = 0; kh < k; ++kh) {
                            const std::ptrdiff_t ih = std::ptrdiff_t(oh + kh) - std::ptrdiff_t(s_.padding);
                            if (ih < 0 || ih >= std::ptrdiff_t(h_)) continue;
                            for (std::size_t kw = 0; kw < k; ++kw) {
                                const std::ptrdiff_t iw = std::ptrdiff_t(ow + kw) - std::ptrdiff_t(s_.padding);
                                if (iw < 0 || iw >= std::ptrdiff_t(h_)) continue;
                                const float* xp = x + ((n * h_ + std::size_t(ih)) * h_ + std::size_t(iw)) * cin + g * cig_;
                                float* dwp = &dw_[((co * k + kh) * k + kw) * cig_];
                                for (std::size_t ci = 0; ci < cig_; ++ci) dwp[ci] += gy * xp[ci];
                            }
                        }
                    }
            db_[co] += bsum;
        }
        // dX: one image per thread, every output gradient scattered into its taps.
        const auto n_batch = static_cast<std::ptrdiff_t>(kBatch);
        PW_BENCH_OMP_FOR
        for (std::ptrdiff_t nn = 0; nn < n_batch; ++nn) {
            const auto n = std::size_t(nn);
            std::fill_n(&dx_[n * h_ * h_ * cin], h_ * h_ * cin, 0.0f);
            for (std::size_t oh = 0; oh < o_; ++oh)
                for (std::size_t ow = 0; ow < o_; ++ow) {
                    const float* dyp = dy + ((n * o_ + oh) * o_ + ow) * cout;
                    for (std::size_t co = 0; co < cout; ++co) {
                        const std::size_t g = co / cog_;
                        const float gy = dyp[co];
                        for (std::size_t kh = 0; kh < k; ++kh) {
                            const std::ptrdiff_t ih = std::ptrdiff_t(oh + kh) - std::ptrdiff_t(s_.padding);
                            if (ih < 0 || ih >= std::ptrdiff_t(h_)) continue;
                            for (std::size_t kw = 0; kw < k; ++kw) {
                                const std::ptrdiff_t iw = std::ptrdiff_t(ow + kw) - std::ptrdiff_t(s_.padding);
                                if (iw < 0 || iw >= std::ptrdiff_t(h_)) continue;
                                float* dxp = &dx_[((n * h_ + std::size_t(ih)) * h_ + std::size_t(iw)) * cin + g * cig_];
                                const float* wp = &w_[((co * k + kh) * k + kw) * cig_];
                                for (std::size_t ci = 0; ci < cig_; ++ci) dxp[ci] += gy * wp[ci];
                            }
                        }
                    }
                }
        }
        return dx_;
    }

private:
    ConvSpec s_;
    std::size_t h_, o_, cig_, cog_;
    std::vector<float> w_, b_, dw_, db_, y_, dx_;
};

pw::Conv2d make_patchwork(const ConvSpec& s) {
    // DepthwiseConv2d only fixes groups = channels in its type; its state is a Conv2d's.
    pw::Conv2d conv = s.groups == s.in && s.in > 1
                          ? pw::Conv2d(pw::DepthwiseConv2d(s.in, s.kernel, {.stride = 1, .padding = s.padding}))
                          : pw::Conv2d(s.in, s.out, s.kernel, {.stride = 1, .padding = s.padding, .groups = s.groups});
    conv.set_input_grad(true);
    pw::Rng rng(7);
    pw::init::uniform(conv.bias.value, rng, -0.1, 0.1);
    return conv;
}

DirectConv make_direct(const ConvSpec& s, std::size_t hw, const pw::Conv2d& like) {
    DirectConv d(s, hw);
    std::copy(like.weight.value.data(), like.weight.value.data() + like.weight.value.size(), d.weight().begin());
    std::copy(like.bias.value.data(), like.bias.value.data() + like.bias.value.size(), d.bias().begin());
    return d;
}

pw::Tensor<float> input(const ConvSpec& s, std::size_t hw) { return bench::random_tensor({kBatch, hw, hw, s.in}, 1); }
pw::Tensor<float> output_grad(const ConvSpec& s, std::size_t hw) {
    const std::size_t o = out_size(s, hw);
    return bench::random_tensor({kBatch, o, o, s.out}, 2);
}

enum class Mode { forward, backward, forward_backward };

void set_gflops(benchmark::State& state, double flops) {
    state.counters["GFLOPS"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

double mode_flops(const ConvSpec& s, std::size_t hw, Mode m) {
    const double f = forward_flops(s, hw);
    return m == Mode::forward ? f : m == Mode::backward ? 2 * f : 3 * f;
}

void BM_Patchwork(benchmark::State& state, ConvSpec s, std::size_t hw, Mode mode) {
    auto conv = make_patchwork(s);
    const auto x = input(s, hw);
    const auto dy = output_grad(s, hw);
    conv.forward(x);
    for (auto _ : state) {
        if (mode != Mode::backward) {
            const auto& y = conv.forward(x);
            benchmark::DoNotOptimize(y.data());
        }
        if (mode != Mode::forward) {
            const auto& dx = conv.backward(dy);  // accumulates dW and db, writes dX
            benchmark::DoNotOptimize(dx.data());
        }
        benchmark::ClobberMemory();
    }
    state.SetLabel(conv.backend());
    set_gflops(state, mode_flops(s, hw, mode));
}

void BM_Direct(benchmark::State& state, ConvSpec s, std::size_t hw, Mode mode) {
    const auto conv = make_patchwork(s);
    auto direct = make_direct(s, hw, conv);
    const auto x = input(s, hw);
    const auto dy = output_grad(s, hw);
    for (auto _ : state) {
        if (mode != Mode::backward) benchmark::DoNotOptimize(direct.forward(x.data()).data());
        if (mode != Mode::forward) benchmark::DoNotOptimize(direct.backward(x.data(), dy.data()).data());
        benchmark::ClobberMemory();
    }
    set_gflops(state, mode_flops(s, hw, mode));
}

float max_abs_diff(const float* a, const float* b, std::size_t n) {
    float m = 0;
    for (std::size_t i = 0; i < n; ++i) m = std::max(m, std::abs(a[i] - b[i]));
    return m;
}

/// One forward and backward of both implementations; the largest difference per shape.
std::string check_agreement() {
    std::ostringstream os;
    bool first = true;
    for (const auto& s : kSpecs)
        for (std::size_t hw : kSizes) {
            auto conv = make_patchwork(s);
            auto direct = make_direct(s, hw, conv);
            const auto x = input(s, hw);
            const auto dy = output_grad(s, hw);
            const auto& y = conv.forward(x);
            const auto& dx = conv.backward(dy);
            direct.forward(x.data());
            direct.backward(x.data(), dy.data());
            float d = max_abs_diff(y.data(), direct.y().data(), y.size());
            d = std::max(d, max_abs_diff(dx.data(), direct.dx().data(), dx.size()));
            d = std::max(d, max_abs_diff(conv.weight.grad.data(), direct.dw().data(), direct.dw().size()));
            d = std::max(d, max_abs_diff(conv.bias.grad.data(), direct.db().data(), direct.db().size()));
            os << (first ? "" : " ") << s.name << "/" << hw << "=" << d;
            first = false;
        }
    return os.str();
}

/// ReLU6: f(x) = min(max(x, 0), 6), f'(x) = [0 < x < 6] (MobileNet's activation).
struct Relu6Function {
    static constexpr const char* name = "relu6";
    template <class T>
    static T value(T x) noexcept { return x < T(0) ? T(0) : x > T(6) ? T(6) : x; }
    template <class T>
    static T grad(T g, T x, T /*y*/) noexcept { return x > T(0) && x < T(6) ? g : T(0); }
};
using Relu6 = pw::BasicActivation<float, Relu6Function>;

using MobileNetBlock = pw::Sequential<pw::Conv2d, pw::BatchNorm2d, Relu6, pw::DepthwiseConv2d, pw::BatchNorm2d, Relu6,
                                      pw::Conv2d, pw::BatchNorm2d>;

struct BlockSpec {
    const char* name;
    std::size_t channels, expanded, hw;
};
constexpr BlockSpec kBlocks[] = {
    {"MobileNetBlock_24_144", 24, 144, 56},
    {"MobileNetBlock_32_192", 32, 192, 28},
};

void BM_Block(benchmark::State& state, BlockSpec s, Mode mode) {
    const pw::Conv2dOptions no_bias{.bias = false};
    MobileNetBlock block(pw::Conv2d(s.channels, s.expanded, 1, no_bias), pw::BatchNorm2d(s.expanded), Relu6{},
                         pw::DepthwiseConv2d(s.expanded, 3, {.padding = 1, .bias = false}), pw::BatchNorm2d(s.expanded),
                         Relu6{}, pw::Conv2d(s.expanded, s.channels, 1, no_bias), pw::BatchNorm2d(s.channels));
    block.set_input_grad(true);
    const auto x = bench::random_tensor({kBatch, s.hw, s.hw, s.channels}, 1);
    const auto dy = bench::random_tensor({kBatch, s.hw, s.hw, s.channels}, 2);
    block.forward(x);  // the buffers' first allocation and page faults stay out of the timing
    block.backward(dy);
    for (auto _ : state) {
        benchmark::DoNotOptimize(block.forward(x).data());
        if (mode != Mode::forward) benchmark::DoNotOptimize(block.backward(dy).data());
        benchmark::ClobberMemory();
    }
    const double pixels = double(kBatch * s.hw * s.hw);
    const double flops = 2.0 * pixels * double(s.expanded) * double(2 * s.channels + 9);
    set_gflops(state, mode == Mode::forward ? flops : 3 * flops);
}

}  // namespace

int main(int argc, char** argv) {
    const int threads = bench::configure_threads();
    benchmark::AddCustomContext("patchwork_build", bench::build_info(threads));
    benchmark::AddCustomContext("max_abs_diff", check_agreement());

    const std::pair<Mode, const char*> modes[] = {
        {Mode::forward, "Forward"}, {Mode::backward, "Backward"}, {Mode::forward_backward, "ForwardBackward"}};
    for (const auto& s : kSpecs)
        for (std::size_t hw : kSizes)
            for (const auto& [mode, mode_name] : modes) {
                const std::string base = std::string(s.name) + "/" + mode_name + "/";
                const std::string suffix = "/hw:" + std::to_string(hw);
                benchmark::RegisterBenchmark((base + "patchwork" + suffix).c_str(), BM_Patchwork, s, hw, mode)
                    ->Unit(benchmark::kMillisecond)
                    ->UseRealTime();
                benchmark::RegisterBenchmark((base + "direct" + suffix).c_str(), BM_Direct, s, hw, mode)
                    ->Unit(benchmark::kMillisecond)
                    ->UseRealTime();
            }
    for (const auto& b : kBlocks)
        for (const auto& [mode, mode_name] : {modes[0], modes[2]}) {
            const std::string name =
                std::string(b.name) + "/" + mode_name + "/patchwork/hw:" + std::to_string(b.hw);
            benchmark::RegisterBenchmark(name.c_str(), BM_Block, b, mode)->Unit(benchmark::kMillisecond)->UseRealTime();
        }
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
