#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/batch_norm.hpp"
#include "patchwork/layers/conv2d.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/layers/pool.hpp"
#include "patchwork/layers/reshape.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/bias_only.hpp"
#include "patchwork/policies/depthwise_patch.hpp"
#include "patchwork/policies/norm_patch.hpp"
#include "patchwork/policies/scale_shift.hpp"
#include "patchwork/policies/tune.hpp"

namespace pw = patchwork;
using pw::testing::check_gradients;

using Conv64 = pw::BasicConv2d<double>;
using DepthwiseConv64 = pw::BasicDepthwiseConv2d<double>;
using BatchNorm64 = pw::BasicBatchNorm2d<double>;
using Relu64 = pw::BasicRelu<double>;

namespace {

struct ConvCase {
    std::size_t in, out, kernel;
    pw::Conv2dOptions options;
};

/// The convolutions worth checking: stride 1/2, padding 0/1, groups 1/2/depthwise
/// (with and without a channel multiplier), bias on/off, the 1x1 shortcut.
std::vector<ConvCase> conv_cases() {
    return {
        {3, 4, 3, {}},
        {3, 4, 3, {.stride = 2}},
        {3, 4, 3, {.padding = 1}},
        {3, 4, 3, {.stride = 2, .padding = 1, .bias = false}},
        {4, 6, 3, {.padding = 1, .groups = 2}},
        {4, 4, 2, {.stride = 2, .groups = 2, .bias = false}},
        {4, 4, 3, {.padding = 1, .groups = 4}},            // depthwise
        {4, 4, 3, {.stride = 2, .padding = 1, .groups = 4}},  // depthwise, strided
        {2, 6, 3, {.padding = 1, .groups = 2, .bias = false}},  // depthwise, multiplier 3
        {4, 3, 1, {}},                                          // pointwise: no im2col
        {4, 6, 1, {.groups = 2}},                               // grouped pointwise
        {3, 2, 1, {.stride = 2}},                               // strided 1x1 goes through im2col
        {1, 3, 3, {.padding = 1}},                              // single-channel stem (dense)
    };
}

std::string describe(const ConvCase& c) {
    return pw::detail::concat("in=", c.in, " out=", c.out, " k=", c.kernel, " stride=", c.options.stride,
                              " pad=", c.options.padding, " groups=", c.options.groups, " bias=", c.options.bias);
}

/// Direct convolution, straight from the definition in conv2d.hpp.
template <class T>
pw::Tensor<T> naive_conv(const pw::Tensor<T>& x, const pw::BasicConv2d<T>& conv) {
    const std::size_t n = x.dim(0), h = x.dim(1), w = x.dim(2), cin = x.dim(3);
    const std::size_t k = conv.kernel_size(), s = conv.stride(), p = conv.padding(), groups = conv.groups();
    const std::size_t cout = conv.out_channels(), cg = cin / groups, per_group = cout / groups;
    const std::size_t ho = (h + 2 * p - k) / s + 1, wo = (w + 2 * p - k) / s + 1;
    pw::Tensor<T> y(pw::Shape{n, ho, wo, cout});
    for (std::size_t b = 0; b < n; ++b)
        for (std::size_t oy = 0; oy < ho; ++oy)
            for (std::size_t ox = 0; ox < wo; ++ox)
                for (std::size_t co = 0; co < cout; ++co) {
                    const std::size_t g = co / per_group;
                    double acc = conv.has_bias() ? double(conv.bias.value[co]) : 0.0;
                    for (std::size_t ky = 0; ky < k; ++ky)
                        for (std::size_t kx = 0; kx < k; ++kx)
                            for (std::size_t j = 0; j < cg; ++j) {
                                const long iy = long(oy * s + ky) - long(p), ix = long(ox * s + kx) - long(p);
                                if (iy < 0 || ix < 0 || iy >= long(h) || ix >= long(w)) continue;
                                acc += double(conv.weight.value[((co * k + ky) * k + kx) * cg + j]) *
                                       double(x[((b * h + std::size_t(iy)) * w + std::size_t(ix)) * cin + g * cg + j]);
                            }
                    y[((b * ho + oy) * wo + ox) * cout + co] = T(acc);
                }
    return y;
}

/// Gradients of naive_conv for an output gradient dy, straight from the
/// definition: every product w x of the forward sends dy w to x and dy x to w.
template <class T>
struct NaiveGrads {
    pw::Tensor<T> dx, dw, db;
};
template <class T>
NaiveGrads<T> naive_conv_backward(const pw::Tensor<T>& x, const pw::Tensor<T>& dy, const pw::BasicConv2d<T>& conv) {
    const std::size_t n = x.dim(0), h = x.dim(1), w = x.dim(2), cin = x.dim(3);
    const std::size_t k = conv.kernel_size(), s = conv.stride(), p = conv.padding(), groups = conv.groups();
    const std::size_t cout = conv.out_channels(), cg = cin / groups, per_group = cout / groups;
    const std::size_t ho = dy.dim(1), wo = dy.dim(2);
    NaiveGrads<T> g{pw::Tensor<T>(x.shape()), pw::Tensor<T>(conv.weight.value.shape()), pw::Tensor<T>(pw::Shape{cout})};
    g.dx.zero();
    g.dw.zero();
    g.db.zero();
    for (std::size_t b = 0; b < n; ++b)
        for (std::size_t oy = 0; oy < ho; ++oy)
            for (std::size_t ox = 0; ox < wo; ++ox)
                for (std::size_t co = 0; co < cout; ++co) {
                    const T gy = dy[((b * ho + oy) * wo + ox) * cout + co];
                    g.db[co] += gy;
                    for (std::size_t ky = 0; ky < k; ++ky)
                        for (std::size_t kx = 0; kx < k; ++kx)
                            for (std::size_t j = 0; j < cg; ++j) {
                                const long iy = long(oy * s + ky) - long(p), ix = long(ox * s + kx) - long(p);
                                if (iy < 0 || ix < 0 || iy >= long(h) || ix >= long(w)) continue;
                                const std::size_t wi = ((co * k + ky) * k + kx) * cg + j;
                                const std::size_t xi =
                                    ((b * h + std::size_t(iy)) * w + std::size_t(ix)) * cin + (co / per_group) * cg + j;
                                g.dx[xi] += gy * conv.weight.value[wi];
                                g.dw[wi] += gy * x[xi];
                            }
                }
    return g;
}

template <class M>
void check_frozen_have_no_gradient(M& m) {
    m.visit([](auto& p) {
        INFO(p.name());
        if (!p.trainable()) CHECK(p.grad.empty());
    });
}

template <class M>
std::vector<std::string> trainable_names(M& m) {
    std::vector<std::string> names;
    m.visit([&](auto& p) {
        if (p.trainable()) names.push_back(p.name());
    });
    return names;
}

void check_shape_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
    try {
        f();
        FAIL("expected a ShapeError");
    } catch (const pw::ShapeError& e) {
        const std::string msg = e.what();
        INFO(msg);
        for (const auto& part : parts) CHECK(msg.find(part) != std::string::npos);
    }
}

}  // namespace

// ---------------------------------------------------------------- Conv2d

TEST_CASE("conv2d: forward equals a direct convolution in every configuration") {
    pw::Rng rng(7);
    for (const auto& c : conv_cases()) {
        INFO(describe(c));
        pw::Conv2d conv(c.in, c.out, c.kernel, c.options);
        pw::init::normal(conv.weight.value, rng, 0.0, 0.5);
        if (conv.has_bias()) pw::init::normal(conv.bias.value, rng, 0.0, 0.5);
        pw::Tensor<float> x(pw::Shape{2, 5, 6, c.in});
        pw::init::normal(x, rng, 0.0, 1.0);
        const auto& y = conv.forward(x);
        const auto expected = naive_conv(x, conv);
        REQUIRE(y.shape() == expected.shape());
        CHECK(conv.out_features() == c.out);
        double worst = 0;
        for (std::size_t i = 0; i < y.size(); ++i) worst = std::max(worst, double(std::abs(y[i] - expected[i])));
        CHECK(worst < 1e-5);
    }
}

TEST_CASE("conv2d: batches of many chunks and tiles match the direct convolution, forward and backward") {
    // Wide rows (many input channels) make tiles of a few pixels that straddle
    // image rows and images; a batch of 19 odd-sized images makes several
    // chunks of unequal size. Every case runs on whatever threads the build has.
    struct Big {
        std::size_t in, out, kernel;
        pw::Conv2dOptions options;
        std::size_t h, w;
    };
    const Big cases[] = {
        {40, 6, 3, {.padding = 1}, 7, 5},
        {40, 6, 3, {.stride = 2, .padding = 1, .bias = false}, 9, 6},
        {48, 8, 3, {.padding = 1, .groups = 4}, 5, 7},
        {64, 5, 1, {}, 6, 5},
        {64, 8, 1, {.groups = 2}, 3, 4},
        {12, 12, 3, {.padding = 1, .groups = 12}, 7, 5},               // depthwise
        {12, 24, 3, {.stride = 2, .padding = 1, .groups = 12}, 9, 6},  // depthwise, multiplier 2
        {12, 12, 5, {.padding = 2, .groups = 12}, 6, 8},               // depthwise, 5x5
    };
    pw::Rng rng(31);
    for (const auto& c : cases) {
        INFO("in=" << c.in << " out=" << c.out << " k=" << c.kernel << " groups=" << c.options.groups);
        Conv64 conv(c.in, c.out, c.kernel, c.options);
        pw::testing::randomize_parameters(conv, rng);
        conv.set_input_grad(true);
        pw::Tensor<double> x(pw::Shape{19, c.h, c.w, c.in});
        pw::init::normal(x, rng, 0.0, 1.0);
        const auto& y = conv.forward(x);
        const auto expected = naive_conv(x, conv);
        REQUIRE(y.shape() == expected.shape());
        for (std::size_t i = 0; i < y.size(); ++i) REQUIRE(y[i] == doctest::Approx(expected[i]).epsilon(1e-12));
        pw::Tensor<double> dy(y.shape());
        pw::init::normal(dy, rng, 0.0, 1.0);
        pw::zero_grad(conv);
        const auto& dx = conv.backward(dy);
        const auto ref = naive_conv_backward(x, dy, conv);
        for (std::size_t i = 0; i < dx.size(); ++i) REQUIRE(dx[i] == doctest::Approx(ref.dx[i]).epsilon(1e-12));
        for (std::size_t i = 0; i < ref.dw.size(); ++i)
            REQUIRE(conv.weight.grad[i] == doctest::Approx(ref.dw[i]).epsilon(1e-12));
        if (conv.has_bias())
            for (std::size_t i = 0; i < ref.db.size(); ++i)
                REQUIRE(conv.bias.grad[i] == doctest::Approx(ref.db[i]).epsilon(1e-12));
    }
}

TEST_CASE("depthwise conv: the row kernels at every border, stride and size match the direct convolution") {
    // Whole vectors of channels and k = 3 or 5 take detail::depthwise_row (forward, and the input
    // gradient for stride 1); images narrower than the window, windows partly outside on both sides
    // and rows of fewer than four interior pixels exercise its checked columns. Float runs
    // on patchwork's kernels here (set_onednn(false)); double always does.
    struct Case {
        std::size_t channels, kernel, stride, padding, h, w;
    };
    const Case cases[] = {
        {8, 3, 1, 1, 7, 9},   {16, 3, 1, 0, 5, 11}, {8, 3, 2, 1, 9, 8},  {8, 3, 1, 2, 4, 4}, {8, 5, 1, 2, 6, 13},
        {16, 5, 2, 2, 7, 7},  {8, 5, 1, 4, 2, 3},   {8, 3, 1, 1, 1, 1},  {8, 5, 1, 1, 5, 5}, {24, 3, 2, 0, 6, 10},
    };
    const auto run = [&](auto scalar) {
        using T = decltype(scalar);
        pw::Rng rng(53);
        for (const auto& c : cases) {
            INFO("C=" << c.channels << " k=" << c.kernel << " stride=" << c.stride << " pad=" << c.padding << " "
                      << c.h << "x" << c.w << " " << (sizeof(T) == 4 ? "float" : "double"));
            pw::BasicConv2d<T> conv = pw::BasicDepthwiseConv2d<T>(c.channels, c.kernel,
                                                                  {.stride = c.stride, .padding = c.padding});
            conv.set_onednn(false);
            conv.set_input_grad(true);
            pw::init::normal(conv.weight.value, rng, 0.0, 0.5);
            pw::init::normal(conv.bias.value, rng, 0.0, 0.5);
            pw::Tensor<T> x(pw::Shape{3, c.h, c.w, c.channels});
            pw::init::normal(x, rng, 0.0, 1.0);
            const pw::Tensor<T> y = conv.forward(x);
            CHECK(std::string(conv.backend()) == "patchwork");
            const auto expected = naive_conv(x, conv);
            REQUIRE(y.shape() == expected.shape());
            const double eps = sizeof(T) == 4 ? 1e-5 : 1e-12;
            for (std::size_t i = 0; i < y.size(); ++i) REQUIRE(y[i] == doctest::Approx(expected[i]).epsilon(eps));
            pw::Tensor<T> dy(y.shape());
            pw::init::normal(dy, rng, 0.0, 1.0);
            pw::zero_grad(conv);
            const pw::Tensor<T> dx = conv.backward(dy);
            const auto ref = naive_conv_backward(x, dy, conv);
            for (std::size_t i = 0; i < dx.size(); ++i) REQUIRE(dx[i] == doctest::Approx(ref.dx[i]).epsilon(eps));
            for (std::size_t i = 0; i < ref.dw.size(); ++i)
                REQUIRE(conv.weight.grad[i] == doctest::Approx(ref.dw[i]).epsilon(eps));
            for (std::size_t i = 0; i < ref.db.size(); ++i)
                REQUIRE(conv.bias.grad[i] == doctest::Approx(ref.db[i]).epsilon(eps));
        }
    };
    run(float{});
    run(double{});
}

TEST_CASE("conv2d (float): forward and backward on the build's backend match the direct convolution") {
    // Float convolutions run on oneDNN in builds with the `dnnl` option and on
    // patchwork's kernels otherwise (and for the cases oneDNN leaves); either must give
    // the direct convolution's values within float rounding, accumulate
    // gradients over calls, and honour a frozen weight and a switched-off input
    // gradient. The double-precision tests above always take patchwork's kernels.
    struct Variant {
        bool freeze_weight, input_grad;
    };
    pw::Rng rng(43);
    for (const auto& c : conv_cases())
        for (const Variant v : {Variant{false, true}, Variant{true, true}, Variant{false, false}}) {
            INFO(describe(c) << " frozen weight=" << v.freeze_weight << " input grad=" << v.input_grad);
            pw::Conv2d conv(c.in, c.out, c.kernel, c.options);
            pw::init::normal(conv.weight.value, rng, 0.0, 0.5);
            if (conv.has_bias()) pw::init::normal(conv.bias.value, rng, 0.0, 0.5);
            conv.weight.set_trainable(!v.freeze_weight);
            conv.set_input_grad(v.input_grad);
            pw::Tensor<float> x(pw::Shape{3, 7, 6, c.in});
            pw::init::normal(x, rng, 0.0, 1.0);
            const pw::Tensor<float> y = conv.forward(x);
#if defined(PATCHWORK_USE_DNNL)
            // oneDNN takes every case whose output size is exact with a bottom/right padding of at most p
            // (stride 2 without padding over an even extent skips the last row: native), except channel
            // multipliers, for which it may have only reference kernels (then native).
            const auto exact = [&](std::size_t extent) {
                return (extent + 2 * c.options.padding - c.kernel) % c.options.stride <= c.options.padding;
            };
            if (!(conv.depthwise() && c.out != c.in))
                CHECK(std::string(conv.backend()) == (exact(7) && exact(6) ? "onednn" : "patchwork"));
#else
            CHECK(std::string(conv.backend()) == "patchwork");
#endif
            const auto expected = naive_conv(x, conv);
            REQUIRE(y.shape() == expected.shape());
            for (std::size_t i = 0; i < y.size(); ++i) REQUIRE(y[i] == doctest::Approx(expected[i]).epsilon(1e-5));
            pw::Tensor<float> dy(y.shape());
            pw::init::normal(dy, rng, 0.0, 1.0);
            pw::zero_grad(conv);
            const auto ref = naive_conv_backward(x, dy, conv);
            for (int call = 1; call <= 2; ++call) {  // the second call adds the same gradients once more
                INFO("backward call " << call);
                const pw::Tensor<float> dx = conv.backward(dy);
                if (v.input_grad) {
                    REQUIRE(dx.shape() == x.shape());
                    for (std::size_t i = 0; i < dx.size(); ++i)
                        REQUIRE(dx[i] == doctest::Approx(ref.dx[i]).epsilon(1e-5).scale(1));
                } else {
                    CHECK(dx.empty());
                }
                if (v.freeze_weight) CHECK(conv.weight.grad.empty());
                else
                    for (std::size_t i = 0; i < ref.dw.size(); ++i)
                        REQUIRE(conv.weight.grad[i] == doctest::Approx(call * ref.dw[i]).epsilon(1e-5).scale(1));
                if (conv.has_bias())
                    for (std::size_t i = 0; i < ref.db.size(); ++i)
                        REQUIRE(conv.bias.grad[i] == doctest::Approx(call * ref.db[i]).epsilon(1e-5).scale(1));
            }
        }
}

TEST_CASE("conv2d (float): a new input shape after the first, and a copied layer, give the same values") {
    // The oneDNN backend keeps primitives per input shape; a copy of a layer builds its own.
    pw::Rng rng(47);
    pw::Conv2d conv(6, 8, 3, {.padding = 1});
    pw::init::normal(conv.weight.value, rng, 0.0, 0.5);
    pw::init::normal(conv.bias.value, rng, 0.0, 0.5);
    for (const pw::Shape& shape : {pw::Shape{2, 5, 5, 6}, pw::Shape{4, 9, 7, 6}, pw::Shape{2, 5, 5, 6}}) {
        INFO("input " << shape);
        pw::Tensor<float> x(shape);
        pw::init::normal(x, rng, 0.0, 1.0);
        const pw::Tensor<float> y = conv.forward(x);
        pw::Conv2d copy = conv;
        const pw::Tensor<float> y_copy = copy.forward(x);
        const auto expected = naive_conv(x, conv);
        REQUIRE(y.shape() == expected.shape());
        for (std::size_t i = 0; i < y.size(); ++i) {
            REQUIRE(y[i] == doctest::Approx(expected[i]).epsilon(1e-5));
            REQUIRE(y_copy[i] == y[i]);
        }
    }
}

TEST_CASE("conv2d: output size, weight layout and roles") {
    pw::Conv2d conv(3, 8, 3, {.stride = 2, .padding = 1});
    CHECK(conv.weight.value.shape() == pw::Shape{8, 3, 3, 3});
    CHECK(conv.weight.role() == pw::Role::weight);
    CHECK(conv.bias.value.shape() == pw::Shape{8});
    pw::Tensor<float> x(pw::Shape{2, 7, 8, 3});
    CHECK(conv.forward(x).shape() == pw::Shape{2, 4, 4, 8});

    pw::Conv2d grouped(4, 8, 3, {.groups = 2});
    CHECK(grouped.weight.value.shape() == pw::Shape{8, 3, 3, 2});
    CHECK(grouped.weight.role() == pw::Role::weight);

    pw::Conv2d dw_as_conv(4, 4, 3, {.groups = 4});
    CHECK(dw_as_conv.depthwise());
    CHECK(dw_as_conv.weight.role() == pw::Role::depthwise);

    pw::Conv2d stem(1, 8, 3);  // one input channel: groups = in_channels, yet a dense filter bank
    CHECK(!stem.depthwise());
    CHECK(stem.weight.role() == pw::Role::weight);
    CHECK(pw::DepthwiseConv2d(1, 3).weight.role() == pw::Role::depthwise);

    pw::DepthwiseConv2d dw(6, 3, {.padding = 1, .groups = 1 /* ignored */});
    CHECK(dw.groups() == 6);
    CHECK(dw.weight.value.shape() == pw::Shape{6, 3, 3, 1});
    CHECK(dw.weight.role() == pw::Role::depthwise);
    CHECK(std::string(pw::DepthwiseConv2d::kind()) == "depthwiseconv");
    CHECK((pw::DepthwiseConv2d::roles & pw::role_bit(pw::Role::weight)) == 0);
    CHECK((pw::DepthwiseConv2d::roles & pw::role_bit(pw::Role::depthwise)) != 0);
    static_assert(pw::Module<pw::Conv2d> && pw::Module<pw::DepthwiseConv2d>);

    pw::Conv2d nobias(3, 2, 1, {.bias = false});
    std::size_t count = 0;
    nobias.visit([&](auto&) { ++count; });
    CHECK(count == 1);
    CHECK(pw::parameter_count(nobias) == 6);
}

TEST_CASE("conv2d: gradients (input, weight, bias) in every configuration") {
    pw::Rng rng(11);
    for (const auto& c : conv_cases()) {
        INFO(describe(c));
        Conv64 conv(c.in, c.out, c.kernel, c.options);
        pw::testing::randomize_parameters(conv, rng);
        check_gradients(conv, pw::Shape{2, 5, 4, c.in});
    }
    DepthwiseConv64 dw(3, 3, {.stride = 2, .padding = 1}, 2);
    pw::testing::randomize_parameters(dw, rng);
    check_gradients(dw, pw::Shape{1, 6, 5, 3});
}

TEST_CASE("conv2d: a frozen weight has no gradient buffer; a switched-off input gradient is skipped") {
    for (std::size_t groups : {std::size_t(1), std::size_t(4)}) {
        INFO("groups=", groups);
        Conv64 conv(4, 4, 3, {.padding = 1, .groups = groups});
        conv.weight.set_trainable(false);
        CHECK(conv.weight.grad.empty());
        check_gradients(conv, pw::Shape{2, 4, 4, 4});
        CHECK(conv.weight.grad.empty());

        pw::Tensor<double> x(pw::Shape{1, 4, 4, 4}, 1.0);
        const auto& y = conv.forward(x);
        pw::Tensor<double> dy(y.shape(), 1.0);
        conv.set_input_grad(false);
        CHECK(conv.backward(dy).empty());
        CHECK(conv.bias.grad[0] != 0.0);
    }
}

TEST_CASE("conv2d: backward refuses a missing or reshaped input") {
    pw::Conv2d conv(2, 2, 3, {.padding = 1});
    conv.set_path("body.conv0");
    pw::Tensor<float> x(pw::Shape{1, 4, 4, 2}, 1.f);
    const auto& y = conv.forward(x);
    pw::Tensor<float> dy(y.shape(), 1.f);
    pw::Conv2d copy = conv;
    CHECK_THROWS_WITH_AS(copy.backward(dy), doctest::Contains("has not seen"), pw::Error);
    x.resize(pw::Shape{1, 2, 8, 2});
    CHECK_THROWS_WITH_AS(conv.backward(dy), doctest::Contains("body.conv0"), pw::Error);
}

TEST_CASE("conv2d: shape and configuration errors name the module and both shapes") {
    pw::Conv2d conv(3, 4, 3, {.padding = 0});
    conv.set_path("features.conv2");
    pw::Tensor<float> wrong_channels(pw::Shape{2, 5, 5, 4});
    check_shape_error([&] { conv.forward(wrong_channels); }, {"features.conv2", "[2, 5, 5, 3]", "[2, 5, 5, 4]"});
    pw::Tensor<float> too_small(pw::Shape{2, 2, 5, 3});
    check_shape_error([&] { conv.forward(too_small); }, {"features.conv2", "[2, 3, 5, 3]", "[2, 2, 5, 3]"});
    pw::Tensor<float> flat(pw::Shape{2, 75});
    check_shape_error([&] { conv.forward(flat); }, {"features.conv2", "[2, 3, 3, 3]", "[2, 75]"});
    pw::Tensor<float> x(pw::Shape{2, 5, 5, 3});
    conv.forward(x);
    pw::Tensor<float> dy(pw::Shape{2, 3, 3, 5});
    check_shape_error([&] { conv.backward(dy); }, {"features.conv2", "[2, 3, 3, 4]", "[2, 3, 3, 5]"});

    CHECK_THROWS_AS(pw::Conv2d(3, 4, 3, {.groups = 2}), pw::ConfigError);
    CHECK_THROWS_AS(pw::Conv2d(0, 4, 3), pw::ConfigError);
    CHECK_THROWS_AS(pw::Conv2d(3, 4, 3, {.stride = 0}), pw::ConfigError);
    CHECK_THROWS_AS(pw::Conv2d(3, 4, 0), pw::ConfigError);
}

// test_conv_native (tests/meson.build) compiles only the convolution tests
// above, for the build machine's instruction set; the rest is the same code
// on either.
#ifndef PATCHWORK_TEST_CONV_KERNELS_ONLY

// ---------------------------------------------------------------- BatchNorm2d

TEST_CASE("batchnorm: training-mode forward and running statistics, by hand") {
    // Two channels over 2 x 1 x 2 = 4 pixels.
    pw::BatchNorm2d bn(2, 1e-5, 0.1);
    pw::Tensor<float> x(pw::Shape{2, 1, 2, 2}, {1, 10, 3, 20, 5, 30, 7, 40});
    const auto& y = bn.forward(x);
    // channel 0: 1 3 5 7 -> mean 4, biased var 5, unbiased 20/3
    // channel 1: 10 20 30 40 -> mean 25, biased var 125, unbiased 500/3
    CHECK(y[0] == doctest::Approx(-3 / std::sqrt(5 + 1e-5)));
    CHECK(y[7] == doctest::Approx(15 / std::sqrt(125 + 1e-5)));
    CHECK(bn.running_mean[0] == doctest::Approx(0.1 * 4));
    CHECK(bn.running_mean[1] == doctest::Approx(0.1 * 25));
    CHECK(bn.running_var[0] == doctest::Approx(0.9 + 0.1 * 20.0 / 3));
    CHECK(bn.running_var[1] == doctest::Approx(0.9 + 0.1 * 500.0 / 3));
    bn.forward(x);
    CHECK(bn.running_mean[0] == doctest::Approx(0.9 * 0.4 + 0.1 * 4));
    CHECK(bn.running_var[1] == doctest::Approx(0.9 * (0.9 + 0.1 * 500.0 / 3) + 0.1 * 500.0 / 3));

    // Inference mode uses, and leaves, the running statistics.
    bn.set_training(false);
    const float rm = bn.running_mean[0], rv = bn.running_var[0];
    const auto& yi = bn.forward(x);
    CHECK(yi[0] == doctest::Approx((1 - rm) / std::sqrt(rv + 1e-5)));
    CHECK(bn.running_mean[0] == rm);
    CHECK(bn.running_var[0] == rv);

    // The statistics are buffers, not parameters.
    CHECK(pw::parameter_count(bn) == 4);
}

TEST_CASE("batchnorm: gradients in training and inference mode, on [N,H,W,C] and [N,C]") {
    pw::Rng rng(5);
    BatchNorm64 bn(3);
    pw::testing::randomize_parameters(bn, rng);
    check_gradients(bn, pw::Shape{2, 3, 2, 3});
    check_gradients(bn, pw::Shape{5, 3});
    pw::init::normal(bn.running_mean, rng, 0.0, 1.0);
    for (auto& v : bn.running_var) v = 0.5 + rng.uniform();
    bn.set_training(false);
    check_gradients(bn, pw::Shape{2, 3, 2, 3});

    BatchNorm64 frozen(3);
    frozen.scale.set_trainable(false);
    frozen.shift.set_trainable(false);
    check_gradients(frozen, pw::Shape{2, 2, 2, 3});
    check_frozen_have_no_gradient(frozen);
}

TEST_CASE("batchnorm: fold() equals the inference-mode forward") {
    pw::Rng rng(9);
    BatchNorm64 bn(4);
    pw::init::normal(bn.scale.value, rng, 1.0, 0.3);
    pw::init::normal(bn.shift.value, rng, 0.0, 0.3);
    pw::Tensor<double> x(pw::Shape{3, 2, 2, 4});
    for (int step = 0; step < 3; ++step) {
        pw::init::normal(x, rng, 1.5, 2.0);
        bn.forward(x);  // training mode: moves the running statistics
    }
    bn.set_training(false);
    pw::init::normal(x, rng, 0.0, 1.0);
    const auto& y = bn.forward(x);
    const auto folded = bn.fold();
    for (std::size_t r = 0; r < x.rows(); ++r)
        for (std::size_t c = 0; c < 4; ++c)
            CHECK(y(r, c) == doctest::Approx(x(r, c) * folded.scale[c] + folded.bias[c]).epsilon(1e-12));
}

TEST_CASE("batchnorm: set_training(model, on) reaches every BatchNorm2d in a model") {
    using Block = pw::Sequential<pw::Conv2d, pw::BatchNorm2d, pw::Relu>;
    using Model = pw::Sequential<Block, pw::Tune<Block, pw::NormPatch>, pw::GlobalAvgPool>;
    Model model(Block(pw::Conv2d(2, 3, 3), pw::BatchNorm2d(3), {}),
                pw::Tune<Block, pw::NormPatch>(pw::Conv2d(3, 3, 3), pw::BatchNorm2d(3), pw::Relu{}), {});
    CHECK(model.get<0>().get<1>().training());
    pw::set_training(model, false);
    CHECK(!model.get<0>().get<1>().training());
    CHECK(!model.get<1>().base().get<1>().training());
    pw::set_training(model, true);
    CHECK(model.get<1>().base().get<1>().training());
}

TEST_CASE("batchnorm: shape and configuration errors") {
    pw::BatchNorm2d bn(3);
    bn.set_path("block.batchnorm1");
    pw::Tensor<float> x(pw::Shape{2, 4, 4, 5});
    check_shape_error([&] { bn.forward(x); }, {"block.batchnorm1", "[2, 4, 4, 3]", "[2, 4, 4, 5]"});
    CHECK_THROWS_AS(pw::BatchNorm2d(0), pw::ConfigError);
    CHECK_THROWS_AS(pw::BatchNorm2d(3, 0.0), pw::ConfigError);
    CHECK_THROWS_AS(pw::BatchNorm2d(3, 1e-5, 1.5), pw::ConfigError);
}

// ---------------------------------------------------------------- pooling and reshaping

TEST_CASE("pool: average and max pooling forward, by hand") {
    // One 4x4 image, one channel, values 0..15 row by row.
    pw::Tensor<float> x(pw::Shape{1, 4, 4, 1});
    for (std::size_t i = 0; i < 16; ++i) x[i] = float(i);
    pw::AvgPool2d avg(2);
    const auto& ya = avg.forward(x);
    REQUIRE(ya.shape() == pw::Shape{1, 2, 2, 1});
    CHECK(ya[0] == doctest::Approx((0 + 1 + 4 + 5) / 4.0));
    CHECK(ya[3] == doctest::Approx((10 + 11 + 14 + 15) / 4.0));
    pw::MaxPool2d max(2);
    const auto& ym = max.forward(x);
    CHECK(ym[0] == 5);
    CHECK(ym[3] == 15);
    // Padding: average counts padded zeros, max ignores them.
    pw::AvgPool2d avg_pad(3, 2, 1);
    CHECK(avg_pad.forward(x)[0] == doctest::Approx((0 + 1 + 4 + 5) / 9.0));
    pw::Tensor<float> neg(pw::Shape{1, 2, 2, 1}, {-4, -3, -2, -1});
    pw::MaxPool2d max_pad(3, 1, 1);
    CHECK(max_pad.forward(neg)[0] == -1);

    CHECK_THROWS_AS(pw::MaxPool2d(3, 1, 2), pw::ConfigError);
    CHECK_THROWS_AS(pw::AvgPool2d(0), pw::ConfigError);
}

TEST_CASE("pool: gradients of average, max and global pooling, flatten and unflatten") {
    struct PoolCase {
        std::size_t kernel, stride, padding;
    };
    for (const auto& c : {PoolCase{2, 2, 0}, PoolCase{3, 1, 1}, PoolCase{3, 2, 1}, PoolCase{2, 1, 0}}) {
        INFO("kernel=", c.kernel, " stride=", c.stride, " padding=", c.padding);
        pw::BasicAvgPool2d<double> avg(c.kernel, c.stride, c.padding);
        check_gradients(avg, pw::Shape{2, 5, 4, 3});
        pw::BasicMaxPool2d<double> max(c.kernel, c.stride, c.padding);
        check_gradients(max, pw::Shape{2, 5, 4, 3});
    }
    pw::BasicGlobalAvgPool<double> gap;
    check_gradients(gap, pw::Shape{2, 3, 4, 5});
    pw::BasicFlatten<double> flatten;
    check_gradients(flatten, pw::Shape{2, 3, 2, 2});
    pw::BasicUnflatten<double> unflatten(2, 3, 2);
    check_gradients(unflatten, pw::Shape{3, 12});
}

TEST_CASE("pool: global pooling, flatten and unflatten shapes and values") {
    pw::Tensor<float> x(pw::Shape{2, 2, 2, 3});
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(i);
    pw::GlobalAvgPool gap;
    const auto& y = gap.forward(x);
    REQUIRE(y.shape() == pw::Shape{2, 3});
    CHECK(y(0, 0) == doctest::Approx((0 + 3 + 6 + 9) / 4.0));
    CHECK(y(1, 2) == doctest::Approx((14 + 17 + 20 + 23) / 4.0));

    pw::Flatten flatten;
    const auto& f = flatten.forward(x);
    CHECK(f.shape() == pw::Shape{2, 12});
    CHECK(f(1, 0) == 12);

    pw::Unflatten unflatten(28, 28, 1);  // Fashion-MNIST rows
    CHECK(unflatten.out_features() == 1);
    pw::Tensor<float> images(pw::Shape{3, 784});
    images[784 + 28 * 2 + 5] = 7;
    const auto& u = unflatten.forward(images);
    REQUIRE(u.shape() == pw::Shape{3, 28, 28, 1});
    CHECK(u[((1 * 28 + 2) * 28 + 5)] == 7);
}

TEST_CASE("pool: shape errors name the module and both shapes") {
    pw::MaxPool2d max(3);
    max.set_path("features.maxpool3");
    pw::Tensor<float> small(pw::Shape{2, 2, 4, 8});
    check_shape_error([&] { max.forward(small); }, {"features.maxpool3", "[2, 3, 4, 8]", "[2, 2, 4, 8]"});
    pw::GlobalAvgPool gap;
    gap.set_path("head.globalavgpool0");
    pw::Tensor<float> flat(pw::Shape{2, 8});
    check_shape_error([&] { gap.forward(flat); }, {"head.globalavgpool0", "[2, 8]"});
    pw::Unflatten unflatten(28, 28, 1);
    unflatten.set_path("input");
    pw::Tensor<float> wrong(pw::Shape{4, 780});
    check_shape_error([&] { unflatten.forward(wrong); }, {"input", "[4, 784]", "[4, 780]"});
    pw::Flatten flatten;
    pw::Tensor<float> vec(pw::Shape{5});
    CHECK_THROWS_AS(flatten.forward(vec), pw::ShapeError);
}

// ---------------------------------------------------------------- policies on conv blocks

TEST_CASE("policies: NormPatch trains only the batch-norm scale and shift of a conv block") {
    using Block = pw::Sequential<Conv64, BatchNorm64, Relu64>;
    pw::Tune<Block, pw::NormPatch> block(Conv64(3, 4, 3, {.padding = 1, .bias = false}), BatchNorm64(4), Relu64{});
    pw::Rng rng(21);
    pw::testing::randomize_parameters(block, rng);
    CHECK(trainable_names(block) == std::vector<std::string>{"batchnorm1.scale", "batchnorm1.shift"});
    CHECK(pw::trainable_count(block) == 8);
    check_gradients(block, pw::Shape{2, 4, 4, 3});
    check_frozen_have_no_gradient(block);
    pw::set_training(block, false);
    check_gradients(block, pw::Shape{2, 4, 4, 3});
}

TEST_CASE("policies: BiasOnly, ScaleShift and Adapter apply to convolution outputs per pixel") {
    pw::Rng rng(23);
    using Block = pw::Sequential<Conv64, Relu64, Conv64>;
    pw::Tune<Block, pw::BiasOnly> bitfit(Conv64(2, 4, 3, {.padding = 1}), Relu64{}, Conv64(4, 3, 1));
    pw::testing::randomize_parameters(bitfit, rng);
    CHECK(trainable_names(bitfit) == std::vector<std::string>{"conv0.bias", "conv2.bias"});
    check_gradients(bitfit, pw::Shape{2, 4, 3, 2});
    check_frozen_have_no_gradient(bitfit);

    pw::Tune<Conv64, pw::ScaleShift> patched(3, 4, 3, pw::Conv2dOptions{.stride = 2, .padding = 1});
    pw::testing::randomize_parameters(patched, rng);
    CHECK(pw::trainable_count(patched) == 8);
    check_gradients(patched, pw::Shape{2, 5, 5, 3});
    check_frozen_have_no_gradient(patched);

    pw::Tune<Conv64, pw::Adapter<2>> adapted(3, 4, 3, pw::Conv2dOptions{.padding = 1});
    pw::testing::randomize_parameters(adapted, rng);
    CHECK(pw::trainable_count(adapted) == 2 * 4 * 2 + 2 + 4);
    check_gradients(adapted, pw::Shape{2, 3, 3, 3});
    check_frozen_have_no_gradient(adapted);
}

TEST_CASE("policies: DepthwisePatch re-learns only the depthwise filters") {
    using Block = pw::Sequential<DepthwiseConv64, BatchNorm64, Relu64, Conv64>;
    pw::Tune<Block, pw::DepthwisePatch> block(DepthwiseConv64(3, 3, {.padding = 1}), BatchNorm64(3), Relu64{},
                                              Conv64(3, 4, 1));
    pw::Rng rng(29);
    pw::testing::randomize_parameters(block, rng);
    CHECK(trainable_names(block) == std::vector<std::string>{"depthwiseconv0.weight"});
    CHECK(pw::trainable_count(block) == 27);
    check_gradients(block, pw::Shape{2, 4, 4, 3});
    check_frozen_have_no_gradient(block);

    // A Conv2d with groups = in_channels is depthwise too; a dense one next to it stays frozen.
    using Mixed = pw::Sequential<Conv64, Conv64>;
    pw::Tune<Mixed, pw::DepthwisePatch> mixed(Conv64(4, 4, 3, {.padding = 1, .groups = 4}), Conv64(4, 2, 1));
    pw::testing::randomize_parameters(mixed, rng);
    CHECK(trainable_names(mixed) == std::vector<std::string>{"conv0.weight"});
    check_gradients(mixed, pw::Shape{1, 3, 3, 4});
    check_frozen_have_no_gradient(mixed);

    // Together with NormPatch: the scale-and-bias plus depthwise patch.
    pw::Tune<Block, pw::DepthwisePatch, pw::NormPatch> both(DepthwiseConv64(3, 3, {.padding = 1}), BatchNorm64(3),
                                                            Relu64{}, Conv64(3, 4, 1));
    CHECK(pw::trainable_count(both) == 27 + 6);
}

TEST_CASE("a small Fashion-MNIST-shaped model: rows in, logits out, gradients exact") {
    using Model = pw::Sequential<pw::BasicUnflatten<double>, Conv64, BatchNorm64, Relu64, pw::BasicMaxPool2d<double>,
                                 DepthwiseConv64, pw::BasicGlobalAvgPool<double>, pw::BasicLinear<double>>;
    Model model({4, 4, 1}, Conv64(1, 3, 3, {.padding = 1, .bias = false}), BatchNorm64(3), {},
                pw::BasicMaxPool2d<double>(2), DepthwiseConv64(3, 2, {.padding = 1}), {},
                pw::BasicLinear<double>(3, 2));
    pw::Rng rng(31);
    pw::testing::randomize_parameters(model, rng);
    pw::Tensor<double> x(pw::Shape{3, 16});
    CHECK(model.forward(x).shape() == pw::Shape{3, 2});
    CHECK(model.out_features() == 2);
    check_gradients(model, pw::Shape{3, 16});
}

#endif  // PATCHWORK_TEST_CONV_KERNELS_ONLY
