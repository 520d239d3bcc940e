// MultiTask on device backbones against the same model on the CPU: mixed-task
// batches in one pass (every patch kind applied per row by its fused kernel
// over stacked per-task parameters) and grouped by task, single-task passes,
// training steps and fit_multitask, rows with several matrix rows each (token
// sequences), and save_patch / load_patch from device models. fp32 within 1e-5, double within
// 1e-12 (2-norm relative error), device outputs poisoned before each run.
#include <filesystem>
#include <fstream>
#include <iterator>

#include "device_compare.hpp"
#include "patchwork/io/parameter_files.hpp"
#include "patchwork/multitask/multitask.hpp"
#include "patchwork/multitask/train.hpp"
#include "patchwork/policies/norm_patch.hpp"
#include "temp_dir.hpp"

using namespace device_test;

namespace {

/// Every patch kind a mixed batch applies per row: ScaleShift, Adapter,
/// NormPatch (per-task LayerNorm scale and shift), LoRA and BitFit (BiasOnly:
/// per-task Linear biases).
template <class T, class D>
using PatchedBody =
    pw::Sequential<pw::Tune<pw::BasicLinear<T, D>, pw::ScaleShift>, pw::BasicRelu<T, D>,
                   pw::Tune<pw::BasicLinear<T, D>, pw::Adapter<3>>, pw::Tune<pw::BasicLayerNorm<T, D>, pw::NormPatch>,
                   pw::Tune<pw::BasicLinear<T, D>, pw::LoRA<2, 4>>, pw::Tune<pw::BasicLinear<T, D>, pw::BiasOnly>>;

template <class T, class D>
PatchedBody<T, D> patched_body() {
    return PatchedBody<T, D>(pw::Tune<pw::BasicLinear<T, D>, pw::ScaleShift>(5, 8), pw::BasicRelu<T, D>{},
                             pw::Tune<pw::BasicLinear<T, D>, pw::Adapter<3>>(8, 8),
                             pw::Tune<pw::BasicLayerNorm<T, D>, pw::NormPatch>(8),
                             pw::Tune<pw::BasicLinear<T, D>, pw::LoRA<2, 4>>(8, 7),
                             pw::Tune<pw::BasicLinear<T, D>, pw::BiasOnly>(7, 6));
}

template <class T, class D>
using Model = pw::MultiTask<PatchedBody<T, D>, pw::BasicLinear<T, D>>;

template <class T, class D>
std::vector<pw::BasicLinear<T, D>> heads(std::size_t k) {
    std::vector<pw::BasicLinear<T, D>> h;
    for (std::size_t i = 0; i < k; ++i) h.emplace_back(6, 3);
    return h;
}

/// Every parameter of a CPU model drawn at random (banks start equal, patches as the identity).
template <class M>
void randomize_model(M& m, std::mt19937& rng) {
    m.visit([&](auto& p) { p.value = random_tensor<typename M::Scalar>(p.value.shape(), rng, 0.5); });
}

/// A CPU and a device model with equal values (every bank its own).
template <class T>
struct Pair {
    Model<T, Cpu> cpu{patched_body<T, Cpu>(), heads<T, Cpu>(4)};
    Model<T, Cuda> dev{patched_body<T, Cuda>(), heads<T, Cuda>(4)};
    explicit Pair(std::mt19937& rng) {
        randomize_model(cpu, rng);
        copy_parameters(cpu, dev);
    }
};

/// Mixed forward and backward of both models on the same batch: output,
/// input gradient and every parameter gradient.
template <class T>
void compare_mixed(Pair<T>& m, const Shape& in_shape, const std::vector<int>& ids, std::mt19937& rng,
                   pw::MixedPass expected) {
    const Tensor<T> x = random_tensor<T>(in_shape, rng);
    const Tensor<T, Cuda> xd(x);
    const Tensor<T>& y = m.cpu.forward(x, ids);
    const_cast<Tensor<T, Cuda>&>(m.dev.forward(xd, ids)).poison();
    const Tensor<T, Cuda>& yd = m.dev.forward(xd, ids);
    CHECK(m.cpu.last_mixed_pass() == expected);
    CHECK(m.dev.last_mixed_pass() == expected);
    check_close(y, yd, "mixed forward");
    const Tensor<T> g = random_tensor<T>(y.shape(), rng);
    const Tensor<T, Cuda> gd(g);
    pw::zero_grad(m.cpu);
    pw::zero_grad(m.dev);
    m.cpu.set_input_grad(true);
    m.dev.set_input_grad(true);
    const Tensor<T>& dx = m.cpu.backward(g);
    const Tensor<T, Cuda>& dxd = m.dev.backward(gd);
    check_close(dx, dxd, "mixed input gradient");
    // Parameter gradients in double only: in fp32 the sums over a task's few
    // rows cancel heavily (an adapter bias gradient of 4e-3 from O(1) terms
    // came out 2.8e-4 apart, relative, between two fp32 CPU-order and
    // device-order sums), which says nothing about the kernels; the double
    // run checks every gradient to 1e-12.
    if constexpr (std::is_same_v<T, double>) check_gradients(m.cpu, m.dev);
}

std::vector<int> mixed_ids(std::size_t n, std::mt19937& rng) {
    // Tasks 0..2 in random order; task 3 never appears (its bank gets no gradient).
    std::vector<int> ids(n);
    std::uniform_int_distribution<int> pick(0, 2);
    for (auto& t : ids) t = pick(rng);
    return ids;
}

std::string file_bytes(const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_CASE_TEMPLATE("MultiTask on a device backbone equals the CPU model, one pass and grouped", T, float, double) {
    std::mt19937 rng(31);
    Pair<T> m(rng);
    REQUIRE(m.cpu.slot_count() == m.dev.slot_count());
    CHECK(m.dev.slot_count() == 11);  // scale, shift; 4 adapter; LN scale, shift; A, B; bias
    std::vector<std::string> names;
    m.dev.visit([&](auto& p) {
        if (p.task() == 2 && p.role() == pw::Role::adapter) names.push_back(p.name());
    });
    CHECK(names == std::vector<std::string>{"task2.linear2.adapter.down.weight", "task2.linear2.adapter.down.bias",
                                            "task2.linear2.adapter.up.weight", "task2.linear2.adapter.up.bias"});
    CHECK(m.dev.one_pass_supported());
    const std::size_t n = kCpu ? 37 : 301;
    for (const Shape& shape : {Shape{n, 5}, Shape{n / 4, 3, 5}}) {
        INFO("input " << shape);
        const std::vector<int> ids = mixed_ids(shape[0], rng);
        compare_mixed(m, shape, ids, rng, pw::MixedPass::one_pass);
        m.cpu.set_one_pass(false);
        m.dev.set_one_pass(false);
        compare_mixed(m, shape, ids, rng, pw::MixedPass::grouped);
        m.cpu.set_one_pass(true);
        m.dev.set_one_pass(true);
    }
    // Rows already sorted by task, and a batch of one task only.
    std::vector<int> sorted = mixed_ids(n, rng);
    std::sort(sorted.begin(), sorted.end());
    compare_mixed(m, Shape{n, 5}, sorted, rng, pw::MixedPass::one_pass);
    compare_mixed(m, Shape{n, 5}, std::vector<int>(n, 3), rng, pw::MixedPass::one_pass);

    // A single-task pass binds the task's bank into the backbone.
    const Tensor<T> x = random_tensor<T>(Shape{9, 5}, rng);
    const Tensor<T, Cuda> xd(x);
    for (int task : {1, 3}) check_close(m.cpu.forward(x, task), m.dev.forward(xd, task), "single-task forward");
}

TEST_CASE("MultiTask on the device: training steps on mixed batches follow the CPU") {
    using T = double;
    std::mt19937 rng(32);
    Pair<T> m(rng);
    pw::BasicAdamW<T> opt(pw::trainable_parameters(m.cpu), pw::AdamWOptions{.lr = 1e-2, .weight_decay = 0.01});
    pw::BasicAdamW<T, Cuda> opt_dev(pw::trainable_parameters(m.dev),
                                    pw::AdamWOptions{.lr = 1e-2, .weight_decay = 0.01});
    for (int step = 0; step < 3; ++step) {
        const std::vector<int> ids = mixed_ids(20, rng);
        const Tensor<T> x = random_tensor<T>(Shape{20, 5}, rng);
        const Tensor<T> g = random_tensor<T>(Shape{20, 3}, rng);
        const Tensor<T, Cuda> xd(x), gd(g);
        pw::zero_grad(m.cpu);
        pw::zero_grad(m.dev);
        m.cpu.forward(x, ids);
        m.cpu.backward(g);
        m.dev.forward(xd, ids);
        m.dev.backward(gd);
        opt.step();
        opt_dev.step();
    }
    std::vector<Tensor<T>> values;
    m.cpu.visit([&](auto& p) { values.push_back(p.value); });
    std::size_t i = 0;
    m.dev.visit([&](auto& p) { check_close(values[i++], p.value, p.name().c_str()); });
    CHECK(i == values.size());
}

TEST_CASE("MultiTask on the device: fit_multitask and evaluate_task follow the CPU") {
    using T = double;
    std::mt19937 rng(35);
    Pair<T> m(rng);
    std::vector<pw::VectorSource<T>> sources(4);
    for (std::size_t k = 0; k < 4; ++k)
        for (int b = 0; b < 2; ++b) {
            pw::Batch<T> batch{random_tensor<T>(Shape{6, 5}, rng), {}};
            for (int r = 0; r < 6; ++r) batch.labels.push_back(int(rng() % 3));
            sources[k].push_back(std::move(batch));
        }
    pw::BasicAdamW<T> opt(pw::trainable_parameters(m.cpu), pw::AdamWOptions{.lr = 1e-2});
    pw::BasicAdamW<T, Cuda> opt_dev(pw::trainable_parameters(m.dev), pw::AdamWOptions{.lr = 1e-2});
    const pw::MultiTaskTrainOptions options{.epochs = 2, .sampling = pw::TaskSampling::proportional, .seed = 5};
    const auto h = pw::fit_multitask(m.cpu, opt, sources, options);
    const auto hd = pw::fit_multitask(m.dev, opt_dev, sources, options);
    REQUIRE(hd.epochs.size() == 2);
    for (std::size_t e = 0; e < 2; ++e)
        for (std::size_t k = 0; k < 4; ++k) {
            CHECK(hd.epochs[e].steps[k] == h.epochs[e].steps[k]);
            CHECK(hd.epochs[e].loss[k] == doctest::Approx(h.epochs[e].loss[k]).epsilon(1e-12));
        }
    for (int k = 0; k < 4; ++k) {
        const auto a = pw::evaluate_task(m.cpu, k, sources[std::size_t(k)]);
        const auto b = pw::evaluate_task(m.dev, k, sources[std::size_t(k)]);
        CHECK(b.loss == doctest::Approx(a.loss).epsilon(1e-12));
        CHECK(b.accuracy == a.accuracy);
    }
}

TEST_CASE("MultiTask on the device: save_patch and load_patch") {
    using T = double;
    std::mt19937 rng(33);
    Pair<T> m(rng);
    pw::testing::TempDir dir("patchwork_device_patch");
    pw::save_patch(m.dev, dir / "dev1.safetensors", 1);
    pw::save_patch(m.cpu, dir / "cpu1.safetensors", 1);
    // The device model writes exactly the file the CPU model writes.
    CHECK(file_bytes(dir / "dev1.safetensors") == file_bytes(dir / "cpu1.safetensors"));
    pw::save_base(m.dev, dir / "dev_base.safetensors");
    pw::save_base(m.cpu, dir / "cpu_base.safetensors");
    CHECK(file_bytes(dir / "dev_base.safetensors") == file_bytes(dir / "cpu_base.safetensors"));

    // Loaded into another device model, task 1's bank and head hold the saved values.
    Model<T, Cuda> fresh{patched_body<T, Cuda>(), heads<T, Cuda>(4)};
    pw::load_patch(fresh, dir / "dev1.safetensors", 1);
    std::vector<Tensor<T>> saved;
    m.cpu.visit([&](auto& p) {
        if (p.task() == 1) saved.push_back(p.value);
    });
    std::size_t i = 0;
    fresh.visit([&](auto& p) {
        if (p.task() == 1) check_close(saved[i++], p.value, p.name().c_str());
    });
    CHECK(i == saved.size());
    CHECK_THROWS_AS(pw::load_patch(fresh, dir / "dev1.safetensors", 2), pw::IoError);
}

TEST_CASE("MultiTask on the device: bad task ids and shapes name the model") {
    using T = float;
    std::mt19937 rng(34);
    Pair<T> m(rng);
    m.dev.set_path("mt");
    const Tensor<T, Cuda> xd(random_tensor<T>(Shape{4, 5}, rng));
    const std::vector<int> bad{0, 1, 4, 2};
    CHECK_THROWS_WITH_AS(m.dev.forward(xd, bad), doctest::Contains("task id 4 at row 2"), pw::ConfigError);
    CHECK_THROWS_WITH_AS(m.dev.forward(xd, std::vector<int>{0, 1}), doctest::Contains("2 task ids for a batch of 4"),
                         pw::ShapeError);
    const Tensor<T, Cuda> wrong(random_tensor<T>(Shape{4, 6}, rng));
    CHECK_THROWS_AS(m.dev.forward(wrong, std::vector<int>{0, 1, 1, 0}), pw::ShapeError);
}
