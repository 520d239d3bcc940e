#include <doctest/doctest.h>

#include "gradcheck.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/bias_only.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/frozen.hpp"
#include "patchwork/policies/lora.hpp"
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

TEST_CASE("a Tune with only injection policies leaves the selection to an enclosing Tune") {
    using LoraLinear = pw::Tune<Linear64, pw::LoRA<2>>;
    using Body = pw::Sequential<LoraLinear, pw::BasicRelu<double>, Linear64>;
    const auto body = [] { return Body(LoraLinear(4, 3), {}, Linear64(3, 2)); };

    // BiasOnly outside: both Linear biases train, and the LoRA factors; no weight.
    pw::Tune<Body, pw::BiasOnly> bitfit(body());
    auto& lora_linear = bitfit.base().get<0>().base();
    CHECK(lora_linear.bias.trainable());
    CHECK_FALSE(lora_linear.weight.trainable());
    CHECK(bitfit.base().get<0>().inner().a.trainable());
    CHECK(bitfit.base().get<0>().inner().b.trainable());
    CHECK(bitfit.base().get<2>().bias.trainable());
    CHECK_FALSE(bitfit.base().get<2>().weight.trainable());
    CHECK(trainable_of_role(bitfit, pw::Role::bias) == 3 + 2);
    CHECK(pw::trainable_count(bitfit) == 3 + 2 + 2 * (4 + 3));

    // FineTune outside: the LoRA'd Linear's own weight trains too.
    pw::Tune<Body, pw::FineTune> full(body());
    CHECK(full.base().get<0>().base().weight.trainable());
    CHECK(pw::trainable_count(full) == pw::parameter_count(full));

    // No selection anywhere: the pre-trained parameters stay frozen.
    pw::Tune<Body> none(body());
    CHECK(pw::trainable_count(none) == 2 * (4 + 3));
    LoraLinear alone(4, 3);
    CHECK_FALSE(alone.base().weight.trainable());
    CHECK_FALSE(alone.base().bias.trainable());
    CHECK(alone.base().bias.grad.empty());

    // Gradients of the mixed set are exact.
    pw::Rng rng(5);
    pw::testing::randomize_parameters(bitfit, rng);
    check_gradients(bitfit, pw::Shape{3, 4});
}

TEST_CASE("an inner Tune that lists a selection policy keeps its decision under an enclosing one") {
    using PinnedLora = pw::Tune<Linear64, pw::Frozen, pw::LoRA<2>>;
    using Body = pw::Sequential<PinnedLora, pw::BasicRelu<double>, Linear64>;
    pw::Tune<Body, pw::BiasOnly> model(Body(PinnedLora(4, 3), {}, Linear64(3, 2)));
    CHECK_FALSE(model.base().get<0>().base().bias.trainable());
    CHECK_FALSE(model.base().get<0>().base().weight.trainable());
    CHECK(model.base().get<2>().bias.trainable());
    CHECK(pw::trainable_count(model) == 2 + 2 * (4 + 3));

    using FineInner = pw::Tune<Linear64, pw::FineTune>;
    using Body2 = pw::Sequential<FineInner, pw::BasicRelu<double>, Linear64>;
    pw::Tune<Body2, pw::Frozen> frozen_outside(Body2(FineInner(4, 3), {}, Linear64(3, 2)));
    CHECK(frozen_outside.base().get<0>().base().weight.trainable());
    CHECK(pw::trainable_count(frozen_outside) == 4 * 3 + 3);
}

TEST_CASE("a module copied out of one Tune takes the decision of the Tune it is put in") {
    // Fine-tuned, then copied (or moved) into a frozen Tune: frozen, because
    // the copy's marks belong to the Tune it came from.
    pw::Tune<Block64, pw::FineTune> tuned(make_block());
    REQUIRE(pw::trainable_count(tuned) == pw::parameter_count(tuned));
    Block64 copy = tuned.base();
    pw::Tune<Block64, pw::Frozen> frozen(copy);
    CHECK(pw::trainable_count(frozen) == 0);
    pw::Tune<Block64, pw::BiasOnly> bitfit(std::move(copy));
    CHECK(pw::trainable_count(bitfit) == 5 + 3);
    CHECK(trainable_of_role(bitfit, pw::Role::bias) == 5 + 3);

    // A policy still inside the copy keeps its decision (and a copy of a whole
    // Tune keeps all of them).
    using FineInner = pw::Tune<Linear64, pw::FineTune>;
    using Body = pw::Sequential<FineInner, pw::BasicRelu<double>, Linear64>;
    pw::Tune<Body, pw::FineTune> all(Body(FineInner(4, 3), {}, Linear64(3, 2)));
    pw::Tune<Body, pw::Frozen> outer_frozen(all.base());
    CHECK(outer_frozen.base().get<0>().base().weight.trainable());
    CHECK_FALSE(outer_frozen.base().get<2>().weight.trainable());
    CHECK(pw::trainable_count(outer_frozen) == 4 * 3 + 3);
    pw::Tune<Body, pw::Frozen> again = outer_frozen;
    pw::Tune<pw::Tune<Body, pw::Frozen>, pw::FineTune> wrapped(again);
    CHECK(pw::trainable_count(wrapped) == 4 * 3 + 3);
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
