#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "patchwork/compose/cascade.hpp"
#include "patchwork/compose/repeat.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/frozen.hpp"
#include "patchwork/policies/lora.hpp"
#include "patchwork/policies/norm_patch.hpp"
#include "patchwork/policies/scale_shift.hpp"
#include "patchwork/search/search_module.hpp"
#include "patchwork/policies/tune.hpp"
#include "patchwork/search/derive.hpp"
#include "patchwork/search/loop.hpp"
#include "patchwork/train/loss.hpp"

namespace pw = patchwork;
namespace search = pw::search;
using pw::testing::check_gradients;

using Linear64 = pw::BasicLinear<double>;
using LayerNorm64 = pw::BasicLayerNorm<double>;
using Relu64 = pw::BasicRelu<double>;
using Block64 = pw::Sequential<Linear64, LayerNorm64, Relu64>;

using LinearCands = pw::Search<pw::Frozen, pw::Adapter<3>, pw::LoRA<2, 4>, pw::ScaleShift, pw::FineTune>;
using BlockCands = pw::Search<pw::Frozen, pw::Adapter<3>, pw::NormPatch, pw::FineTune>;

namespace {

pw::Tensor<double> random_tensor(const pw::Shape& s, std::uint64_t seed) {
    pw::Rng rng(seed);
    pw::Tensor<double> t(s);
    pw::init::normal(t, rng, 0.0, 1.0);
    return t;
}

/// Every parameter random (also zero-initialised adapter and LoRA factors), alpha included.
template <class M>
void randomize(M& m, std::uint64_t seed) {
    pw::Rng rng(seed);
    pw::testing::randomize_parameters(m, rng);
}

}  // namespace

TEST_CASE("search: with one-hot hard gates the mixed op equals that candidate exactly") {
    pw::Tune<Linear64, LinearCands> m(5, 4);
    m.set_path("enc");
    randomize(m, 3);
    auto& s = m.inner();
    search::GateConfig hard{.mode = search::GateMode::softmax, .tau = 1.0, .hard = true};
    s.set_gates(hard);
    const auto x = random_tensor(pw::Shape{3, 5}, 4);
    for (std::size_t k = 0; k < LinearCands::module<Linear64>::candidates; ++k) {
        for (std::size_t j = 0; j < s.candidates; ++j) s.alpha.value[j] = j == k ? 5.0 : 0.0;
        const pw::Tensor<double> y = m.forward(x);
        // The candidate alone, computed by the fixed type with the same parameters.
        pw::Tensor<double> expected;
        if (k == 0) expected = s.base().forward(x);
        else if (k == 1) {
            pw::Tune<Linear64, pw::Adapter<3>> f(s.base());
            auto& src = s.branch<1>().head();
            f.inner().down_weight.value = src.down_weight.value;
            f.inner().down_bias.value = src.down_bias.value;
            f.inner().up_weight.value = src.up_weight.value;
            f.inner().up_bias.value = src.up_bias.value;
            expected = f.forward(x);
        } else if (k == 2) {
            pw::Tune<Linear64, pw::LoRA<2, 4>> f(s.base());
            f.inner().a.value = s.branch<2>().a.value;
            f.inner().b.value = s.branch<2>().b.value;
            expected = f.forward(x);
        } else if (k == 3) {
            pw::Tune<Linear64, pw::ScaleShift> f(s.base());
            f.inner().scale.value = s.branch<3>().head().scale.value;
            f.inner().shift.value = s.branch<3>().head().shift.value;
            expected = f.forward(x);
        } else {
            expected = s.branch<4>().module().forward(x);
        }
        INFO("candidate ", k);
        REQUIRE(y.shape() == expected.shape());
        for (std::size_t i = 0; i < y.size(); ++i) CHECK(y[i] == expected[i]);
    }
}

TEST_CASE("search: gradients (input, every candidate's parameters, alpha) through softmax gates") {
    pw::Tune<Linear64, LinearCands> m(4, 3);
    randomize(m, 5);
    check_gradients(m, pw::Shape{3, 4});
    pw::Tune<Block64, BlockCands> b(Linear64(4, 5), LayerNorm64(5), Relu64{});
    randomize(b, 6);
    check_gradients(b, pw::Shape{2, 4});
}

TEST_CASE("search: alpha gradients through Gumbel-softmax with fixed noise, soft and straight-through") {
    pw::Tune<Linear64, LinearCands> m(4, 3);
    randomize(m, 7);
    auto& s = m.inner();
    s.fix_noise({0.3, -1.2, 0.7, 0.1, -0.4});
    s.set_gates({.mode = search::GateMode::gumbel, .tau = 0.7, .hard = false});
    check_gradients(m, pw::Shape{3, 4});
    const auto& st = s.gate_state();
    double sum = 0;
    for (double p : st.soft) sum += p;
    CHECK(sum == doctest::Approx(1.0).epsilon(1e-12));
    // Straight-through: the forward is the argmax candidate; alpha's gradient is
    // that of the soft gates at the same point, dL/dalpha = J_p^T <G, o_k>.
    s.set_gates({.mode = search::GateMode::gumbel, .tau = 0.7, .hard = true});
    pw::zero_grad(m);
    const auto x = random_tensor(pw::Shape{3, 4}, 8);
    const pw::Tensor<double> y = m.forward(x);
    const auto r = random_tensor(y.shape(), 9);
    m.backward(r);
    const auto hard_grad = s.alpha.grad;
    const auto& used = s.gate_state().used;
    double ones = 0;
    for (double g : used) ones += g;
    CHECK(ones == 1.0);
    // Numerical derivative of sum(r * sum_k p_k(alpha) o_k) with o_k held fixed = the ST gradient.
    std::vector<pw::Tensor<double>> outs;
    for (std::size_t k = 0; k < s.candidates; ++k) {
        std::vector<double> a(s.candidates, -50.0);
        a[k] = 50.0;
        search::GateConfig onehot{.mode = search::GateMode::softmax, .tau = 1.0, .hard = true};
        s.set_gates(onehot);
        const auto saved = s.alpha.value;
        for (std::size_t j = 0; j < s.candidates; ++j) s.alpha.value[j] = a[j];
        s.fix_noise(std::vector<double>(s.candidates, 0.0));
        outs.push_back(m.forward(x));
        s.alpha.value = saved;
        s.fix_noise({0.3, -1.2, 0.7, 0.1, -0.4});
    }
    search::GateState<double> gs;
    gs.noise = {0.3, -1.2, 0.7, 0.1, -0.4};
    search::GateConfig soft{.mode = search::GateMode::gumbel, .tau = 0.7, .hard = false};
    const auto mixed = [&](const pw::Tensor<double>& alpha) {
        gs.compute_with_noise(alpha.data(), s.candidates, soft);
        double v = 0;
        for (std::size_t k = 0; k < s.candidates; ++k)
            for (std::size_t i = 0; i < r.size(); ++i) v += gs.soft[k] * outs[k][i] * r[i];
        return v;
    };
    for (std::size_t j = 0; j < s.candidates; ++j) {
        auto a = s.alpha.value;
        const double h = 1e-6;
        a[j] += h;
        const double lp = mixed(a);
        a[j] -= 2 * h;
        const double lm = mixed(a);
        CHECK(hard_grad[j] == doctest::Approx((lp - lm) / (2 * h)).epsilon(1e-6));
    }
}

TEST_CASE("search: an architecture-only backward gives the same alpha and input gradients and no weight gradients") {
    pw::Tune<Block64, BlockCands> m(Linear64(4, 5), LayerNorm64(5), Relu64{});
    randomize(m, 31);
    const auto x = random_tensor(pw::Shape{3, 4}, 32);
    const pw::Tensor<double> y = m.forward(x);
    const auto r = random_tensor(y.shape(), 33);
    pw::zero_grad(m);
    m.forward(x);
    const pw::Tensor<double> dx_full = m.backward(r);
    const auto alpha_full = m.inner().alpha.grad;
    pw::zero_grad(m);
    {
        const pw::GradientRoles only(search::architecture_only);
        m.forward(x);
        const pw::Tensor<double> dx = m.backward(r);
        for (std::size_t i = 0; i < dx.size(); ++i) CHECK(dx[i] == dx_full[i]);
    }
    for (std::size_t j = 0; j < alpha_full.size(); ++j) CHECK(m.inner().alpha.grad[j] == alpha_full[j]);
    std::size_t nonzero = 0;
    m.visit([&](auto& p) {
        if (p.trainable() && p.role() != pw::Role::architecture)
            for (std::size_t i = 0; i < p.grad.size(); ++i) nonzero += p.grad[i] != 0.0;
    });
    CHECK(nonzero == 0);
    // The scope ends: weight gradients come back.
    m.forward(x);
    m.backward(r);
    m.visit([&](auto& p) {
        if (p.trainable() && p.role() != pw::Role::architecture)
            for (std::size_t i = 0; i < p.grad.size(); ++i) nonzero += p.grad[i] != 0.0;
    });
    CHECK(nonzero > 0);
}

TEST_CASE("search: the penalty's value and its exact alpha gradient") {
    using Model = pw::Sequential<pw::Tune<Linear64, LinearCands>, Relu64, pw::Tune<Block64, BlockCands>>;
    Model model(pw::Tune<Linear64, LinearCands>(4, 6), Relu64{},
                pw::Tune<Block64, BlockCands>(Linear64(6, 5), LayerNorm64(5), Relu64{}));
    randomize(model, 11);
    const auto x = random_tensor(pw::Shape{2, 4}, 12);
    search::Penalty pen{.lambda = 0.7, .frozen_cost = search::FrozenCost::constant(0.05)};
    const std::size_t full = search::full_parameters(model);
    CHECK(full == (4 * 6 + 6) + (6 * 5 + 5 + 5 + 5));

    const auto value_at = [&]() {
        model.forward(x);
        return search::penalty(model, pen, 0);
    };
    pw::zero_grad(model);
    const double v = value_at();
    // By hand: lambda * sum_k p_k P_k / P_full per module.
    double expected = 0;
    search::for_each_searched(model, [&](auto& m) {
        const auto counts = m.candidate_parameters();
        const auto labels = m.candidate_labels();
        for (std::size_t k = 0; k < m.candidates; ++k) {
            const double pk = labels[k] == "Frozen" ? 0.05 * double(m.base_parameters()) : double(counts[k]);
            expected += m.gate_state().used[k] * 0.7 * pk / double(full);
        }
    });
    CHECK(v == doctest::Approx(expected).epsilon(1e-14));
    std::vector<pw::Tensor<double>> analytic;
    search::for_each_searched(model, [&](auto& m) { analytic.push_back(m.alpha.grad); });
    std::size_t i = 0;
    search::for_each_searched(model, [&](auto& m) {
        const auto& a = analytic[i++];
        for (std::size_t j = 0; j < m.candidates; ++j) {
            const double keep = m.alpha.value[j], h = 1e-6;
            m.alpha.value[j] = keep + h;
            const double lp = value_at();
            m.alpha.value[j] = keep - h;
            const double lm = value_at();
            m.alpha.value[j] = keep;
            CHECK(a[j] == doctest::Approx((lp - lm) / (2 * h)).epsilon(1e-6));
        }
    });
}

TEST_CASE("search: derive keeps the argmax; derived and fixed-type models match in count and output") {
    using S0 = pw::Tune<Linear64, LinearCands>;
    using S1 = pw::Tune<Block64, BlockCands>;
    using Model = pw::Cascade<S0, pw::Sequential<Relu64, S1>>;
    Model model(S0(4, 6), pw::Sequential<Relu64, S1>(Relu64{}, S1(Linear64(6, 5), LayerNorm64(5), Relu64{})));
    randomize(model, 21);
    auto& s0 = model.stage<0>().inner();
    auto& s1 = model.stage<1>().get<1>().inner();
    // Choose LoRA in stage 0 and NormPatch in stage 1.
    for (std::size_t j = 0; j < s0.candidates; ++j) s0.alpha.value[j] = j == 2 ? 1.0 : 0.0;
    for (std::size_t j = 0; j < s1.candidates; ++j) s1.alpha.value[j] = j == 2 ? 1.0 : 0.0;
    const auto report = search::derive(model);
    REQUIRE(report.modules.size() == 2);
    CHECK(report.modules[0].chosen == "LoRA<2, 4>");
    CHECK(report.modules[1].chosen == "NormPatch");
    CHECK(s0.derived());
    CHECK(s0.chosen() == 2);
    CHECK(report.fixed_type.find("Tune<Linear<double>, LoRA<2, 4>>") == std::string::npos);  // spelled BasicLinear<double>
    CHECK(report.fixed_type.find("LoRA<2, 4>") != std::string::npos);
    CHECK(report.fixed_type.find("NormPatch") != std::string::npos);
    CHECK(report.fixed_type.find("Search") == std::string::npos);

    using F0 = pw::Tune<Linear64, pw::LoRA<2, 4>>;
    using F1 = pw::Tune<Block64, pw::NormPatch>;
    using Fixed = pw::Cascade<F0, pw::Sequential<Relu64, F1>>;
    Fixed fixed(F0(4, 6), pw::Sequential<Relu64, F1>(Relu64{}, F1(Linear64(6, 5), LayerNorm64(5), Relu64{})));
    CHECK(pw::parameter_count(model) == pw::parameter_count(fixed));
    CHECK(pw::trainable_count(model) == pw::trainable_count(fixed));
    CHECK(report.trainable == pw::trainable_count(fixed));
    search::copy_parameters(model, fixed);
    const auto x = random_tensor(pw::Shape{3, 4}, 22);
    const pw::Tensor<double> a = model.forward(x);
    const pw::Tensor<double> b = fixed.forward(x);
    REQUIRE(a.shape() == b.shape());
    for (std::size_t i = 0; i < a.size(); ++i) CHECK(a[i] == b[i]);
    // And the derived model still trains: gradients match the fixed type's.
    check_gradients(model, pw::Shape{2, 4});
    std::ostringstream os;
    os << report;
    CHECK(os.str().find("stage0") != std::string::npos);
    CHECK(os.str().find("fixed type:") != std::string::npos);
}

TEST_CASE("search: a derived FineTune candidate frees the shared base; names follow the fixed type") {
    pw::Tune<Block64, BlockCands> m(Linear64(4, 5), LayerNorm64(5), Relu64{});
    m.set_path("block");
    const std::size_t searching = pw::parameter_count(m);
    CHECK(searching == 3 * 35 + 2 * 5 * 3 + 3 + 5 + 4);  // base + copies (NormPatch, FineTune) + adapter + alpha
    m.inner().derive(3);
    CHECK(pw::parameter_count(m) == 35);
    CHECK(pw::trainable_count(m) == 35);
    std::vector<std::string> names;
    m.visit([&](auto& p) { names.push_back(p.name()); });
    CHECK(names.front() == "block.linear0.weight");
    CHECK_THROWS_AS(m.inner().derive(1), pw::Error);
}

TEST_CASE("search: bad configuration is a clear error") {
    pw::Tune<Linear64, LinearCands> g(3, 2);
    CHECK_THROWS_WITH_AS(search::set_gates(g, {.mode = search::GateMode::gumbel, .tau = 0}), doctest::Contains("tau"),
                         pw::ConfigError);
    search::Penalty neg{.lambda = -1};
    CHECK_THROWS_WITH_AS(neg.validate(), doctest::Contains("lambda"), pw::ConfigError);
    pw::Tune<Linear64, LinearCands> m(3, 2);
    CHECK_THROWS_AS(m.inner().derive(7), pw::ConfigError);

    // A held-out split too small for one batch.
    pw::Tune<Linear64, LinearCands> model(3, 2);
    pw::VectorSource<double> train({pw::Batch<double>{random_tensor(pw::Shape{4, 3}, 1), {0, 1, 0, 1}}});
    pw::VectorSource<double> empty{std::vector<pw::Batch<double>>{}};
    pw::BasicSGD<double> opt(search::weight_parameters(model), {.lr = 0.1});
    const auto step = [](auto& mod, const pw::Batch<double>& b) {
        auto ce = pw::cross_entropy(mod.forward(b.x), b.labels);
        mod.backward(ce.grad);
        return ce.value;
    };
    CHECK_THROWS_WITH_AS(search::run(model, opt, train, empty, step, {}), doctest::Contains("held-out"),
                         pw::ConfigError);
    Linear64 plain(3, 2);
    pw::BasicSGD<double> opt2(pw::trainable_parameters(plain), {.lr = 0.1});
    CHECK_THROWS_WITH_AS(search::run(plain, opt2, train, train, step, {}), doctest::Contains("no Search"),
                         pw::ConfigError);
}

TEST_CASE("search: the DARTS loop moves alpha, logs gates to CSV, is reproducible, and stops early") {
    const auto make = [] {
        pw::Tune<Linear64, LinearCands> m(6, 3);
        pw::initialize(m, 5);
        return m;
    };
    std::vector<pw::Batch<double>> tb, vb;
    pw::Rng rng(3);
    for (int i = 0; i < 6; ++i) {
        pw::Batch<double> b{random_tensor(pw::Shape{8, 6}, 100 + i), {}};
        for (int r = 0; r < 8; ++r) b.labels.push_back(int(rng.next() % 3));
        (i < 4 ? tb : vb).push_back(b);
    }
    pw::VectorSource<double> train(tb), val(vb);
    const auto step = [](auto& mod, const pw::Batch<double>& b) {
        auto ce = pw::cross_entropy(mod.forward(b.x), b.labels);
        mod.backward(ce.grad);
        return ce.value;
    };
    const std::string csv = (std::filesystem::temp_directory_path() / "patchwork_test_search_gates.csv").string();
    search::SearchOptions o{.epochs = 3, .gates = {.mode = search::GateMode::gumbel}, .penalty = {.lambda = 2.0},
                            .log_every = 2, .csv = csv, .seed = 9};
    auto m1 = make();
    const auto alpha0 = m1.inner().alpha.value;
    pw::BasicAdam<double> opt1(search::weight_parameters(m1), {.lr = 1e-2});
    const auto r1 = search::run(m1, opt1, train, val, step, o);
    CHECK(r1.steps == 12);
    CHECK(r1.alpha_steps == 12);
    bool moved = false;
    for (std::size_t j = 0; j < alpha0.size(); ++j) moved = moved || m1.inner().alpha.value[j] != alpha0[j];
    CHECK(moved);
    // The penalty pushes toward cheap candidates: FineTune (most parameters) loses weight.
    const auto p = m1.inner().probabilities();
    CHECK(p[4] < p[0]);
    std::ifstream in(csv);
    std::string header;
    std::getline(in, header);
    CHECK(header == "step,model:Frozen,model:Adapter<3>,model:LoRA<2, 4>,model:ScaleShift,model:FineTune");
    std::size_t rows = 0;
    for (std::string line; std::getline(in, line);) ++rows;
    CHECK(rows == r1.history.size());

    auto m2 = make();
    pw::BasicAdam<double> opt2(search::weight_parameters(m2), {.lr = 1e-2});
    search::SearchOptions o2 = o;
    o2.csv.clear();
    search::run(m2, opt2, train, val, step, o2);
    for (std::size_t j = 0; j < alpha0.size(); ++j) CHECK(m2.inner().alpha.value[j] == m1.inner().alpha.value[j]);

    auto m3 = make();
    pw::BasicAdam<double> opt3(search::weight_parameters(m3), {.lr = 1e-2});
    o2.early_stop = 2;
    o2.log_every = 1;
    o2.epochs = 50;
    const auto r3 = search::run(m3, opt3, train, val, step, o2);
    CHECK(r3.stopped_early);
    CHECK(r3.steps < 200);
}

TEST_CASE("search: a Repeat whose searched blocks choose differently has no single fixed type") {
    using Block = pw::Tune<Linear64, pw::Search<pw::Frozen, pw::Adapter<2>>>;
    pw::Repeat<Block> stack(3, Block(4, 4));
    const auto report = search::derive(stack, {0, 1, 0});
    CHECK(report.fixed_type.empty());
    CHECK(report.fixed_type_note.find("no single fixed type") != std::string::npos);
    REQUIRE(report.modules.size() == 3);
    CHECK(report.modules[1].chosen == "Adapter<2>");
    CHECK(report.modules[1].module == "block1");
    pw::Repeat<Block> same(2, Block(4, 4));
    const auto r2 = search::derive(same, {1, 1});
    CHECK(r2.fixed_type.find("Repeat<Tune<BasicLinear<double>, Adapter<2>>>") != std::string::npos);
    CHECK_THROWS_WITH_AS(search::derive(same, {1, 1}), doctest::Contains("already derived"), pw::Error);
    pw::Repeat<Block> wrong(2, Block(4, 4));
    CHECK_THROWS_WITH_AS(search::derive(wrong, {1}), doctest::Contains("1 choices given for 2"), pw::ConfigError);
}
