// Injection policies: Adapter, LoRA and ScaleShift (forward math, gradients, merge, errors).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>

#include "gradcheck.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/bias_only.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/lora.hpp"
#include "patchwork/policies/norm_patch.hpp"
#include "patchwork/policies/scale_shift.hpp"
#include "patchwork/policies/tune.hpp"

namespace pw = patchwork;
using pw::testing::check_gradients;

using Linear64 = pw::BasicLinear<double>;
using LayerNorm64 = pw::BasicLayerNorm<double>;
using Block64 = pw::Sequential<Linear64, pw::BasicRelu<double>, Linear64, LayerNorm64>;
using GeluAdapter3 = pw::Adapter<3, pw::AdapterActivation::gelu>;

namespace {

Block64 make_block() { return Block64(Linear64(4, 5), {}, Linear64(5, 3), LayerNorm64(3)); }

/// Names of the trainable parameters, in visiting order.
template <class M>
std::set<std::string> trainable_names(M& m) {
    std::set<std::string> names;
    m.visit([&](auto& p) {
        if (p.trainable()) names.insert(p.name());
    });
    return names;
}

/// Randomise every parameter, then check input and trainable-parameter gradients,
/// and that exactly the `expected` parameters train (so none is skipped silently).
template <class M>
void check_tuned(M& m, const pw::Shape& in, const std::set<std::string>& expected, std::uint64_t seed) {
    pw::Rng rng(seed);
    pw::testing::randomize_parameters(m, rng);
    CHECK(trainable_names(m) == expected);
    check_gradients(m, in, 1e-6, seed);
}

template <class M>
pw::Tensor<double> output_of(M& m, const pw::Tensor<double>& x) {
    return m.forward(x);
}

pw::Tensor<double> random_input(const pw::Shape& shape, std::uint64_t seed) {
    pw::Rng rng(seed);
    pw::Tensor<double> x(shape);
    pw::init::normal(x, rng, 0.0, 1.0);
    return x;
}

bool equal(const pw::Tensor<double>& a, const pw::Tensor<double>& b) {
    return a.shape() == b.shape() && std::equal(a.begin(), a.end(), b.begin());
}

const std::set<std::string> adapter_names = {"adapter.down.weight", "adapter.down.bias", "adapter.up.weight",
                                             "adapter.up.bias"};

std::set<std::string> with(std::set<std::string> a, const std::set<std::string>& b) {
    a.insert(b.begin(), b.end());
    return a;
}

}  // namespace

// ---------------------------------------------------------------- Adapter

TEST_CASE("adapter: gradients on a Linear, a LayerNorm and a block, with ReLU and GELU") {
    pw::Tune<Linear64, pw::Adapter<3>> lin(4, 5);
    check_tuned(lin, pw::Shape{3, 4}, adapter_names, 11);
    pw::Tune<Linear64, GeluAdapter3> lin_gelu(4, 5);
    check_tuned(lin_gelu, pw::Shape{2, 3, 4}, adapter_names, 12);

    pw::Tune<LayerNorm64, pw::Adapter<2>> ln(5);
    check_tuned(ln, pw::Shape{3, 5}, adapter_names, 13);
    pw::Tune<LayerNorm64, pw::Adapter<2, pw::AdapterActivation::gelu>> ln_gelu(5);
    check_tuned(ln_gelu, pw::Shape{3, 5}, adapter_names, 14);

    pw::Tune<Block64, pw::Adapter<2>> block(make_block());
    check_tuned(block, pw::Shape{3, 4}, adapter_names, 15);
    pw::Tune<Block64, GeluAdapter3> block_gelu(make_block());
    check_tuned(block_gelu, pw::Shape{3, 4}, adapter_names, 16);
}

TEST_CASE("adapter: gradients reach the wrapped module's trainable parameters through the residual") {
    pw::Tune<Linear64, pw::FineTune, GeluAdapter3> lin(4, 5);
    check_tuned(lin, pw::Shape{3, 4}, with(adapter_names, {"weight", "bias"}), 21);

    pw::Tune<Block64, pw::NormPatch, pw::Adapter<3>> block(make_block());
    check_tuned(block, pw::Shape{3, 4}, with(adapter_names, {"layernorm3.scale", "layernorm3.shift"}), 22);
    CHECK(pw::trainable_count(block) == 3 + 3 + (2 * 3 * 3 + 3 + 3));

    pw::Tune<Block64, pw::BiasOnly, pw::Adapter<2, pw::AdapterActivation::gelu>> bitfit(make_block());
    check_tuned(bitfit, pw::Shape{2, 4}, with(adapter_names, {"linear0.bias", "linear2.bias"}), 23);
}

TEST_CASE("adapter: starts as the identity, adds 2 d r + r + d parameters, names them under .adapter") {
    const auto x = random_input(pw::Shape{3, 4}, 31);
    pw::Tune<Block64, pw::Adapter<3>> t(make_block());
    const auto y = output_of(t, x);
    CHECK(equal(y, output_of(t.base(), x)));

    pw::Tune<Linear64, GeluAdapter3> lin(4, 6);
    CHECK(equal(output_of(lin, x), output_of(lin.base(), x)));
    CHECK(pw::parameter_count(lin) == 4 * 6 + 6 + (2 * 6 * 3 + 3 + 6));
    CHECK(pw::trainable_count(lin) == 2 * 6 * 3 + 3 + 6);
    CHECK(lin.out_features() == 6);
    CHECK(decltype(lin)::Inner::bottleneck == 3);

    lin.set_path("encoder.linear0");
    CHECK(lin.inner().down_weight.name() == "encoder.linear0.adapter.down.weight");
    CHECK(lin.inner().down_bias.name() == "encoder.linear0.adapter.down.bias");
    CHECK(lin.inner().up_weight.name() == "encoder.linear0.adapter.up.weight");
    CHECK(lin.inner().up_bias.name() == "encoder.linear0.adapter.up.bias");
    CHECK(lin.base().weight.name() == "encoder.linear0.weight");
    CHECK(lin.inner().down_weight.role() == pw::Role::adapter);
    CHECK(std::string(decltype(lin)::kind()) == "linear");

    // Re-drawing restarts the adapter as the identity.
    pw::Rng rng(32);
    pw::testing::randomize_parameters(t, rng);
    CHECK_FALSE(equal(output_of(t, x), output_of(t.base(), x)));
    t.reset_parameters(rng);
    CHECK(equal(output_of(t, x), output_of(t.base(), x)));
}

TEST_CASE("adapter: a frozen base keeps empty gradient buffers; no input gradient still trains the adapter") {
    pw::Tune<Block64, pw::Adapter<2>> t(make_block());
    pw::Rng rng(41);
    pw::testing::randomize_parameters(t, rng);
    const auto x = random_input(pw::Shape{3, 4}, 42);
    const auto& y = t.forward(x);
    const pw::Tensor<double> dy(y.shape(), 0.5);

    pw::zero_grad(t);
    const auto& dx = t.backward(dy);
    CHECK(dx.shape() == x.shape());
    const pw::Tensor<double> with_input_grad = t.inner().up_weight.grad;
    const pw::Tensor<double> down_with_input_grad = t.inner().down_weight.grad;

    pw::zero_grad(t);
    t.set_input_grad(false);
    t.forward(x);
    CHECK(t.backward(dy).empty());
    CHECK(equal(t.inner().up_weight.grad, with_input_grad));
    CHECK(equal(t.inner().down_weight.grad, down_with_input_grad));
    t.base().visit([](auto& p) {
        CHECK_FALSE(p.trainable());
        CHECK(p.grad.empty());
    });
}

namespace {
/// A module that claims a fixed width but reports none, to reach the run-time check.
struct NoWidth : pw::BasicRelu<double> {
    static constexpr bool fixed_width = true;
};
using NoWidthAdapter = pw::AdapterModule<NoWidth, 2>;
}  // namespace

TEST_CASE("adapter: shape errors name the module path; a module without a width is rejected") {
    pw::Tune<Linear64, pw::Adapter<2>> t(4, 3);
    t.set_path("encoder.linear0");
    pw::Tensor<double> x(pw::Shape{2, 5});
    CHECK_THROWS_WITH_AS(t.forward(x), doctest::Contains("encoder.linear0"), pw::ShapeError);
    t.forward(pw::Tensor<double>(pw::Shape{2, 4}));
    try {
        t.backward(pw::Tensor<double>(pw::Shape{2, 4}));
        FAIL("expected a ShapeError");
    } catch (const pw::ShapeError& e) {
        const std::string msg = e.what();
        CHECK(msg.find("encoder.linear0") != std::string::npos);
        CHECK(msg.find("[2, 3]") != std::string::npos);
        CHECK(msg.find("[2, 4]") != std::string::npos);
    }
    CHECK_THROWS_AS(NoWidthAdapter{}, pw::ConfigError);
}

// ---------------------------------------------------------------- LoRA

TEST_CASE("lora: gradients on a Linear with and without bias, and under selection policies") {
    const std::set<std::string> lora_names = {"lora.a", "lora.b"};
    pw::Tune<Linear64, pw::LoRA<2>> lin(5, 4);
    check_tuned(lin, pw::Shape{3, 5}, lora_names, 51);
    pw::Tune<Linear64, pw::LoRA<3, 6>> nobias(5, 4, false);
    CHECK(nobias.inner().scale() == 2.0);
    check_tuned(nobias, pw::Shape{2, 3, 5}, lora_names, 52);

    pw::Tune<Linear64, pw::BiasOnly, pw::LoRA<2>> bitfit(5, 4);
    check_tuned(bitfit, pw::Shape{3, 5}, with(lora_names, {"bias"}), 53);
    CHECK(pw::trainable_count(bitfit) == 4 + 2 * (5 + 4));

    pw::Tune<Linear64, pw::FineTune, pw::LoRA<2>> full(5, 4);
    full.inner().set_scale(0.75);
    check_tuned(full, pw::Shape{3, 5}, with(lora_names, {"weight", "bias"}), 54);
}

TEST_CASE("lora: LoRA layers inside a block; names read <layer>.lora.a") {
    using LoraLinear = pw::Tune<Linear64, pw::LoRA<2>>;
    using Mlp = pw::Sequential<LoraLinear, pw::BasicGelu<double>, LoraLinear, LayerNorm64>;
    pw::Tune<Mlp, pw::NormPatch> mlp(Mlp(LoraLinear(4, 5), {}, LoraLinear(5, 3), LayerNorm64(3)));
    check_tuned(mlp, pw::Shape{3, 4},
                {"linear0.lora.a", "linear0.lora.b", "linear2.lora.a", "linear2.lora.b", "layernorm3.scale",
                 "layernorm3.shift"},
                61);
    CHECK(mlp.base().get<2>().inner().a.name() == "linear2.lora.a");
    CHECK(mlp.base().get<2>().inner().b.role() == pw::Role::lora);
}

TEST_CASE("lora: starts as the identity and adds r (in + out) parameters; the base keeps no gradient") {
    const auto x = random_input(pw::Shape{3, 5}, 71);
    pw::Tune<Linear64, pw::LoRA<2>> t(5, 4);
    CHECK(equal(output_of(t, x), output_of(t.base(), x)));
    CHECK(pw::parameter_count(t) == 5 * 4 + 4 + 2 * (5 + 4));
    CHECK(pw::trainable_count(t) == 2 * (5 + 4));
    CHECK(t.inner().a.value.shape() == pw::Shape{2, 5});
    CHECK(t.inner().b.value.shape() == pw::Shape{4, 2});
    CHECK(t.inner().scale() == 1.0);

    pw::Rng rng(72);
    pw::testing::randomize_parameters(t, rng);
    const auto& y = t.forward(x);
    t.backward(pw::Tensor<double>(y.shape(), 1.0));
    CHECK(t.base().weight.grad.empty());
    CHECK(t.base().bias.grad.empty());
    CHECK_FALSE(t.inner().a.grad.empty());

    // No input gradient: the factors' gradients are unchanged, none is returned.
    pw::zero_grad(t);
    t.forward(x);
    CHECK(t.backward(pw::Tensor<double>(y.shape(), 1.0)).shape() == x.shape());
    const pw::Tensor<double> ga = t.inner().a.grad, gb = t.inner().b.grad;
    pw::zero_grad(t);
    t.set_input_grad(false);
    t.forward(x);
    CHECK(t.backward(pw::Tensor<double>(y.shape(), 1.0)).empty());
    CHECK(equal(t.inner().a.grad, ga));
    CHECK(equal(t.inner().b.grad, gb));

    t.reset_parameters(rng);
    CHECK(equal(output_of(t, x), output_of(t.base(), x)));
}

TEST_CASE("lora: merge folds s B A into W; unmerge restores it; backward while merged is an error") {
    pw::Tune<pw::Linear, pw::LoRA<2, 4>> t(6, 5);
    t.set_path("head");
    pw::Rng rng(81);
    t.visit([&](pw::Parameter<float>& p) { pw::init::normal(p.value, rng, 0.0, 0.25); });
    pw::Tensor<float> x(pw::Shape{3, 6});
    pw::init::normal(x, rng, 0.0, 1.0);

    auto& lora = t.inner();
    CHECK(lora.scale() == 2.0f);
    const pw::Tensor<float> w0 = t.base().weight.value;
    const pw::Tensor<float> unmerged = t.forward(x);
    lora.merge();
    CHECK(lora.merged());
    const pw::Tensor<float> merged = t.forward(x);
    REQUIRE(merged.shape() == unmerged.shape());
    for (std::size_t i = 0; i < merged.size(); ++i) CHECK(std::abs(merged[i] - unmerged[i]) < 1e-6f);

    CHECK_THROWS_WITH_AS(t.backward(merged), doctest::Contains("head"), pw::Error);
    CHECK_THROWS_AS(lora.set_scale(1.0f), pw::Error);

    lora.unmerge();
    CHECK_FALSE(lora.merged());
    for (std::size_t i = 0; i < w0.size(); ++i) CHECK(std::abs(t.base().weight.value[i] - w0[i]) < 1e-6f);
    const pw::Tensor<float> again = t.forward(x);
    for (std::size_t i = 0; i < again.size(); ++i) CHECK(std::abs(again[i] - unmerged[i]) < 1e-6f);
    CHECK_NOTHROW(t.backward(again));
}

TEST_CASE("lora: shape errors name the module path and both shapes") {
    pw::Tune<Linear64, pw::LoRA<2>> t(4, 3);
    t.set_path("encoder.linear0");
    pw::Tensor<double> x(pw::Shape{2, 5});
    try {
        t.forward(x);
        FAIL("expected a ShapeError");
    } catch (const pw::ShapeError& e) {
        const std::string msg = e.what();
        CHECK(msg.find("encoder.linear0") != std::string::npos);
        CHECK(msg.find("[2, 4]") != std::string::npos);
        CHECK(msg.find("[2, 5]") != std::string::npos);
    }
    t.forward(pw::Tensor<double>(pw::Shape{2, 4}));
    CHECK_THROWS_WITH_AS(t.backward(pw::Tensor<double>(pw::Shape{2, 4})),
                         doctest::Contains("encoder.linear0: lora output gradient"), pw::ShapeError);
}

// ---------------------------------------------------------------- ScaleShift

TEST_CASE("scale_shift: gradients on a Linear, a LayerNorm and a block") {
    const std::set<std::string> names = {"scale_shift.scale", "scale_shift.shift"};
    pw::Tune<Linear64, pw::ScaleShift> lin(4, 5);
    check_tuned(lin, pw::Shape{3, 4}, names, 91);
    pw::Tune<LayerNorm64, pw::ScaleShift> ln(5);
    check_tuned(ln, pw::Shape{2, 3, 5}, names, 92);
    pw::Tune<Block64, pw::ScaleShift> block(make_block());
    check_tuned(block, pw::Shape{3, 4}, names, 93);
    pw::Tune<Block64, pw::BiasOnly, pw::ScaleShift> bitfit(make_block());
    check_tuned(bitfit, pw::Shape{3, 4}, with(names, {"linear0.bias", "linear2.bias"}), 94);
}

TEST_CASE("scale_shift: starts as the identity, adds 2 d parameters, names them under .scale_shift") {
    const auto x = random_input(pw::Shape{3, 4}, 101);
    pw::Tune<Block64, pw::ScaleShift> t(make_block());
    CHECK(equal(output_of(t, x), output_of(t.base(), x)));
    CHECK(pw::trainable_count(t) == 2 * 3);
    t.set_path("stage0");
    CHECK(t.inner().scale.name() == "stage0.scale_shift.scale");
    CHECK(t.inner().shift.name() == "stage0.scale_shift.shift");
    CHECK(t.inner().shift.role() == pw::Role::scale_shift);
    t.visit([](auto& p) { CHECK(p.grad.empty() == !pw::is_injected(p.role())); });
    CHECK_THROWS_WITH_AS(t.forward(pw::Tensor<double>(pw::Shape{2, 3})), doctest::Contains("stage0.linear0"),
                         pw::ShapeError);
}

// ---------------------------------------------------------------- stacked injections

TEST_CASE("injection policies stack in the order listed, the first innermost") {
    pw::Tune<Linear64, pw::LoRA<2>, pw::ScaleShift> lin(4, 3);
    check_tuned(lin, pw::Shape{3, 4}, {"lora.a", "lora.b", "scale_shift.scale", "scale_shift.shift"}, 111);
    CHECK(lin.inner().inner().a.name() == "lora.a");
    CHECK(&lin.base() == &lin.inner().inner().inner());

    pw::Tune<Block64, pw::NormPatch, pw::Adapter<2>, pw::ScaleShift> block(make_block());
    check_tuned(block, pw::Shape{3, 4},
                with(with(adapter_names, {"scale_shift.scale", "scale_shift.shift"}),
                     {"layernorm3.scale", "layernorm3.shift"}),
                112);
    CHECK(pw::trainable_count(block) == 6 + (2 * 3 * 2 + 2 + 3) + 6);
}
