// The kernels' math, checked without a GPU: the plain C++ references of
// kernel_reference.hpp against the CPU modules (AdapterModule,
// ScaleShiftModule, LoRAModule, the search gates and mixing) and by finite
// differences in double; and the host-side launch planning of plan.hpp.
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include <doctest/doctest.h>

#include "kernel_reference.hpp"
#include "patchwork/core/random.hpp"
#include "patchwork/layers/identity.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/lora.hpp"
#include "patchwork/policies/scale_shift.hpp"
#include "patchwork/search/gates.hpp"

namespace pw = patchwork;
namespace kr = patchwork::kernels::ref;
using pw::kernels::Act;
using Vec = kr::Vec;

namespace {

Vec random_vec(std::size_t n, pw::Rng& rng, double scale = 1.0) {
    Vec v(n);
    for (auto& x : v) x = rng.normal(0.0, scale);
    return v;
}
Vec from_tensor(const pw::Tensor<double>& t) { return Vec(t.data(), t.data() + t.size()); }
pw::Tensor<double> to_tensor(const Vec& v, const pw::Shape& s) {
    pw::Tensor<double> t(s);
    for (std::size_t i = 0; i < v.size(); ++i) t[i] = v[i];
    return t;
}
double max_rel(const Vec& a, const Vec& b) {
    REQUIRE(a.size() == b.size());
    double w = 0;
    for (std::size_t i = 0; i < a.size(); ++i) w = std::max(w, std::abs(a[i] - b[i]) / std::max(1.0, std::abs(b[i])));
    return w;
}
double dot(const Vec& a, const Vec& b) {
    double s = 0;
    for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
    return s;
}
/// Relative error ||a - n|| / max(||a||, ||n||) of an analytic gradient against central differences
/// of L(v) = loss() with v perturbed in place.
double fd_error(Vec& v, const Vec& analytic, const std::function<double()>& loss, double h = 1e-6) {
    double diff = 0, na = 0, nn = 0;
    for (std::size_t i = 0; i < v.size(); ++i) {
        const double s = v[i];
        v[i] = s + h;
        const double lp = loss();
        v[i] = s - h;
        const double lm = loss();
        v[i] = s;
        const double num = (lp - lm) / (2 * h);
        diff += (num - analytic[i]) * (num - analytic[i]);
        na += analytic[i] * analytic[i];
        nn += num * num;
    }
    const double scale = std::max(std::sqrt(na), std::sqrt(nn));
    return scale == 0 ? 0 : std::sqrt(diff) / scale;
}

template <std::size_t R, pw::AdapterActivation A>
void adapter_against_module(std::size_t n, std::size_t d, std::uint64_t seed) {
    pw::Rng rng(seed);
    pw::AdapterModule<pw::BasicIdentity<double>, R, A> m(d);
    m.visit([&](pw::Parameter<double>& p) { pw::init::normal(p.value, rng, 0.0, 0.5); });
    const Vec h = random_vec(n * d, rng), g = random_vec(n * d, rng);
    const auto ht = to_tensor(h, pw::Shape{n, d}), gt = to_tensor(g, pw::Shape{n, d});  // alive until backward
    const auto y = from_tensor(m.forward(ht));
    pw::zero_grad(m);
    m.set_input_grad(true);
    const auto dh_mod = from_tensor(m.backward(gt));

    const Act act = A == pw::AdapterActivation::gelu ? Act::gelu : Act::relu;
    const kr::Dims dims{n, d, d, R, 1};
    Vec yr, z, dh;
    kr::adapter_forward(act, dims, h, nullptr, from_tensor(m.down_weight.value), from_tensor(m.down_bias.value),
                        from_tensor(m.up_weight.value), from_tensor(m.up_bias.value), yr, z);
    kr::Grads gr{Vec(R * d, 0.0), Vec(R, 0.0), Vec(d * R, 0.0), Vec(d, 0.0)};
    kr::adapter_backward(act, dims, h, g, nullptr, from_tensor(m.down_weight.value), from_tensor(m.up_weight.value), z,
                         &dh, gr);
    INFO("adapter r=", R, " n=", n, " d=", d);
    CHECK(max_rel(yr, y) < 1e-12);
    CHECK(max_rel(dh, dh_mod) < 1e-12);
    CHECK(max_rel(gr.w1, from_tensor(m.down_weight.grad)) < 1e-12);
    CHECK(max_rel(gr.b1, from_tensor(m.down_bias.grad)) < 1e-12);
    CHECK(max_rel(gr.w2, from_tensor(m.up_weight.grad)) < 1e-12);
    CHECK(max_rel(gr.b2, from_tensor(m.up_bias.grad)) < 1e-12);
}

/// Finite-difference check of every gradient of the low-rank reference with L = <y, R>.
void lowrank_gradcheck(Act act, const kr::Dims& d, bool biases, bool residual, double s, const std::vector<int>* task,
                       std::uint64_t seed) {
    pw::Rng rng(seed);
    Vec x = random_vec(d.n * d.c_in, rng), res = residual ? random_vec(d.n * d.c_out, rng) : Vec{};
    Vec w1 = random_vec(d.k * d.r * d.c_in, rng, 0.5), w2 = random_vec(d.k * d.c_out * d.r, rng, 0.5);
    Vec b1 = biases ? random_vec(d.k * d.r, rng, 0.5) : Vec{}, b2 = biases ? random_vec(d.k * d.c_out, rng, 0.5) : Vec{};
    const Vec rr = random_vec(d.n * d.c_out, rng);
    const Vec dres = random_vec(d.n * d.c_in, rng);  // stands for the residual's own input gradient
    const auto loss = [&] {
        Vec y, z;
        kr::lowrank_forward(act, d, x, res, task, w1, b1, w2, b2, s, y, z);
        // dres enters as L += <x, dres> so that dL/dx = dres + the patch's part.
        return dot(y, rr) + dot(x, dres);
    };
    Vec y, z, dx;
    kr::lowrank_forward(act, d, x, res, task, w1, b1, w2, b2, s, y, z);
    kr::Grads gr{Vec(w1.size(), 0.0), Vec(b1.size(), 0.0), Vec(w2.size(), 0.0), Vec(b2.size(), 0.0)};
    kr::lowrank_backward(act, d, x, rr, dres, task, w1, w2, s, z, &dx, gr);
    INFO("act ", int(act), " n=", d.n, " in=", d.c_in, " out=", d.c_out, " r=", d.r, " k=", d.k);
    CHECK(fd_error(x, dx, loss) < 1e-6);
    CHECK(fd_error(w1, gr.w1, loss) < 1e-6);
    CHECK(fd_error(w2, gr.w2, loss) < 1e-6);
    if (biases) {
        CHECK(fd_error(b1, gr.b1, loss) < 1e-6);
        CHECK(fd_error(b2, gr.b2, loss) < 1e-6);
    }
}

}  // namespace

TEST_CASE("reference adapter equals AdapterModule (forward, dh, every parameter gradient), ReLU and GELU") {
    adapter_against_module<1, pw::AdapterActivation::relu>(5, 7, 1);
    adapter_against_module<3, pw::AdapterActivation::relu>(9, 33, 2);
    adapter_against_module<8, pw::AdapterActivation::relu>(17, 12, 3);
    adapter_against_module<3, pw::AdapterActivation::gelu>(6, 10, 4);
    adapter_against_module<8, pw::AdapterActivation::gelu>(4, 40, 5);
    adapter_against_module<70, pw::AdapterActivation::gelu>(3, 9, 6);
}

TEST_CASE("reference scale-shift equals ScaleShiftModule") {
    for (auto [n, d] : {std::pair<std::size_t, std::size_t>{1, 1}, {7, 33}, {20, 5}}) {
        pw::Rng rng(n * 31 + d);
        pw::ScaleShiftModule<pw::BasicIdentity<double>> m(d);
        m.visit([&](pw::Parameter<double>& p) { pw::init::normal(p.value, rng, 0.0, 1.0); });
        const Vec h = random_vec(n * d, rng), g = random_vec(n * d, rng);
        const auto ht = to_tensor(h, pw::Shape{n, d}), gt = to_tensor(g, pw::Shape{n, d});
        const auto y = from_tensor(m.forward(ht));
        pw::zero_grad(m);
        m.set_input_grad(true);
        const auto dh_mod = from_tensor(m.backward(gt));
        Vec yr, dh, dgamma(d, 0.0), dbeta(d, 0.0);
        kr::scale_shift_forward(n, d, 1, h, nullptr, from_tensor(m.scale.value), from_tensor(m.shift.value), yr);
        kr::scale_shift_backward(n, d, 1, h, g, nullptr, from_tensor(m.scale.value), &dh, dgamma, dbeta);
        CHECK(max_rel(yr, y) < 1e-14);
        CHECK(max_rel(dh, dh_mod) < 1e-14);
        CHECK(max_rel(dgamma, from_tensor(m.scale.grad)) < 1e-12);
        CHECK(max_rel(dbeta, from_tensor(m.shift.grad)) < 1e-12);
    }
}

TEST_CASE("reference LoRA equals LoRAModule (added onto the Linear's output; dx onto its input gradient)") {
    const std::size_t n = 6, in = 9, out = 5;
    pw::Rng rng(11);
    pw::LoRAModule<pw::BasicLinear<double>, 3, 7> m(in, out);
    m.visit([&](pw::Parameter<double>& p) { pw::init::normal(p.value, rng, 0.0, 0.5); });
    const Vec x = random_vec(n * in, rng), g = random_vec(n * out, rng);
    const auto xt = to_tensor(x, pw::Shape{n, in}), gt = to_tensor(g, pw::Shape{n, out});
    const auto y = from_tensor(m.forward(xt));
    pw::zero_grad(m);
    m.set_input_grad(true);
    const auto dx_mod = from_tensor(m.backward(gt));
    const Vec w = from_tensor(m.inner().weight.value), b = from_tensor(m.inner().bias.value);
    Vec base(n * out), base_dx(n * in, 0.0);
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t o = 0; o < out; ++o) {
            double v = b[o];
            for (std::size_t c = 0; c < in; ++c) {
                v += x[i * in + c] * w[o * in + c];
                base_dx[i * in + c] += g[i * out + o] * w[o * in + c];
            }
            base[i * out + o] = v;
        }
    const double s = 7.0 / 3.0;
    const kr::Dims dims{n, in, out, 3, 1};
    Vec yr, u, dx;
    kr::lowrank_forward(Act::none, dims, x, base, nullptr, from_tensor(m.a.value), {}, from_tensor(m.b.value), {}, s,
                        yr, u);
    kr::Grads gr{Vec(3 * in, 0.0), {}, Vec(out * 3, 0.0), {}};
    kr::lowrank_backward(Act::none, dims, x, g, base_dx, nullptr, from_tensor(m.a.value), from_tensor(m.b.value), s, u,
                         &dx, gr);
    CHECK(max_rel(yr, y) < 1e-12);
    CHECK(max_rel(dx, dx_mod) < 1e-12);
    CHECK(max_rel(gr.w1, from_tensor(m.a.grad)) < 1e-12);
    CHECK(max_rel(gr.w2, from_tensor(m.b.grad)) < 1e-12);
}

TEST_CASE("reference gates and mixing equal search::GateState (softmax, Gumbel soft and straight-through hard)") {
    namespace search = pw::search;
    pw::Rng rng(21);
    for (int mode = 0; mode < 4; ++mode) {
        const std::size_t k = 5, m = 37;
        const Vec alpha = random_vec(k, rng), noise = random_vec(k, rng);
        const bool gumbel = mode >= 1, hard = mode == 2 || mode == 3;
        const double tau = mode == 3 ? 0.3 : 0.7;
        search::GateConfig cfg{.mode = gumbel ? search::GateMode::gumbel : search::GateMode::softmax, .tau = tau,
                               .hard = hard};
        search::GateState<double> st;
        st.noise = gumbel ? noise : Vec(k, 0.0);
        st.compute_with_noise(alpha.data(), k, cfg);
        const auto gv = kr::gates(alpha, gumbel ? noise : Vec{}, tau, hard);
        INFO("mode ", mode);
        CHECK(max_rel(gv.soft, st.soft) < 1e-14);
        CHECK(gv.used == st.used);
        CHECK(gv.inv_tau == st.inv_tau);
        std::vector<Vec> cands;
        for (std::size_t j = 0; j < k; ++j) cands.push_back(random_vec(m, rng));
        const Vec g = random_vec(m, rng);
        // Search's mixing: y = sum_j used_j o_j over nonzero gates; dgate_j = <g, o_j>.
        Vec y(m, 0.0);
        for (std::size_t j = 0; j < k; ++j)
            if (st.used[j] != 0)
                for (std::size_t i = 0; i < m; ++i) y[i] += st.used[j] * cands[j][i];
        Vec dgate(k), grad_cpu(k, 0.25), grad_ref(k, 0.25);
        for (std::size_t j = 0; j < k; ++j) dgate[j] = dot(g, cands[j]);
        st.backward(dgate.data(), grad_cpu.data());
        std::vector<Vec> dc;
        kr::mix_backward(gv, cands, g, dc, grad_ref);
        CHECK(max_rel(kr::mix_forward(gv, cands), y) < 1e-14);
        CHECK(max_rel(grad_ref, grad_cpu) < 1e-13);
        for (std::size_t j = 0; j < k; ++j)
            for (std::size_t i = 0; i < m; ++i) CHECK(dc[j][i] == st.used[j] * g[i]);
    }
}

TEST_CASE("reference low-rank backward passes finite differences (adapter, LoRA, ranks above 64, mixed tasks)") {
    lowrank_gradcheck(Act::relu, {4, 6, 6, 3, 1}, true, true, 1.0, nullptr, 1);
    lowrank_gradcheck(Act::gelu, {5, 7, 7, 2, 1}, true, true, 1.0, nullptr, 2);
    lowrank_gradcheck(Act::none, {3, 5, 4, 2, 1}, false, true, 2.5, nullptr, 3);
    lowrank_gradcheck(Act::gelu, {2, 3, 3, 66, 1}, true, true, 1.0, nullptr, 4);
    const std::vector<int> task{2, 0, 2, 1, 1, 2, 0};
    lowrank_gradcheck(Act::gelu, {7, 5, 5, 3, 3}, true, true, 1.0, &task, 5);
    lowrank_gradcheck(Act::none, {7, 4, 6, 2, 3}, false, true, 0.5, &task, 6);
}

TEST_CASE("reference scale-shift backward passes finite differences, per task") {
    const std::size_t n = 6, d = 4, k = 3;
    const std::vector<int> task{1, 0, 1, 2, 2, 1};
    pw::Rng rng(31);
    Vec h = random_vec(n * d, rng), gamma = random_vec(k * d, rng), beta = random_vec(k * d, rng);
    const Vec rr = random_vec(n * d, rng);
    const auto loss = [&] {
        Vec y;
        kr::scale_shift_forward(n, d, k, h, &task, gamma, beta, y);
        return dot(y, rr);
    };
    Vec dh, dgamma(k * d, 0.0), dbeta(k * d, 0.0);
    kr::scale_shift_backward(n, d, k, h, rr, &task, gamma, &dh, dgamma, dbeta);
    CHECK(fd_error(h, dh, loss) < 1e-7);
    CHECK(fd_error(gamma, dgamma, loss) < 1e-7);
    CHECK(fd_error(beta, dbeta, loss) < 1e-7);
}

TEST_CASE("reference mixing backward passes finite differences (alpha through softmax and Gumbel-softmax)") {
    pw::Rng rng(41);
    for (int mode = 0; mode < 2; ++mode) {
        const std::size_t k = 4, m = 10;
        Vec alpha = random_vec(k, rng);
        const Vec noise = mode == 1 ? random_vec(k, rng) : Vec{};
        std::vector<Vec> cands;
        for (std::size_t j = 0; j < k; ++j) cands.push_back(random_vec(m, rng));
        const Vec rr = random_vec(m, rng);
        const auto loss = [&] { return dot(kr::mix_forward(kr::gates(alpha, noise, 0.6, false), cands), rr); };
        Vec ga(k, 0.0);
        std::vector<Vec> dc;
        kr::mix_backward(kr::gates(alpha, noise, 0.6, false), cands, rr, dc, ga);
        CHECK(fd_error(alpha, ga, loss) < 1e-7);
        for (std::size_t j = 0; j < k; ++j) {
            std::vector<Vec> probe = cands;
            const auto lj = [&] { return dot(kr::mix_forward(kr::gates(alpha, noise, 0.6, false), probe), rr); };
            CHECK(fd_error(probe[j], dc[j], lj) < 1e-7);
        }
    }
    // Straight-through: alpha's gradient with hard gates is the soft one, candidates get used_k g.
    const Vec alpha{0.3, 1.2, -0.4}, noise{0.1, -0.2, 0.5};
    std::vector<Vec> cands{{1, 2}, {3, 4}, {5, 6}};
    Vec gs(3, 0.0), gh(3, 0.0);
    std::vector<Vec> ds, dh;
    kr::mix_backward(kr::gates(alpha, noise, 0.5, false), cands, {1, -1}, ds, gs);
    kr::mix_backward(kr::gates(alpha, noise, 0.5, true), cands, {1, -1}, dh, gh);
    CHECK(gs == gh);
    CHECK(dh[1] == Vec{1, -1});
    CHECK(dh[0] == Vec{0, 0});
}

TEST_CASE("mixed-task reference: every row equals the single-task patch of its own task") {
    const std::size_t n = 9, d = 6, r = 3, k = 4;
    const std::vector<int> task{3, 0, 0, 2, 1, 3, 3, 0, 2};
    pw::Rng rng(51);
    const Vec h = random_vec(n * d, rng), g = random_vec(n * d, rng);
    const Vec dw = random_vec(k * r * d, rng), db = random_vec(k * r, rng), uw = random_vec(k * d * r, rng),
              ub = random_vec(k * d, rng);
    Vec y, z, dh;
    kr::adapter_forward(Act::gelu, {n, d, d, r, k}, h, &task, dw, db, uw, ub, y, z);
    kr::Grads gr{Vec(dw.size(), 0.0), Vec(db.size(), 0.0), Vec(uw.size(), 0.0), Vec(ub.size(), 0.0)};
    kr::adapter_backward(Act::gelu, {n, d, d, r, k}, h, g, &task, dw, uw, z, &dh, gr);
    for (std::size_t t = 0; t < k; ++t) {
        Vec hs, gs;
        std::vector<std::size_t> rows;
        for (std::size_t i = 0; i < n; ++i)
            if (std::size_t(task[i]) == t) {
                rows.push_back(i);
                hs.insert(hs.end(), h.begin() + i * d, h.begin() + (i + 1) * d);
                gs.insert(gs.end(), g.begin() + i * d, g.begin() + (i + 1) * d);
            }
        const auto slice = [&](const Vec& v, std::size_t per) { return Vec(v.begin() + t * per, v.begin() + (t + 1) * per); };
        Vec ys, zs, dhs;
        const kr::Dims ds{rows.size(), d, d, r, 1};
        kr::adapter_forward(Act::gelu, ds, hs, nullptr, slice(dw, r * d), slice(db, r), slice(uw, d * r), slice(ub, d),
                            ys, zs);
        kr::Grads gs1{Vec(r * d, 0.0), Vec(r, 0.0), Vec(d * r, 0.0), Vec(d, 0.0)};
        kr::adapter_backward(Act::gelu, ds, hs, gs, nullptr, slice(dw, r * d), slice(uw, d * r), zs, &dhs, gs1);
        for (std::size_t q = 0; q < rows.size(); ++q)
            for (std::size_t c = 0; c < d; ++c) {
                CHECK(y[rows[q] * d + c] == ys[q * d + c]);
                CHECK(dh[rows[q] * d + c] == dhs[q * d + c]);
            }
        CHECK(max_rel(slice(gr.w1, r * d), gs1.w1) < 1e-13);
        CHECK(max_rel(slice(gr.b1, r), gs1.b1) < 1e-13);
        CHECK(max_rel(slice(gr.w2, d * r), gs1.w2) < 1e-13);
        CHECK(max_rel(slice(gr.b2, d), gs1.b2) < 1e-13);
    }
}

TEST_CASE("launch planning: rank buckets, passes, reduction splits, mixing blocks, workspace sizes") {
    using namespace pw::kernels;
    CHECK(lowrank_bucket(1) == 8);
    CHECK(lowrank_bucket(8) == 8);
    CHECK(lowrank_bucket(9) == 16);
    CHECK(lowrank_bucket(33) == 64);
    CHECK(lowrank_bucket(64) == 64);
    CHECK(lowrank_bucket(65) == 64);
    CHECK(lowrank_passes(64) == 1);
    CHECK(lowrank_passes(65) == 2);
    CHECK(lowrank_passes(200) == 4);
    CHECK(lowrank_fused(64));
    CHECK_FALSE(lowrank_fused(65));
    CHECK_FALSE(lowrank_fused(0));
    for (std::size_t n : {1u, 7u, 63u, 64u, 65u, 129u, 1000u, 10000u, 1000000u})
        for (std::size_t c : {1u, 33u, 768u, 4096u})
            for (std::size_t k : {1u, 3u, 32u}) {
                const auto g = reduce_geometry(n, c, k);
                INFO("n=", n, " c=", c, " k=", k);
                CHECK(g.col_tiles * kColTile >= c);
                CHECK((g.col_tiles - 1) * kColTile < c);
                CHECK(g.splits >= 1);
                CHECK(g.splits * g.rows_per_split >= n);
                CHECK((g.splits - 1) * g.rows_per_split < n);  // no empty split
                CHECK(g.splits <= 65535);
                if (g.splits > 1) CHECK(g.rows_per_split >= kMinSplitRows / 2);
                CHECK(reduce_partial_elems(g, k, 10) == (g.splits > 1 ? g.splits * k * 10 : 0));
            }
    CHECK(reduce_geometry(0, 5, 1).splits == 0);
    CHECK(mix_blocks(0) == 1);
    CHECK(mix_blocks(1) == 1);
    CHECK(mix_blocks(std::size_t(kThreads) * 8 + 1) == 2);
    CHECK(mix_blocks(std::size_t(1) << 30) == kMixBlocksMax);
    CHECK(ws_bytes(1, 4) == 256);
    CHECK(ws_bytes(64, 4) == 256);
    CHECK(ws_bytes(65, 4) == 512);
    CHECK(lowrank_backward_workspace_bytes(1000, 768, 768, 64, 1, 4) >= 2 * 1000 * 64 * 4);
    CHECK(mix_backward_workspace_bytes(1 << 20, 4, 4) >= mix_blocks(1 << 20) * 4 * 4);
}

TEST_CASE("launch planning: size checks throw ConfigError / ShapeError naming the caller") {
    using namespace pw::kernels;
    CHECK_THROWS_WITH_AS(check::positive("enc.adapter", "the rank / bottleneck r", 0), doctest::Contains("enc.adapter"),
                         pw::ConfigError);
    CHECK_THROWS_WITH_AS(check::pointer("enc.adapter", "the output", nullptr), doctest::Contains("null"),
                         pw::ConfigError);
    CHECK_THROWS_AS(check::extent("x", "rows", std::size_t(1) << 40, std::size_t(1) << 30), pw::ShapeError);
    CHECK_NOTHROW(check::extent("x", "rows", 1000000, 4096));
    CHECK_THROWS_AS(check::fits_int("x", "width", std::size_t(1) << 33), pw::ShapeError);
    CHECK_THROWS_AS(check::tasks("x", 0), pw::ConfigError);
    CHECK_THROWS_AS(check::tasks("x", 70000), pw::ConfigError);
    CHECK_NOTHROW(check::tasks("x", 32));
}
