// The image layers on the device against the same layers on the CPU: Conv2d
// (dense, grouped, pointwise, strided, padded), DepthwiseConv2d (channel
// multipliers), BatchNorm2d (training with running statistics, inference,
// fold), AvgPool2d, MaxPool2d, GlobalAvgPool, Flatten and Unflatten, the
// selection policies on them, a small CNN as one Sequential, and a multi-task
// model on a convolutional backbone with per-task BatchNorm statistics. Forward,
// input gradient and every parameter gradient: fp32 within 1e-5 and double
// within 1e-12 (2-norm relative error), device outputs poisoned (NaN) before
// each run, sizes with partial blocks, odd extents, stride 2 and padding.
#include <algorithm>
#include <array>
#include <cstdio>
#include <vector>

#include "device_compare.hpp"

#include "patchwork/layers/batch_norm.hpp"
#include "patchwork/layers/conv2d.hpp"
#include "patchwork/layers/pool.hpp"
#include "patchwork/layers/reshape.hpp"
#include "patchwork/multitask/multitask.hpp"
#include "patchwork/policies/depthwise_patch.hpp"
#include "patchwork/policies/norm_patch.hpp"

// The definitions of the image layers' device operations (nvcc only).
#include "patchwork/kernels/batchnorm.cuh"
#include "patchwork/kernels/conv.cuh"
#include "patchwork/kernels/pooling.cuh"

using namespace device_test;

namespace {

/// Every parameter of a CPU module drawn at random (biases start at zero, BatchNorm at the identity).
template <class M>
void randomize_conv_parameters(M& m, std::mt19937& rng) {
    m.visit([&](auto& p) { p.value = random_tensor<typename M::Scalar>(p.value.shape(), rng, 0.5); });
}

/// The largest relative error seen by a test case, printed at its end.
struct WorstError {
    const char* what;
    double worst = 0;
    template <class T>
    void check(const Tensor<T>& cpu, const Tensor<T, Cuda>& dev, const char* item) {
        const double e = rel_error(cpu, pw::to_host(dev));
        worst = std::max(worst, e);
        INFO(item);
        CHECK(e < tolerance<T>());
    }
    ~WorstError() { std::printf("%s: largest relative error %.3g\n", what, worst); }
};

struct ConvCase {
    std::size_t batch, h, w, in, out, kernel, stride, padding, groups;
    bool bias;
};

}  // namespace

TEST_CASE_TEMPLATE("Conv2d on the device equals Conv2d on the CPU", T, float, double) {
    std::mt19937 rng(21);
    std::vector<ConvCase> cases = {
        {1, 1, 1, 1, 1, 1, 1, 0, 1, true},    // the smallest
        {2, 5, 7, 3, 4, 3, 1, 1, 1, true},    // 3x3, padding, odd extents
        {3, 9, 6, 4, 6, 3, 2, 1, 2, false},   // grouped, stride 2, no bias
        {2, 8, 7, 6, 5, 1, 1, 0, 1, true},    // pointwise: no im2col
        {2, 7, 5, 4, 6, 1, 2, 0, 2, true},    // 1x1 with stride 2, grouped
        {1, 11, 13, 5, 7, 5, 2, 2, 1, true},  // 5x5, stride 2, padding 2
        {2, 6, 6, 3, 6, 3, 1, 0, 3, true},    // groups = in_channels: depthwise, m = 2
        {2, 9, 9, 1, 4, 3, 1, 1, 1, true},    // a grayscale stem (dense)
        {1, 4, 5, 2, 3, 4, 3, 1, 1, true},    // kernel 4, stride 3: windows that skip pixels
    };
    if (!kCpu) cases.push_back({8, 32, 32, 16, 32, 3, 1, 1, 1, true});
    for (const ConvCase& c : cases) {
        INFO("batch=" << c.batch << " h=" << c.h << " w=" << c.w << " in=" << c.in << " out=" << c.out
                      << " k=" << c.kernel << " stride=" << c.stride << " pad=" << c.padding
                      << " groups=" << c.groups);
        const pw::Conv2dOptions o{.stride = c.stride, .padding = c.padding, .groups = c.groups, .bias = c.bias};
        pw::BasicConv2d<T> cpu(c.in, c.out, c.kernel, o);
        pw::BasicConv2d<T, Cuda> dev(c.in, c.out, c.kernel, o);
        CHECK(dev.depthwise() == cpu.depthwise());
        randomize_conv_parameters(cpu, rng);
        compare_module(cpu, dev, Shape{c.batch, c.h, c.w, c.in}, rng);
    }
    // A frozen weight gets no gradient; no input gradient when switched off.
    pw::BasicConv2d<T> cpu(3, 5, 3, {.padding = 1});
    pw::BasicConv2d<T, Cuda> dev(3, 5, 3, {.padding = 1});
    randomize_conv_parameters(cpu, rng);
    cpu.weight.set_trainable(false);
    dev.weight.set_trainable(false);
    compare_module(cpu, dev, Shape{2, 4, 5, 3}, rng);
    dev.set_input_grad(false);
    const Tensor<T, Cuda> x(random_tensor<T>(Shape{2, 4, 5, 3}, rng));
    dev.forward(x);
    CHECK(dev.backward(Tensor<T, Cuda>(Shape{2, 4, 5, 5})).empty());
}

TEST_CASE_TEMPLATE("Conv2d on the device in chunks of images equals one pass", T, float, double) {
    // A patch matrix capped at one image (then two): the forward and the
    // backward run image chunk by image chunk, weight gradients added in order.
    std::mt19937 rng(22);
    WorstError worst{"Conv2d in chunks"};
    const pw::Conv2dOptions o{.stride = 2, .padding = 1, .groups = 2};
    pw::BasicConv2d<T> cpu(4, 6, 3, o);
    randomize_conv_parameters(cpu, rng);
    const Shape in{5, 7, 6, 4};
    const Tensor<T> x = random_tensor<T>(in, rng);
    const Tensor<T>& y = cpu.forward(x);
    const Tensor<T> g = random_tensor<T>(y.shape(), rng);
    pw::zero_grad(cpu);
    const Tensor<T>& dx = cpu.backward(g);

    pw::cuda::WindowShape s;
    s.batch = 5, s.h = 7, s.w = 6, s.in_channels = 4, s.ho = 4, s.wo = 3, s.out_channels = 6;
    s.kernel = 3, s.stride = 2, s.padding = 1, s.groups = 2;
    const std::size_t per_image = s.ho * s.wo * s.taps() * s.in_channels;
    const Tensor<T, Cuda> xd(x), gd(g), wd(cpu.weight.value), bd(cpu.bias.value);
    for (std::size_t cap : {per_image, 2 * per_image + 1}) {
        Tensor<T, Cuda> yd, cols, dcols, dxd;
        Tensor<T, Cuda> dw(cpu.weight.value.shape()), db(Shape{6});
        pw::cuda::conv2d_forward(xd, wd, &bd, s, yd, cols, "chunked", cap);
        worst.check(y, yd, "forward");
        dxd.resize(in);
        dxd.poison();
        pw::cuda::conv2d_backward(xd, gd, wd, s, &dw, &db, &dxd, cols, dcols, "chunked", cap);
        worst.check(dx, dxd, "input gradient");
        worst.check(cpu.weight.grad, dw, "weight gradient");
        worst.check(cpu.bias.grad, db, "bias gradient");
    }
}

TEST_CASE_TEMPLATE("DepthwiseConv2d on the device equals DepthwiseConv2d on the CPU", T, float, double) {
    std::mt19937 rng(23);
    struct Case {
        std::size_t batch, h, w, channels, kernel, stride, padding, multiplier;
        bool bias;
    };
    std::vector<Case> cases = {
        {1, 1, 1, 1, 1, 1, 0, 1, true},  {2, 7, 9, 5, 3, 1, 1, 1, true}, {3, 8, 7, 4, 3, 2, 1, 2, false},
        {2, 6, 6, 3, 5, 2, 2, 1, true},  {1, 5, 5, 2, 3, 1, 0, 3, true}, {2, 9, 4, 8, 3, 1, 2, 1, true},
        {1, 3, 3, 1, 3, 1, 1, 2, true},  // one channel, multiplier 2
    };
    if (!kCpu) cases.push_back({8, 56, 56, 32, 3, 1, 1, 1, true});
    for (const Case& c : cases) {
        INFO("batch=" << c.batch << " h=" << c.h << " w=" << c.w << " channels=" << c.channels << " k=" << c.kernel
                      << " stride=" << c.stride << " pad=" << c.padding << " multiplier=" << c.multiplier);
        const pw::Conv2dOptions o{.stride = c.stride, .padding = c.padding, .bias = c.bias};
        pw::BasicDepthwiseConv2d<T> cpu(c.channels, c.kernel, o, c.multiplier);
        pw::BasicDepthwiseConv2d<T, Cuda> dev(c.channels, c.kernel, o, c.multiplier);
        CHECK(dev.depthwise());
        CHECK(dev.weight.role() == pw::Role::depthwise);
        randomize_conv_parameters(cpu, rng);
        compare_module(cpu, dev, Shape{c.batch, c.h, c.w, c.channels}, rng);
    }
    // The filter gradient is a deterministic reduction: two backward passes give the same bits.
    pw::BasicDepthwiseConv2d<T, Cuda> dev(6, 3, {.padding = 1});
    const Tensor<T, Cuda> x(random_tensor<T>(Shape{3, 20, 13, 6}, rng));
    const Tensor<T, Cuda> g(random_tensor<T>(Shape{3, 20, 13, 6}, rng));
    std::vector<Tensor<T>> grads;
    for (int run = 0; run < 2; ++run) {
        pw::zero_grad(dev);
        dev.forward(x);
        dev.backward(g);
        grads.push_back(pw::to_host(dev.weight.grad));
    }
    CHECK(std::equal(grads[0].begin(), grads[0].end(), grads[1].begin()));
}

TEST_CASE_TEMPLATE("BatchNorm2d on the device equals BatchNorm2d on the CPU", T, float, double) {
    std::mt19937 rng(24);
    WorstError worst{"BatchNorm2d running statistics and fold"};
    std::vector<Shape> shapes = {{1, 1, 1, 1}, {2, 3, 5, 7}, {300, 33}, {4, 9, 7, 40}};
    if (!kCpu) shapes.push_back({32, 28, 28, 64});
    for (const Shape& shape : shapes) {
        INFO("shape " << shape);
        const std::size_t c = shape.back();
        for (bool training : {true, false}) {
            INFO("training " << training);
            pw::BasicBatchNorm2d<T> cpu(c, 1e-3, 0.2);
            pw::BasicBatchNorm2d<T, Cuda> dev(c, 1e-3, 0.2);
            randomize_conv_parameters(cpu, rng);
            cpu.running_mean = random_tensor<T>(Shape{c}, rng);
            cpu.running_var = random_tensor<T>(Shape{c}, rng);
            for (auto& v : cpu.running_var) v = T(0.5) + v * v;
            pw::copy(cpu.running_mean, dev.running_mean);
            pw::copy(cpu.running_var, dev.running_var);
            cpu.set_training(training);
            dev.set_training(training);
            {
                // One step each: the running statistics move alike (compare_module runs the device module thrice).
                pw::BasicBatchNorm2d<T> cpu1 = cpu;
                pw::BasicBatchNorm2d<T, Cuda> dev1(c, 1e-3, 0.2);
                copy_parameters(cpu1, dev1);
                pw::copy(cpu.running_mean, dev1.running_mean);
                pw::copy(cpu.running_var, dev1.running_var);
                dev1.set_training(training);
                const Tensor<T> x = random_tensor<T>(shape, rng, 2.0);
                cpu1.forward(x);
                dev1.forward(Tensor<T, Cuda>(x));
                worst.check(cpu1.running_mean, dev1.running_mean, "running mean");
                worst.check(cpu1.running_var, dev1.running_var, "running variance");
                const auto f = cpu1.fold();
                const auto fd = dev1.fold();
                worst.check(f.scale, fd.scale, "folded scale");
                worst.check(f.bias, fd.bias, "folded bias");
            }
            compare_module(cpu, dev, shape, rng);
        }
    }
    pw::BasicBatchNorm2d<T, Cuda> dev(5);
    dev.set_path("stage1.bn");
    CHECK_THROWS_WITH_AS(dev.forward(Tensor<T, Cuda>(Shape{2, 3, 3, 4})),
                         doctest::Contains("stage1.bn: batchnorm input (channels last)"), pw::ShapeError);
}

TEST_CASE_TEMPLATE("pools, Flatten and Unflatten on the device equal the CPU", T, float, double) {
    std::mt19937 rng(25);
    struct Case {
        std::size_t batch, h, w, c, kernel, stride, padding;
    };
    std::vector<Case> cases = {{1, 1, 1, 1, 1, 1, 0}, {2, 6, 6, 3, 2, 2, 0}, {3, 7, 5, 4, 3, 2, 1},
                               {2, 9, 8, 5, 3, 1, 1}, {1, 5, 7, 6, 4, 3, 2}, {2, 4, 4, 33, 2, 1, 0}};
    if (!kCpu) cases.push_back({16, 56, 56, 64, 3, 2, 1});
    for (const Case& c : cases) {
        INFO("batch=" << c.batch << " h=" << c.h << " w=" << c.w << " c=" << c.c << " k=" << c.kernel
                      << " stride=" << c.stride << " pad=" << c.padding);
        const Shape in{c.batch, c.h, c.w, c.c};
        {
            pw::BasicAvgPool2d<T> cpu(c.kernel, c.stride, c.padding);
            pw::BasicAvgPool2d<T, Cuda> dev(c.kernel, c.stride, c.padding);
            compare_module(cpu, dev, in, rng);
        }
        {
            pw::BasicMaxPool2d<T> cpu(c.kernel, c.stride, c.padding);
            pw::BasicMaxPool2d<T, Cuda> dev(c.kernel, c.stride, c.padding);
            compare_module(cpu, dev, in, rng);
        }
        {
            pw::BasicGlobalAvgPool<T> cpu;
            pw::BasicGlobalAvgPool<T, Cuda> dev;
            compare_module(cpu, dev, in, rng);
        }
        {
            pw::BasicFlatten<T> cpu;
            pw::BasicFlatten<T, Cuda> dev;
            compare_module(cpu, dev, in, rng);
        }
        {
            pw::BasicUnflatten<T> cpu(c.h, c.w, c.c);
            pw::BasicUnflatten<T, Cuda> dev(c.h, c.w, c.c);
            compare_module(cpu, dev, Shape{c.batch, c.h * c.w * c.c}, rng);
        }
    }
    // Overlapping max windows (stride 1): an input that wins several windows collects all their gradients.
    pw::BasicMaxPool2d<T> cpu(3, 1, 1);
    pw::BasicMaxPool2d<T, Cuda> dev(3, 1, 1);
    compare_module(cpu, dev, Shape{2, 5, 5, 3}, rng);
    pw::BasicAvgPool2d<T, Cuda> avg(3, 2);
    avg.set_path("head.pool");
    CHECK_THROWS_WITH_AS(avg.forward(Tensor<T, Cuda>(Shape{2, 2, 2, 4})), doctest::Contains("head.pool: avgpool input"),
                         pw::ShapeError);
}

TEST_CASE_TEMPLATE("policies on device convolutions and BatchNorm2d equal the CPU", T, float, double) {
    std::mt19937 rng(26);
    {
        pw::Tune<pw::BasicConv2d<T>, pw::BiasOnly> cpu(4, 6, 3, pw::Conv2dOptions{.stride = 2, .padding = 1});
        pw::Tune<pw::BasicConv2d<T, Cuda>, pw::BiasOnly> dev(4, 6, 3, pw::Conv2dOptions{.stride = 2, .padding = 1});
        randomize_conv_parameters(cpu, rng);
        compare_module(cpu, dev, Shape{2, 7, 8, 4}, rng);
    }
    {
        pw::Tune<pw::BasicDepthwiseConv2d<T>, pw::DepthwisePatch> cpu(5, 3, pw::Conv2dOptions{.padding = 1});
        pw::Tune<pw::BasicDepthwiseConv2d<T, Cuda>, pw::DepthwisePatch> dev(5, 3, pw::Conv2dOptions{.padding = 1});
        randomize_conv_parameters(cpu, rng);
        CHECK(!dev.base().bias.trainable());
        compare_module(cpu, dev, Shape{3, 6, 5, 5}, rng);
    }
    {
        pw::Tune<pw::BasicBatchNorm2d<T>, pw::NormPatch> cpu(7);
        pw::Tune<pw::BasicBatchNorm2d<T, Cuda>, pw::NormPatch> dev(7);
        randomize_conv_parameters(cpu, rng);
        compare_module(cpu, dev, Shape{2, 4, 3, 7}, rng);
    }
    {
        pw::Tune<pw::BasicConv2d<T>, pw::Frozen> cpu(3, 4, 3);
        pw::Tune<pw::BasicConv2d<T, Cuda>, pw::Frozen> dev(3, 4, 3);
        randomize_conv_parameters(cpu, rng);
        compare_module(cpu, dev, Shape{2, 5, 5, 3}, rng);
    }
    // Per-pixel patches on the channels-last outputs: the fused kernels of Linear outputs apply unchanged.
    {
        pw::Tune<pw::BasicConv2d<T>, pw::Frozen, pw::ScaleShift> cpu(3, 5, 3, pw::Conv2dOptions{.stride = 2});
        pw::Tune<pw::BasicConv2d<T, Cuda>, pw::Frozen, pw::ScaleShift> dev(3, 5, 3, pw::Conv2dOptions{.stride = 2});
        randomize_conv_parameters(cpu, rng);
        compare_module(cpu, dev, Shape{2, 7, 6, 3}, rng);
    }
    {
        pw::Tune<pw::BasicDepthwiseConv2d<T>, pw::Frozen, pw::Adapter<3>> cpu(6, 3, pw::Conv2dOptions{.padding = 1});
        pw::Tune<pw::BasicDepthwiseConv2d<T, Cuda>, pw::Frozen, pw::Adapter<3>> dev(6, 3,
                                                                                    pw::Conv2dOptions{.padding = 1});
        randomize_conv_parameters(cpu, rng);
        compare_module(cpu, dev, Shape{2, 5, 4, 6}, rng);
    }
}

TEST_CASE_TEMPLATE("a small CNN on the device equals the CPU model", T, float, double) {
    // Unflatten, Conv2d, BatchNorm2d (training), ReLU, MaxPool2d, DepthwiseConv2d, GlobalAvgPool and Linear
    // in one Sequential: the layers hand each other device tensors, and the gradients flow through all of them.
    // The convolution before BatchNorm2d has no bias: its gradient would be zero (up to rounding) in training mode.
    std::mt19937 rng(27);
    constexpr pw::Conv2dOptions kStem{.padding = 1, .bias = false};
    using CpuNet = pw::Sequential<pw::BasicUnflatten<T>, pw::BasicConv2d<T>, pw::BasicBatchNorm2d<T>, pw::BasicRelu<T>,
                                  pw::BasicMaxPool2d<T>, pw::BasicDepthwiseConv2d<T>, pw::BasicGlobalAvgPool<T>,
                                  pw::BasicLinear<T>>;
    using DevNet =
        pw::Sequential<pw::BasicUnflatten<T, Cuda>, pw::BasicConv2d<T, Cuda>, pw::BasicBatchNorm2d<T, Cuda>,
                       pw::BasicRelu<T, Cuda>, pw::BasicMaxPool2d<T, Cuda>, pw::BasicDepthwiseConv2d<T, Cuda>,
                       pw::BasicGlobalAvgPool<T, Cuda>, pw::BasicLinear<T, Cuda>>;
    CpuNet cpu{pw::BasicUnflatten<T>(9, 8, 2), pw::BasicConv2d<T>(2, 6, 3, kStem), pw::BasicBatchNorm2d<T>(6),
               pw::BasicRelu<T>{}, pw::BasicMaxPool2d<T>(2), pw::BasicDepthwiseConv2d<T>(6, 3, {.padding = 1}),
               pw::BasicGlobalAvgPool<T>{}, pw::BasicLinear<T>(6, 4)};
    DevNet dev{pw::BasicUnflatten<T, Cuda>(9, 8, 2), pw::BasicConv2d<T, Cuda>(2, 6, 3, kStem),
               pw::BasicBatchNorm2d<T, Cuda>(6), pw::BasicRelu<T, Cuda>{}, pw::BasicMaxPool2d<T, Cuda>(2),
               pw::BasicDepthwiseConv2d<T, Cuda>(6, 3, {.padding = 1}), pw::BasicGlobalAvgPool<T, Cuda>{},
               pw::BasicLinear<T, Cuda>(6, 4)};
    randomize_conv_parameters(cpu, rng);
    compare_module(cpu, dev, Shape{5, 9 * 8 * 2}, rng);
}

TEST_CASE_TEMPLATE("device convolutions name the module and the shapes on bad input", T, float, double) {
    pw::BasicConv2d<T, Cuda> conv(3, 4, 3, {.padding = 1});
    conv.set_path("features.conv1");
    const char* message = "features.conv1: conv input (NHWC): expected [2, 5, 5, 3], got [2, 5, 5, 4]";
    CHECK_THROWS_WITH_AS(conv.forward(Tensor<T, Cuda>(Shape{2, 5, 5, 4})), doctest::Contains(message), pw::ShapeError);
    CHECK_THROWS_AS(conv.forward(Tensor<T, Cuda>(Shape{10, 3})), pw::ShapeError);
    pw::BasicDepthwiseConv2d<T, Cuda> dw(4, 5);
    dw.set_path("features.dw");
    CHECK_THROWS_WITH_AS(dw.forward(Tensor<T, Cuda>(Shape{1, 3, 3, 4})), doctest::Contains("features.dw"),
                         pw::ShapeError);
    const Tensor<T, Cuda> x(Shape{2, 5, 5, 3});
    conv.forward(x);
    CHECK_THROWS_WITH_AS(conv.backward(Tensor<T, Cuda>(Shape{2, 5, 5, 3})),
                         doctest::Contains("features.conv1: conv output gradient"), pw::ShapeError);
    using DevConv = pw::BasicConv2d<T, Cuda>;
    CHECK_THROWS_AS(DevConv(3, 4, 3, {.groups = 2}), pw::ConfigError);
}

TEST_CASE("MultiTask on a device convolutional backbone with per-task BatchNorm statistics equals the CPU") {
    // The backbone of examples/multitask_patches in small: a frozen stem, per-task depthwise filters
    // (DepthwisePatch) and BatchNorm2d scale, shift and running statistics (NormPatch). The CPU model computes
    // a mixed batch in one pass; the device model groups the rows by task (its image layers take whole
    // batches), binding each task's banks and statistics. Both equal the per-task passes.
    using T = double;
    std::mt19937 rng(28);
    constexpr pw::Conv2dOptions kPad{.padding = 1};
    using CpuBody = pw::Tune<pw::Sequential<pw::BasicConv2d<T>, pw::BasicDepthwiseConv2d<T>, pw::BasicBatchNorm2d<T>,
                                            pw::BasicRelu<T>, pw::BasicGlobalAvgPool<T>>,
                             pw::DepthwisePatch, pw::NormPatch>;
    using DevBody = pw::Tune<pw::Sequential<pw::BasicConv2d<T, Cuda>, pw::BasicDepthwiseConv2d<T, Cuda>,
                                            pw::BasicBatchNorm2d<T, Cuda>, pw::BasicRelu<T, Cuda>,
                                            pw::BasicGlobalAvgPool<T, Cuda>>,
                             pw::DepthwisePatch, pw::NormPatch>;
    std::vector<pw::BasicLinear<T>> heads;
    std::vector<pw::BasicLinear<T, Cuda>> dev_heads;
    for (int k = 0; k < 3; ++k) {
        heads.emplace_back(4, 2);
        dev_heads.emplace_back(4, 2);
    }
    pw::MultiTask<CpuBody, pw::BasicLinear<T>> cpu(
        CpuBody(pw::BasicConv2d<T>(2, 4, 3, kPad), pw::BasicDepthwiseConv2d<T>(4, 3, kPad), pw::BasicBatchNorm2d<T>(4),
                pw::BasicRelu<T>{}, pw::BasicGlobalAvgPool<T>{}),
        std::move(heads));
    pw::MultiTask<DevBody, pw::BasicLinear<T, Cuda>> dev(
        DevBody(pw::BasicConv2d<T, Cuda>(2, 4, 3, kPad), pw::BasicDepthwiseConv2d<T, Cuda>(4, 3, kPad),
                pw::BasicBatchNorm2d<T, Cuda>(4), pw::BasicRelu<T, Cuda>{}, pw::BasicGlobalAvgPool<T, Cuda>{}),
        std::move(dev_heads));
    cpu.visit([&](auto& p) {
        p.value = random_tensor<T>(p.value.shape(), rng, 0.5);
        if (p.leaf() == "running_var")
            for (auto& v : p.value) v = 0.5 + std::abs(v);
    });
    copy_parameters(cpu, dev);
    CHECK(dev.slot_count() == cpu.slot_count());
    CHECK(cpu.one_pass_supported());
    CHECK(!dev.one_pass_supported());  // device BatchNorm2d takes whole batches: grouped by task

    const std::vector<int> ids{2, 0, 2, 1, 0, 0, 2};
    const Tensor<T> x = random_tensor<T>(Shape{7, 5, 6, 2}, rng);
    const Tensor<T, Cuda> xd(x);
    const Tensor<T>& y = cpu.forward(x, ids);
    const Tensor<T, Cuda>& yd = dev.forward(xd, ids);
    CHECK(dev.last_mixed_pass() == pw::MixedPass::grouped);
    check_close(y, yd, "mixed forward");
    const Tensor<T> g = random_tensor<T>(y.shape(), rng);
    const Tensor<T, Cuda> gd(g);
    pw::zero_grad(cpu);
    pw::zero_grad(dev);
    cpu.set_input_grad(true);
    dev.set_input_grad(true);
    check_close(cpu.backward(g), dev.backward(gd), "mixed input gradient");
    // Every gradient, and every task's running statistics after one training-mode forward (moved once, by its
    // own rows; task 1's too, the statistics restored after the grouped backward's second forward).
    check_gradients(cpu, dev);
    std::vector<Tensor<T>> values;
    cpu.visit([&](auto& p) { values.push_back(p.value); });
    std::size_t i = 0;
    dev.visit([&](auto& p) { check_close(values[i++], p.value, p.name().c_str()); });
}
