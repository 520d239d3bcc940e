#include <doctest/doctest.h>

#include "gradcheck.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/bias_only.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/frozen.hpp"
#include "patchwork/policies/norm_patch.hpp"
#include "patchwork/policies/tune.hpp"

namespace pw = patchwork;
using pw::testing::check_gradients;

using Linear64 = pw::BasicLinear<double>;
using LayerNorm64 = pw::BasicLayerNorm<double>;
using Block64 = pw::Sequential<Linear64, pw::BasicRelu<double>, Linear64, LayerNorm64>;

Block64 make_block() { return Block64(Linear64(4, 5), {}, Linear64(5, 3), LayerNorm64(3)); }

template <class M>
std::size_t trainable_of_role(M& m, pw::Role role) {
    std::size_t n = 0;
    m.visit([&](auto& p) { n += (p.trainable() && p.role() == role) ? p.size() : 0; });
    return n;
}

TEST_CASE("selection policies choose which pre-trained parameters train") {
    pw::Tune<Block64, pw::Frozen> frozen(make_block());
    CHECK(pw::trainable_count(frozen) == 0);
    frozen.visit([](auto& p) { CHECK(p.grad.empty()); });

    pw::Tune<Block64, pw::FineTune> full(make_block());
    CHECK(pw::trainable_count(full) == pw::parameter_count(full));

    pw::Tune<Block64, pw::BiasOnly> bitfit(make_block());
    CHECK(pw::trainable_count(bitfit) == 5 + 3);
    CHECK(trainable_of_role(bitfit, pw::Role::bias) == 8);

    pw::Tune<Block64, pw::NormPatch> patch(make_block());
    CHECK(pw::trainable_count(patch) == 3 + 3);

    pw::Tune<Block64, pw::NormPatch, pw::BiasOnly> both(make_block());
    CHECK(pw::trainable_count(both) == 6 + 8);

    pw::Tune<Block64> none(make_block());
    CHECK(pw::trainable_count(none) == 0);
}

TEST_CASE("the innermost policy wins over an enclosing one") {
    using Inner = pw::Tune<Linear64, pw::FineTune>;
    using Outer = pw::Sequential<Inner, pw::BasicRelu<double>, Linear64>;
    pw::Tune<Outer, pw::Frozen> model(Outer(Inner(4, 3), {}, Linear64(3, 2)));
    CHECK(model.base().get<0>().base().weight.trainable());
    CHECK_FALSE(model.base().get<2>().weight.trainable());
    CHECK(pw::trainable_count(model) == 4 * 3 + 3);
}

TEST_CASE("tuned modules keep exact gradients for what trains, and pass the input gradient through") {
    pw::Rng rng(2);
    pw::Tune<Block64, pw::NormPatch> patch(make_block());
    pw::testing::randomize_parameters(patch, rng);
    check_gradients(patch, pw::Shape{3, 4});
    pw::Tune<Block64, pw::BiasOnly> bitfit(make_block());
    pw::testing::randomize_parameters(bitfit, rng);
    check_gradients(bitfit, pw::Shape{3, 4});
    pw::Tune<Block64, pw::Frozen> frozen(make_block());
    pw::testing::randomize_parameters(frozen, rng);
    check_gradients(frozen, pw::Shape{3, 4});
}

TEST_CASE("Tune keeps the module's names") {
    pw::Tune<Block64, pw::FineTune> t(make_block());
    t.set_path("stage1");
    CHECK(t.base().get<3>().scale.name() == "stage1.layernorm3.scale");
}
