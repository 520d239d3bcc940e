// Every kernel of patchwork/kernels against the plain C++ reference
// (kernel_reference.hpp) on random shapes, sizes that are not multiples of
// the tiles included. Outputs are poisoned (0xFF bytes: NaN) before each run
// so unwritten elements fail; gradients start from random values so += is
// checked. fp32 and double: relative error < 1e-5; bf16 storage: < 3e-2
// relative to the output's scale (inputs rounded to bf16 first).
//
// On the CPU execution of the CUDA code (PATCHWORK_CPU_CUDA, CI) a 256-thread
// block runs as 256 threads, so the sizes are smaller there, still chosen to
// reach every path: partial row tiles, every rank bucket (8, 16, 32, 64) and
// a multi-pass rank, up to 32 tasks, split and unsplit column reductions,
// more output columns than threads, several mixing blocks.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kernel_reference.hpp"
#include "patchwork/core/random.hpp"
#include "patchwork/cuda/device_tensor.hpp"
#include "patchwork/kernels/adapter.cuh"
#include "patchwork/kernels/mix.cuh"
#include "patchwork/kernels/multitask.cuh"
#include "patchwork/kernels/ops.cuh"
#include "patchwork/kernels/scale_shift.cuh"

namespace pw = patchwork;
namespace pk = patchwork::kernels;
namespace kr = patchwork::kernels::ref;
using pk::Act;
using Vec = kr::Vec;

namespace {

#ifdef PATCHWORK_CPU_CUDA
constexpr bool kCpu = true;
#else
constexpr bool kCpu = false;
#endif
// Under ThreadSanitizer every thread of a block is a real thread, about 100
// times slower: the sweeps keep one size of each kind there (every kernel,
// partial tiles, split reductions, a multi-pass rank are still reached).
#ifdef CPU_CUDA_TSAN  // tests/cpu_cuda/include/cpu_cuda/runtime.hpp
constexpr bool kTsan = true;
#else
constexpr bool kTsan = false;
#endif

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
    // Hard gates are exact 0 / 1; soft gates are fp32 (bf16: fp32) values of a double softmax.
    CHECK(error(download(dused, k), gv.used) <= (hard ? 0.0 : tol));
    CHECK(error(download(dout, m), out) < tol);
    Vec dcat;
    for (auto& v : dc) dcat.insert(dcat.end(), v.begin(), v.end());
    CHECK(error(download(ddall, k * m), dcat) < tol);
    CHECK(error(download(dga, k), ga) < tol);
}

}  // namespace

TEST_CASE("adapter forward and backward match the reference (fp32, double, bf16), fused and multi-pass ranks") {
    const auto ns = kTsan ? std::vector<std::size_t>{129}
                    : kCpu ? std::vector<std::size_t>{1, 7, 129} : std::vector<std::size_t>{1, 7, 129, 1000};
    const auto ds = kTsan ? std::vector<std::size_t>{33}
                    : kCpu ? std::vector<std::size_t>{1, 33} : std::vector<std::size_t>{1, 33, 768};
    const auto rs = kTsan ? std::vector<std::size_t>{8, 80} : std::vector<std::size_t>{1, 8, 64, 80};
    for (std::size_t n : ns)
        for (std::size_t d : ds)
            for (std::size_t r : rs) {
                if (n * d * r > 1000u * 768u * 8u && !(n == 129)) continue;  // keep the double reference fast
                check_lowrank<float>(Act::relu, {n, d, d, r, 1}, false, false, n + d + r);
                check_lowrank<float>(Act::gelu, {n, d, d, r, 1}, false, false, n * d + r);
            }
    // Every rank bucket (8, 16, 32, 64) and more columns than threads per block.
    for (std::size_t r : {12u, 24u, 40u})
        check_lowrank<float>(Act::gelu, {kCpu ? 40u : 300u, 33, 33, r, 1}, false, false, r);
    check_lowrank<float>(Act::relu, {7, 300, 300, 24, 1}, false, false, 5);
    check_lowrank<double>(Act::gelu, {129, 33, 33, 64, 1}, false, false, 1);
    check_lowrank<double>(Act::relu, {7, kCpu ? 300u : 768u, kCpu ? 300u : 768u, 80, 1}, false, false, 2);
    check_lowrank<pk::bf16>(Act::relu, {kCpu ? 40u : 129u, kCpu ? 96u : 768u, kCpu ? 96u : 768u, 64, 1}, false, false, 3);
    check_lowrank<pk::bf16>(Act::gelu, {kCpu ? 129u : 1000u, 33, 33, 8, 1}, false, false, 4);
}

TEST_CASE("mixed-task adapter and LoRA match the reference, each gradient into its task's slot") {
    const auto ns = kTsan ? std::vector<std::size_t>{129}
                    : kCpu ? std::vector<std::size_t>{1, 7, 129} : std::vector<std::size_t>{1, 7, 129, 1000};
    for (std::size_t n : ns) {
        check_lowrank<float>(Act::gelu, {n, 33, 33, 8, 5}, false, true, n);
        check_lowrank<float>(Act::relu, {n, 64, 64, 16, 32}, false, true, n + 1);
        check_lowrank<float>(Act::none, {n, 33, 65, 8, 4}, true, true, n + 2);
        check_lowrank<float>(Act::none, {n, 40, 24, 70, 3}, true, true, n + 3);
    }
    check_lowrank<double>(Act::none, {129, 33, 17, 4, 6}, true, true, 9);
    check_lowrank<pk::bf16>(Act::gelu, {129, 96, 96, 16, 7}, false, true, 10);
}

TEST_CASE("scale-shift forward and backward match the reference, single and mixed tasks") {
    const auto ns = kTsan ? std::vector<std::size_t>{129}
                    : kCpu ? std::vector<std::size_t>{1, 7, 129} : std::vector<std::size_t>{1, 7, 129, 1000};
    const auto ds = kCpu ? std::vector<std::size_t>{1, 33} : std::vector<std::size_t>{1, 33, 768};
    for (std::size_t n : ns)
        for (std::size_t d : ds) {
            check_scale_shift<float>(n, d, 1, n + d);
            check_scale_shift<float>(n, d, 32, n * d);
        }
    check_scale_shift<double>(kCpu ? 300 : 1000, 33, 3, 1);
    check_scale_shift<pk::bf16>(kCpu ? 300 : 1000, kCpu ? 40 : 768, 1, 2);
    check_scale_shift<pk::bf16>(129, 33, 5, 3);
}

TEST_CASE("softmax / Gumbel-softmax mixing matches the reference, pointer and stacked candidates") {
    const auto ms = kTsan ? std::vector<std::size_t>{5000}
                    : kCpu ? std::vector<std::size_t>{1, 7, 5000} : std::vector<std::size_t>{1, 7, 1000, 100003};
    for (std::size_t m : ms)
        for (int mode = 0; mode < 3; ++mode) {
            check_mix<float>(4, m, mode, false, m + mode);
            check_mix<float>(1, m, mode, true, m * 3 + mode);
            check_mix<float>(16, m, mode, true, m * 5 + mode);
        }
    check_mix<double>(5, 4097, 1, false, 1);
    check_mix<pk::bf16>(3, kCpu ? 5000 : 100003, 0, true, 2);
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

TEST_CASE("a task id outside [0, K) is a ConfigError naming the module, the row and the id") {
    std::vector<int> task{0, 1, 2, 7, 1, -1};
    pw::cuda::Buffer<int> dtask(task.size());
    dtask.upload(task);
    pw::cuda::Buffer<float> b(4096);
    float* p = b.data();
    CHECK_THROWS_WITH_AS(pk::multitask_scale_shift_forward<float>(p, dtask.data(), 6, 4, 3, p, p, p, "enc.block2.ss"),
                         doctest::Contains("enc.block2.ss: task id 7 of row 3 is outside [0, 3)"), pw::ConfigError);
    CHECK_THROWS_WITH_AS(pk::multitask_adapter_backward<float>(p, p, dtask.data(), 6, 4, 2, 3, p, p, Act::relu,
                                                               p, p, {}, "mt.adapter"),
                         doctest::Contains("task id 7 of row 3"), pw::ConfigError);
    CHECK_THROWS_WITH_AS(pk::multitask_lora_forward<float>(p, p, dtask.data(), 6, 4, 4, 2, 8, p, p, 1.f, p, p, "lora"),
                         doctest::Contains("task id -1 of row 5 is outside [0, 8)"), pw::ConfigError);
    CHECK_NOTHROW(pk::multitask_scale_shift_forward<float>(p, dtask.data(), 3, 4, 3, p, p, p, "first rows only"));
}

namespace {
/// The adapter backward with only some outputs wanted against the reference:
/// what is not wanted stays untouched (poisoned / its old value).
template <class E>
void check_adapter_subset(std::size_t n, std::size_t d, std::size_t r, bool want_dx, bool want_down, bool want_up_w,
                          bool want_up_b, std::uint64_t seed) {
    using A = pk::accum_t<E>;
    pw::Rng rng(seed);
    const kr::Dims dims{n, d, d, r, 1};
    const Vec x = random_vec<E>(n * d, rng), w1 = random_vec<E>(r * d, rng, 0.3), w2 = random_vec<E>(d * r, rng, 0.3);
    const Vec b1 = random_vec<E>(r, rng), b2 = random_vec<E>(d, rng), g = random_vec<E>(n * d, rng);
    Vec y, z, dx;
    kr::lowrank_forward(Act::gelu, dims, x, x, nullptr, w1, b1, w2, b2, 1.0, y, z);
    kr::Grads gr{random_vec<A>(w1.size(), rng), random_vec<A>(b1.size(), rng), random_vec<A>(w2.size(), rng),
                 random_vec<A>(b2.size(), rng)};
    const kr::Grads g0 = gr;
    kr::lowrank_backward(Act::gelu, dims, x, g, g, nullptr, w1, w2, 1.0, z, &dx, gr);
    auto dx_ = upload<E>(x), dw1 = upload<E>(w1), dw2 = upload<E>(w2), dg = upload<E>(g), dz = upload<A>(z);
    auto gw1 = upload<A>(g0.w1), gb1 = upload<A>(g0.b1), gw2 = upload<A>(g0.w2), gb2 = upload<A>(g0.b2);
    auto ddx = poisoned<E>(n * d);
    pk::adapter_backward<E>(dx_.data(), dg.data(), n, d, r, dw1.data(), dw2.data(), Act::gelu, dz.data(),
                            want_dx ? ddx.data() : nullptr,
                            {want_down ? gw1.data() : nullptr, want_down ? gb1.data() : nullptr,
                             want_up_w ? gw2.data() : nullptr, want_up_b ? gb2.data() : nullptr},
                            "test.subset");
    INFO("n=", n, " d=", d, " r=", r, " dx=", want_dx, " down=", want_down, " up_w=", want_up_w, " up_b=", want_up_b);
    const double tol = tolerance<E>();
    if (want_dx) CHECK(error(download(ddx, n * d), dx) < tol);
    else CHECK(std::isnan(download(ddx, 1)[0]));
    CHECK(error(download(gw1, w1.size()), want_down ? gr.w1 : g0.w1) < (want_down ? tol : 1e-300));
    CHECK(error(download(gb1, b1.size()), want_down ? gr.b1 : g0.b1) < (want_down ? tol : 1e-300));
    CHECK(error(download(gw2, w2.size()), want_up_w ? gr.w2 : g0.w2) < (want_up_w ? tol : 1e-300));
    CHECK(error(download(gb2, b2.size()), want_up_b ? gr.b2 : g0.b2) < (want_up_b ? tol : 1e-300));
}
}  // namespace

TEST_CASE("backward with dx not wanted, db2 only, and other subsets of the gradients") {
    for (std::size_t r : {8u, 70u}) {
        check_adapter_subset<float>(129, 33, r, false, true, true, true, r);    // no dx
        check_adapter_subset<float>(129, 33, r, false, false, false, true, r);  // db2 only
        check_adapter_subset<float>(7, 33, r, true, false, false, false, r);    // dx only
        check_adapter_subset<float>(129, 33, r, false, true, false, false, r);  // down only
        check_adapter_subset<double>(40, 17, r, true, false, true, false, r);   // dx and dW2
    }
}

TEST_CASE("an in-place adapter (y == h) gives the out-of-place result at every rank, also in bf16 past 64") {
    for (std::size_t r : {8u, 64u, 80u, 150u}) {
        pw::Rng rng(r);
        const std::size_t n = 45, d = 40;
        const kr::Dims dims{n, d, d, r, 1};
        const Vec h = random_vec<float>(n * d, rng), w1 = random_vec<float>(r * d, rng, 0.2);
        const Vec w2 = random_vec<float>(d * r, rng, 0.2), b1 = random_vec<float>(r, rng), b2 = random_vec<float>(d, rng);
        Vec y, z;
        kr::lowrank_forward(Act::relu, dims, h, h, nullptr, w1, b1, w2, b2, 1.0, y, z);
        auto dh = upload<float>(h), dw1 = upload<float>(w1), dw2 = upload<float>(w2), db1 = upload<float>(b1),
             db2 = upload<float>(b2);
        auto dz = poisoned<float>(n * r);
        pk::adapter_forward<float>(dh.data(), n, d, r, dw1.data(), db1.data(), dw2.data(), db2.data(), Act::relu,
                                   dh.data(), dz.data(), "inplace");
        INFO("r=", r);
        CHECK(error(download(dh, n * d), y) < 1e-5);
        CHECK(error(download(dz, n * r), z) < 1e-5);
    }
    // bf16 past rank 64: the passes are summed in fp32, so y is the reference rounded once.
    pw::Rng rng(5);
    const std::size_t n = 33, d = 48, r = 150;
    const kr::Dims dims{n, d, d, r, 1};
    const Vec h = random_vec<pk::bf16>(n * d, rng), w1 = random_vec<pk::bf16>(r * d, rng, 0.2);
    const Vec w2 = random_vec<pk::bf16>(d * r, rng, 0.2), b1 = random_vec<pk::bf16>(r, rng),
              b2 = random_vec<pk::bf16>(d, rng);
    Vec y, z;
    kr::lowrank_forward(Act::gelu, dims, h, h, nullptr, w1, b1, w2, b2, 1.0, y, z);
    auto dh = upload<pk::bf16>(h), dw1 = upload<pk::bf16>(w1), dw2 = upload<pk::bf16>(w2), db1 = upload<pk::bf16>(b1),
         db2 = upload<pk::bf16>(b2);
    auto dy = poisoned<pk::bf16>(n * d);
    pk::adapter_forward<pk::bf16>(dh.data(), n, d, r, dw1.data(), db1.data(), dw2.data(), db2.data(), Act::gelu,
                                  dy.data(), nullptr, "bf16");
    const Vec got = download(dy, n * d);
    double worst = 0;  // in units of the bf16 spacing at the reference value (2^-8 relative): at most ~1 rounding
    for (std::size_t i = 0; i < got.size(); ++i)
        worst = std::max(worst, std::abs(got[i] - y[i]) / std::max(std::abs(y[i]), 1e-3) * 256.0);
    CHECK(worst <= 1.01);
}

TEST_CASE("caller-provided workspaces: exact size works, too small or misaligned is a ConfigError") {
    const std::size_t n = 129, d = 33, r = 8;
    const std::size_t bytes = pk::adapter_backward_workspace_bytes(n, d, r, sizeof(float));
    REQUIRE(bytes > 0);
    pw::Rng rng(3);
    const Vec x = random_vec<float>(n * d, rng), w = random_vec<float>(r * d, rng), g = random_vec<float>(n * d, rng);
    const Vec z = random_vec<float>(n * r, rng);
    auto dx_ = upload<float>(x), dw1 = upload<float>(w), dw2 = upload<float>(w), dg = upload<float>(g),
         dz = upload<float>(z);
    auto gw1 = upload<float>(Vec(r * d, 0.0)), gw2 = upload<float>(Vec(d * r, 0.0));
    auto ref1 = upload<float>(Vec(r * d, 0.0)), ref2 = upload<float>(Vec(d * r, 0.0));
    pw::cuda::Buffer<unsigned char> ws(bytes + 256);
    const auto run = [&](float* o1, float* o2, pk::Workspace w_) {
        pk::adapter_backward<float>(dx_.data(), dg.data(), n, d, r, dw1.data(), dw2.data(), Act::relu, dz.data(),
                                    nullptr, {o1, nullptr, o2, nullptr}, "enc.adapter", w_);
    };
    run(ref1.data(), ref2.data(), {});
    run(gw1.data(), gw2.data(), {ws.data(), bytes});
    CHECK(error(download(gw1, r * d), download(ref1, r * d)) == 0);  // same sizes, same order: same bits
    CHECK(error(download(gw2, d * r), download(ref2, d * r)) == 0);
    CHECK_THROWS_WITH_AS(run(gw1.data(), gw2.data(), {ws.data(), bytes - 1}),
                         doctest::Contains("enc.adapter: the caller's workspace has"), pw::ConfigError);
    CHECK_THROWS_WITH_AS(run(gw1.data(), gw2.data(), {ws.data() + 4, bytes}), doctest::Contains("256-byte aligned"),
                         pw::ConfigError);
    CHECK_THROWS_AS(run(gw1.data(), gw2.data(), {nullptr, bytes}), pw::ConfigError);
}

TEST_CASE("two contexts on one thread: each has its own workspace, results as on one") {
    pw::cuda::Context a, b;
    const std::size_t d = 33, r = 8;
    pw::Rng rng(4);
    const auto backward_on = [&](pw::cuda::Context& ctx, std::size_t n, std::uint64_t seed) {
        pw::cuda::ContextScope use(ctx);
        pw::Rng local(seed);
        const Vec x = random_vec<float>(n * d, local), w = random_vec<float>(r * d, local, 0.3);
        const Vec g = random_vec<float>(n * d, local), b1 = random_vec<float>(r, local), b2 = random_vec<float>(d, local);
        Vec y, z, dx;
        kr::lowrank_forward(Act::relu, {n, d, d, r, 1}, x, x, nullptr, w, b1, w, b2, 1.0, y, z);
        kr::Grads gr{Vec(r * d, 0.0), Vec(r, 0.0), Vec(d * r, 0.0), Vec(d, 0.0)};
        kr::lowrank_backward(Act::relu, {n, d, d, r, 1}, x, g, g, nullptr, w, w, 1.0, z, &dx, gr);
        auto dx_ = upload<float>(x), dw = upload<float>(w), dg = upload<float>(g), dz = upload<float>(z);
        auto gw1 = upload<float>(Vec(r * d, 0.0)), gw2 = upload<float>(Vec(d * r, 0.0));
        pk::adapter_backward<float>(dx_.data(), dg.data(), n, d, r, dw.data(), dw.data(), Act::relu, dz.data(),
                                    nullptr, {gw1.data(), nullptr, gw2.data(), nullptr}, "ctx");
        CHECK(error(download(gw1, r * d), gr.w1) < 1e-5);
        CHECK(error(download(gw2, d * r), gr.w2) < 1e-5);
    };
    backward_on(a, 129, 1);
    backward_on(b, 1000, 2);  // larger: B's workspace grows, A's is untouched
    CHECK(a.workspace_bytes() > 0);
    CHECK(b.workspace_bytes() > a.workspace_bytes());
    CHECK(a.workspace(1) != b.workspace(1));
    const void* before = a.workspace(1);
    backward_on(a, 129, 3);
    CHECK(a.workspace(1) == before);  // reused, not reallocated
}

TEST_CASE("ContextScope makes the context's device current, and restores the previous one") {
    if (pw::cuda::device_count() < 2) {
        MESSAGE("one device: nothing to switch");
        return;
    }
    int dev = -1;
    REQUIRE(cudaGetDevice(&dev) == cudaSuccess);
    REQUIRE(dev == 0);
    pw::cuda::Context second(1);
    REQUIRE(cudaGetDevice(&dev) == cudaSuccess);
    CHECK(dev == 0);  // making a context leaves the current device alone
    {
        pw::cuda::ContextScope use(second);
        REQUIRE(cudaGetDevice(&dev) == cudaSuccess);
        CHECK(dev == 1);
        pw::cuda::Buffer<float> onto_second(16);
#ifdef PATCHWORK_CPU_CUDA
        CHECK(cpu_cuda::device_of(onto_second.data()) == 1);
#endif
    }
    REQUIRE(cudaGetDevice(&dev) == cudaSuccess);
    CHECK(dev == 0);
    CHECK_THROWS_WITH_AS((void)pw::cuda::Context(pw::cuda::device_count()), doctest::Contains("does not exist"),
                         pw::CudaError);
}

TEST_CASE("column sums: blocks that take several chunks give the same bits as one chunk per block") {
    for (std::size_t rows : {1u, 255u, 256u, 1500u}) {
        const std::size_t cols = 37;
        pw::Rng rng(rows);
        const Vec g = random_vec<float>(rows * cols, rng);
        auto dg = upload<float>(g);
        auto one = upload<float>(Vec(cols, 0.5)), few = upload<float>(Vec(cols, 0.5));
        const pk::detail::load_element<float> f{dg.data(), cols};
        pk::detail::add_column_sums(f, rows, cols, one.data(), "colsum");
        pk::detail::add_column_sums(f, rows, cols, few.data(), "colsum", 2);  // 2 block rows for up to 6 chunks
        Vec want(cols, 0.5);
        for (std::size_t i = 0; i < rows; ++i)
            for (std::size_t c = 0; c < cols; ++c) want[c] += g[i * cols + c];
        INFO("rows=", rows);
        CHECK(error(download(one, cols), want) < 1e-5);
        CHECK(error(download(few, cols), download(one, cols)) == 0);
    }
}
