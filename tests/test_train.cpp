#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <numbers>
#include <sstream>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/train/batch.hpp"
#include "patchwork/train/clip.hpp"
#include "patchwork/train/loss.hpp"
#include "patchwork/train/metrics.hpp"
#include "patchwork/train/optimizer.hpp"
#include "patchwork/train/progress.hpp"
#include "patchwork/train/schedule.hpp"
#include "patchwork/train/trainer.hpp"

namespace pw = patchwork;

using Linear64 = pw::BasicLinear<double>;
using T2 = pw::Tensor<double>;

namespace {

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

/// The message of the exception `f` throws as E (empty if it throws nothing).
template <class E, class F>
std::string message_of(F&& f) {
    try {
        f();
    } catch (const E& e) {
        return e.what();
    }
    return {};
}

/// Central-difference gradient of a scalar function of a tensor.
template <class F>
T2 numeric_gradient(F&& f, T2 x, double h = 1e-6) {
    T2 g(x.shape());
    for (std::size_t i = 0; i < x.size(); ++i) {
        const double v = x[i];
        x[i] = v + h;
        const double lp = f(x);
        x[i] = v - h;
        const double lm = f(x);
        x[i] = v;
        g[i] = (lp - lm) / (2 * h);
    }
    return g;
}

/// A tiny parameter [0.5, -1.5] for the optimiser tests.
pw::Parameter<double> tiny_parameter() {
    pw::Parameter<double> p("w", pw::Role::weight, pw::Shape{2});
    p.value[0] = 0.5;
    p.value[1] = -1.5;
    return p;
}
/// The gradient the optimiser tests use: g_i = 2 p_i + 0.1 (i + 1), so it moves with p.
double tiny_grad(double p, std::size_t i) { return 2 * p + 0.1 * double(i + 1); }
void set_tiny_grad(pw::Parameter<double>& p) {
    for (std::size_t i = 0; i < 2; ++i) p.grad[i] = tiny_grad(p.value[i], i);
}

/// `n` points in 2-D, class 1 when x0 + x1 > 0, in batches of `batch`.
pw::VectorSource<double> separable(std::size_t n, std::size_t batch, std::uint64_t seed) {
    pw::Rng rng(seed);
    pw::VectorSource<double> src;
    for (std::size_t start = 0; start < n; start += batch) {
        pw::Batch<double> b{T2(pw::Shape{batch, 2}), {}};
        for (std::size_t r = 0; r < batch; ++r) {
            double x0 = rng.uniform(-1, 1), x1 = rng.uniform(-1, 1);
            if (std::abs(x0 + x1) < 0.2) x0 += x0 + x1 > 0 ? 0.2 : -0.2;  // a margin
            b.x(r, 0) = x0;
            b.x(r, 1) = x1;
            b.labels.push_back(x0 + x1 > 0 ? 1 : 0);
        }
        src.push_back(std::move(b));
    }
    return src;
}

/// A source that builds its batches on demand and returns them by value.
struct ByValueSource {
    using Scalar = double;
    std::size_t epoch = 0;
    void start_epoch(std::size_t e) { epoch = e; }
    [[nodiscard]] std::size_t batches() const { return 3; }
    [[nodiscard]] pw::Batch<double> batch(std::size_t i) const {
        pw::Batch<double> b{T2(pw::Shape{2, 2}, {1.0, double(i), -1.0, double(epoch)}), {0, 1}};
        return b;
    }
};
static_assert(pw::BatchSource<ByValueSource>);
static_assert(!pw::BatchSource<int>);
static_assert(pw::Optimizer<pw::AdamW> && pw::Optimizer<pw::BasicSGD<double>>);

}  // namespace

// ---------------------------------------------------------------- losses

TEST_CASE("cross_entropy: hand values and gradient softmax - onehot over N") {
    const T2 z(pw::Shape{2, 3}, {1, 2, 3, 0, 0, 0});
    const std::vector<int> y{2, 0};
    const auto loss = pw::cross_entropy(z, y);
    const double s = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
    const double l0 = std::log(s) - 3, l1 = std::log(3.0);
    CHECK(loss.value == doctest::Approx((l0 + l1) / 2).epsilon(1e-14));
    CHECK(loss.value == doctest::Approx(0.7531091266).epsilon(1e-9));
    REQUIRE(loss.grad.shape() == z.shape());
    CHECK(loss.grad(0, 0) == doctest::Approx(std::exp(1.0) / s / 2).epsilon(1e-14));
    CHECK(loss.grad(0, 2) == doctest::Approx((std::exp(3.0) / s - 1) / 2).epsilon(1e-14));
    CHECK(loss.grad(1, 0) == doctest::Approx((1.0 / 3 - 1) / 2).epsilon(1e-14));
    CHECK(loss.grad(1, 1) == doctest::Approx(1.0 / 6).epsilon(1e-14));
    double row_sum = 0;
    for (std::size_t j = 0; j < 3; ++j) row_sum += loss.grad(0, j);
    CHECK(std::abs(row_sum) < 1e-15);
}

TEST_CASE("cross_entropy: large logits stay finite (max subtraction)") {
    const pw::Tensor<float> z(pw::Shape{2, 2}, {1000.f, 0.f, -1000.f, 1000.f});
    const auto loss = pw::cross_entropy(z, std::vector<int>{0, 0});
    CHECK(std::isfinite(loss.value));
    CHECK(loss.value == doctest::Approx(1000.0f));  // (0 + 2000) / 2
    for (float g : loss.grad) CHECK(std::isfinite(g));
    CHECK(loss.grad(1, 0) == doctest::Approx(-0.5f));
}

TEST_CASE("cross_entropy: gradient matches finite differences (double)") {
    pw::Rng rng(7);
    T2 z(pw::Shape{4, 5});
    pw::init::normal(z, rng, 0.0, 2.0);
    const std::vector<int> y{3, 0, 4, 1};
    const auto loss = pw::cross_entropy(z, y);
    const T2 num = numeric_gradient([&](const T2& t) { return pw::cross_entropy(t, y).value; }, z);
    CHECK(pw::testing::relative_error(loss.grad, num) < 1e-6);
    // Leading dimensions are flattened into rows: [2, 2, 5] takes 4 labels.
    T2 z3 = z;
    z3.reshape(pw::Shape{2, 2, 5});
    CHECK(pw::cross_entropy(z3, y).value == doctest::Approx(loss.value).epsilon(1e-15));
}

TEST_CASE("cross_entropy: label count and range errors name the values") {
    const T2 z(pw::Shape{4, 3});
    const auto count = message_of<pw::ShapeError>([&] { (void)pw::cross_entropy(z, std::vector<int>{0, 1, 2}); });
    CHECK(contains(count, "3 labels"));
    CHECK(contains(count, "4 rows"));
    CHECK(contains(count, "[4, 3]"));
    const auto range = message_of<pw::ConfigError>([&] { (void)pw::cross_entropy(z, std::vector<int>{0, 1, 7, 2}); });
    CHECK(contains(range, "label 7"));
    CHECK(contains(range, "row 2"));
    CHECK(contains(range, "[0, 3)"));
    CHECK_THROWS_AS((void)pw::cross_entropy(z, std::vector<int>{0, -1, 0, 0}), pw::ConfigError);
    CHECK_THROWS_AS((void)pw::cross_entropy(T2{}, std::vector<int>{}), pw::ShapeError);
}

TEST_CASE("cross_entropy with a class count per row: equals the narrow loss, padding gets no gradient") {
    pw::Rng rng(8);
    T2 z(pw::Shape{4, 6});
    pw::init::normal(z, rng, 0.0, 2.0);
    const std::vector<int> y{3, 0, 1, 5};
    const std::vector<std::size_t> classes{4, 2, 2, 6};
    const auto loss = pw::cross_entropy(z, y, classes);
    // Each row alone, through the ordinary loss on its first C_r logits.
    double sum = 0;
    for (std::size_t r = 0; r < 4; ++r) {
        T2 row(pw::Shape{1, classes[r]});
        for (std::size_t j = 0; j < classes[r]; ++j) row[j] = z(r, j);
        const auto one = pw::cross_entropy(row, std::vector<int>{y[r]});
        sum += one.value;
        for (std::size_t j = 0; j < 6; ++j)
            CHECK(loss.grad(r, j) == doctest::Approx(j < classes[r] ? one.grad[j] / 4 : 0.0).epsilon(1e-14));
    }
    CHECK(loss.value == doctest::Approx(sum / 4).epsilon(1e-14));
    const T2 num = numeric_gradient([&](const T2& t) { return pw::cross_entropy(t, y, classes).value; }, z);
    CHECK(pw::testing::relative_error(loss.grad, num) < 1e-6);
    // Every row at full width is the ordinary loss, bit for bit.
    const std::vector<std::size_t> full(4, 6);
    const auto wide = pw::cross_entropy(z, y, full), plain = pw::cross_entropy(z, y);
    CHECK(wide.value == plain.value);
    CHECK(pw::testing::relative_error(wide.grad, plain.grad) == 0.0);
    // Accuracy over the first C classes only.
    const T2 p(pw::Shape{2, 3}, {0, 1, 9, 2, 1, 9});
    CHECK(pw::count_correct(p, std::vector<int>{1, 0}, 2) == 2);
    CHECK(pw::count_correct(p, std::vector<int>{1, 0}, 3) == 0);
    CHECK_THROWS_AS((void)pw::count_correct(p, std::vector<int>{1, 0}, 4), pw::ShapeError);
}

TEST_CASE("cross_entropy with a class count per row: errors name the row") {
    const T2 z(pw::Shape{3, 4});
    const std::vector<int> y{0, 1, 2};
    const auto count = message_of<pw::ShapeError>(
        [&] { (void)pw::cross_entropy(z, y, std::vector<std::size_t>{4, 4}); });
    CHECK(contains(count, "2 class counts for 3 rows"));
    const auto wide = message_of<pw::ConfigError>(
        [&] { (void)pw::cross_entropy(z, y, std::vector<std::size_t>{4, 5, 4}); });
    CHECK(contains(wide, "row 1 has 5 classes, outside [1, 4]"));
    CHECK_THROWS_AS((void)pw::cross_entropy(z, y, std::vector<std::size_t>{4, 0, 4}), pw::ConfigError);
    const auto label = message_of<pw::ConfigError>(
        [&] { (void)pw::cross_entropy(z, y, std::vector<std::size_t>{4, 4, 2}); });
    CHECK(contains(label, "label 2 at row 2 is outside [0, 2)"));
}

TEST_CASE("mse: hand values, finite differences, shape errors") {
    const T2 y(pw::Shape{2, 2}, {1, 2, 3, 4});
    const T2 t(pw::Shape{2, 2}, {0, 2, 5, 4});
    const auto loss = pw::mse(y, t);
    CHECK(loss.value == doctest::Approx((1.0 + 0 + 4 + 0) / 4).epsilon(1e-15));
    CHECK(loss.grad[0] == doctest::Approx(2.0 * 1 / 4));
    CHECK(loss.grad[1] == 0.0);
    CHECK(loss.grad[2] == doctest::Approx(2.0 * -2 / 4));

    pw::Rng rng(11);
    T2 a(pw::Shape{3, 4}), b(pw::Shape{3, 4});
    pw::init::normal(a, rng, 0.0, 1.0);
    pw::init::normal(b, rng, 0.0, 1.0);
    const T2 num = numeric_gradient([&](const T2& x) { return pw::mse(x, b).value; }, a);
    CHECK(pw::testing::relative_error(pw::mse(a, b).grad, num) < 1e-6);

    const auto msg = message_of<pw::ShapeError>([&] { (void)pw::mse(a, T2(pw::Shape{4, 3})); });
    CHECK(contains(msg, "[3, 4]"));
    CHECK(contains(msg, "[4, 3]"));
}

TEST_CASE("metrics: argmax_rows (first on ties) and accuracy") {
    const T2 z(pw::Shape{3, 3}, {0.1, 0.9, 0.0, 5, 5, 1, -1, -3, -0.5});
    CHECK(pw::argmax_rows(z) == std::vector<int>{1, 0, 2});
    CHECK(pw::accuracy(z, std::vector<int>{1, 1, 2}) == doctest::Approx(2.0 / 3));
    CHECK(pw::count_correct(z, std::vector<int>{1, 0, 2}) == 3);
    CHECK_THROWS_AS((void)pw::accuracy(z, std::vector<int>{1}), pw::ShapeError);
}

// ---------------------------------------------------------------- optimisers

TEST_CASE("SGD: plain, momentum and nesterov steps equal the formulas") {
    SUBCASE("plain, first step by hand") {
        auto p = tiny_parameter();
        pw::BasicSGD<double> opt{{&p}, {.lr = 0.1}};
        set_tiny_grad(p);  // g = [1.1, -2.8]
        opt.step();
        CHECK(p.value[0] == doctest::Approx(0.5 - 0.1 * 1.1).epsilon(1e-15));
        CHECK(p.value[1] == doctest::Approx(-1.5 + 0.1 * 2.8).epsilon(1e-15));
        CHECK(opt.state_size() == 0);  // no momentum, no state
    }
    for (const bool nesterov : {false, true}) {
        CAPTURE(nesterov);
        const double lr = 0.05, mu = 0.9, wd = 0.01;
        auto p = tiny_parameter();
        pw::BasicSGD<double> opt{{&p}, {.lr = lr, .momentum = mu, .nesterov = nesterov, .weight_decay = wd}};
        double w[2] = {0.5, -1.5}, buf[2] = {0, 0};
        for (int step = 0; step < 3; ++step) {
            set_tiny_grad(p);
            opt.step();
            for (std::size_t i = 0; i < 2; ++i) {
                const double g = tiny_grad(w[i], i) + wd * w[i];
                buf[i] = step == 0 ? g : mu * buf[i] + g;
                w[i] -= lr * (nesterov ? g + mu * buf[i] : buf[i]);
                CHECK(p.value[i] == doctest::Approx(w[i]).epsilon(1e-14));
            }
        }
        CHECK(opt.state_size() == 2);
    }
    // Two steps of momentum by hand: g1 = 1.1, b1 = 1.1, p1 = 0.5 - 0.1*1.1 = 0.39;
    // g2 = 2*0.39 + 0.1 = 0.88, b2 = 0.9*1.1 + 0.88 = 1.87, p2 = 0.39 - 0.187 = 0.203.
    auto p = tiny_parameter();
    pw::BasicSGD<double> opt{{&p}, {.lr = 0.1, .momentum = 0.9}};
    for (int i = 0; i < 2; ++i) {
        set_tiny_grad(p);
        opt.step();
    }
    CHECK(p.value[0] == doctest::Approx(0.203).epsilon(1e-14));
}

TEST_CASE("Adam and AdamW steps equal the formulas (bias correction, eps outside the root)") {
    SUBCASE("Adam's first step is lr * g / (|g| + eps)") {
        auto p = tiny_parameter();
        pw::BasicAdam<double> opt{{&p}, {.lr = 0.01}};
        CHECK(opt.state_size() == 0);  // lazily allocated
        set_tiny_grad(p);
        opt.step();
        CHECK(opt.state_size() == 4);
        CHECK(p.value[0] == doctest::Approx(0.5 - 0.01 * 1.1 / (1.1 + 1e-8)).epsilon(1e-14));
        CHECK(p.value[1] == doctest::Approx(-1.5 + 0.01 * 2.8 / (2.8 + 1e-8)).epsilon(1e-14));
    }
    for (const bool decoupled : {false, true}) {
        for (const double wd : {0.0, 0.1}) {
            CAPTURE(decoupled);
            CAPTURE(wd);
            const double lr = 0.02, b1 = 0.8, b2 = 0.95, eps = 1e-3;
            auto p = tiny_parameter();
            pw::BasicAdam<double> adam{{&p}, {.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd}};
            pw::BasicAdamW<double> adamw{{&p}, {.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd}};
            double w[2] = {0.5, -1.5}, m[2] = {0, 0}, v[2] = {0, 0};
            for (int t = 1; t <= 3; ++t) {
                set_tiny_grad(p);
                if (decoupled)
                    adamw.step();
                else
                    adam.step();
                for (std::size_t i = 0; i < 2; ++i) {
                    double g = tiny_grad(w[i], i);
                    if (decoupled)
                        w[i] -= lr * wd * w[i];
                    else
                        g += wd * w[i];
                    m[i] = b1 * m[i] + (1 - b1) * g;
                    v[i] = b2 * v[i] + (1 - b2) * g * g;
                    const double mhat = m[i] / (1 - std::pow(b1, t)), vhat = v[i] / (1 - std::pow(b2, t));
                    w[i] -= lr * mhat / (std::sqrt(vhat) + eps);
                    CHECK(p.value[i] == doctest::Approx(w[i]).epsilon(1e-13));
                }
            }
        }
    }
}

TEST_CASE("AdamW: decoupled decay shrinks a parameter with zero gradient, Adam's L2 does not alone") {
    auto p = tiny_parameter();
    pw::BasicAdamW<double> opt{{&p}, {.lr = 0.1, .weight_decay = 0.5}};
    p.grad.zero();
    opt.step();  // p (1 - 0.05), then m = v = 0: no Adam move
    CHECK(p.value[0] == doctest::Approx(0.5 * 0.95).epsilon(1e-15));
    CHECK(p.value[1] == doctest::Approx(-1.5 * 0.95).epsilon(1e-15));
}

TEST_CASE("optimisers: float aliases, CTAD and float steps") {
    pw::Linear lin(3, 2);
    pw::AdamW opt{pw::trainable_parameters(lin), {.lr = 1e-2}};
    static_assert(std::is_same_v<decltype(opt), pw::BasicAdamW<float>>);
    pw::Parameter<double> q("q", pw::Role::bias, pw::Shape{1});
    pw::BasicSGD sgd{std::vector<pw::Parameter<double>*>{&q}};  // deduces double
    static_assert(std::is_same_v<decltype(sgd)::Scalar, double>);
    const pw::Tensor<float> before = lin.weight.value;
    lin.weight.grad.fill(1.f);
    opt.step();
    CHECK(lin.weight.value[0] == doctest::Approx(before[0] * (1 - 1e-2f * 1e-2f) - 1e-2f).epsilon(1e-5));
    CHECK(opt.steps() == 1);
}

TEST_CASE("optimisers: frozen parameters are never touched, even when passed") {
    auto a = tiny_parameter();
    auto b = tiny_parameter();
    pw::BasicAdamW<double> opt{{&a, &b}, {.lr = 0.1, .weight_decay = 0.3}};
    set_tiny_grad(a);
    b.set_trainable(false);  // frozen after being handed over: no gradient buffer at all
    const T2 b_before = b.value;
    for (int i = 0; i < 3; ++i) opt.step();
    CHECK(std::memcmp(b.value.data(), b_before.data(), sizeof(double) * 2) == 0);
    CHECK(a.value[0] != 0.5);
    CHECK(opt.state_size() == 4);  // moments for `a` only
    opt.zero_grad();               // also safe with a frozen member
    CHECK(a.grad[0] == 0.0);
}

TEST_CASE("optimisers: parameter groups with their own learning rates; set_lr and set_lr_factor") {
    auto a = tiny_parameter();
    auto b = tiny_parameter();
    pw::BasicSGD<double> opt{{&a}, {.lr = 0.1}};
    opt.add_group({&b}, {.lr = 0.01});
    REQUIRE(opt.groups().size() == 2);
    set_tiny_grad(a);
    set_tiny_grad(b);
    opt.step();
    CHECK(a.value[0] == doctest::Approx(0.5 - 0.1 * 1.1).epsilon(1e-15));
    CHECK(b.value[0] == doctest::Approx(0.5 - 0.01 * 1.1).epsilon(1e-15));

    opt.set_lr(0.2);  // group ratios kept
    CHECK(opt.lr() == doctest::Approx(0.2));
    CHECK(opt.lr(1) == doctest::Approx(0.02));
    opt.set_lr_factor(0.5);  // what a schedule does; bases unchanged
    CHECK(opt.lr() == doctest::Approx(0.1));
    CHECK(opt.lr(1) == doctest::Approx(0.01));
    CHECK(opt.groups()[1].options.lr == doctest::Approx(0.02));
    const double a0 = a.value[0], b0 = b.value[0];
    a.grad.fill(1);
    b.grad.fill(1);
    opt.step();
    CHECK(a.value[0] == doctest::Approx(a0 - 0.1).epsilon(1e-15));
    CHECK(b.value[0] == doctest::Approx(b0 - 0.01).epsilon(1e-15));
    CHECK_THROWS_AS((void)opt.lr(2), pw::ConfigError);
}

TEST_CASE("optimisers: invalid options throw ConfigError naming the value") {
    auto p = tiny_parameter();
    std::vector<pw::Parameter<double>*> ps{&p};
    using SGD = pw::BasicSGD<double>;
    using Adam = pw::BasicAdam<double>;
    using AdamW = pw::BasicAdamW<double>;
    CHECK(contains(message_of<pw::ConfigError>([&] { SGD(ps, {.lr = -0.1}); }), "lr=-0.1"));
    CHECK(contains(message_of<pw::ConfigError>([&] { SGD(ps, {.lr = 0}); }), "lr=0"));
    CHECK_THROWS_AS(SGD(ps, {.lr = std::numeric_limits<double>::quiet_NaN()}), pw::ConfigError);
    CHECK(contains(message_of<pw::ConfigError>([&] { SGD(ps, {.momentum = 1.0}); }), "momentum=1"));
    CHECK(contains(message_of<pw::ConfigError>([&] { SGD(ps, {.nesterov = true}); }), "nesterov"));
    CHECK_THROWS_AS(SGD(ps, {.weight_decay = -1}), pw::ConfigError);
    CHECK(contains(message_of<pw::ConfigError>([&] { Adam(ps, {.beta1 = 1.0}); }), "beta1=1"));
    CHECK(contains(message_of<pw::ConfigError>([&] { AdamW(ps, {.beta2 = -0.5}); }), "beta2=-0.5"));
    CHECK(contains(message_of<pw::ConfigError>([&] { Adam(ps, {.eps = 0}); }), "eps=0"));
    CHECK_THROWS_AS(AdamW(ps, {.weight_decay = -0.01}), pw::ConfigError);
    // Groups are validated too, and a parameter cannot be in two groups.
    SGD opt(ps, {.lr = 0.1});
    auto q = tiny_parameter();
    CHECK(contains(message_of<pw::ConfigError>([&] { opt.add_group({&q}, {.lr = -2}); }), "group 1"));
    CHECK(contains(message_of<pw::ConfigError>([&] { opt.add_group({&q, &p}, {}); }), "given twice"));
    CHECK(contains(message_of<pw::ConfigError>([&] { opt.add_group({nullptr}, {}); }), "null"));
    CHECK_THROWS_AS(opt.set_lr(0), pw::ConfigError);
    CHECK_THROWS_AS(opt.set_lr_factor(-1), pw::ConfigError);
    CHECK_THROWS_AS(opt.set_lr_factor(std::numeric_limits<double>::infinity()), pw::ConfigError);
}

// ---------------------------------------------------------------- schedules, clipping

TEST_CASE("schedules: warm-up then cosine, and constant") {
    const pw::WarmupCosine s{.warmup_steps = 10, .total_steps = 110, .min_ratio = 0.1};
    CHECK(s.factor(0) == doctest::Approx(0.1));
    CHECK(s.factor(4) == doctest::Approx(0.5));
    CHECK(s.factor(9) == doctest::Approx(1.0));
    CHECK(s.factor(10) == doctest::Approx(1.0));
    CHECK(s.factor(60) == doctest::Approx(0.55));  // half-way: 0.1 + 0.9 * 0.5
    CHECK(s.factor(35) == doctest::Approx(0.1 + 0.9 * 0.5 * (1 + std::cos(std::numbers::pi / 4))));
    CHECK(s.factor(110) == doctest::Approx(0.1));
    CHECK(s.factor(100000) == doctest::Approx(0.1));
    for (std::size_t i = 10; i < 110; ++i) CHECK(s.factor(i + 1) <= s.factor(i));
    CHECK(pw::WarmupCosine{0, 100}.factor(0) == doctest::Approx(1.0));
    CHECK(pw::WarmupCosine{0, 100}.factor(99) > 0.0);
    const std::function<double(std::size_t)> f = pw::WarmupCosine{2, 4};
    CHECK(f(0) == doctest::Approx(0.5));
    CHECK(pw::Constant{0.3}.factor(123) == 0.3);
    CHECK(pw::Constant{}(7) == 1.0);

    CHECK(contains(message_of<pw::ConfigError>([] { (void)pw::WarmupCosine{0, 0}.factor(0); }), "total_steps=0"));
    CHECK(contains(message_of<pw::ConfigError>([] { (void)pw::WarmupCosine{20, 10}.factor(0); }),
                   "warmup_steps=20"));
    CHECK(contains(message_of<pw::ConfigError>([] { (void)pw::WarmupCosine{1, 10, 1.5}.factor(0); }),
                   "min_ratio=1.5"));
    CHECK_THROWS_AS((void)pw::Constant{-1}.factor(0), pw::ConfigError);
}

TEST_CASE("clip_grad_norm: global norm over trainable parameters, scaled only above the limit") {
    pw::Parameter<double> a("a", pw::Role::weight, pw::Shape{2});
    pw::Parameter<double> b("b", pw::Role::bias, pw::Shape{1});
    pw::Parameter<double> frozen("f", pw::Role::bias, pw::Shape{1}, false);
    std::vector<pw::Parameter<double>*> ps{&a, &b, &frozen};
    a.grad[0] = 3;
    b.grad[0] = 4;
    CHECK(pw::grad_norm(ps) == doctest::Approx(5.0));
    CHECK(pw::clip_grad_norm(ps, 10.0) == doctest::Approx(5.0));
    CHECK(a.grad[0] == 3.0);  // below the limit: untouched
    CHECK(pw::clip_grad_norm(ps, 1.0) == doctest::Approx(5.0));
    CHECK(a.grad[0] == doctest::Approx(0.6));
    CHECK(a.grad[1] == 0.0);
    CHECK(b.grad[0] == doctest::Approx(0.8));
    CHECK(pw::grad_norm(ps) == doctest::Approx(1.0));
    CHECK(frozen.grad.empty());
    CHECK(contains(message_of<pw::ConfigError>([&] { pw::clip_grad_norm(ps, 0.0); }), "max_norm=0"));

    Linear64 lin(2, 2);
    lin.weight.grad.fill(1);
    lin.bias.grad.fill(1);  // norm sqrt(6)
    CHECK(pw::clip_grad_norm(lin, 1.0) == doctest::Approx(std::sqrt(6.0)));
    CHECK(lin.bias.grad[0] == doctest::Approx(1 / std::sqrt(6.0)));
}

// ---------------------------------------------------------------- progress

TEST_CASE("progress: plain log lines off a terminal, an updating bar on one") {
    std::ostringstream plain;
    pw::Progress p(plain, false, 2);
    CHECK_FALSE(p.interactive());
    for (std::size_t s = 1; s <= 4; ++s)
        p.update({.epoch = 0, .epochs = 2, .step = s, .steps = 4, .loss = 0.5, .samples_per_second = 1234,
                  .elapsed_seconds = double(s)});
    p.end_epoch({.epoch = 0, .epochs = 2, .loss = 0.25, .accuracy = 0.875, .samples_per_second = 1000,
                 .seconds = 4, .lr = 0.001});
    const std::string out = plain.str();
    CHECK(contains(out, "epoch 1/2  step 2/4  loss 0.5000  1.23k samples/s  ETA 0:06\n"));
    CHECK_FALSE(contains(out, "step 1/4"));
    CHECK_FALSE(contains(out, "step 4/4"));  // the epoch line follows instead
    CHECK(contains(out, "epoch 1/2  done  loss 0.2500  acc 87.50%"));
    CHECK(contains(out, "lr 0.001"));
    CHECK_FALSE(contains(out, "\r"));

    std::ostringstream tty;
    pw::Progress bar(tty, true);
    CHECK(bar.interactive());
    bar.update({.epoch = 0, .epochs = 1, .step = 1, .steps = 4, .loss = 1.0, .samples_per_second = 10,
                .elapsed_seconds = 0.5});
    bar.update({.epoch = 0, .epochs = 1, .step = 2, .steps = 4, .loss = 1.0, .samples_per_second = 10,
                .elapsed_seconds = 0.52});  // within the redraw interval: skipped
    bar.update({.epoch = 0, .epochs = 1, .step = 4, .steps = 4, .loss = 0.9, .samples_per_second = 10,
                .elapsed_seconds = 0.6});  // the last step is always drawn
    bar.end_epoch({.epoch = 0, .epochs = 1, .loss = 0.9});
    const std::string t = tty.str();
    CHECK(contains(t, "\repoch 1/1 [######..................] 1/4  loss 1.0000"));
    CHECK_FALSE(contains(t, "2/4"));
    CHECK(contains(t, "[########################] 4/4"));
    CHECK(contains(t, "\repoch 1/1  done  loss 0.9000"));
    CHECK(t.back() == '\n');

    CHECK(pw::Progress::format_duration(3725) == "1:02:05");
    CHECK(pw::Progress::format_duration(65) == "1:05");
    CHECK(pw::Progress::format_rate(45600000) == "45.6M");
    std::ostringstream not_a_terminal;
    CHECK_FALSE(pw::is_terminal(not_a_terminal));
}

// ---------------------------------------------------------------- trainer

TEST_CASE("fit: frozen parameters stay bit-identical while trainable ones change") {
    pw::manual_seed(5);
    pw::Sequential model(Linear64(4, 3), pw::BasicTanh<double>{}, Linear64(3, 2));
    auto& first = model.get<0>();
    first.weight.set_trainable(false);
    std::vector<pw::Parameter<double>*> all;  // frozen ones included on purpose
    model.visit([&](pw::Parameter<double>& p) { all.push_back(&p); });
    pw::BasicAdamW<double> opt{all, {.lr = 0.05, .weight_decay = 0.1}};

    pw::Rng rng(3);
    pw::VectorSource<double> src;
    for (int i = 0; i < 2; ++i) {
        pw::Batch<double> b{T2(pw::Shape{5, 4}), {0, 1, 1, 0, 1}};
        pw::init::normal(b.x, rng, 0.0, 1.0);
        src.push_back(std::move(b));
    }
    const T2 frozen_before = first.weight.value;
    const T2 bias_before = first.bias.value;
    const T2 head_before = model.get<2>().weight.value;
    const auto h = pw::fit(model, opt, src, {.epochs = 3, .clip_norm = 0.5, .verbose = false});
    CHECK(h.steps == 6);
    CHECK(opt.steps() == 6);
    CHECK(std::memcmp(first.weight.value.data(), frozen_before.data(), sizeof(double) * frozen_before.size()) == 0);
    CHECK(first.weight.grad.empty());
    CHECK(first.bias.value[0] != bias_before[0]);
    CHECK(model.get<2>().weight.value[0] != head_before[0]);
    CHECK(model.input_grad());  // restored after fit
}

TEST_CASE("fit: a separable toy problem is learned; history, progress, evaluate") {
    pw::manual_seed(1);
    Linear64 model(2, 2);
    auto train = separable(64, 16, 21);
    auto test = separable(64, 32, 22);
    pw::BasicSGD<double> opt{pw::trainable_parameters(model), {.lr = 0.5, .momentum = 0.9}};
    std::ostringstream log;
    std::size_t callbacks = 0;
    const auto before = pw::evaluate(model, test);
    const auto h = pw::fit(model, opt, train,
                           {.epochs = 8,
                            .schedule = pw::WarmupCosine{4, 32, 0.1},
                            .log_every = 2,
                            .out = &log,
                            .interactive = false,
                            .on_epoch_end = [&](const pw::EpochStats& e) { callbacks += e.epoch == callbacks; }});
    REQUIRE(h.epochs.size() == 8);
    CHECK(callbacks == 8);
    CHECK(h.steps == 32);
    CHECK(h.last().loss < 0.5 * h.epochs.front().loss);
    CHECK(h.losses().size() == 8);
    REQUIRE(h.last().accuracy.has_value());
    CHECK(*h.last().accuracy > 0.9);
    CHECK(h.last().samples == 64);
    CHECK(h.last().steps == 4);
    CHECK(h.last().lr == doctest::Approx(0.5 * pw::WarmupCosine{4, 32, 0.1}.factor(31)));
    CHECK(h.last().samples_per_second > 0);

    const auto after = pw::evaluate(model, test);
    CHECK(after.samples == 64);
    CHECK(after.loss < before.loss);
    CHECK(after.accuracy > 0.9);

    const std::string out = log.str();
    CHECK(contains(out, "epoch 1/8  step 2/4  loss "));
    CHECK(contains(out, "epoch 8/8  done  loss "));
    CHECK(contains(out, "acc "));
}

TEST_CASE("fit: float model, AdamW alias, custom loss, by-value source") {
    pw::manual_seed(2);
    pw::Linear model(2, 2);
    pw::AdamW opt{pw::trainable_parameters(model), {.lr = 0.05, .weight_decay = 0}};
    pw::VectorSource<float> src;
    pw::Batch<float> b{pw::Tensor<float>(pw::Shape{4, 2}, {1, 0, 0, 1, -1, 2, 0.5f, -0.5f}), {}};
    src.push_back(b);
    // Autoencoding with MSE: the loss takes the whole batch (labels are empty).
    const auto loss = [](const pw::Tensor<float>& y, const pw::Batch<float>& batch) { return pw::mse(y, batch.x); };
    const auto h = pw::fit(model, opt, src, loss, {.epochs = 30, .seed = 9, .verbose = false});
    CHECK(h.last().loss < 0.25f * h.epochs.front().loss);
    CHECK_FALSE(h.last().accuracy.has_value());
    CHECK(h.last().samples == 4);

    // A source returning batches by value, and a loss taking the labels only.
    Linear64 m2(2, 2);
    pw::BasicAdam<double> o2{pw::trainable_parameters(m2)};
    ByValueSource gen;
    const auto h2 = pw::fit(m2, o2, gen,
                            [](const T2& y, std::span<const int> labels) { return pw::cross_entropy(y, labels); },
                            {.epochs = 2, .verbose = false});
    CHECK(h2.steps == 6);
    CHECK(gen.epoch == 1);
    CHECK(pw::evaluate(m2, gen).samples == 6);
}

TEST_CASE("fit: invalid options and a non-finite loss") {
    Linear64 model(2, 2);
    pw::BasicSGD<double> opt{pw::trainable_parameters(model), {.lr = 0.1}};
    auto src = separable(8, 4, 1);
    CHECK(contains(message_of<pw::ConfigError>([&] { pw::fit(model, opt, src, {.epochs = 0}); }), "epochs=0"));
    CHECK(contains(message_of<pw::ConfigError>([&] { pw::fit(model, opt, src, {.clip_norm = -1}); }),
                   "clip_norm=-1"));
    CHECK_THROWS_AS(pw::fit(model, opt, src, {.schedule = pw::Constant{-2}, .verbose = false}), pw::ConfigError);
    pw::VectorSource<double> empty;
    CHECK(contains(message_of<pw::ConfigError>([&] { pw::fit(model, opt, empty, {.verbose = false}); }),
                   "no batches"));
    CHECK_THROWS_AS((void)pw::evaluate(model, empty), pw::ConfigError);

    const auto nan_loss = [](const T2& y, const pw::Batch<double>&) {
        return pw::Loss<double>{std::numeric_limits<double>::quiet_NaN(), T2(y.shape())};
    };
    const auto msg = message_of<pw::Error>([&] { pw::fit(model, opt, src, nan_loss, {.verbose = false}); });
    CHECK(contains(msg, "nan"));
    CHECK(contains(msg, "epoch 0 step 0"));
    const auto bad_grad = [](const T2&, const pw::Batch<double>&) { return pw::Loss<double>{1.0, T2(pw::Shape{1})}; };
    CHECK_THROWS_AS(pw::fit(model, opt, src, bad_grad, {.verbose = false}), pw::ShapeError);
}
