#include <doctest/doctest.h>

#include "gradcheck.hpp"
#include "patchwork/compose/repeat.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/layers/linear.hpp"

namespace pw = patchwork;
using pw::testing::check_gradients;

using Linear64 = pw::BasicLinear<double>;
using LayerNorm64 = pw::BasicLayerNorm<double>;

TEST_CASE("linear: forward is x W^T + b") {
    pw::Linear lin(3, 2);
    lin.weight.value = pw::Tensor<float>(pw::Shape{2, 3}, {1, 2, 3, 4, 5, 6});
    lin.bias.value = pw::Tensor<float>(pw::Shape{2}, {0.5f, -1});
    pw::Tensor<float> x(pw::Shape{1, 3}, {1, 0, -1});
    const auto& y = lin.forward(x);
    CHECK(y.shape() == pw::Shape{1, 2});
    CHECK(y[0] == doctest::Approx(1 - 3 + 0.5));
    CHECK(y[1] == doctest::Approx(4 - 6 - 1));
}

TEST_CASE("linear: gradients (input, weight, bias), with and without bias, 3-d input") {
    pw::Rng rng(3);
    Linear64 lin(5, 4);
    pw::testing::randomize_parameters(lin, rng);
    check_gradients(lin, pw::Shape{3, 5});
    check_gradients(lin, pw::Shape{2, 3, 5});
    Linear64 nobias(4, 3, false);
    check_gradients(nobias, pw::Shape{2, 4});
}

TEST_CASE("linear: a frozen weight has no gradient buffer and skips its gradient") {
    Linear64 lin(4, 3);
    lin.weight.set_trainable(false);
    CHECK(lin.weight.grad.empty());
    check_gradients(lin, pw::Shape{2, 4});  // input and bias gradients still exact
    CHECK(lin.weight.grad.empty());
}

TEST_CASE("linear: shape errors name the module path and both shapes") {
    pw::Linear lin(4, 3);
    lin.set_path("encoder.linear0");
    pw::Tensor<float> x(pw::Shape{2, 5});
    try {
        lin.forward(x);
        FAIL("expected a ShapeError");
    } catch (const pw::ShapeError& e) {
        const std::string msg = e.what();
        CHECK(msg.find("encoder.linear0") != std::string::npos);
        CHECK(msg.find("[2, 4]") != std::string::npos);
        CHECK(msg.find("[2, 5]") != std::string::npos);
    }
    CHECK_THROWS_AS(pw::Linear(0, 3), pw::ConfigError);
}

TEST_CASE("linear: backward reads the forward's input in place, and refuses a changed or missing one") {
    pw::Linear lin(3, 2);
    lin.set_path("head");
    pw::Tensor<float> dy(pw::Shape{2, 2});
    dy.fill(1);
    // Backward before any forward: the output-gradient shape cannot match.
    CHECK_THROWS_AS(lin.backward(dy), pw::ShapeError);

    pw::Tensor<float> x(pw::Shape{2, 3}, {1, 2, 3, 4, 5, 6});
    lin.forward(x);
    lin.backward(dy);
    // dW = dY^T X: with dY all ones, each row of dW is the column sums of x.
    CHECK(lin.weight.grad[0] == doctest::Approx(5));
    CHECK(lin.weight.grad[2] == doctest::Approx(9));

    lin.set_input_grad(false);  // no input gradient: an empty tensor, and the weight gradient still accumulates
    CHECK(lin.backward(dy).empty());
    CHECK(lin.weight.grad[0] == doctest::Approx(10));
    lin.set_input_grad(true);
    pw::Linear copy = lin;  // a copy has seen no forward: it must not read lin's input
    CHECK_THROWS_WITH_AS(copy.backward(dy), doctest::Contains("has not seen"), pw::Error);
    pw::Relu relu;
    relu.forward(x);
    pw::Relu relu_copy = relu;
    CHECK_THROWS_WITH_AS(relu_copy.backward(x), doctest::Contains("has not seen"), pw::Error);

    x.resize(pw::Shape{4, 3});  // the caller broke the contract: the input changed shape
    CHECK_THROWS_WITH_AS(lin.backward(dy), doctest::Contains("head"), pw::Error);
    CHECK_THROWS_WITH_AS(lin.backward(dy), doctest::Contains("[4, 3]"), pw::Error);
}

TEST_CASE_TEMPLATE("activations: gradients", Act, pw::BasicRelu<double>, pw::BasicGelu<double>,
                   pw::BasicTanh<double>) {
    Act act;
    check_gradients(act, pw::Shape{4, 7});
}

TEST_CASE("activations: values") {
    pw::Tensor<double> x(pw::Shape{1, 3}, {-1.0, 0.5, 2.0});
    pw::BasicRelu<double> relu;
    CHECK(relu.forward(x)[0] == 0.0);
    CHECK(relu.forward(x)[2] == 2.0);
    pw::BasicGelu<double> gelu;
    CHECK(gelu.forward(x)[2] == doctest::Approx(1.9544997361));  // 2 * Phi(2)
    pw::BasicTanh<double> th;
    CHECK(th.forward(x)[1] == doctest::Approx(std::tanh(0.5)));
}

TEST_CASE("layernorm: normalises each row, then scales and shifts") {
    LayerNorm64 ln(4);
    pw::Tensor<double> x(pw::Shape{2, 4}, {1, 2, 3, 4, -2, 0, 2, 4});
    const auto& y = ln.forward(x);
    for (std::size_t r = 0; r < 2; ++r) {
        double mean = 0, var = 0;
        for (std::size_t i = 0; i < 4; ++i) mean += y(r, i) / 4;
        for (std::size_t i = 0; i < 4; ++i) var += (y(r, i) - mean) * (y(r, i) - mean) / 4;
        CHECK(mean == doctest::Approx(0).epsilon(1e-12));
        CHECK(var == doctest::Approx(1).epsilon(1e-4));
    }
}

TEST_CASE("layernorm: gradients") {
    pw::Rng rng(5);
    LayerNorm64 ln(6);
    pw::testing::randomize_parameters(ln, rng);
    check_gradients(ln, pw::Shape{3, 6});
    CHECK_THROWS_AS(LayerNorm64(0), pw::ConfigError);
}

using Mlp64 = pw::Sequential<Linear64, pw::BasicGelu<double>, Linear64, LayerNorm64, pw::BasicTanh<double>>;

TEST_CASE("sequential: gradients flow through every child; names follow kind and position") {
    pw::Rng rng(7);
    Mlp64 mlp(Linear64(5, 6), {}, Linear64(6, 4), LayerNorm64(4), {});
    pw::testing::randomize_parameters(mlp, rng);
    check_gradients(mlp, pw::Shape{3, 5});
    CHECK(mlp.get<2>().weight.name() == "linear2.weight");
    CHECK(mlp.get<3>().scale.name() == "layernorm3.scale");
    CHECK(mlp.out_features() == 4);
    CHECK(pw::parameter_count(mlp) == 5 * 6 + 6 + 6 * 4 + 4 + 4 + 4);
}

TEST_CASE("sequential: a frozen prefix is skipped when no input gradient is wanted") {
    Mlp64 mlp(Linear64(5, 6), {}, Linear64(6, 4), LayerNorm64(4), {});
    mlp.get<0>().weight.set_trainable(false);
    mlp.get<0>().bias.set_trainable(false);
    mlp.get<2>().weight.set_trainable(false);
    mlp.get<2>().bias.set_trainable(false);
    mlp.set_input_grad(false);
    pw::Tensor<double> x(pw::Shape{2, 5}, 0.3);
    const auto& y = mlp.forward(x);
    const pw::Tensor<double> dy(y.shape(), 1.0);
    const auto& dx = mlp.backward(dy);
    CHECK(dx.empty());
    CHECK_FALSE(mlp.get<3>().input_grad());  // the first trainable child computes no input gradient
}

TEST_CASE("sequential: a mismatched chain reports the child's path") {
    using Bad = pw::Sequential<Linear64, Linear64>;
    Bad bad(Linear64(3, 4), Linear64(5, 2));
    bad.set_path("model");
    pw::Tensor<double> x(pw::Shape{1, 3});
    CHECK_THROWS_WITH_AS(bad.forward(x), doctest::Contains("model.linear1"), pw::ShapeError);
}

TEST_CASE("repeat: N blocks chained at run time, gradients and names") {
    using Block = pw::Sequential<Linear64, pw::BasicTanh<double>>;
    pw::Repeat<Block> stack(3, [](std::size_t) { return Block(Linear64(4, 4), {}); });
    pw::Rng rng(11);
    pw::testing::randomize_parameters(stack, rng);
    check_gradients(stack, pw::Shape{2, 4});
    CHECK(stack.size() == 3);
    CHECK(stack[2].get<0>().weight.name() == "block2.linear0.weight");
    pw::Repeat<Block> copies(2, stack[0]);
    CHECK(copies[1].get<0>().weight.value[3] == stack[0].get<0>().weight.value[3]);
    CHECK_THROWS_AS(pw::Repeat<Block>(0, stack[0]), pw::ConfigError);
}
