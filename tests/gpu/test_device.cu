// The CUDA backend's device modules against the CPU backend: tensors and
// copies, cuBLAS GEMMs, Linear, the activations, LayerNorm, softmax
// cross-entropy, SGD / Adam / AdamW, whole training steps of a Sequential
// model, and fit / evaluate on a device model (clipping included). Shapes are random and mostly not multiples of any block size. Every
// output buffer is poisoned (NaN) and recomputed, so an element a kernel fails
// to write shows up. fp32 results must be within 1e-5 relative error (2-norm
// over the tensor) of the CPU; double within 1e-12.
#include "device_compare.hpp"

#include "patchwork/train/batch.hpp"
#include "patchwork/train/trainer.hpp"

using namespace device_test;

TEST_CASE_TEMPLATE("device tensors: copies, fill, resize and poison", T, float, double) {
    std::mt19937 rng(1);
    const Tensor<T> h = random_tensor<T>(Shape{3, 5, 7}, rng);
    Tensor<T, Cuda> d(h);
    CHECK(d.shape() == h.shape());
    CHECK(rel_error(h, pw::to_host(d)) == 0.0);
    Tensor<T, Cuda> e = d;  // deep copy
    e.fill(T(2.5));
    CHECK(rel_error(h, pw::to_host(d)) == 0.0);
    for (T v : pw::to_host(e)) CHECK(v == T(2.5));
    const T* before = e.data();
    e.resize(Shape{4, 4});
    CHECK(e.data() == before);  // fits: keeps the allocation
    e.poison();
    for (T v : pw::to_host(e)) CHECK(std::isnan(double(v)));
    e.zero();
    for (T v : pw::to_host(e)) CHECK(v == T(0));
    CHECK_THROWS_AS(e.reshape(Shape{3, 3}), pw::ShapeError);
}

TEST_CASE_TEMPLATE("cuda::gemm matches Eigen for every transposition", T, float, double) {
    std::mt19937 rng(2);
    for (int trial = 0; trial < 6; ++trial) {
        const std::size_t m = 1 + rng() % 130, n = 1 + rng() % 97, k = 1 + rng() % 300;
        for (int ta = 0; ta < 2; ++ta)
            for (int tb = 0; tb < 2; ++tb) {
                const Tensor<T> a = random_tensor<T>(ta ? Shape{k, m} : Shape{m, k}, rng);
                const Tensor<T> b = random_tensor<T>(tb ? Shape{n, k} : Shape{k, n}, rng);
                Tensor<T> c = random_tensor<T>(Shape{m, n}, rng);
                Tensor<T, Cuda> cd(c);
                const T alpha = T(0.75), beta = T(0.5);
                pw::cuda::gemm(bool(ta), bool(tb), alpha, Tensor<T, Cuda>(a), Tensor<T, Cuda>(b), beta, cd, "test");
                if (ta && tb) c.matrix() = alpha * a.matrix().transpose() * b.matrix().transpose() + beta * c.matrix();
                else if (ta) c.matrix() = alpha * a.matrix().transpose() * b.matrix() + beta * c.matrix();
                else if (tb) c.matrix() = alpha * a.matrix() * b.matrix().transpose() + beta * c.matrix();
                else c.matrix() = alpha * a.matrix() * b.matrix() + beta * c.matrix();
                INFO("m=" << m << " n=" << n << " k=" << k << " ta=" << ta << " tb=" << tb);
                CHECK(rel_error(c, pw::to_host(cd)) < tolerance<T>());
            }
    }
    Tensor<T, Cuda> a(Shape{3, 4}), b(Shape{5, 6}), c(Shape{3, 6});
    CHECK_THROWS_WITH_AS(pw::cuda::gemm(false, false, T(1), a, b, T(0), c, "stage0.linear1"),
                         doctest::Contains("stage0.linear1: gemm shapes do not agree"), pw::ShapeError);
}

TEST_CASE_TEMPLATE("Linear on the device equals Linear on the CPU", T, float, double) {
    std::mt19937 rng(3);
    const std::vector<std::array<std::size_t, 3>> sizes =
        kCpu ? std::vector<std::array<std::size_t, 3>>{{1, 1, 1}, {7, 33, 5}, {40, 100, 257}}
             : std::vector<std::array<std::size_t, 3>>{{1, 1, 1}, {7, 33, 5}, {129, 100, 257}, {64, 784, 256}};
    for (auto [n, in, out] : sizes) {
        pw::BasicLinear<T> cpu(in, out);
        pw::BasicLinear<T, Cuda> dev(in, out);
        cpu.bias.value = random_tensor<T>(Shape{out}, rng);
        compare_module(cpu, dev, Shape{n, in}, rng);
    }
    // Leading dimensions are flattened, a frozen weight gets no gradient, no input gradient when off.
    pw::BasicLinear<T> cpu(12, 9);
    pw::BasicLinear<T, Cuda> dev(12, 9);
    cpu.weight.set_trainable(false);
    dev.weight.set_trainable(false);
    compare_module(cpu, dev, Shape{2, 3, 12}, rng);
    dev.set_input_grad(false);
    const Tensor<T, Cuda> x(random_tensor<T>(Shape{4, 12}, rng));
    dev.forward(x);
    CHECK(dev.backward(Tensor<T, Cuda>(Shape{4, 9})).empty());
    CHECK_THROWS_WITH_AS(dev.forward(Tensor<T, Cuda>(Shape{4, 11})), doctest::Contains("linear input"),
                         pw::ShapeError);
}

TEST_CASE_TEMPLATE("activations on the device equal the CPU", T, float, double) {
    std::mt19937 rng(4);
    for (std::size_t n : kCpu ? std::vector<std::size_t>{1, 1000, 9000} : std::vector<std::size_t>{1, 1000, 70001}) {
        {
            pw::BasicRelu<T> c;
            pw::BasicRelu<T, Cuda> d;
            compare_module(c, d, Shape{n}, rng);
        }
        {
            pw::BasicGelu<T> c;
            pw::BasicGelu<T, Cuda> d;
            compare_module(c, d, Shape{n, 1}, rng);
        }
        {
            pw::BasicTanh<T> c;
            pw::BasicTanh<T, Cuda> d;
            compare_module(c, d, Shape{1, n}, rng);
        }
    }
}

TEST_CASE_TEMPLATE("LayerNorm on the device equals LayerNorm on the CPU", T, float, double) {
    std::mt19937 rng(5);
    const std::vector<std::array<std::size_t, 2>> sizes =
        kCpu ? std::vector<std::array<std::size_t, 2>>{{1, 1}, {3, 7}, {65, 33}, {5, 768}}
             : std::vector<std::array<std::size_t, 2>>{{1, 1}, {3, 7}, {65, 33}, {17, 768}, {300, 1000}};
    for (auto [n, d] : sizes) {
        pw::BasicLayerNorm<T> cpu(d);
        pw::BasicLayerNorm<T, Cuda> dev(d);
        cpu.scale.value = random_tensor<T>(Shape{d}, rng);
        cpu.shift.value = random_tensor<T>(Shape{d}, rng);
        compare_module(cpu, dev, Shape{n, d}, rng);
    }
}

TEST_CASE_TEMPLATE("cross_entropy on the device equals the CPU", T, float, double) {
    std::mt19937 rng(6);
    const std::vector<std::array<std::size_t, 2>> sizes =
        kCpu ? std::vector<std::array<std::size_t, 2>>{{1, 2}, {7, 10}, {40, 300}}
             : std::vector<std::array<std::size_t, 2>>{{1, 2}, {7, 10}, {257, 1000}};
    for (auto [n, c] : sizes) {
        const Tensor<T> z = random_tensor<T>(Shape{n, c}, rng, 3.0);
        std::vector<int> labels(n);
        for (auto& l : labels) l = int(rng() % c);
        const auto lc = pw::cross_entropy(z, std::span<const int>(labels));
        const auto ld = pw::cross_entropy(Tensor<T, Cuda>(z), std::span<const int>(labels));
        CHECK(std::abs(double(lc.value) - double(ld.value)) <= tolerance<T>() * std::abs(double(lc.value)));
        check_close(lc.grad, ld.grad, "cross-entropy gradient");
    }
    std::vector<int> bad{0, 11};
    CHECK_THROWS_AS((void)pw::cross_entropy(Tensor<T, Cuda>(Shape{2, 10}), std::span<const int>(bad)),
                    pw::ConfigError);
}

TEST_CASE_TEMPLATE("cross_entropy with a class count per row on the device equals the CPU", T, float, double) {
    // Mixed-task logits padded to the widest head: row r's softmax runs over its first classes[r] logits.
    std::mt19937 rng(61);
    const std::vector<std::array<std::size_t, 2>> sizes =
        kCpu ? std::vector<std::array<std::size_t, 2>>{{1, 3}, {9, 10}, {40, 300}}
             : std::vector<std::array<std::size_t, 2>>{{1, 3}, {9, 10}, {257, 1000}};
    for (auto [n, c] : sizes) {
        const Tensor<T> z = random_tensor<T>(Shape{n, c}, rng, 3.0);
        std::vector<std::size_t> classes(n);
        std::vector<int> labels(n);
        for (std::size_t r = 0; r < n; ++r) {
            classes[r] = 1 + rng() % c;
            labels[r] = int(rng() % classes[r]);
        }
        classes[0] = c;  // one full-width row
        const auto lc = pw::cross_entropy(z, std::span<const int>(labels), std::span<const std::size_t>(classes));
        const auto ld =
            pw::cross_entropy(Tensor<T, Cuda>(z), std::span<const int>(labels), std::span<const std::size_t>(classes));
        CHECK(std::abs(double(lc.value) - double(ld.value)) <= tolerance<T>() * std::abs(double(lc.value)));
        check_close(lc.grad, ld.grad, "per-row cross-entropy gradient");
        // The padding gets no gradient, and the restricted loss differs from the full-width one.
        const Tensor<T> g = pw::to_host(ld.grad);
        for (std::size_t r = 0; r < n; ++r)
            for (std::size_t j = classes[r]; j < c; ++j) CHECK(g(r, j) == T(0));
        if (c > 3) CHECK(std::abs(double(ld.value) - double(pw::cross_entropy(z, std::span<const int>(labels)).value)) > 1e-3);
    }
    const std::vector<int> labels{0, 2};
    const std::vector<std::size_t> too_wide{4, 11}, too_few{3}, below{3, 2};
    const Tensor<T, Cuda> z(Shape{2, 10});
    CHECK_THROWS_WITH_AS((void)pw::cross_entropy(z, std::span<const int>(labels), std::span<const std::size_t>(too_wide)),
                         doctest::Contains("row 1 has 11 classes"), pw::ConfigError);
    CHECK_THROWS_AS((void)pw::cross_entropy(z, std::span<const int>(labels), std::span<const std::size_t>(too_few)),
                    pw::ShapeError);
    CHECK_THROWS_WITH_AS((void)pw::cross_entropy(z, std::span<const int>(labels), std::span<const std::size_t>(below)),
                         doctest::Contains("label 2 at row 1"), pw::ConfigError);
}

namespace {
template <class OptC, class OptD, class Options>
void compare_optimizer(Options options) {
    using T = typename OptC::Scalar;
    std::mt19937 rng(7);
    pw::Parameter<T> pc("w", pw::Role::weight, Shape{1001});
    pw::Parameter<T, Cuda> pd("w", pw::Role::weight, Shape{1001});
    pc.value = random_tensor<T>(Shape{1001}, rng);
    pw::copy(pc.value, pd.value);
    OptC oc({&pc}, options);
    OptD od({&pd}, options);
    for (int step = 0; step < 5; ++step) {
        pc.grad = random_tensor<T>(Shape{1001}, rng);
        pw::copy(pc.grad, pd.grad);
        oc.step();
        od.step();
        check_close(pc.value, pd.value, "parameter after the step");
    }
}
}  // namespace

TEST_CASE("SGD, Adam and AdamW on the device follow the CPU updates") {
    compare_optimizer<pw::BasicSGD<float>, pw::BasicSGD<float, Cuda>>(pw::SGDOptions{.lr = 0.1, .weight_decay = 0.01});
    compare_optimizer<pw::BasicSGD<float>, pw::BasicSGD<float, Cuda>>(
        pw::SGDOptions{.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01});
    compare_optimizer<pw::BasicSGD<double>, pw::BasicSGD<double, Cuda>>(
        pw::SGDOptions{.lr = 0.1, .momentum = 0.9, .nesterov = true});
    compare_optimizer<pw::BasicAdam<float>, pw::BasicAdam<float, Cuda>>(pw::AdamOptions{.lr = 1e-2, .weight_decay = 1e-3});
    compare_optimizer<pw::BasicAdamW<float>, pw::BasicAdamW<float, Cuda>>(pw::AdamWOptions{.lr = 1e-2});
    compare_optimizer<pw::BasicAdamW<double>, pw::BasicAdamW<double, Cuda>>(pw::AdamWOptions{.lr = 1e-2});
}

TEST_CASE("training steps of a tuned Sequential model on the device follow the CPU") {
    // A frozen first block and a fine-tuned head: the frozen prefix costs no backward on either device.
    using CpuBody = pw::Tune<pw::Sequential<pw::BasicLinear<float>, pw::BasicLayerNorm<float>, pw::BasicGelu<float>>,
                             pw::Frozen>;
    using DevBody = pw::Tune<pw::Sequential<pw::BasicLinear<float, Cuda>, pw::BasicLayerNorm<float, Cuda>,
                                            pw::BasicGelu<float, Cuda>>,
                             pw::Frozen>;
    using CpuModel = pw::Sequential<CpuBody, pw::Tune<pw::BasicLinear<float>, pw::BiasOnly>, pw::BasicRelu<float>,
                                    pw::Tune<pw::BasicLinear<float>, pw::FineTune>>;
    using DevModel = pw::Sequential<DevBody, pw::Tune<pw::BasicLinear<float, Cuda>, pw::BiasOnly>,
                                    pw::BasicRelu<float, Cuda>, pw::Tune<pw::BasicLinear<float, Cuda>, pw::FineTune>>;
    CpuModel cpu(CpuBody(pw::BasicLinear<float>(50, 64), pw::BasicLayerNorm<float>(64), pw::BasicGelu<float>{}),
                 pw::Tune<pw::BasicLinear<float>, pw::BiasOnly>(64, 40), pw::BasicRelu<float>{},
                 pw::Tune<pw::BasicLinear<float>, pw::FineTune>(40, 10));
    DevModel dev(DevBody(pw::BasicLinear<float, Cuda>(50, 64), pw::BasicLayerNorm<float, Cuda>(64),
                         pw::BasicGelu<float, Cuda>{}),
                 pw::Tune<pw::BasicLinear<float, Cuda>, pw::BiasOnly>(64, 40), pw::BasicRelu<float, Cuda>{},
                 pw::Tune<pw::BasicLinear<float, Cuda>, pw::FineTune>(40, 10));
    copy_parameters(cpu, dev);
    CHECK(pw::trainable_count(cpu) == pw::trainable_count(dev));
    pw::BasicAdamW<float> oc(pw::trainable_parameters(cpu), {.lr = 1e-2});
    pw::BasicAdamW<float, Cuda> od(pw::trainable_parameters(dev), {.lr = 1e-2});
    std::mt19937 rng(8);
    for (int step = 0; step < 4; ++step) {
        const Tensor<float> x = random_tensor<float>(Shape{33, 50}, rng);
        std::vector<int> y(33);
        for (auto& l : y) l = int(rng() % 10);
        oc.zero_grad();
        od.zero_grad();
        const auto lc = pw::cross_entropy(cpu.forward(x), std::span<const int>(y));
        const Tensor<float, Cuda> xd(x);  // alive until the backward: modules keep a pointer to their input
        const auto ld = pw::cross_entropy(dev.forward(xd), std::span<const int>(y));
        CHECK(std::abs(lc.value - ld.value) <= 1e-5f * std::abs(lc.value));
        cpu.backward(lc.grad);
        dev.backward(ld.grad);
        check_gradients(cpu, dev);
        oc.step();
        od.step();
    }
    std::vector<Tensor<float>> values;
    cpu.visit([&](auto& p) { values.push_back(p.value); });
    std::size_t i = 0;
    dev.visit([&](auto& p) { check_close(values[i++], p.value, p.name().c_str()); });
}

// In double (fp32 runs the same code; the layers and optimisers are checked in fp32 above).
TEST_CASE_TEMPLATE("fit and evaluate train and score a device model as they do the CPU model", T, double) {
    using CpuModel = pw::Sequential<pw::Tune<pw::BasicLinear<T>, pw::LoRA<4, 8>>, pw::BasicTanh<T>, pw::BasicLinear<T>>;
    using DevModel = pw::Sequential<pw::Tune<pw::BasicLinear<T, Cuda>, pw::LoRA<4, 8>>, pw::BasicTanh<T, Cuda>,
                                    pw::BasicLinear<T, Cuda>>;
    CpuModel cpu(pw::Tune<pw::BasicLinear<T>, pw::LoRA<4, 8>>(12, 16), pw::BasicTanh<T>{}, pw::BasicLinear<T>(16, 4));
    DevModel dev(pw::Tune<pw::BasicLinear<T, Cuda>, pw::LoRA<4, 8>>(12, 16), pw::BasicTanh<T, Cuda>{},
                 pw::BasicLinear<T, Cuda>(16, 4));
    std::mt19937 rng(12);
    cpu.visit([&](auto& p) { p.value = random_tensor<T>(p.value.shape(), rng, 0.4); });
    copy_parameters(cpu, dev);
    std::vector<pw::Batch<T>> batches;
    for (int i = 0; i < 5; ++i) {
        pw::Batch<T> b{random_tensor<T>(Shape{std::size_t(6 + i), 12}, rng), {}};
        for (std::size_t r = 0; r < b.x.rows(); ++r) b.labels.push_back(int(rng() % 4));
        batches.push_back(b);
    }
    pw::VectorSource<T> source(batches);
    pw::BasicAdam<T> oc(pw::trainable_parameters(cpu), {.lr = 5e-2});
    pw::BasicAdam<T, Cuda> od(pw::trainable_parameters(dev), {.lr = 5e-2});
    const pw::TrainOptions options{.epochs = 3, .clip_norm = 0.3, .verbose = false};
    const auto hc = pw::fit(cpu, oc, source, options);
    const auto hd = pw::fit(dev, od, source, options);
    const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-10;
    REQUIRE(hd.epochs.size() == 3);
    CHECK(hd.steps == hc.steps);
    for (std::size_t e = 0; e < 3; ++e) {
        CHECK(std::abs(hd.epochs[e].loss - hc.epochs[e].loss) <= tol * hc.epochs[e].loss);
        CHECK(hd.epochs[e].accuracy.value() == doctest::Approx(hc.epochs[e].accuracy.value()));
        CHECK(std::abs(hd.epochs[e].max_grad_norm - hc.epochs[e].max_grad_norm) <= tol * hc.epochs[e].max_grad_norm);
        CHECK(hc.epochs[e].max_grad_norm > 0.3);  // clipping did act
    }
    std::vector<Tensor<T>> values;
    cpu.visit([&](auto& p) { values.push_back(p.value); });
    std::size_t i = 0;
    dev.visit([&](auto& p) {
        INFO(p.name());
        CHECK(rel_error(values[i++], pw::to_host(p.value)) < tol);
    });
    const auto ec = pw::evaluate(cpu, source), ed = pw::evaluate(dev, source);
    CHECK(ed.samples == ec.samples);
    CHECK(std::abs(ed.loss - ec.loss) <= tol * ec.loss);
    CHECK(ed.accuracy == doctest::Approx(ec.accuracy));
}
