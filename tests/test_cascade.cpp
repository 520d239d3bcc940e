#include <doctest/doctest.h>

#include <sstream>

#include "gradcheck.hpp"
#include "patchwork/compose/cascade.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/core/report.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/frozen.hpp"
#include "patchwork/policies/norm_patch.hpp"
#include "patchwork/policies/tune.hpp"

namespace pw = patchwork;

using Linear64 = pw::BasicLinear<double>;
using Stage64 = pw::Sequential<Linear64, pw::BasicTanh<double>, pw::BasicLayerNorm<double>>;

Stage64 make_stage(std::size_t in, std::size_t out) { return Stage64(Linear64(in, out), {}, pw::BasicLayerNorm<double>(out)); }

using Model64 = pw::Cascade<pw::Tune<Stage64, pw::NormPatch>, pw::Tune<Stage64, pw::Frozen>, pw::Tune<Linear64, pw::FineTune>>;

Model64 make_model() {
    return Model64(pw::Tune<Stage64, pw::NormPatch>(make_stage(4, 5)), pw::Tune<Stage64, pw::Frozen>(make_stage(5, 3)),
                   pw::Tune<Linear64, pw::FineTune>(3, 2));
}

TEST_CASE("cascade: gradients flow through every stage; stage outputs are reachable") {
    auto model = make_model();
    pw::Rng rng(4);
    pw::testing::randomize_parameters(model, rng);
    pw::testing::check_gradients(model, pw::Shape{3, 4});
    pw::Tensor<double> x(pw::Shape{2, 4}, 0.1);
    const auto& y = model.forward(x);
    CHECK(model.output<0>().shape() == pw::Shape{2, 5});
    CHECK(model.output<1>().shape() == pw::Shape{2, 3});
    CHECK(&model.output<2>() == &y);
    CHECK(model.stage<2>().base().weight.name() == "stage2.weight");
    CHECK(model.stage<0>().base().get<2>().scale.name() == "stage0.layernorm2.scale");
}

// L = sum(R * y_final) + w * sum(R0 * y_0): the stage loss reaches stage 0's parameters.
TEST_CASE("cascade: a weighted stage loss adds its gradient at that stage") {
    auto model = make_model();
    pw::Rng rng(9);
    pw::testing::randomize_parameters(model, rng);
    pw::Tensor<double> x(pw::Shape{3, 4});
    pw::init::normal(x, rng, 0, 1);
    pw::Tensor<double> r(pw::Shape{3, 2}), r0(pw::Shape{3, 5});
    pw::init::normal(r, rng, 0, 1);
    pw::init::normal(r0, rng, 0, 1);
    const double w = 0.7;
    const auto loss = [&] {
        const auto& y = model.forward(x);
        double s = 0;
        for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * r[i];
        const auto& y0 = model.output<0>();
        for (std::size_t i = 0; i < y0.size(); ++i) s += w * y0[i] * r0[i];
        return s;
    };
    pw::zero_grad(model);
    model.set_input_grad(false);
    model.forward(x);
    model.add_stage_grad<0>(r0, w);
    model.backward(r);
    auto& gamma = model.stage<0>().base().get<2>().scale;
    REQUIRE(gamma.trainable());
    for (std::size_t i = 0; i < gamma.size(); ++i) {
        const double v = gamma.value[i], h = 1e-6;
        gamma.value[i] = v + h;
        const double lp = loss();
        gamma.value[i] = v - h;
        const double lm = loss();
        gamma.value[i] = v;
        const double numeric = (lp - lm) / (2 * h);
        CHECK(gamma.grad[i] == doctest::Approx(numeric).epsilon(1e-6));
    }
    CHECK_THROWS_AS(model.add_stage_grad<0>(pw::Tensor<double>(pw::Shape{3, 4}), 1.0), pw::ShapeError);
}

TEST_CASE("cascade: frozen stages keep no gradient buffers") {
    auto model = make_model();
    model.stage<1>().visit([](auto& p) {
        CHECK_FALSE(p.trainable());
        CHECK(p.grad.empty());
    });
}

TEST_CASE("parameter_report: totals, trainable counts and the share of full fine-tuning") {
    auto model = make_model();
    const auto report = pw::parameter_report(model);
    const std::size_t total = (4 * 5 + 5 + 5 + 5) + (5 * 3 + 3 + 3 + 3) + (3 * 2 + 2);
    CHECK(report.total == total);
    CHECK(report.pretrained == total);
    CHECK(report.trainable == 5 + 5 + 3 * 2 + 2);
    CHECK(report.percent_of_full() == doctest::Approx(100.0 * 18 / double(total)));
    CHECK(report.rows.size() == 5);
    CHECK(report.rows[0].module == "stage0.linear0");
    CHECK(report.rows[0].trainable == 0);
    std::ostringstream os;
    os << report;
    CHECK(os.str().find("stage0.layernorm2") != std::string::npos);
    CHECK(os.str().find("total") != std::string::npos);
}
