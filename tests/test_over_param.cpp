#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include <Eigen/LU>

#include "gradcheck.hpp"
#include "patchwork/compose/cascade.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/frozen.hpp"
#include "patchwork/policies/over_param.hpp"
#include "patchwork/policies/tune.hpp"
#include "patchwork/train/loss.hpp"
#include "patchwork/train/optimizer.hpp"

namespace pw = patchwork;
using pw::testing::check_gradients;

using Linear64 = pw::BasicLinear<double>;
using Relu64 = pw::BasicRelu<double>;
using pw::SharedFactor;
using pw::TaskFactor;

using UMV = pw::OverParam<>;
using UMtV = pw::OverParam<SharedFactor, TaskFactor, SharedFactor>;
using TwoShared = pw::OverParam<SharedFactor, SharedFactor>;
using Deep = pw::OverParam<SharedFactor, TaskFactor, TaskFactor, SharedFactor>;

namespace {

std::set<std::string> trainable_names(auto& m) {
    std::set<std::string> names;
    m.visit([&](auto& p) {
        if (p.trainable()) names.insert(p.name());
    });
    return names;
}

pw::Tensor<double> random_tensor(const pw::Shape& shape, std::uint64_t seed, double stddev = 1.0) {
    pw::Rng rng(seed);
    pw::Tensor<double> x(shape);
    pw::init::normal(x, rng, 0.0, stddev);
    return x;
}

double max_abs_diff(const pw::Tensor<double>& a, const pw::Tensor<double>& b) {
    REQUIRE(a.shape() == b.shape());
    double d = 0;
    for (std::size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
    return d;
}

double max_abs(const pw::Tensor<double>& a) {
    double d = 0;
    for (double v : a) d = std::max(d, std::abs(v));
    return d;
}

template <class M>
pw::Tensor<double> output_of(M& m, const pw::Tensor<double>& x) {
    return m.forward(x);
}

pw::OverParamOptions opts(std::size_t expansion, std::size_t tasks = 1,
                          pw::OverParamInit init = pw::OverParamInit::from_weight) {
    return pw::OverParamOptions{.expansion = expansion, .tasks = tasks, .init = init};
}

/// Randomise every parameter (so no factor sits at a special point), then gradcheck.
template <class M>
void check_random(M& m, const pw::Shape& in, std::uint64_t seed) {
    pw::Rng rng(seed);
    pw::testing::randomize_parameters(m, rng);
    check_gradients(m, in, 1e-6, seed);
}

}  // namespace

// ---------------------------------------------------------------- gradients

TEST_CASE("over_param: gradients of every factor, the bias and the input, on both orientations") {
    SUBCASE("U M V, out < in, bias trains (FineTune)") {
        pw::Tune<Linear64, pw::FineTune, UMV> t(Linear64(5, 3), opts(2));
        CHECK(trainable_names(t) ==
              std::set<std::string>{"overparam.factor0", "overparam.factor1", "overparam.factor2", "bias"});
        check_random(t, pw::Shape{4, 5}, 11);
    }
    SUBCASE("U M V, out > in (the transposed chain), leading dimensions flattened") {
        pw::Tune<Linear64, pw::FineTune, UMV> t(Linear64(3, 5), opts(2));
        check_random(t, pw::Shape{2, 3, 3}, 12);
    }
    SUBCASE("two factors, expansion 1 and 3; bias frozen without a selection policy") {
        pw::Tune<Linear64, TwoShared> t(Linear64(4, 4), opts(1));
        CHECK(trainable_names(t) == std::set<std::string>{"overparam.factor0", "overparam.factor1"});
        check_random(t, pw::Shape{3, 4}, 13);
        pw::Tune<Linear64, TwoShared> u(Linear64(4, 2), opts(3));
        check_random(u, pw::Shape{3, 4}, 14);
    }
    SUBCASE("four factors, two per task, active task 1 of 3, both orientations") {
        pw::Tune<Linear64, pw::FineTune, Deep> t(Linear64(5, 3), opts(2, 3));
        t.inner().set_task(1);
        // Only the active task's factors receive a gradient; gradcheck sees the others as constants.
        check_random(t, pw::Shape{3, 5}, 15);
        pw::Tune<Linear64, pw::FineTune, Deep> u(Linear64(2, 4), opts(2, 3));
        u.inner().set_task(2);
        check_random(u, pw::Shape{3, 2}, 16);
    }
    SUBCASE("a frozen factor gets no gradient and the others stay exact") {
        pw::Tune<Linear64, UMtV> t(Linear64(5, 3), opts(2, 2));
        t.inner().factor(0).set_trainable(false);
        t.inner().factor(2).set_trainable(false);
        check_random(t, pw::Shape{3, 5}, 17);
        CHECK(trainable_names(t) == std::set<std::string>{"overparam.factor1.task0", "overparam.factor1.task1"});
    }
}

TEST_CASE("over_param: only the active task's per-task factors accumulate gradients") {
    pw::Tune<Linear64, UMtV> t(Linear64(4, 3), opts(2, 2));
    auto& op = t.inner();
    const auto x = random_tensor(pw::Shape{5, 4}, 21);
    pw::zero_grad(t);
    op.set_task(1);
    const auto& y = t.forward(x);
    t.backward(pw::Tensor<double>(y.shape(), 1.0));
    CHECK(max_abs(op.factor(1, 0).grad) == 0.0);
    CHECK(max_abs(op.factor(1, 1).grad) > 0.0);
    CHECK(max_abs(op.factor(0).grad) > 0.0);
    CHECK(op.factor(1, 1).task() == 1);
    CHECK(op.factor(0).task() == pw::shared_task);
}

TEST_CASE("over_param: weight_of and compact between forward and backward leave the gradients alone") {
    pw::Tune<Linear64, Deep> t(Linear64(5, 3), opts(2, 2));
    pw::Rng rng(23);
    pw::testing::randomize_parameters(t, rng);
    auto& op = t.inner();
    const auto x = random_tensor(pw::Shape{4, 5}, 24);
    const auto run = [&](bool peek) {
        pw::zero_grad(t);
        const auto& y = t.forward(x);
        const pw::Tensor<double> dy(y.shape(), 0.5);
        if (peek) {
            (void)op.weight_of(1);
            (void)op.compact(1);
        }
        t.backward(dy);
        std::vector<pw::Tensor<double>> grads;
        t.visit([&](auto& p) { grads.push_back(p.grad); });
        return grads;
    };
    const auto plain = run(false), peeked = run(true);
    REQUIRE(plain.size() == peeked.size());
    for (std::size_t i = 0; i < plain.size(); ++i) CHECK(max_abs_diff(plain[i], peeked[i]) == 0.0);
}

// ---------------------------------------------------------------- initialisation

TEST_CASE("over_param: from_weight reproduces the pre-trained weight exactly, for every shape and depth") {
    for (const auto& shape : std::vector<std::pair<std::size_t, std::size_t>>{{7, 3}, {3, 7}, {6, 6}}) {
        const std::size_t in = shape.first, out = shape.second;  // not bound: CAPTURE takes them (clang 14)
        for (std::size_t e : {1u, 2u, 3u}) {
            CAPTURE(in);
            CAPTURE(out);
            CAPTURE(e);
            Linear64 base(in, out);
            pw::Rng rng(100 + in + e);
            pw::init::normal(base.weight.value, rng, 0.0, 1.0);
            const auto scale = max_abs(base.weight.value);
            pw::Tune<Linear64, TwoShared> two(base, opts(e));
            pw::Tune<Linear64, UMV> three(base, opts(e));
            pw::Tune<Linear64, Deep> four(base, opts(e, 2));
            CHECK(max_abs_diff(two.inner().weight_of(0), base.weight.value) < 1e-10 * scale);
            CHECK(max_abs_diff(three.inner().weight_of(0), base.weight.value) < 1e-10 * scale);
            CHECK(max_abs_diff(four.inner().weight_of(0), base.weight.value) < 1e-10 * scale);
            CHECK(max_abs_diff(four.inner().weight_of(1), base.weight.value) < 1e-10 * scale);
            CHECK(three.inner().width() == e * std::min(in, out));
            // The forward is the pre-trained layer's.
            const auto x = random_tensor(pw::Shape{4, in}, 7);
            CHECK(max_abs_diff(output_of(three, x), output_of(base, x)) < 1e-10);
        }
    }
}

TEST_CASE("over_param: from_weight keeps random factors (the extra width is used), product still exact") {
    Linear64 base(8, 4);
    pw::Tune<Linear64, UMV> t(base, opts(4));
    auto& op = t.inner();
    CHECK(op.factor(0).value.shape() == pw::Shape{4, 16});
    CHECK(op.factor(1).value.shape() == pw::Shape{16, 16});
    CHECK(op.factor(2).value.shape() == pw::Shape{16, 8});
    // F_3 has a component outside the row space the first two factors need: its rank exceeds out.
    Eigen::MatrixXd f3 = op.factor(2).value.matrix();
    CHECK(Eigen::FullPivLU<Eigen::MatrixXd>(f3).rank() == 8);
}

TEST_CASE("over_param: random init keeps the product's variance at the Linear's 1/in") {
    pw::manual_seed(5);
    for (const auto& shape : std::vector<std::pair<std::size_t, std::size_t>>{{200, 100}, {100, 200}}) {
        const std::size_t in = shape.first, out = shape.second;  // not bound: CAPTURE takes them (clang 14)
        pw::Tune<Linear64, TwoShared> two(Linear64(in, out), opts(2, 1, pw::OverParamInit::random));
        pw::Tune<Linear64, UMV> three(Linear64(in, out), opts(2, 1, pw::OverParamInit::random));
        pw::Tune<Linear64, Deep> four(Linear64(in, out), opts(3, 2, pw::OverParamInit::random));
        const double expected = 1.0 / std::sqrt(double(in));
        const auto std_of = [](const pw::Tensor<double>& w) {
            double s = 0, s2 = 0;
            for (double v : w) s += v, s2 += v * v;
            const double n = double(w.size());
            return std::sqrt(s2 / n - (s / n) * (s / n));
        };
        CAPTURE(in);
        CHECK(std_of(two.inner().weight_of(0)) == doctest::Approx(expected).epsilon(0.06));
        CHECK(std_of(three.inner().weight_of(0)) == doctest::Approx(expected).epsilon(0.06));
        CHECK(std_of(four.inner().weight_of(1)) == doctest::Approx(expected).epsilon(0.06));
        // The compact Linear's own init, for comparison (Kaiming-uniform, gain 1).
        Linear64 plain(in, out);
        CHECK(std_of(plain.weight.value) == doctest::Approx(expected).epsilon(0.06));
        // Per-task factors are independent draws under random init.
        CHECK(max_abs_diff(four.inner().weight_of(0), four.inner().weight_of(1)) > 0.1);
    }
}

// ---------------------------------------------------------------- collapse

TEST_CASE("over_param: collapse gives the compact parameter count and the same outputs (shared factors)") {
    pw::Tune<Linear64, pw::FineTune, UMV> t(Linear64(6, 4), opts(3));
    pw::Rng rng(31);
    pw::testing::randomize_parameters(t, rng);
    t.set_path("trunk.linear0");
    const auto x = random_tensor(pw::Shape{5, 6}, 32);
    const auto before = output_of(t, x);
    CHECK(pw::parameter_count(t) == 4 * 12 + 12 * 12 + 12 * 6 + 4);
    auto& op = t.inner();
    op.collapse();
    CHECK(op.collapsed());
    CHECK(pw::parameter_count(t) == 4 * 6 + 4);
    CHECK(max_abs_diff(output_of(t, x), before) < 1e-10);
    std::set<std::string> names;
    t.visit([&](auto& p) { names.insert(p.name()); });
    CHECK(names == std::set<std::string>{"trunk.linear0.weight", "trunk.linear0.bias"});
    // The plain compact Linear gives the same outputs with the same kernel.
    auto compact = op.compact(0);
    CHECK(max_abs_diff(output_of(compact, x), before) < 1e-10);
    CHECK(compact.weight.trainable());
    // Collapsing twice changes nothing.
    op.collapse();
    CHECK(max_abs_diff(output_of(t, x), before) == 0.0);
}

TEST_CASE("over_param: collapse with per-task factors keeps one compact weight per task") {
    pw::Tune<Linear64, pw::FineTune, UMtV> t(Linear64(5, 3), opts(2, 3));
    pw::Rng rng(41);
    pw::testing::randomize_parameters(t, rng);
    t.set_path("enc");
    auto& op = t.inner();
    const auto x = random_tensor(pw::Shape{4, 5}, 42);
    std::vector<pw::Tensor<double>> before;
    for (std::size_t k = 0; k < 3; ++k) {
        op.set_task(k);
        before.push_back(output_of(t, x));
    }
    CHECK(max_abs_diff(before[0], before[1]) > 1e-3);
    op.set_task(1);
    op.collapse();
    CHECK(pw::parameter_count(t) == 3 * (3 * 5) + 3);
    for (std::size_t k : {2u, 0u, 1u}) {
        op.set_task(k);
        CAPTURE(k);
        CHECK(max_abs_diff(output_of(t, x), before[k]) < 1e-10);
        auto compact = op.compact(k);
        CHECK(max_abs_diff(output_of(compact, x), before[k]) < 1e-10);
    }
    std::set<std::string> names;
    t.visit([&](auto& p) { names.insert(p.name()); });
    CHECK(names == std::set<std::string>{"enc.task0.weight", "enc.task1.weight", "enc.task2.weight", "enc.bias"});
}

TEST_CASE("over_param: reset_parameters restores a trainable, uncollapsed layer") {
    pw::Tune<Linear64, pw::FineTune, UMV> t(Linear64(4, 3), opts(2));
    t.inner().collapse();
    pw::Rng rng(3);
    t.reset_parameters(rng);
    CHECK_FALSE(t.inner().collapsed());
    CHECK(pw::parameter_count(t) == 3 * 6 + 6 * 6 + 6 * 4 + 3);
    CHECK(max_abs_diff(t.inner().weight_of(0), t.base().weight.value) < 1e-10);
    check_random(t, pw::Shape{2, 4}, 4);
}

// ---------------------------------------------------------------- errors

TEST_CASE("over_param: bad input names the layer and the offending values") {
    CHECK_THROWS_WITH_AS((pw::Tune<Linear64, UMV>(Linear64(4, 3), opts(0))),
                         doctest::Contains("expansion must be positive, got expansion=0"), pw::ConfigError);
    CHECK_THROWS_WITH_AS((pw::Tune<Linear64, UMV>(Linear64(4, 3), opts(2, 0))),
                         doctest::Contains("at least one task, got tasks=0"), pw::ConfigError);

    pw::Tune<Linear64, UMtV> t(Linear64(4, 3), opts(2, 2));
    t.set_path("trunk.linear2");
    CHECK_THROWS_WITH_AS(t.inner().set_task(2),
                         "trunk.linear2: task index 2 out of range (this OverParam layer has 2 tasks)",
                         pw::ConfigError);
    CHECK_THROWS_WITH_AS((void)t.inner().factor(3), doctest::Contains("factor index 3 out of range"), pw::ConfigError);

    // set_task between forward and backward.
    const auto x = random_tensor(pw::Shape{2, 4}, 51);
    const auto& y = t.forward(x);
    const pw::Tensor<double> dy(y.shape(), 1.0);
    t.inner().set_task(1);
    CHECK_THROWS_WITH_AS(t.backward(dy), doctest::Contains("trunk.linear2: OverParam backward for task 1"), pw::Error);

    // Shape errors come from the Linear and name the path.
    CHECK_THROWS_WITH_AS(t.forward(pw::Tensor<double>(pw::Shape{2, 5})), doctest::Contains("trunk.linear2"),
                         pw::ShapeError);

    // Backward after collapse.
    t.forward(x);
    t.inner().collapse();
    CHECK_THROWS_WITH_AS(t.backward(dy), doctest::Contains("trunk.linear2: OverParam backward after collapse()"),
                         pw::Error);
    CHECK_THROWS_WITH_AS((void)t.inner().factor(0), doctest::Contains("trunk.linear2: OverParam factor() after collapse()"),
                         pw::Error);
    CHECK_THROWS_WITH_AS(pw::set_overparam_task(t, 5), doctest::Contains("task index 5 out of range"),
                         pw::ConfigError);
}

// ---------------------------------------------------------------- composition

namespace {
using OpLinear = pw::Tune<Linear64, pw::FineTune, UMV>;
using OpTaskLinear = pw::Tune<Linear64, pw::FineTune, UMtV>;
using Stage0 = pw::Sequential<OpLinear, Relu64, OpLinear>;
using Stage1 = pw::Sequential<Relu64, OpTaskLinear>;
using Model = pw::Cascade<Stage0, Stage1>;

Model make_cascade() {
    pw::manual_seed(61);
    // Every layer of a multi-task model is built for both tasks, also those whose factors are all shared.
    return Model(Stage0(OpLinear(Linear64(6, 8), opts(2, 2)), {}, OpLinear(Linear64(8, 5), opts(3, 2))),
                 Stage1({}, OpTaskLinear(Linear64(5, 3), opts(2, 2))));
}
}  // namespace

TEST_CASE("over_param: inside a Cascade, gradients check, training lowers the loss, collapse is exact") {
    Model model = make_cascade();
    CHECK(pw::set_overparam_task(model, 1) == 3);
    check_random(model, pw::Shape{4, 6}, 62);

    // Train a few SGD steps on a fixed batch.
    model = make_cascade();
    const auto x = random_tensor(pw::Shape{16, 6}, 63);
    std::vector<int> labels;
    for (int i = 0; i < 16; ++i) labels.push_back(i % 3);
    pw::BasicSGD<double> opt{pw::trainable_parameters(model), {.lr = 0.1}};
    double first = 0, last = 0;
    for (int step = 0; step < 30; ++step) {
        pw::zero_grad(model);
        const auto& y = model.forward(x);
        auto ce = pw::cross_entropy(y, std::span<const int>(labels));
        model.backward(ce.grad);
        opt.step();
        (step == 0 ? first : last) = ce.value;
    }
    CHECK(last < 0.8 * first);

    const auto before = output_of(model, x);
    const std::size_t trained_count = pw::parameter_count(model);
    CHECK(pw::collapse_overparam(model) == 3);
    CHECK(pw::parameter_count(model) == (6 * 8 + 8) + (8 * 5 + 5) + (2 * 5 * 3 + 3));
    CHECK(pw::parameter_count(model) < trained_count);
    CHECK(max_abs_diff(output_of(model, x), before) < 1e-10);
}

TEST_CASE("over_param: a multi-task model, shared trunk factors, per-task heads and per-task middle factors") {
    // Trunk: two OverParam layers, U and V shared by the tasks, M per task; one head per task.
    using Trunk = pw::Sequential<OpTaskLinear, Relu64, OpTaskLinear, Relu64>;
    pw::manual_seed(71);
    Trunk trunk(OpTaskLinear(Linear64(6, 10), opts(2, 2)), {}, OpTaskLinear(Linear64(10, 8), opts(2, 2)), {});
    std::vector<Linear64> heads{Linear64(8, 3), Linear64(8, 2)};
    heads[0].set_path("head0");
    heads[1].set_path("head1");
    CHECK(trainable_names(trunk).count("linear0.overparam.factor1.task1") == 1);

    // Task 0: argmax of three input projections; task 1: sign of the input sum.
    const auto x = random_tensor(pw::Shape{32, 6}, 72);
    std::vector<int> labels0, labels1;
    for (std::size_t n = 0; n < 32; ++n) {
        const double a = x(n, 0) + x(n, 1), b = x(n, 2) - x(n, 3), c = x(n, 4) + x(n, 5);
        labels0.push_back(a > b && a > c ? 0 : (b > c ? 1 : 2));
        double s = 0;
        for (std::size_t i = 0; i < 6; ++i) s += x(n, i);
        labels1.push_back(s > 0 ? 1 : 0);
    }
    const std::vector<int>* labels[2] = {&labels0, &labels1};

    std::vector<pw::Parameter<double>*> params = pw::trainable_parameters(trunk);
    for (auto& h : heads)
        for (auto* p : pw::trainable_parameters(h)) params.push_back(p);
    pw::BasicAdam<double> opt{params, {.lr = 1e-2}};
    double first[2] = {0, 0}, last[2] = {0, 0};
    for (int step = 0; step < 60; ++step) {
        pw::zero_grad(trunk);
        for (auto& h : heads) pw::zero_grad(h);
        // Each task: its active index, a forward through the trunk and its head, a backward.
        // Gradients of the shared factors add up over the tasks; one optimiser step for all.
        for (std::size_t k = 0; k < 2; ++k) {
            CHECK(pw::set_overparam_task(trunk, k) == 2);
            const auto& y = heads[k].forward(trunk.forward(x));
            auto ce = pw::cross_entropy(y, std::span<const int>(*labels[k]));
            trunk.backward(heads[k].backward(ce.grad));
            (step == 0 ? first[k] : last[k]) = ce.value;
        }
        if (step == 0) {
            // Task 1's per-task factor saw only task 1's gradient, the shared ones both tasks'.
            auto& op = trunk.get<0>().inner();
            CHECK(max_abs(op.factor(1, 0).grad) > 0);
            CHECK(max_abs(op.factor(1, 1).grad) > 0);
        }
        opt.step();
    }
    CHECK(last[0] < 0.7 * first[0]);
    CHECK(last[1] < 0.7 * first[1]);

    // Collapse: per task, a compact trunk weight per layer; outputs unchanged.
    pw::Tensor<double> before[2];
    for (std::size_t k = 0; k < 2; ++k) {
        pw::set_overparam_task(trunk, k);
        before[k] = heads[k].forward(trunk.forward(x));
    }
    CHECK(pw::collapse_overparam(trunk) == 2);
    CHECK(pw::parameter_count(trunk) == 2 * (6 * 10) + 10 + 2 * (10 * 8) + 8);
    for (std::size_t k : {1u, 0u}) {
        pw::set_overparam_task(trunk, k);
        CHECK(max_abs_diff(heads[k].forward(trunk.forward(x)), before[k]) < 1e-10);
    }
}

TEST_CASE("over_param: float layers, the umbrella policy name and the kind") {
    pw::manual_seed(81);
    pw::Linear base(16, 8);
    pw::Tune<pw::Linear, pw::OverParam<>> t(base, pw::OverParamOptions{.expansion = 2});
    pw::Tensor<float> x(pw::Shape{4, 16});
    pw::Rng rng(82);
    pw::init::normal(x, rng, 0.0, 1.0);
    const pw::Tensor<float> y0 = base.forward(x);
    const auto& y1 = t.forward(x);
    for (std::size_t i = 0; i < y0.size(); ++i) CHECK(y1[i] == doctest::Approx(y0[i]).epsilon(1e-4));
    CHECK(std::string(decltype(t)::kind()) == "linear");
    CHECK(std::string(pw::OverParam<>::name()) == "OverParam");
    CHECK(decltype(t)::Inner::depth == 3);
    CHECK_FALSE(decltype(t)::Inner::any_per_task);
    // An outer Frozen leaves the factors trainable: the policy decided them.
    using Block = pw::Sequential<pw::Tune<pw::Linear, pw::OverParam<>>, pw::Relu>;
    pw::Tune<Block, pw::Frozen> frozen(Block(pw::Tune<pw::Linear, pw::OverParam<>>(pw::Linear(4, 3)), {}));
    CHECK(trainable_names(frozen) ==
          std::set<std::string>{"linear0.overparam.factor0", "linear0.overparam.factor1", "linear0.overparam.factor2"});
    // The same with a Linear copied out of a fine-tuned Tune: its bias is the
    // outer Frozen's to decide, not the fine-tuning's.
    pw::Tune<pw::Linear, pw::FineTune> tuned(4, 3);
    pw::Tune<Block, pw::Frozen> frozen_copy(Block(pw::Tune<pw::Linear, pw::OverParam<>>(tuned.base()), {}));
    CHECK(trainable_names(frozen_copy) == trainable_names(frozen));
}
