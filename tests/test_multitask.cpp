#include <doctest/doctest.h>

#include <filesystem>
#include <unistd.h>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/core/report.hpp"
#include "patchwork/io/parameter_files.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/batch_norm.hpp"
#include "patchwork/layers/conv2d.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/layers/pool.hpp"
#include "patchwork/multitask/multitask.hpp"
#include "patchwork/multitask/train.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/bias_only.hpp"
#include "patchwork/policies/depthwise_patch.hpp"
#include "patchwork/policies/lora.hpp"
#include "patchwork/policies/scale_shift.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/norm_patch.hpp"
#include "patchwork/policies/tune.hpp"
#include "patchwork/train/optimizer.hpp"

namespace pw = patchwork;
using pw::testing::check_gradients;

using Linear64 = pw::BasicLinear<double>;
using LayerNorm64 = pw::BasicLayerNorm<double>;
using Relu64 = pw::BasicRelu<double>;
using Conv64 = pw::BasicConv2d<double>;
using Depthwise64 = pw::BasicDepthwiseConv2d<double>;
using BatchNorm64 = pw::BasicBatchNorm2d<double>;
using Pool64 = pw::BasicGlobalAvgPool<double>;

using MlpBody = pw::Sequential<Linear64, LayerNorm64, Relu64, Linear64>;
using MlpPatched = pw::Tune<MlpBody, pw::NormPatch>;      // shared frozen, norms per task
using MlpShared = pw::Tune<MlpBody, pw::FineTune>;        // everything trains, norms per task
using ConvBody = pw::Sequential<Conv64, Depthwise64, BatchNorm64, Relu64, Pool64>;
using ConvPatched = pw::Tune<ConvBody, pw::DepthwisePatch, pw::NormPatch>;

namespace {

constexpr unsigned norm_roles = pw::role_bit(pw::Role::norm_scale) | pw::role_bit(pw::Role::norm_shift);

MlpBody mlp_body() { return MlpBody(Linear64(5, 8), LayerNorm64(8), Relu64{}, Linear64(8, 6)); }
ConvBody conv_body() {
    return ConvBody(Conv64(2, 3, 3, {.padding = 1}), Depthwise64(3, 3, {.padding = 1}), BatchNorm64(3), Relu64{},
                    Pool64{});
}
std::vector<Linear64> heads(std::size_t k, std::size_t in, std::size_t out) {
    std::vector<Linear64> h;
    for (std::size_t i = 0; i < k; ++i) h.emplace_back(in, out);
    return h;
}

/// Give every bank its own random values (banks start equal), and everything else too.
template <class M>
void randomize(M& m, std::uint64_t seed) {
    pw::Rng rng(seed);
    m.visit([&](pw::Parameter<double>& p) {
        if (p.leaf() == "running_var") pw::init::uniform(p.value, rng, 0.5, 1.5);
        else pw::init::normal(p.value, rng, 0.0, 0.5);
    });
}

pw::Tensor<double> random_tensor(const pw::Shape& s, std::uint64_t seed) {
    pw::Rng rng(seed);
    pw::Tensor<double> t(s);
    pw::init::normal(t, rng, 0.0, 1.0);
    return t;
}

/// A module view of a MultiTask model on a fixed mixed batch (for gradcheck).
template <class MT>
struct MixedView {
    using Scalar = double;
    MT& m;
    std::vector<int> ids;
    const pw::Tensor<double>& forward(const pw::Tensor<double>& x) { return m.forward(x, ids); }
    const pw::Tensor<double>& backward(const pw::Tensor<double>& dy) { return m.backward(dy); }
    template <class F>
    void visit(F&& f) {
        m.visit(f);
    }
    void set_input_grad(bool on) { m.set_input_grad(on); }
};

template <class M>
std::vector<pw::Tensor<double>> snapshot(M& m, int task) {
    std::vector<pw::Tensor<double>> out;
    m.visit([&](pw::Parameter<double>& p) {
        if (p.task() == task) out.push_back(p.value);
    });
    return out;
}

bool bit_equal(const pw::Tensor<double>& a, const pw::Tensor<double>& b) {
    if (!(a.shape() == b.shape())) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
        if (a[i] != b[i]) return false;
    return true;
}

}  // namespace

TEST_CASE("multitask: banks, names and tasks of parameters") {
    pw::MultiTask<MlpPatched, Linear64> m(MlpPatched(mlp_body()), heads(3, 6, 4));
    CHECK(m.tasks() == 3);
    CHECK(m.slot_count() == 2);  // layernorm1.scale and .shift
    std::vector<std::string> names;
    std::vector<int> owners;
    m.visit([&](pw::Parameter<double>& p) {
        names.push_back(p.name());
        owners.push_back(p.task());
    });
    // Shared: linear0 (weight, bias), linear3 (weight, bias); then per task: 2 bank + 2 head.
    REQUIRE(names.size() == 4 + 3 * 4);
    CHECK(names[0] == "linear0.weight");
    CHECK(names[2] == "linear3.weight");
    CHECK(names[4] == "task0.layernorm1.scale");
    CHECK(names[5] == "task0.layernorm1.shift");
    CHECK(names[6] == "task0.head.weight");
    CHECK(names[12] == "task2.layernorm1.scale");
    CHECK(owners[0] == pw::shared_task);
    CHECK(owners[4] == 0);
    CHECK(owners[7] == 0);
    CHECK(owners[15] == 2);
    // Trainable: banks and heads only (NormPatch froze the rest).
    CHECK(pw::trainable_count(m) == 3 * (8 + 8 + 6 * 4 + 4));
    const auto report = pw::parameter_report(m);
    CHECK(report.trainable == pw::trainable_count(m));
    m.set_path("mt");
    bool renamed = false;
    m.visit([&](pw::Parameter<double>& p) { renamed = renamed || p.name() == "mt.task1.layernorm1.shift"; });
    CHECK(renamed);
}

TEST_CASE("multitask: gradients by finite differences, MLP with NormPatch banks") {
    pw::MultiTask<MlpShared, Linear64> m(MlpShared(mlp_body()), heads(3, 6, 4), pw::PerTaskRoles{norm_roles});
    randomize(m, 7);
    SUBCASE("single task, shared weights trainable") {
        m.set_active_task(1);
        check_gradients(m, pw::Shape{4, 5}, 1e-6);
    }
    SUBCASE("mixed batch") {
        MixedView<decltype(m)> view{m, {2, 0, 2, 1, 0}};
        check_gradients(view, pw::Shape{5, 5}, 1e-6);
    }
}

TEST_CASE("multitask: gradients by finite differences, conv backbone with BatchNorm2d and DepthwisePatch") {
    pw::MultiTask<ConvPatched, Linear64> m(ConvPatched(conv_body()), heads(2, 3, 2));
    CHECK(m.slot_count() == 3);  // depthwise filters, batch-norm scale and shift
    randomize(m, 11);
    SUBCASE("single task, training-mode batch norm") {
        m.set_active_task(1);
        check_gradients(m, pw::Shape{3, 4, 4, 2}, 1e-6);
    }
    SUBCASE("single task, inference-mode batch norm") {
        pw::set_training(m, false);
        check_gradients(m, pw::Shape{3, 4, 4, 2}, 1e-6);
    }
    SUBCASE("mixed batch, training-mode batch norm (statistics per group)") {
        MixedView<decltype(m)> view{m, {1, 0, 1, 1, 0}};
        check_gradients(view, pw::Shape{5, 4, 4, 2}, 1e-6);
    }
}

TEST_CASE("multitask: a mixed batch equals the per-task passes (outputs and gradients)") {
    pw::MultiTask<MlpShared, Linear64> m(MlpShared(mlp_body()), heads(3, 6, 4), pw::PerTaskRoles{norm_roles});
    randomize(m, 3);
    // The grouped path runs each task's rows through the same computation as
    // a single-task pass, so its outputs are bit-for-bit those of the per-task
    // passes. (The one-pass path multiplies all rows in one GEMM, whose
    // blocking may round differently; the "one pass" cases check it to 1e-12.)
    m.set_one_pass(false);
    const std::vector<int> ids{2, 0, 0, 2, 1, 2};
    const auto x = random_tensor({6, 5}, 4);
    const auto dy = random_tensor({6, 4}, 5);

    pw::zero_grad(m);
    const pw::Tensor<double> y_mixed = m.forward(x, ids);
    CHECK(m.last_mixed_pass() == pw::MixedPass::grouped);
    const pw::Tensor<double> dx_mixed = m.backward(dy);
    std::vector<pw::Tensor<double>> g_mixed;
    m.visit([&](pw::Parameter<double>& p) { g_mixed.push_back(p.grad); });

    pw::zero_grad(m);
    pw::Tensor<double> y_split({6, 4}), dx_split({6, 5});
    for (int k = 0; k < 3; ++k) {
        std::vector<std::size_t> rows;
        for (std::size_t i = 0; i < ids.size(); ++i)
            if (ids[i] == k) rows.push_back(i);
        pw::Tensor<double> xk({rows.size(), 5}), dyk({rows.size(), 4});
        for (std::size_t r = 0; r < rows.size(); ++r) {
            for (std::size_t c = 0; c < 5; ++c) xk(r, c) = x(rows[r], c);
            for (std::size_t c = 0; c < 4; ++c) dyk(r, c) = dy(rows[r], c);
        }
        const auto& yk = m.forward(xk, k);
        for (std::size_t r = 0; r < rows.size(); ++r)
            for (std::size_t c = 0; c < 4; ++c) y_split(rows[r], c) = yk(r, c);
        const auto& dxk = m.backward(dyk);
        for (std::size_t r = 0; r < rows.size(); ++r)
            for (std::size_t c = 0; c < 5; ++c) dx_split(rows[r], c) = dxk(r, c);
    }
    CHECK(bit_equal(y_mixed, y_split));
    CHECK(pw::testing::relative_error(dx_mixed, dx_split) < 1e-12);
    std::size_t i = 0;
    m.visit([&](pw::Parameter<double>& p) {
        INFO(p.name());
        CHECK(pw::testing::relative_error(g_mixed[i++], p.grad) < 1e-12);
    });
}

TEST_CASE("multitask: per-task batch-norm statistics") {
    pw::manual_seed(123);
    pw::MultiTask<ConvPatched, Linear64> m(ConvPatched(conv_body()), heads(2, 3, 2));
    auto& s0 = m.statistics(0);
    auto& s1 = m.statistics(1);
    REQUIRE(s0.size() == 2);
    CHECK(s0[0].name() == "task0.batchnorm2.running_mean");
    CHECK(s1[1].name() == "task1.batchnorm2.running_var");
    CHECK(!s0[0].trainable());
    auto& bn = m.backbone().inner().get<2>();
    const pw::Tensor<double> bn_mean = bn.running_mean;

    const auto x = random_tensor({4, 4, 4, 2}, 1);
    m.forward(x, 0);
    // Task 0's statistics moved, task 1's and the backbone's own did not.
    CHECK(!bit_equal(s0[0].value, bn_mean));
    CHECK(bit_equal(s1[0].value, bn_mean));
    CHECK(bit_equal(bn.running_mean, bn_mean));
    const pw::Tensor<double> after_one = s0[0].value;

    // A mixed batch moves each present task's statistics once, as the per-task
    // passes would, although its backward re-runs all but the last group's forward.
    const std::vector<int> ids{0, 1, 0, 1};
    const auto dy = random_tensor({4, 2}, 2);
    m.forward(x, ids);
    m.backward(dy);
    pw::manual_seed(123);
    pw::MultiTask<ConvPatched, Linear64> ref(ConvPatched(conv_body()), heads(2, 3, 2));
    ref.forward(x, 0);
    pw::Tensor<double> x0({2, 4, 4, 2}), x1({2, 4, 4, 2});
    const std::size_t row = 32;
    for (std::size_t r = 0; r < 2; ++r)
        for (std::size_t c = 0; c < row; ++c) {
            x0[r * row + c] = x[(2 * r) * row + c];
            x1[r * row + c] = x[(2 * r + 1) * row + c];
        }
    ref.forward(x0, 0);
    ref.forward(x1, 1);
    CHECK(bit_equal(s0[0].value, ref.statistics(0)[0].value));
    CHECK(bit_equal(s0[1].value, ref.statistics(0)[1].value));
    CHECK(bit_equal(s1[0].value, ref.statistics(1)[0].value));
    CHECK(bit_equal(s1[1].value, ref.statistics(1)[1].value));

    // Inference mode uses each task's own statistics.
    pw::set_training(m, false);
    s1[0].value.fill(3.0);
    const pw::Tensor<double> y0 = m.forward(x, 0);
    const pw::Tensor<double> y1_before = m.forward(x, 1);
    s1[0].value = s0[0].value;
    s1[1].value = s0[1].value;
    for (std::size_t i = 0; i < m.bank(0).size(); ++i) m.bank(1)[i].value = m.bank(0)[i].value;
    m.head(1).weight.value = m.head(0).weight.value;
    m.head(1).bias.value = m.head(0).bias.value;
    const pw::Tensor<double> y1_after = m.forward(x, 1);
    CHECK(!bit_equal(y0, y1_before));
    CHECK(bit_equal(y0, y1_after));
}

TEST_CASE("multitask: a step on task 0 leaves task 1's bank and head alone; shared weights learn from both") {
    pw::MultiTask<MlpShared, Linear64> m(MlpShared(mlp_body()), heads(2, 6, 3), pw::PerTaskRoles{norm_roles});
    randomize(m, 5);
    pw::BasicSGD<double> opt{pw::trainable_parameters(m), {.lr = 0.1}};
    const auto task1 = snapshot(m, 1);
    const auto shared = snapshot(m, pw::shared_task);
    const auto task0 = snapshot(m, 0);
    const auto x = random_tensor({4, 5}, 9);
    const std::vector<int> labels{0, 2, 1, 0};
    pw::zero_grad(m);
    auto ce = pw::cross_entropy(m.forward(x, 0), std::span<const int>(labels));
    m.backward(ce.grad);
    m.visit([&](pw::Parameter<double>& p) {
        if (p.task() == 1) CHECK(p.grad.vector().norm() == 0.0);
    });
    opt.step();
    const auto task1_after = snapshot(m, 1);
    for (std::size_t i = 0; i < task1.size(); ++i) CHECK(bit_equal(task1[i], task1_after[i]));
    const auto shared_after = snapshot(m, pw::shared_task);
    const auto task0_after = snapshot(m, 0);
    bool shared_moved = false, task0_moved = false;
    for (std::size_t i = 0; i < shared.size(); ++i) shared_moved = shared_moved || !bit_equal(shared[i], shared_after[i]);
    for (std::size_t i = 0; i < task0.size(); ++i) task0_moved = task0_moved || !bit_equal(task0[i], task0_after[i]);
    CHECK(shared_moved);
    CHECK(task0_moved);
}

namespace {
pw::VectorSource<double> make_source(std::size_t batches, std::size_t rows, int classes, std::uint64_t seed) {
    pw::VectorSource<double> src;
    for (std::size_t b = 0; b < batches; ++b) {
        pw::Batch<double> batch{random_tensor({rows, 5}, seed * 100 + b), {}};
        for (std::size_t r = 0; r < rows; ++r) {
            // A learnable rule: the class is the arg-max of the first `classes` inputs.
            int best = 0;
            for (int c = 1; c < classes; ++c)
                if (batch.x(r, std::size_t(c)) > batch.x(r, std::size_t(best))) best = c;
            batch.labels.push_back(best);
        }
        src.push_back(std::move(batch));
    }
    return src;
}
}  // namespace

TEST_CASE("multitask: joint training with each sampling scheme") {
    for (auto sampling : {pw::TaskSampling::round_robin, pw::TaskSampling::proportional, pw::TaskSampling::weighted}) {
        pw::MultiTask<MlpShared, Linear64> m(MlpShared(mlp_body()), heads(2, 6, 3), pw::PerTaskRoles{norm_roles});
        pw::initialize(m, 1);
        std::vector<pw::VectorSource<double>> sources{make_source(6, 16, 3, 1), make_source(2, 16, 2, 2)};
        pw::BasicAdamW<double> opt{pw::trainable_parameters(m), {.lr = 1e-2}};
        const auto before0 = pw::evaluate_task(m, 0, sources[0]);
        const auto h = pw::fit_multitask(m, opt, sources,
                                         {.epochs = 8, .sampling = sampling, .weights = {1.0, 3.0}, .seed = 4});
        REQUIRE(h.epochs.size() == 8);
        const auto& last = h.epochs.back();
        CHECK(last.steps[0] + last.steps[1] == 8);
        if (sampling == pw::TaskSampling::round_robin) CHECK(last.steps[0] == 4);
        const auto after0 = pw::evaluate_task(m, 0, sources[0]);
        CHECK(after0.loss < before0.loss);
    }
    pw::MultiTask<MlpShared, Linear64> m(MlpShared(mlp_body()), heads(2, 6, 3), pw::PerTaskRoles{norm_roles});
    std::vector<pw::VectorSource<double>> one{make_source(2, 4, 3, 1)};
    pw::BasicSGD<double> opt{pw::trainable_parameters(m), {.lr = 1e-2}};
    CHECK_THROWS_AS(pw::fit_multitask(m, opt, one), pw::ConfigError);
}

TEST_CASE("multitask: sequential transfer leaves earlier tasks bit-for-bit identical") {
    pw::MultiTask<MlpShared, Linear64> m(MlpShared(mlp_body()), heads(2, 6, 3), pw::PerTaskRoles{norm_roles});
    randomize(m, 21);
    const auto x = random_tensor({7, 5}, 22);
    std::vector<pw::Tensor<double>> outputs;
    for (int k = 0; k < 2; ++k) outputs.push_back(m.forward(x, k));
    const auto shared = snapshot(m, pw::shared_task);
    const auto task0 = snapshot(m, 0), task1 = snapshot(m, 1);

    const int k = m.add_task(Linear64(6, 3));
    CHECK(k == 2);
    // The new bank starts from the pre-trained (construction-time) values: ones and zeros of a fresh LayerNorm.
    for (std::size_t i = 0; i < 8; ++i) {
        CHECK(m.bank(2)[0].value[i] == 1.0);
        CHECK(m.bank(2)[1].value[i] == 0.0);
    }
    m.train_only(k);
    m.visit([&](pw::Parameter<double>& p) { CHECK(p.trainable() == (p.task() == k)); });
    m.set_active_task(k);
    pw::BasicAdamW<double> opt{pw::trainable_parameters(m), {.lr = 1e-2}};
    auto src = make_source(4, 8, 3, 9);
    const auto before = pw::evaluate(m, src);
    pw::fit(m, opt, src, {.epochs = 5, .verbose = false});
    const auto after = pw::evaluate(m, src);
    CHECK(after.loss < before.loss);

    for (int t = 0; t < 2; ++t) CHECK(bit_equal(m.forward(x, t), outputs[std::size_t(t)]));
    const auto shared_after = snapshot(m, pw::shared_task);
    const auto task0_after = snapshot(m, 0), task1_after = snapshot(m, 1);
    for (std::size_t i = 0; i < shared.size(); ++i) CHECK(bit_equal(shared[i], shared_after[i]));
    for (std::size_t i = 0; i < task0.size(); ++i) CHECK(bit_equal(task0[i], task0_after[i]));
    for (std::size_t i = 0; i < task1.size(); ++i) CHECK(bit_equal(task1[i], task1_after[i]));
    const int k2 = m.add_task(Linear64(6, 3), 2);
    CHECK(bit_equal(m.bank(k2)[0].value, m.bank(2)[0].value));
}

TEST_CASE("multitask: base and patches through safetensors reproduce every task") {
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / ("patchwork_multitask_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    pw::MultiTask<ConvPatched, Linear64> m(ConvPatched(conv_body()), heads(3, 3, 2));
    randomize(m, 31);
    pw::save_base(m, dir / "base.safetensors");
    for (int k = 0; k < 3; ++k) pw::save_patch(m, dir / ("task" + std::to_string(k) + ".safetensors"), k);
    const auto base = pw::read_safetensors(dir / "base.safetensors");
    CHECK(base.find("conv0.weight") != nullptr);
    CHECK(base.find("depthwiseconv1.weight") == nullptr);  // a slot, never saved
    const auto patch1 = pw::read_safetensors(dir / "task1.safetensors");
    CHECK(patch1.find("task1.depthwiseconv1.weight") != nullptr);
    CHECK(patch1.find("task1.batchnorm2.running_var") != nullptr);
    CHECK(patch1.find("task1.head.weight") != nullptr);
    CHECK(patch1.find("task0.head.weight") == nullptr);

    pw::MultiTask<ConvPatched, Linear64> fresh(ConvPatched(conv_body()), heads(3, 3, 2));
    randomize(fresh, 99);
    pw::load_base(fresh, dir / "base.safetensors");
    for (int k = 0; k < 3; ++k) pw::load_patch(fresh, dir / ("task" + std::to_string(k) + ".safetensors"), k);
    CHECK_THROWS_AS(pw::load_patch(fresh, dir / "task1.safetensors", 2), pw::IoError);
    const auto x = random_tensor({3, 4, 4, 2}, 5);
    pw::set_training(m, false);
    pw::set_training(fresh, false);
    for (int k = 0; k < 3; ++k) CHECK(bit_equal(m.forward(x, k), fresh.forward(x, k)));
    fs::remove_all(dir);
}

TEST_CASE("multitask: clear errors") {
    pw::MultiTask<MlpPatched, Linear64> m(MlpPatched(mlp_body()), heads(2, 6, 4));
    m.set_path("mt");
    const auto x = random_tensor({3, 5}, 1);
    CHECK_THROWS_WITH_AS(m.backward(random_tensor({3, 4}, 2)), doctest::Contains("mt: backward needs a forward"),
                         pw::Error);
    CHECK_THROWS_WITH_AS(m.forward(x, 2), doctest::Contains("mt: task id 2 is out of range; the model has 2 tasks"),
                         pw::ConfigError);
    CHECK_THROWS_AS(m.forward(x, -1), pw::ConfigError);
    CHECK_THROWS_AS(m.set_active_task(5), pw::ConfigError);
    const std::vector<int> two{0, 1};
    CHECK_THROWS_WITH_AS(m.forward(x, two), doctest::Contains("2 task ids for a batch of 3 rows"), pw::ShapeError);
    const std::vector<int> bad{0, 1, 4};
    CHECK_THROWS_WITH_AS(m.forward(x, bad), doctest::Contains("task id 4 at row 2"), pw::ConfigError);
    // A failed forward leaves nothing to backward.
    CHECK_THROWS_AS(m.backward(random_tensor({3, 4}, 2)), pw::Error);
    const std::vector<int> three{0, 1, 1};
    m.forward(x, three);
    CHECK_THROWS_AS(m.backward(random_tensor({3, 5}, 2)), pw::ShapeError);
    CHECK_THROWS_AS((pw::MultiTask<MlpPatched, Linear64>(MlpPatched(mlp_body()), {})), pw::ConfigError);
}

// -- One-pass mixed batches ----------------------------------------------------

namespace {

constexpr unsigned role_bits(pw::Role r) { return pw::role_bit(r); }

using ConvBiasBody = pw::Sequential<Conv64, Relu64, Depthwise64, Pool64>;
using ConvBias = pw::Tune<ConvBiasBody, pw::BiasOnly>;  // conv biases per task
using ScaleShiftLinear = pw::Tune<Linear64, pw::FineTune, pw::ScaleShift>;
using ScaleShiftBody = pw::Sequential<ScaleShiftLinear, Relu64, ScaleShiftLinear>;
using AdapterLinear = pw::Tune<Linear64, pw::FineTune, pw::Adapter<3>>;
using GeluAdapterLinear = pw::Tune<Linear64, pw::FineTune, pw::Adapter<2, pw::AdapterActivation::gelu>>;
using AdapterBody = pw::Sequential<AdapterLinear, LayerNorm64, Relu64, GeluAdapterLinear>;
using AdapterConv = pw::Tune<Conv64, pw::Adapter<2>>;
using ConvAdapterBody = pw::Sequential<AdapterConv, Relu64, Pool64>;
using LoraLinear2 = pw::Tune<Linear64, pw::FineTune, pw::LoRA<2>>;
using LoraLinear3 = pw::Tune<Linear64, pw::FineTune, pw::LoRA<3, 6>>;
using LoraBody = pw::Sequential<LoraLinear2, Relu64, LoraLinear3>;

ConvBiasBody conv_bias_body() {
    return ConvBiasBody(Conv64(2, 3, 3, {.padding = 1}), Relu64{}, Depthwise64(3, 3, {.padding = 1}), Pool64{});
}
ScaleShiftBody scale_shift_body() { return ScaleShiftBody(ScaleShiftLinear(5, 7), Relu64{}, ScaleShiftLinear(7, 6)); }
AdapterBody adapter_body() { return AdapterBody(AdapterLinear(5, 7), LayerNorm64(7), Relu64{}, GeluAdapterLinear(7, 6)); }
ConvAdapterBody conv_adapter_body() { return ConvAdapterBody(AdapterConv(2, 4, 3, pw::Conv2dOptions{.padding = 1}), Relu64{}, Pool64{}); }
LoraBody lora_body() { return LoraBody(LoraLinear2(5, 7), Relu64{}, LoraLinear3(7, 6, false)); }

/// Makes every shared (non-bank) backbone parameter trainable, so that the
/// comparison also covers gradients summed over all tasks' rows.
template <class M>
void train_shared(M& m, const std::string& prefix = "") {
    m.visit([&](pw::Parameter<double>& p) {
        if (p.task() == pw::shared_task && p.name().starts_with(prefix)) p.set_trainable(true);
    });
}

pw::Tensor<double> take_rows(const pw::Tensor<double>& t, const std::vector<std::size_t>& rows) {
    pw::Shape s = t.shape();
    s[0] = rows.size();
    pw::Tensor<double> out(s);
    const std::size_t w = t.size() / t.dim(0);
    for (std::size_t r = 0; r < rows.size(); ++r) std::copy_n(t.data() + rows[r] * w, w, out.data() + r * w);
    return out;
}
void put_rows(const pw::Tensor<double>& src, const std::vector<std::size_t>& rows, pw::Tensor<double>& dst) {
    const std::size_t w = dst.size() / dst.dim(0);
    REQUIRE(src.size() == rows.size() * w);
    for (std::size_t r = 0; r < rows.size(); ++r) std::copy_n(src.data() + r * w, w, dst.data() + rows[r] * w);
}

/// Runs the mixed batch (x, ids) forward and backward, then each task's rows
/// alone (forward(x_k, k), backward), from the same parameters and running
/// statistics, and checks: the one-pass path ran; outputs, input gradients,
/// every parameter gradient and every running statistic agree within `tol`
/// (relative); every parameter of a task absent from the batch has a zero gradient.
template <class MT>
void check_one_pass_equals_per_task(MT& m, const pw::Tensor<double>& x, const std::vector<int>& ids,
                                    std::uint64_t seed, double tol = 1e-12) {
    const bool input_grad = m.input_grad();
    const std::size_t n = ids.size();
    const int tasks = int(m.tasks());
    REQUIRE(m.one_pass_supported());
    std::vector<pw::Tensor<double>> stats_before;
    for (int k = 0; k < tasks; ++k)
        for (auto& p : m.statistics(k)) stats_before.push_back(p.value);

    pw::zero_grad(m);
    const pw::Tensor<double> y_mixed = m.forward(x, ids);
    CHECK(m.last_mixed_pass() == pw::MixedPass::one_pass);
    const auto dy = random_tensor(y_mixed.shape(), seed);
    const pw::Tensor<double> dx_mixed = m.backward(dy);
    std::vector<pw::Tensor<double>> g_mixed, stats_mixed;
    m.visit([&](pw::Parameter<double>& p) { g_mixed.push_back(p.grad); });
    for (int k = 0; k < tasks; ++k)
        for (auto& p : m.statistics(k)) stats_mixed.push_back(p.value);

    // Absent tasks: no gradient at all.
    std::size_t i = 0;
    m.visit([&](pw::Parameter<double>& p) {
        const pw::Tensor<double>& g = g_mixed[i++];
        if (p.task() >= 0 && std::find(ids.begin(), ids.end(), p.task()) == ids.end()) {
            INFO(p.name());
            CHECK(g.vector().norm() == 0.0);
        }
    });

    // The per-task passes, from the same statistics.
    i = 0;
    for (int k = 0; k < tasks; ++k)
        for (auto& p : m.statistics(k)) p.value = stats_before[i++];
    pw::zero_grad(m);
    pw::Tensor<double> y_split(y_mixed.shape()), dx_split(x.shape());
    for (int k = 0; k < tasks; ++k) {
        std::vector<std::size_t> rows;
        for (std::size_t r = 0; r < n; ++r)
            if (ids[r] == k) rows.push_back(r);
        if (rows.empty()) continue;
        const auto xk = take_rows(x, rows);  // alive until the backward (layers keep their input)
        put_rows(m.forward(xk, k), rows, y_split);
        CHECK(m.last_mixed_pass() == pw::MixedPass::none);
        const pw::Tensor<double>& dxk = m.backward(take_rows(dy, rows));
        if (input_grad) put_rows(dxk, rows, dx_split);
        else CHECK(dxk.empty());
    }
    CHECK(pw::testing::relative_error(y_mixed, y_split) <= tol);
    if (input_grad) CHECK(pw::testing::relative_error(dx_mixed, dx_split) <= tol);
    else CHECK(dx_mixed.empty());
    i = 0;
    m.visit([&](pw::Parameter<double>& p) {
        INFO(p.name());
        CHECK(pw::testing::relative_error(g_mixed[i++], p.grad) <= tol);
    });
    i = 0;
    for (int k = 0; k < tasks; ++k)
        for (auto& p : m.statistics(k)) {
            INFO(p.name());
            CHECK(pw::testing::relative_error(stats_mixed[i++], p.value) <= tol);
        }
}

// Four tasks: task 2 absent, task 1 on a single row, rows not grouped.
const std::vector<int> mixed_ids{3, 0, 1, 3, 0, 3, 0};

}  // namespace

TEST_CASE("multitask one pass: NormPatch (BatchNorm2d) and DepthwisePatch equal the per-task passes") {
    pw::MultiTask<ConvPatched, Linear64> m(ConvPatched(conv_body()), heads(4, 3, 2));
    randomize(m, 41);
    train_shared(m);  // the dense convolution learns from every task's rows
    const auto x = random_tensor({7, 4, 4, 2}, 42);
    SUBCASE("training mode: batch statistics per task, running statistics move per task") {
        check_one_pass_equals_per_task(m, x, mixed_ids, 43);
    }
    SUBCASE("inference mode: each task's running statistics") {
        pw::set_training(m, false);
        check_one_pass_equals_per_task(m, x, mixed_ids, 44);
    }
    SUBCASE("statistics shared by all tasks") {
        pw::MultiTask<ConvPatched, Linear64> shared_stats(ConvPatched(conv_body()), heads(4, 3, 2),
                                                          pw::PerTaskTrainable{}, {.per_task_statistics = false});
        randomize(shared_stats, 45);
        auto& bn = shared_stats.backbone().inner().get<2>();
        const pw::Tensor<double> mean0 = bn.running_mean, var0 = bn.running_var;
        pw::zero_grad(shared_stats);
        const pw::Tensor<double> y = shared_stats.forward(x, mixed_ids);
        CHECK(shared_stats.last_mixed_pass() == pw::MixedPass::one_pass);
        const pw::Tensor<double> mean_mixed = bn.running_mean, var_mixed = bn.running_var;
        // Per-task passes in task order move the one set of statistics once per task.
        bn.running_mean = mean0;
        bn.running_var = var0;
        for (int k : {0, 1, 3}) {
            std::vector<std::size_t> rows;
            for (std::size_t r = 0; r < mixed_ids.size(); ++r)
                if (mixed_ids[r] == k) rows.push_back(r);
            shared_stats.forward(take_rows(x, rows), k);
        }
        CHECK(pw::testing::relative_error(mean_mixed, bn.running_mean) <= 1e-12);
        CHECK(pw::testing::relative_error(var_mixed, bn.running_var) <= 1e-12);
    }
}

TEST_CASE("multitask one pass: BiasOnly on convolutions equals the per-task passes") {
    pw::MultiTask<ConvBias, Linear64> m(ConvBias(conv_bias_body()), heads(4, 3, 2));
    CHECK(m.slot_count() == 2);  // conv0.bias, depthwiseconv2.bias
    randomize(m, 51);
    train_shared(m);
    check_one_pass_equals_per_task(m, random_tensor({7, 4, 4, 2}, 52), mixed_ids, 53);
}

TEST_CASE("multitask one pass: NormPatch on LayerNorm and BiasOnly on Linear equal the per-task passes") {
    SUBCASE("LayerNorm scale and shift per task, shared weights frozen") {
        pw::MultiTask<MlpPatched, Linear64> m(MlpPatched(mlp_body()), heads(4, 6, 3));
        CHECK(m.slot_count() == 2);
        randomize(m, 55);
        check_one_pass_equals_per_task(m, random_tensor({7, 5}, 56), mixed_ids, 57);
    }
    SUBCASE("LayerNorm banks with every shared weight trainable") {
        pw::MultiTask<MlpShared, Linear64> m(MlpShared(mlp_body()), heads(4, 6, 3), pw::PerTaskRoles{norm_roles});
        randomize(m, 58);
        check_one_pass_equals_per_task(m, random_tensor({7, 5}, 59), mixed_ids, 60);
    }
    SUBCASE("Linear biases per task") {
        using Body = pw::Tune<MlpBody, pw::BiasOnly>;
        pw::MultiTask<Body, Linear64> m(Body(mlp_body()), heads(4, 6, 3));
        CHECK(m.slot_count() == 2);  // linear0.bias, linear3.bias
        randomize(m, 65);
        train_shared(m);
        check_one_pass_equals_per_task(m, random_tensor({7, 5}, 66), mixed_ids, 67);
    }
}

TEST_CASE("multitask one pass: ScaleShift equals the per-task passes") {
    pw::MultiTask<ScaleShiftBody, Linear64> m(scale_shift_body(), heads(4, 6, 3),
                                              pw::PerTaskRoles{role_bits(pw::Role::scale_shift)});
    CHECK(m.slot_count() == 4);
    randomize(m, 61);
    check_one_pass_equals_per_task(m, random_tensor({7, 5}, 62), mixed_ids, 63);
}

TEST_CASE("multitask one pass: Adapter equals the per-task passes") {
    SUBCASE("on Linear layers (ReLU and GELU adapters), shared weights trainable") {
        pw::MultiTask<AdapterBody, Linear64> m(adapter_body(), heads(4, 6, 3),
                                               pw::PerTaskRoles{role_bits(pw::Role::adapter)});
        CHECK(m.slot_count() == 8);
        randomize(m, 71);
        check_one_pass_equals_per_task(m, random_tensor({7, 5}, 72), mixed_ids, 73);
    }
    SUBCASE("on a convolution (several matrix rows per batch row)") {
        pw::MultiTask<ConvAdapterBody, Linear64> m(conv_adapter_body(), heads(4, 4, 2));
        CHECK(m.slot_count() == 4);
        randomize(m, 74);
        check_one_pass_equals_per_task(m, random_tensor({7, 3, 3, 2}, 75), mixed_ids, 76);
    }
}

TEST_CASE("multitask one pass: LoRA equals the per-task passes") {
    pw::MultiTask<LoraBody, Linear64> m(lora_body(), heads(4, 6, 3), pw::PerTaskRoles{role_bits(pw::Role::lora)});
    CHECK(m.slot_count() == 4);
    randomize(m, 81);
    check_one_pass_equals_per_task(m, random_tensor({7, 5}, 82), mixed_ids, 83);
    // A merged update cannot differ per row: the model falls back to one pass per task.
    auto& lora0 = m.backbone().template get<0>().inner();
    lora0.merge();
    CHECK(!m.one_pass_supported());
    m.forward(random_tensor({7, 5}, 84), mixed_ids);
    CHECK(m.last_mixed_pass() == pw::MixedPass::grouped);
    lora0.unmerge();
    CHECK(m.one_pass_supported());
}

TEST_CASE("multitask one pass: per-task parameters below a patch, without an input gradient") {
    // A scale-shift patch around a convolution and a batch norm whose scale and
    // shift are per task too: with the input gradient off, the patch still has
    // to run the backward of its inner block for the batch-norm banks.
    using Block = pw::Tune<pw::Sequential<Conv64, BatchNorm64>, pw::NormPatch, pw::ScaleShift>;
    using Body = pw::Sequential<Block, Relu64, Pool64>;
    pw::MultiTask<Body, Linear64> m(Body(Block(pw::Sequential<Conv64, BatchNorm64>(Conv64(2, 3, 3, {.padding = 1}),
                                                                                   BatchNorm64(3))),
                                         Relu64{}, Pool64{}),
                                    heads(4, 3, 2));
    CHECK(m.slot_count() == 4);  // batchnorm scale, shift; scale_shift scale, shift
    randomize(m, 111);
    m.set_input_grad(false);
    check_one_pass_equals_per_task(m, random_tensor({7, 4, 4, 2}, 112), mixed_ids, 113);
    bool bn_bank_grad = false;
    m.visit([&](pw::Parameter<double>& p) {
        if (p.task() == 0 && p.name() == "task0.block0.batchnorm1.scale") bn_bank_grad = p.grad.vector().norm() > 0;
    });
    CHECK(bn_bank_grad);
}

TEST_CASE("multitask one pass: gradients by finite differences") {
    SUBCASE("BatchNorm2d (training mode) and depthwise banks, shared convolution trainable") {
        pw::MultiTask<ConvPatched, Linear64> m(ConvPatched(conv_body()), heads(3, 3, 2));
        randomize(m, 91);
        // (Not the depthwise bias: a training-mode batch norm right after it makes its gradient exactly zero.)
        train_shared(m, "conv0");
        MixedView<decltype(m)> view{m, {2, 0, 2, 2, 0}};
        check_gradients(view, pw::Shape{5, 4, 4, 2}, 1e-6);
        CHECK(m.last_mixed_pass() == pw::MixedPass::one_pass);
    }
    SUBCASE("BatchNorm2d in inference mode") {
        pw::MultiTask<ConvPatched, Linear64> m(ConvPatched(conv_body()), heads(3, 3, 2));
        randomize(m, 92);
        pw::set_training(m, false);
        MixedView<decltype(m)> view{m, {1, 0, 1, 2, 0}};
        check_gradients(view, pw::Shape{5, 4, 4, 2}, 1e-6);
        CHECK(m.last_mixed_pass() == pw::MixedPass::one_pass);
    }
    SUBCASE("convolution biases") {
        pw::MultiTask<ConvBias, Linear64> m(ConvBias(conv_bias_body()), heads(3, 3, 2));
        randomize(m, 93);
        MixedView<decltype(m)> view{m, {1, 1, 0, 2}};
        check_gradients(view, pw::Shape{4, 4, 4, 2}, 1e-6);
        CHECK(m.last_mixed_pass() == pw::MixedPass::one_pass);
    }
    SUBCASE("scale-shift, adapter and LoRA banks with shared weights") {
        pw::MultiTask<ScaleShiftBody, Linear64> ss(scale_shift_body(), heads(3, 6, 3),
                                                   pw::PerTaskRoles{role_bits(pw::Role::scale_shift)});
        randomize(ss, 94);
        MixedView<decltype(ss)> ssv{ss, {2, 0, 2, 1, 0}};
        check_gradients(ssv, pw::Shape{5, 5}, 1e-6);
        CHECK(ss.last_mixed_pass() == pw::MixedPass::one_pass);

        pw::MultiTask<AdapterBody, Linear64> ad(adapter_body(), heads(3, 6, 3),
                                                pw::PerTaskRoles{role_bits(pw::Role::adapter)});
        randomize(ad, 95);
        MixedView<decltype(ad)> adv{ad, {0, 2, 2, 1, 0}};
        check_gradients(adv, pw::Shape{5, 5}, 1e-6);
        CHECK(ad.last_mixed_pass() == pw::MixedPass::one_pass);

        pw::MultiTask<LoraBody, Linear64> lo(lora_body(), heads(3, 6, 3), pw::PerTaskRoles{role_bits(pw::Role::lora)});
        randomize(lo, 96);
        MixedView<decltype(lo)> lov{lo, {1, 1, 0, 2, 0}};
        check_gradients(lov, pw::Shape{5, 5}, 1e-6);
        CHECK(lo.last_mixed_pass() == pw::MixedPass::one_pass);
    }
}

TEST_CASE("multitask one pass: which path runs") {
    // A dense weight per task cannot be applied row by row in one GEMM: such
    // banks fall back to one pass per task.
    pw::MultiTask<MlpShared, Linear64> ln(MlpShared(mlp_body()), heads(2, 6, 4),
                                          pw::PerTaskRoles{role_bits(pw::Role::weight)});
    CHECK(!ln.one_pass_supported());
    const std::vector<int> ids{1, 0, 1};
    ln.forward(random_tensor({3, 5}, 1), ids);
    CHECK(ln.last_mixed_pass() == pw::MixedPass::grouped);
    ln.forward(random_tensor({3, 5}, 1), 0);
    CHECK(ln.last_mixed_pass() == pw::MixedPass::none);

    // The grouped path can be asked for, and gives the same result.
    pw::MultiTask<ConvPatched, Linear64> m(ConvPatched(conv_body()), heads(2, 3, 2));
    randomize(m, 101);
    pw::set_training(m, false);  // leave the statistics alone
    const auto x = random_tensor({3, 4, 4, 2}, 102);
    const auto dy = random_tensor({3, 2}, 103);
    pw::zero_grad(m);
    const pw::Tensor<double> y1 = m.forward(x, ids);
    CHECK(m.last_mixed_pass() == pw::MixedPass::one_pass);
    const pw::Tensor<double> dx1 = m.backward(dy);
    std::vector<pw::Tensor<double>> g1;
    m.visit([&](pw::Parameter<double>& p) { g1.push_back(p.grad); });
    m.set_one_pass(false);
    pw::zero_grad(m);
    const pw::Tensor<double> y2 = m.forward(x, ids);
    CHECK(m.last_mixed_pass() == pw::MixedPass::grouped);
    const pw::Tensor<double> dx2 = m.backward(dy);
    CHECK(pw::testing::relative_error(y1, y2) <= 1e-12);
    CHECK(pw::testing::relative_error(dx1, dx2) <= 1e-12);
    std::size_t i = 0;
    m.visit([&](pw::Parameter<double>& p) { CHECK(pw::testing::relative_error(g1[i++], p.grad) <= 1e-12); });
    // After a one-pass step the slots hold the pre-trained values again and no gradient.
    m.set_one_pass(true);
    m.forward(x, ids);
    m.backward(dy);
    auto& dw = m.backbone().inner().get<1>();
    CHECK(!dw.weight.trainable());
    CHECK(dw.weight.grad.empty());
}

TEST_CASE("multitask one pass: clear errors") {
    pw::MultiTask<ConvPatched, Linear64> m(ConvPatched(conv_body()), heads(2, 3, 2));
    m.set_path("mt");
    REQUIRE(m.one_pass_supported());
    const auto x = random_tensor({3, 4, 4, 2}, 1);
    const std::vector<int> two{0, 1};
    CHECK_THROWS_WITH_AS(m.forward(x, two), doctest::Contains("mt: 2 task ids for a batch of 3 rows"),
                         pw::ShapeError);
    const std::vector<int> bad{0, -1, 1};
    CHECK_THROWS_WITH_AS(m.forward(x, bad), doctest::Contains("mt: task id -1 at row 1 is out of range"),
                         pw::ConfigError);
    CHECK_THROWS_AS(m.backward(random_tensor({3, 2}, 2)), pw::Error);
    const std::vector<int> ok{1, 0, 1};
    m.forward(x, ok);
    CHECK_THROWS_WITH_AS(m.backward(random_tensor({2, 2}, 2)), doctest::Contains("mt: multitask output gradient"),
                         pw::ShapeError);
    // A module's backward outside the mixed batch of its forward is refused.
    auto& bn = m.backbone().inner().get<2>();
    CHECK_THROWS_WITH_AS(bn.backward(random_tensor({3, 4, 4, 3}, 3)),
                         doctest::Contains("batchnorm2: backward of a mixed-task forward"), pw::Error);
}
