// Every kernel of patchwork/kernels against the plain C++ reference
// (kernel_reference.hpp) on random shapes, sizes that are not multiples of
// the tiles included. Outputs are poisoned (0xFF bytes: NaN) before each run
// so unwritten elements fail; gradients start from random values so += is
// checked. fp32 and double: relative error < 1e-5; bf16 storage: < 3e-2
// relative to the output's scale (inputs rounded to bf16 first).
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kernel_reference.hpp"
#include "patchwork/core/random.hpp"
#include "patchwork/cuda/tensor.hpp"
#include "patchwork/kernels/adapter.cuh"
#include "patchwork/kernels/mix.cuh"
#include "patchwork/kernels/multitask.cuh"
#include "patchwork/kernels/scale_shift.cuh"

namespace pw = patchwork;
namespace pk = patchwork::kernels;
namespace kr = patchwork::kernels::ref;
using pk::Act;
using Vec = kr::Vec;

namespace {

template <class E>
E to_e(double v) {
    if constexpr (std::is_same_v<E, pk::bf16>) return __float2bfloat16_rn(float(v));
    else return E(v);
}
template <class E>
double from_e(E v) {
    if constexpr (std::is_same_v<E, pk::bf16>) return double(__bfloat162float(v));
    else return double(v);
}
template <class E>
double tolerance() {
    return std::is_same_v<E, pk::bf16> ? 3e-2 : 1e-5;
}

/// Random values, rounded to what E can hold (so the reference sees the same inputs).
template <class E>
Vec random_vec(std::size_t n, pw::Rng& rng, double scale = 1.0) {
    Vec v(n);
    for (auto& x : v) x = from_e<E>(to_e<E>(rng.normal(0.0, scale)));
    return v;
}

template <class E>
pw::cuda::Buffer<E> upload(const Vec& v) {
    std::vector<E> host(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) host[i] = to_e<E>(v[i]);
    pw::cuda::Buffer<E> b(std::max<std::size_t>(v.size(), 1));
    if (!v.empty()) b.upload(host);
    pw::cuda::synchronize();
    return b;
}
template <class E>
pw::cuda::Buffer<E> poisoned(std::size_t n) {
    pw::cuda::Buffer<E> b(std::max<std::size_t>(n, 1));
    b.memset(0xFF, std::max<std::size_t>(n, 1));
    return b;
}
template <class E>
Vec download(const pw::cuda::Buffer<E>& b, std::size_t n) {
    const auto h = b.download(n);
    Vec v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = from_e<E>(h[i]);
    return v;
}

/// max |a - b| / max(1, max |b|) over the tensor; NaN (an unwritten element) fails.
double error(const Vec& got, const Vec& want) {
    REQUIRE(got.size() == want.size());
    double scale = 1, worst = 0;
    for (double w : want) scale = std::max(scale, std::abs(w));
    for (std::size_t i = 0; i < got.size(); ++i) {
        if (!std::isfinite(got[i])) return INFINITY;
        worst = std::max(worst, std::abs(got[i] - want[i]));
    }
    return worst / scale;
}

template <class E>
void check_lowrank(Act act, const kr::Dims& d, bool lora, bool tasks, std::uint64_t seed) {
    using A = pk::accum_t<E>;
    pw::Rng rng(seed);
    const double tol = tolerance<E>();
    std::vector<int> task(d.n);
    for (auto& t : task) t = int(rng.uniform(0, double(d.k)));
    if (d.k > 1) std::sort(task.begin(), task.begin() + d.n / 2);  // half grouped, half interleaved
    const std::vector<int>* tp = tasks ? &task : nullptr;
    const Vec x = random_vec<E>(d.n * d.c_in, rng);
    const Vec res = lora ? random_vec<E>(d.n * d.c_out, rng) : x;
    const Vec w1 = random_vec<E>(d.k * d.r * d.c_in, rng, 1.0 / std::sqrt(double(d.c_in)));
    const Vec w2 = random_vec<E>(d.k * d.c_out * d.r, rng, 1.0 / std::sqrt(double(d.r)));
    const Vec b1 = lora ? Vec{} : random_vec<E>(d.k * d.r, rng, 0.5), b2 = lora ? Vec{} : random_vec<E>(d.k * d.c_out, rng, 0.5);
    const Vec g = random_vec<E>(d.n * d.c_out, rng), dres = lora ? random_vec<E>(d.n * d.c_in, rng) : g;
    const double s = lora ? 2.0 : 1.0;
    Vec y, z, dx;
    kr::lowrank_forward(act, d, x, res, tp, w1, b1, w2, b2, s, y, z);
    kr::Grads gr{random_vec<A>(w1.size(), rng), random_vec<A>(b1.size(), rng), random_vec<A>(w2.size(), rng),
                 random_vec<A>(b2.size(), rng)};
    const kr::Grads g0 = gr;
    kr::lowrank_backward(act, d, x, g, dres, tp, w1, w2, s, z, &dx, gr);

    auto dx_ = upload<E>(x), dres_ = upload<E>(res), dw1 = upload<E>(w1), dw2 = upload<E>(w2), db1 = upload<E>(b1),
         db2 = upload<E>(b2), dg = upload<E>(g), ddres = upload<E>(dres);
    auto dtask = pw::cuda::Buffer<int>(std::max<std::size_t>(d.n, 1));
    if (d.n > 0) dtask.upload(task);
    auto dy = poisoned<E>(d.n * d.c_out), ddx = poisoned<E>(d.n * d.c_in);
    auto dz = poisoned<A>(d.n * d.r);
    auto gw1 = upload<A>(g0.w1), gw2 = upload<A>(g0.w2), gb1 = upload<A>(g0.b1), gb2 = upload<A>(g0.b2);
    const int* dt = tasks ? dtask.data() : nullptr;
    const std::string where = "test.lowrank";
    if (lora) {
        pk::multitask_lora_forward<E>(dx_.data(), dres_.data(), tasks ? dt : nullptr, d.n, d.c_in, d.c_out, d.r, d.k,
                                      dw1.data(), dw2.data(), A(s), dy.data(), dz.data(), where);
    } else if (tasks) {
        pk::multitask_adapter_forward<E>(dx_.data(), dt, d.n, d.c_in, d.r, d.k, dw1.data(), db1.data(), dw2.data(),
                                         db2.data(), act, dy.data(), dz.data(), where);
    } else {
        pk::adapter_forward<E>(dx_.data(), d.n, d.c_in, d.r, dw1.data(), db1.data(), dw2.data(), db2.data(), act,
                               dy.data(), dz.data(), where);
    }
    INFO("n=", d.n, " in=", d.c_in, " out=", d.c_out, " r=", d.r, " k=", d.k, " act=", int(act), " lora=", lora);
    CHECK(error(download(dy, d.n * d.c_out), y) < tol);
    CHECK(error(download(dz, d.n * d.r), z) < tol);
    if (lora) {
        pk::multitask_lora_backward<E>(dx_.data(), dg.data(), ddres.data(), dt, d.n, d.c_in, d.c_out, d.r, d.k,
                                       dw1.data(), dw2.data(), A(s), dz.data(), ddx.data(), {gw1.data(), gw2.data()},
                                       where);
    } else if (tasks) {
        pk::multitask_adapter_backward<E>(dx_.data(), dg.data(), dt, d.n, d.c_in, d.r, d.k, dw1.data(), dw2.data(), act,
                                          dz.data(), ddx.data(), {gw1.data(), gb1.data(), gw2.data(), gb2.data()},
                                          where);
    } else {
        pk::adapter_backward<E>(dx_.data(), dg.data(), d.n, d.c_in, d.r, dw1.data(), dw2.data(), act, dz.data(),
                                ddx.data(), {gw1.data(), gb1.data(), gw2.data(), gb2.data()}, where);
    }
    CHECK(error(download(ddx, d.n * d.c_in), dx) < tol);
    CHECK(error(download(gw1, gr.w1.size()), gr.w1) < tol);
    CHECK(error(download(gw2, gr.w2.size()), gr.w2) < tol);
    if (!lora) {
        CHECK(error(download(gb1, gr.b1.size()), gr.b1) < tol);
        CHECK(error(download(gb2, gr.b2.size()), gr.b2) < tol);
    }
}

template <class E>
void check_scale_shift(std::size_t n, std::size_t d, std::size_t k, std::uint64_t seed) {
    using A = pk::accum_t<E>;
    pw::Rng rng(seed);
    std::vector<int> task(n);
    for (auto& t : task) t = int(rng.uniform(0, double(k)));
    const Vec h = random_vec<E>(n * d, rng), g = random_vec<E>(n * d, rng), gamma = random_vec<E>(k * d, rng),
              beta = random_vec<E>(k * d, rng);
    Vec y, dh, dgamma = random_vec<A>(k * d, rng), dbeta = random_vec<A>(k * d, rng);
    const Vec dgamma0 = dgamma, dbeta0 = dbeta;
    kr::scale_shift_forward(n, d, k, h, &task, gamma, beta, y);
    kr::scale_shift_backward(n, d, k, h, g, &task, gamma, &dh, dgamma, dbeta);
    auto dh_ = upload<E>(h), dg = upload<E>(g), dgm = upload<E>(gamma), dbt = upload<E>(beta);  // storage E
    auto dtask = pw::cuda::Buffer<int>(std::max<std::size_t>(n, 1));
    if (n > 0) dtask.upload(task);
    auto dy = poisoned<E>(n * d), ddh = poisoned<E>(n * d);
    auto ggm = upload<A>(dgamma0), gbt = upload<A>(dbeta0);
    if (k == 1) {
        pk::scale_shift_forward<E>(dh_.data(), n, d, dgm.data(), dbt.data(), dy.data(), "test.scale_shift");
        pk::scale_shift_backward<E>(dh_.data(), dg.data(), n, d, dgm.data(), ddh.data(), ggm.data(), gbt.data(),
                                    "test.scale_shift");
    } else {
        pk::multitask_scale_shift_forward<E>(dh_.data(), dtask.data(), n, d, k, dgm.data(), dbt.data(), dy.data(),
                                             "test.scale_shift");
        pk::multitask_scale_shift_backward<E>(dh_.data(), dg.data(), dtask.data(), n, d, k, dgm.data(), ddh.data(),
                                              ggm.data(), gbt.data(), "test.scale_shift");
    }
    INFO("n=", n, " d=", d, " k=", k);
    const double tol = tolerance<E>();
    CHECK(error(download(dy, n * d), y) < tol);
    CHECK(error(download(ddh, n * d), dh) < tol);
    CHECK(error(download(ggm, k * d), dgamma) < tol);
    CHECK(error(download(gbt, k * d), dbeta) < tol);
}

template <class E>
void check_mix(std::size_t k, std::size_t m, int mode, bool stacked, std::uint64_t seed) {
    using A = pk::accum_t<E>;
    pw::Rng rng(seed);
    const Vec alpha = random_vec<A>(k, rng), noise = mode >= 1 ? random_vec<A>(k, rng) : Vec{};
    const bool hard = mode == 2;
    const double tau = 0.7;
    std::vector<Vec> cands;
    Vec all;
    for (std::size_t j = 0; j < k; ++j) {
        cands.push_back(random_vec<E>(m, rng));
        all.insert(all.end(), cands.back().begin(), cands.back().end());
    }
    const Vec g = random_vec<E>(m, rng);
    const auto gv = kr::gates(alpha, noise, tau, hard);
    const Vec out = kr::mix_forward(gv, cands);
    Vec ga = random_vec<A>(k, rng);
    const Vec ga0 = ga;
    std::vector<Vec> dc;
    kr::mix_backward(gv, cands, g, dc, ga);

    auto dalpha = upload<A>(alpha), dnoise = upload<A>(noise);
    auto dall = upload<E>(all), dg = upload<E>(g);
    auto dout = poisoned<E>(m), ddall = poisoned<E>(k * m);
    auto dsoft = poisoned<A>(k), dused = poisoned<A>(k);
    auto dga = upload<A>(ga0);
    const pk::MixGates<A> gates{mode >= 1 ? dnoise.data() : nullptr, tau, hard};
    if (stacked) {
        pk::mix_forward_stacked<E>(dalpha.data(), k, gates, dall.data(), m, dout.data(), dsoft.data(), dused.data(),
                                   "test.mix");
        pk::mix_backward_stacked<E>(dg.data(), m, dall.data(), k, dsoft.data(), dused.data(), gates, ddall.data(),
                                    dga.data(), "test.mix");
    } else {
        std::vector<const E*> ptrs;
        std::vector<E*> dptrs;
        for (std::size_t j = 0; j < k; ++j) {
            ptrs.push_back(dall.data() + j * m);
            dptrs.push_back(ddall.data() + j * m);
        }
        pk::mix_forward<E>(dalpha.data(), k, gates, ptrs.data(), m, dout.data(), dsoft.data(), dused.data(), "test.mix");
        pk::mix_backward<E>(dg.data(), m, ptrs.data(), k, dsoft.data(), dused.data(), gates, dptrs.data(), dga.data(),
                            "test.mix");
    }
    INFO("k=", k, " m=", m, " mode=", mode, " stacked=", stacked);
    const double tol = tolerance<E>();
    CHECK(error(download(dsoft, k), gv.soft) < tol);
    CHECK(error(download(dused, k), gv.used) == 0);
    CHECK(error(download(dout, m), out) < tol);
    Vec dcat;
    for (auto& v : dc) dcat.insert(dcat.end(), v.begin(), v.end());
    CHECK(error(download(ddall, k * m), dcat) < tol);
    CHECK(error(download(dga, k), ga) < tol);
}

}  // namespace

TEST_CASE("adapter forward and backward match the reference (fp32, double, bf16), fused and multi-pass ranks") {
    for (std::size_t n : {1u, 7u, 129u, 1000u})
        for (std::size_t d : {1u, 33u, 768u})
            for (std::size_t r : {1u, 8u, 64u, 80u}) {
                if (n * d * r > 1000u * 768u * 8u && !(n == 129)) continue;  // keep the double reference fast
                check_lowrank<float>(Act::relu, {n, d, d, r, 1}, false, false, n + d + r);
                check_lowrank<float>(Act::gelu, {n, d, d, r, 1}, false, false, n * d + r);
            }
    check_lowrank<double>(Act::gelu, {129, 33, 33, 64, 1}, false, false, 1);
    check_lowrank<double>(Act::relu, {7, 768, 768, 80, 1}, false, false, 2);
    check_lowrank<pk::bf16>(Act::relu, {129, 768, 768, 64, 1}, false, false, 3);
    check_lowrank<pk::bf16>(Act::gelu, {1000, 33, 33, 8, 1}, false, false, 4);
}

TEST_CASE("mixed-task adapter and LoRA match the reference, each gradient into its task's slot") {
    for (std::size_t n : {1u, 7u, 129u, 1000u}) {
        check_lowrank<float>(Act::gelu, {n, 33, 33, 8, 5}, false, true, n);
        check_lowrank<float>(Act::relu, {n, 64, 64, 16, 32}, false, true, n + 1);
        check_lowrank<float>(Act::none, {n, 33, 65, 8, 4}, true, true, n + 2);
        check_lowrank<float>(Act::none, {n, 40, 24, 70, 3}, true, true, n + 3);
    }
    check_lowrank<double>(Act::none, {129, 33, 17, 4, 6}, true, true, 9);
    check_lowrank<pk::bf16>(Act::gelu, {129, 96, 96, 16, 7}, false, true, 10);
}

TEST_CASE("scale-shift forward and backward match the reference, single and mixed tasks") {
    for (std::size_t n : {1u, 7u, 129u, 1000u})
        for (std::size_t d : {1u, 33u, 768u}) {
            check_scale_shift<float>(n, d, 1, n + d);
            check_scale_shift<float>(n, d, 32, n * d);
        }
    check_scale_shift<double>(1000, 33, 3, 1);
    check_scale_shift<pk::bf16>(1000, 768, 1, 2);
    check_scale_shift<pk::bf16>(129, 33, 5, 3);
}

TEST_CASE("softmax / Gumbel-softmax mixing matches the reference, pointer and stacked candidates") {
    for (std::size_t m : {1u, 7u, 1000u, 100003u})
        for (int mode = 0; mode < 3; ++mode) {
            check_mix<float>(4, m, mode, false, m + mode);
            check_mix<float>(1, m, mode, true, m * 3 + mode);
            check_mix<float>(16, m, mode, true, m * 5 + mode);
        }
    check_mix<double>(5, 4097, 1, false, 1);
    check_mix<pk::bf16>(3, 100003, 0, true, 2);
}

TEST_CASE("launchers reject bad sizes and null pointers before launching") {
    pw::cuda::Buffer<float> b(16);
    float* p = b.data();
    CHECK_THROWS_AS(pk::adapter_forward<float>(p, 2, 4, 0, p, p, p, p, Act::relu, p, nullptr, "enc.adapter"),
                    pw::ConfigError);
    CHECK_THROWS_WITH_AS(pk::adapter_forward<float>(p, 2, 4, 2, nullptr, p, p, p, Act::relu, p, nullptr, "enc.adapter"),
                         doctest::Contains("enc.adapter"), pw::ConfigError);
    CHECK_THROWS_AS(pk::mix_forward_stacked<float>(p, 17, {}, p, 1, p, nullptr, nullptr, "mix"), pw::ConfigError);
    CHECK_THROWS_AS(pk::mix_forward_stacked<float>(p, 2, {p, 0.0, false}, p, 1, p, nullptr, nullptr, "mix"),
                    pw::ConfigError);
    CHECK_THROWS_AS(pk::multitask_scale_shift_forward<float>(p, nullptr, 2, 4, 2, p, p, p, "mt"), pw::ConfigError);
}
