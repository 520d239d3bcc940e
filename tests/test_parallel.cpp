// The loops of core/parallel.hpp: every index is visited exactly once, and the
// layers that split work across threads give the same bits on any thread
// count. This file is also built with OpenMP (test_parallel_openmp), where
// the tensors below are large enough to take the threaded path.
#include <doctest/doctest.h>

#include <cstddef>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "patchwork/core/parallel.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/conv2d.hpp"
#include "patchwork/layers/identity.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/policies/scale_shift.hpp"
#include "patchwork/policies/tune.hpp"

namespace pw = patchwork;

namespace {
void set_threads(int n) {
#if defined(_OPENMP)
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}
}  // namespace

TEST_CASE("parallel: for_range and for_rows visit every index exactly once") {
    set_threads(2);
    for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(15), std::size_t(16), std::size_t(17),
                          pw::parallel_threshold - 1, pw::parallel_threshold, std::size_t(100003)}) {
        std::vector<int> seen(n, 0);
        pw::for_range(n, [&](std::size_t b, std::size_t e) {
            for (std::size_t i = b; i < e; ++i) ++seen[i];
        });
        bool once = true;
        for (int s : seen) once = once && s == 1;
        INFO("n = ", n);
        CHECK(once);
        std::vector<int> rows(n, 0);
        pw::for_rows(n, 64, [&](std::size_t r) { ++rows[r]; });
        once = true;
        for (int s : rows) once = once && s == 1;
        CHECK(once);
    }
}

TEST_CASE("parallel: LayerNorm, ReLU, GELU and ScaleShift give the same bits on 1 and 2 threads") {
    const pw::Shape shape{512, 256};  // 131072 elements: above the threshold
    pw::Rng rng(5);
    pw::Tensor<float> x(shape), dy(shape);
    pw::init::normal(x, rng, 0.0, 1.0);
    pw::init::normal(dy, rng, 0.0, 1.0);

    const auto run = [&](int threads) {
        set_threads(threads);
        pw::LayerNorm ln(256);
        pw::init::normal(ln.scale.value, rng = pw::Rng(6), 1.0, 0.1);
        pw::Relu relu;
        pw::Gelu gelu;
        pw::Tune<pw::Identity, pw::ScaleShift> ss(256);
        pw::init::normal(ss.inner().scale.value, rng = pw::Rng(7), 1.0, 0.1);
        std::vector<pw::Tensor<float>> out;
        out.push_back(ln.forward(x));
        out.push_back(ln.backward(dy));
        out.push_back(ln.scale.grad);
        out.push_back(relu.forward(x));
        out.push_back(relu.backward(dy));
        out.push_back(gelu.forward(x));
        out.push_back(gelu.backward(dy));
        out.push_back(ss.forward(x));
        out.push_back(ss.backward(dy));
        return out;
    };
    const auto one = run(1);
    const auto two = run(2);
    REQUIRE(one.size() == two.size());
    for (std::size_t k = 0; k < one.size(); ++k) {
        INFO("output ", k);
        REQUIRE(one[k].shape() == two[k].shape());
        std::size_t differ = 0;
        for (std::size_t i = 0; i < one[k].size(); ++i) differ += one[k][i] != two[k][i];
        CHECK(differ == 0);
    }
    set_threads(2);
}

namespace {
/// Forward and backward of a float convolution on `threads` threads: dx, dW, db.
std::vector<pw::Tensor<float>> conv_outputs(pw::Conv2d conv, const pw::Tensor<float>& x, const pw::Tensor<float>& dy,
                                            int threads, bool onednn) {
    set_threads(threads);
    pw::Rng rng(9);
    pw::init::normal(conv.weight.value, rng, 0.0, 0.3);
    pw::init::normal(conv.bias.value, rng, 0.0, 0.3);
    conv.set_input_grad(true);
    conv.set_onednn(onednn);
    conv.forward(x);
    if (!onednn) CHECK(std::string(conv.backend()) == "patchwork");
    std::vector<pw::Tensor<float>> out;
    out.push_back(conv.backward(dy));
    out.push_back(conv.weight.grad);
    out.push_back(conv.bias.grad);
    return out;
}

void check_same_bits(const std::vector<pw::Tensor<float>>& a, const std::vector<pw::Tensor<float>>& b) {
    for (std::size_t k = 0; k < a.size(); ++k) {
        INFO("output ", k, " (dx, dW, db)");
        REQUIRE(a[k].shape() == b[k].shape());
        std::size_t differ = 0;
        for (std::size_t i = 0; i < a[k].size(); ++i) differ += a[k][i] != b[k][i];
        CHECK(differ == 0);
    }
}
}  // namespace

TEST_CASE("parallel: Conv2d and DepthwiseConv2d gradients give the same bits on 1 and 2 threads") {
    // 16 x 20 x 20 = 6400 output pixels: several chunks of the weight gradient's partial sums.
    pw::Rng rng(8);
    pw::Tensor<float> x(pw::Shape{16, 20, 20, 8}), dy(pw::Shape{16, 20, 20, 8}), dy16(pw::Shape{16, 20, 20, 16});
    pw::init::normal(x, rng, 0.0, 1.0);
    pw::init::normal(dy, rng, 0.0, 1.0);
    pw::init::normal(dy16, rng, 0.0, 1.0);
    const pw::Conv2d depthwise = pw::DepthwiseConv2d(8, 3, {.padding = 1});
    const pw::Conv2d dense(8, 16, 3, {.padding = 1});
    SUBCASE("patchwork's kernels (set_onednn(false)): any number of threads") {
        check_same_bits(conv_outputs(depthwise, x, dy, 1, false), conv_outputs(depthwise, x, dy, 2, false));
        check_same_bits(conv_outputs(dense, x, dy16, 1, false), conv_outputs(dense, x, dy16, 2, false));
    }
    SUBCASE("the build's backend (oneDNN where built with it): the same bits on the same number of threads") {
        check_same_bits(conv_outputs(depthwise, x, dy, 2, true), conv_outputs(depthwise, x, dy, 2, true));
        check_same_bits(conv_outputs(dense, x, dy16, 2, true), conv_outputs(dense, x, dy16, 2, true));
    }
    set_threads(2);
}
