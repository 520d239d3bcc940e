#include <doctest/doctest.h>

#include <xtensor/xmath.hpp>

#include "patchwork/core/module.hpp"
#include "patchwork/core/tensor.hpp"
#include "patchwork/core/xtensor.hpp"

namespace pw = patchwork;

TEST_CASE("tensor: shape, row-major layout and the Eigen view share memory") {
    pw::Tensor<float> t(pw::Shape{2, 3, 4});
    CHECK(t.size() == 24);
    CHECK(t.rows() == 6);
    CHECK(t.cols() == 4);
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = float(i);
    auto m = t.matrix();
    CHECK(m.rows() == 6);
    CHECK(m(1, 2) == 6.0f);  // row-major: element (1, 2) is index 1 * 4 + 2
    m(5, 3) = -1.0f;
    CHECK(t[23] == -1.0f);
}

TEST_CASE("tensor: the xtensor view aliases the same memory") {
    pw::Tensor<double> t(pw::Shape{2, 3});
    auto x = pw::xt(t);
    x(1, 2) = 7.5;
    CHECK(t(1, 2) == 7.5);
    CHECK(x.shape()[0] == 2);
    CHECK(x.shape()[1] == 3);
    t(0, 1) = 2.0;
    CHECK(::xt::sum(x)() == doctest::Approx(9.5));
}

TEST_CASE("tensor: resize keeps the allocation, reshape checks the element count") {
    pw::Tensor<float> t(pw::Shape{8, 8});
    const float* before = t.data();
    t.resize(pw::Shape{4, 8});
    CHECK(t.data() == before);
    CHECK_THROWS_AS(t.reshape(pw::Shape{3, 3}), pw::ShapeError);
    t.reshape(pw::Shape{2, 16});
    CHECK(t.cols() == 16);
    CHECK_THROWS_AS((pw::Tensor<float>(pw::Shape{2, 2}, {1.f, 2.f, 3.f})), pw::ShapeError);
}

TEST_CASE("parameter: a gradient buffer exists only while trainable") {
    pw::Parameter<float> p("weight", pw::Role::weight, pw::Shape{3, 4}, false);
    CHECK(p.grad.empty());
    p.set_trainable(true);
    CHECK(p.grad.shape() == p.value.shape());
    p.set_trainable(false);
    CHECK(p.grad.empty());
    p.set_prefix("stage0.linear1");
    CHECK(p.name() == "stage0.linear1.weight");
}

TEST_CASE("errors derive from patchwork::Error") {
    CHECK_THROWS_AS(throw pw::ShapeError("x"), pw::Error);
    CHECK_THROWS_AS(throw pw::IoError("x"), pw::Error);
    CHECK_THROWS_AS(throw pw::ConfigError("x"), pw::Error);
}
