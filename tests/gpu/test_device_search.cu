// Architecture search on the device against the same search on the CPU:
// Tune<Linear, Search<...>> with every kind of branch (the shared frozen base,
// injection heads, the LoRA branch, selection copies), under softmax,
// Gumbel-softmax (fixed and drawn noise) and hard gates: gate values, output,
// input gradient and every parameter gradient (alpha's included), the
// parameter penalty, gradient clipping, a few steps of search::run, derive
// and copying the derived weights into the fixed type on the other device.
// fp32 within 1e-5 and double within 1e-12 for one step (2-norm relative
// error); after several optimiser steps (double) 1e-10.
#include "device_compare.hpp"

#include "patchwork/search/derive.hpp"
#include "patchwork/search/loop.hpp"
#include "patchwork/search/search_module.hpp"
#include "patchwork/train/batch.hpp"
#include "patchwork/train/clip.hpp"

using namespace device_test;
namespace search = pw::search;

namespace {

using Cands = pw::Search<pw::Frozen, pw::Adapter<3>, pw::LoRA<2, 4>, pw::ScaleShift, pw::FineTune>;
template <class T, class D>
using Searched = pw::Tune<pw::BasicLinear<T, D>, Cands>;
template <class T, class D>
using Net = pw::Sequential<Searched<T, D>, pw::BasicRelu<T, D>, pw::BasicLinear<T, D>>;

template <class M>
void randomize_search(M& m, std::mt19937& rng) {
    m.visit([&](auto& p) { p.value = random_tensor<typename M::Scalar>(p.value.shape(), rng, 0.5); });
}

template <class T>
void check_vector_close(const std::vector<T>& a, const std::vector<T>& b, const char* what, double tol) {
    INFO(what);
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) CHECK(std::abs(double(a[i]) - double(b[i])) <= tol);
}

/// Every parameter value of the two models within `tol` (relative 2-norm).
template <class C, class G>
void check_values(C& cpu, G& dev, double tol) {
    std::vector<const pw::Parameter<typename C::Scalar>*> src;
    cpu.visit([&](auto& p) { src.push_back(&p); });
    std::size_t i = 0;
    dev.visit([&](auto& p) {
        const auto* c = src[i++];
        INFO(p.name());
        CHECK(c->name() == p.name());
        CHECK(rel_error(c->value, pw::to_host(p.value)) < tol);
    });
    CHECK(i == src.size());
}

}  // namespace

TEST_CASE_TEMPLATE("Search on the device equals the CPU search: gates, outputs, gradients", T, float, double) {
    std::mt19937 rng(21);
    struct Mode {
        search::GateConfig gates;
        bool fixed_noise;
    };
    const std::vector<Mode> modes{{{}, false},
                                  {{.mode = search::GateMode::gumbel, .tau = 0.7}, true},
                                  {{.mode = search::GateMode::gumbel, .tau = 0.5}, false},
                                  {{.mode = search::GateMode::gumbel, .tau = 0.9, .hard = true}, false},
                                  {{.mode = search::GateMode::softmax, .hard = true}, true}};
    const std::vector<std::array<std::size_t, 3>> sizes{{1, 3, 2}, {9, 17, 12}, {40, 33, 20}};
    for (const auto& mode : modes) {
        for (const auto& size : sizes) {
            const std::size_t n = size[0], in = size[1], out = size[2];  // not a structured binding: lambdas use n
            CAPTURE(n);
            CAPTURE(int(mode.gates.mode));
            CAPTURE(mode.gates.hard);
            Searched<T, Cpu> cpu(in, out);
            Searched<T, Cuda> dev(in, out);
            randomize_search(cpu, rng);
            copy_parameters(cpu, dev);
            cpu.inner().set_gates(mode.gates);
            dev.inner().set_gates(mode.gates);
            if (mode.fixed_noise) {
                std::normal_distribution<double> nd(0.0, 1.0);
                std::vector<T> noise(5);
                for (auto& v : noise) v = T(nd(rng));
                cpu.inner().fix_noise(noise);
                dev.inner().fix_noise(noise);
            }
            // Drawn noise: both modules reseeded before every forward, so each
            // forward draws what the CPU's did.
            const auto forward = [&](auto& m, const auto& x) -> const auto& {
                if (!mode.fixed_noise) m.inner().seed(77 + n);
                return m.forward(x);
            };
            const Tensor<T> x = random_tensor<T>(Shape{n, in}, rng);
            const Tensor<T, Cuda> xd(x);
            const Tensor<T>& y = forward(cpu, x);
            const_cast<Tensor<T, Cuda>&>(forward(dev, xd)).poison();
            check_close(y, forward(dev, xd), "forward");
            const auto& gc = cpu.inner().gate_state();
            const auto& gd = dev.inner().gate_state();
            check_vector_close(gc.noise, gd.noise, "noise", 0.0);
            check_vector_close(gc.soft, gd.soft, "p", tolerance<T>());
            check_vector_close(gc.used, gd.used, "g", tolerance<T>());
            const auto pc = cpu.inner().probabilities(), pd = dev.inner().probabilities();
            check_vector_close(pc, pd, "softmax(alpha)", 1e-12);

            const Tensor<T> g = random_tensor<T>(y.shape(), rng);
            const Tensor<T, Cuda> gd_(g);
            pw::zero_grad(cpu);
            pw::zero_grad(dev);
            const Tensor<T>& dx = cpu.backward(g);
            const_cast<Tensor<T, Cuda>&>(dev.backward(gd_)).poison();
            pw::zero_grad(dev);
            forward(dev, xd);
            check_close(dx, dev.backward(gd_), "input gradient");
            check_gradients(cpu, dev);
        }
    }
}

// In double only (fp32 takes the same code; the gates and gradients above check it):
// the losses, gate snapshots and parameters after several steps are compared to 1e-10.
TEST_CASE_TEMPLATE("Search on the device: the penalty, clipping, search::run and derive follow the CPU", T, double) {
    std::mt19937 rng(5);
    constexpr std::size_t in = 10, hidden = 8, classes = 3;
    Net<T, Cpu> cpu(Searched<T, Cpu>(in, hidden), pw::BasicRelu<T, Cpu>{}, pw::BasicLinear<T, Cpu>(hidden, classes));
    Net<T, Cuda> dev(Searched<T, Cuda>(in, hidden), pw::BasicRelu<T, Cuda>{},
                     pw::BasicLinear<T, Cuda>(hidden, classes));
    randomize_search(cpu, rng);
    copy_parameters(cpu, dev);

    // The penalty on one forward: the same value, the same alpha gradient.
    const Tensor<T> x = random_tensor<T>(Shape{6, in}, rng);
    const Tensor<T, Cuda> xd(x);
    search::Penalty pen{.lambda = 0.8, .frozen_cost = search::FrozenCost::constant(0.25)};
    cpu.forward(x);
    dev.forward(xd);
    pw::zero_grad(cpu);
    pw::zero_grad(dev);
    const double vc = search::penalty(cpu, pen, 0), vd = search::penalty(dev, pen, 0);
    CHECK(std::abs(vc - vd) <= tolerance<T>() * std::abs(vc));
    check_close(cpu.template get<0>().inner().alpha.grad, dev.template get<0>().inner().alpha.grad,
                "alpha gradient of the penalty");

    // Clipping on the device: the same norm, the same scaled gradients.
    const Tensor<T> g = random_tensor<T>(Shape{6, classes}, rng);
    cpu.backward(g);
    dev.backward(Tensor<T, Cuda>(g));
    auto pcs = pw::trainable_parameters(cpu);
    auto pds = pw::trainable_parameters(dev);
    const double nc = pw::clip_grad_norm(pcs, 0.5), nd = pw::clip_grad_norm(pds, 0.5);
    CHECK(std::abs(nc - nd) <= tolerance<T>() * nc);
    CHECK(nc > 0.5);
    check_gradients(cpu, dev);
    CHECK(pw::grad_norm(pds) == doctest::Approx(0.5).epsilon(tolerance<T>() * 10));

    // A few DARTS steps (Gumbel noise drawn from the same seeds, the penalty,
    // alpha clipping): both models end with the same parameters.
    std::vector<pw::Batch<T>> tb, vb;
    for (int i = 0; i < 5; ++i) {
        pw::Batch<T> b{random_tensor<T>(Shape{7, in}, rng), {}};
        for (int r = 0; r < 7; ++r) b.labels.push_back(int(rng() % classes));
        (i < 3 ? tb : vb).push_back(b);
    }
    pw::VectorSource<T> train(tb), val(vb);
    const auto step_cpu = [](auto& m, const pw::Batch<T>& b) {
        auto ce = pw::cross_entropy(m.forward(b.x), b.labels);
        m.backward(ce.grad);
        return double(ce.value);
    };
    const auto step_dev = [](auto& m, const pw::Batch<T>& b) {
        const Tensor<T, Cuda> xb(b.x);
        auto ce = pw::cross_entropy(m.forward(xb), b.labels);
        m.backward(ce.grad);
        return double(ce.value);
    };
    const search::SearchOptions opts{.epochs = 2,
                                     .gates = {.mode = search::GateMode::gumbel},
                                     .tau_start = 1.0,
                                     .tau_end = 0.3,
                                     .penalty = pen,
                                     .alpha = {.lr = 0.05, .beta1 = 0.5, .beta2 = 0.999, .eps = 1e-8},
                                     .alpha_clip = 0.05,
                                     .log_every = 2,
                                     .seed = 3};
    copy_parameters(cpu, dev);
    pw::BasicAdam<T> opt_cpu(search::weight_parameters(cpu), {.lr = 1e-2});
    pw::BasicAdam<T, Cuda> opt_dev(search::weight_parameters(dev), {.lr = 1e-2});
    const auto rc = search::run(cpu, opt_cpu, train, val, step_cpu, opts);
    const auto rd = search::run(dev, opt_dev, train, val, step_dev, opts);
    CHECK(rc.steps == 6);
    CHECK(rd.steps == rc.steps);
    CHECK(rd.alpha_steps == rc.alpha_steps);
    const double steps_tol = std::is_same_v<T, float> ? 1e-4 : 1e-10;
    CHECK(std::abs(rd.last_train_loss - rc.last_train_loss) <= steps_tol * std::abs(rc.last_train_loss));
    CHECK(std::abs(rd.last_penalty - rc.last_penalty) <= steps_tol * std::abs(rc.last_penalty));
    REQUIRE(rd.history.size() == rc.history.size());
    for (std::size_t i = 0; i < rc.history.size(); ++i) {
        CHECK(rd.history[i].argmax == rc.history[i].argmax);
        for (std::size_t k = 0; k < rc.history[i].probabilities[0].size(); ++k)
            CHECK(std::abs(rd.history[i].probabilities[0][k] - rc.history[i].probabilities[0][k]) <= steps_tol);
    }
    check_values(cpu, dev, steps_tol);

    // derive: the same choice; the derived device model computes what the CPU
    // one does, and its weights move into the fixed type on the CPU.
    const auto report_cpu = search::derive(cpu), report_dev = search::derive(dev);
    CHECK(report_dev.modules.at(0).chosen == report_cpu.modules.at(0).chosen);
    CHECK(report_dev.trainable == report_cpu.trainable);
    const Tensor<T> x2 = random_tensor<T>(Shape{4, in}, rng);
    check_close(cpu.forward(x2), dev.forward(Tensor<T, Cuda>(x2)), "derived forward");
    Net<T, Cpu> again(Searched<T, Cpu>(in, hidden), pw::BasicRelu<T, Cpu>{}, pw::BasicLinear<T, Cpu>(hidden, classes));
    again.visit([](auto& p) { p.value.zero(); });
    again.template get<0>().inner().derive(cpu.template get<0>().inner().chosen());
    search::copy_parameters(dev, again);
    check_close(again.forward(x2), dev.forward(Tensor<T, Cuda>(x2)), "derived weights copied to the CPU");
}

TEST_CASE("Search on the device: bad input names the module") {
    Searched<float, Cuda> dev(4, 3);
    dev.set_path("stage0");
    dev.inner().set_gates({.mode = search::GateMode::gumbel});
    dev.inner().fix_noise({0.1f, 0.2f});  // 2 values for 5 candidates
    const Tensor<float, Cuda> x(Shape{2, 4}, 0.5f);
    CHECK_THROWS_WITH_AS(dev.forward(x), doctest::Contains("stage0: fixed noise of 2 values for 5 candidates"),
                         pw::ShapeError);
    Searched<float, Cuda> fresh(4, 3);
    CHECK_THROWS_WITH_AS(fresh.inner().add_gate_grad(std::vector<float>(5, 1.0f)),
                         doctest::Contains("gate gradient before any forward"), pw::Error);
    fresh.forward(x);
    CHECK_THROWS_AS(fresh.inner().add_gate_grad(std::vector<float>(3, 1.0f)), pw::ShapeError);
    CHECK_THROWS_AS(fresh.backward(Tensor<float, Cuda>(Shape{2, 4}, 1.0f)), pw::ShapeError);
}
