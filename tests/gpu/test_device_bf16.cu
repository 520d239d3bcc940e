// bf16 storage on the device: modules built with Scalar = pw::bf16 keep their
// parameters and activations in bf16, compute in fp32 (kernels and cuBLAS),
// accumulate parameter gradients in fp32, and the optimisers update an fp32
// master copy of each bf16 parameter.
//
// The reference is the same module in fp32 on the CPU with the same weights
// and inputs, both rounded to bf16 first (so the two differ only by the
// device's rounding of activations to bf16). Each check's tolerance is a few
// bf16 roundings (2^-8 relative each) through the module's depth; a device
// that lost the fp32 accumulation (a bf16 sum over hundreds of terms) or read
// a bf16 gradient as fp32 would be off by far more. The optimiser test is
// exact: the master copy is what the CPU's fp32 update computes.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "device_compare.hpp"
#include "temp_dir.hpp"

#include "patchwork/layers/attention.hpp"
#include "patchwork/layers/dropout.hpp"
#include "patchwork/layers/embedding.hpp"
#include "patchwork/io/parameter_files.hpp"
#include "patchwork/multitask/multitask.hpp"
#include "patchwork/multitask/train.hpp"
#include "patchwork/train/trainer.hpp"
#include "patchwork/policies/norm_patch.hpp"
#include "patchwork/search/derive.hpp"
#include "patchwork/search/loop.hpp"
#include "patchwork/search/penalty.hpp"
#include "patchwork/search/search_module.hpp"
#include "patchwork/train/clip.hpp"
#include "patchwork/transformer/bert.hpp"

// The definitions of the transformer layers' device operations (nvcc only).
#include "patchwork/kernels/attention.cuh"

using namespace device_test;
using pw::bf16;

namespace {

/// A host tensor rounded to bf16 and back (what a bf16 tensor of it holds).
Tensor<float> bf16_rounded(const Tensor<float>& x) { return pw::cast<float>(pw::cast<bf16>(x)); }

/// Every parameter of a float CPU module drawn at random and rounded to bf16.
template <class M>
void randomize_bf16(M& m, std::mt19937& rng, double scale = 0.5) {
    m.visit([&](auto& p) { p.value = bf16_rounded(random_tensor<float>(p.value.shape(), rng, scale)); });
}

/// ||cpu - dev|| / max(||cpu||, ||dev||) for a float CPU tensor and a device
/// tensor of bf16 (activations) or float (gradients).
template <class E>
double bf16_error(const Tensor<float>& cpu, const Tensor<E, Cuda>& dev) {
    return rel_error(cpu, pw::cast<float>(pw::to_host(dev)));
}

struct Bf16Worst {
    const char* what;
    double worst = 0;
    std::string worst_item;
    template <class E>
    void check(const Tensor<float>& cpu, const Tensor<E, Cuda>& dev, const std::string& item, double tol) {
        const double e = bf16_error(cpu, dev);
        if (e >= worst) {
            worst = e;
            worst_item = item;
        }
        INFO(item << ": relative error " << e << ", tolerance " << tol);
        CHECK(e < tol);
    }
    /// Every trainable parameter's gradient (fp32 on both sides).
    template <class C, class G>
    void gradients(C& cpu, G& dev, double tol) {
        std::vector<const pw::Parameter<float>*> src;
        cpu.visit([&](auto& p) { src.push_back(&p); });
        std::size_t i = 0;
        dev.visit([&](auto& p) {
            REQUIRE(i < src.size());
            const auto* c = src[i++];
            REQUIRE(c->name() == p.name());
            REQUIRE(c->trainable() == p.trainable());
            if (!p.trainable()) return;
            static_assert(std::is_same_v<typename std::decay_t<decltype(p.grad)>::Scalar, float>,
                          "bf16 parameters keep fp32 gradients");
            if (p.name().ends_with("key.bias")) return;  // zero in exact arithmetic: rounding noise on both sides
            check(c->grad, p.grad, p.name(), tol);
        });
        REQUIRE(i == src.size());
    }
    ~Bf16Worst() { std::printf("%s (bf16): largest relative error %.3g (%s)\n", what, worst, worst_item.c_str()); }
};

/// Forward, input gradient and parameter gradients of a float CPU module and
/// its bf16 device twin on the same bf16-rounded input and output gradient.
template <class C, class G>
void bf16_parity(C& cpu, G& dev, const Shape& in, std::mt19937& rng, Bf16Worst& w, double tol,
                 const std::vector<std::int32_t>& mask = {}) {
    pw::search::copy_parameters(cpu, dev);  // float -> bf16: exact, the values are bf16-rounded
    const Tensor<float> x = bf16_rounded(random_tensor<float>(in, rng));
    const Tensor<bf16, Cuda> xd(pw::cast<bf16>(x));
    pw::AttentionMask scope(mask, in[0], in.rank() > 2 ? in[1] : 1);
    const Tensor<float>& y = cpu.forward(x);
    const_cast<Tensor<bf16, Cuda>&>(dev.forward(xd)).poison();
    const Tensor<bf16, Cuda>& yd = dev.forward(xd);
    w.check(y, yd, "forward", tol);
    const Tensor<float> g = bf16_rounded(random_tensor<float>(y.shape(), rng));
    const Tensor<bf16, Cuda> gd(pw::cast<bf16>(g));
    pw::zero_grad(cpu);
    pw::zero_grad(dev);
    const Tensor<float>& dx = cpu.backward(g);
    const Tensor<bf16, Cuda>& dxd = dev.backward(gd);
    if (cpu.input_grad()) w.check(dx, dxd, "input gradient", tol);
    w.gradients(cpu, dev, tol);
}

template <class T>
pw::BertConfig tiny_bert(std::size_t layers, std::size_t hidden, std::size_t heads) {
    pw::BertConfig c;
    c.vocab_size = 41;
    c.hidden_size = hidden;
    c.num_hidden_layers = layers;
    c.num_attention_heads = heads;
    c.intermediate_size = 2 * hidden;
    c.max_position_embeddings = 16;
    c.type_vocab_size = 2;
    c.layer_norm_eps = 1e-12;
    c.hidden_dropout_prob = 0;
    c.attention_probs_dropout_prob = 0;
    return c;
}

}  // namespace

TEST_CASE("bf16 rounds to nearest even, on the host and on the device") {
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1);
    // 1 + 3 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to 1 + 2^-6.
    const Tensor<float> x(Shape{6}, {1.0f, 1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-7f + 0x1p-10f, -2.5f,
                                     3.0e38f});
    // 3e38 lies between 225 and 226 bf16 steps of 2^120 (225.7): 226 2^120 = 0x1.c4p+127.
    const Tensor<float> want(Shape{6}, {1.0f, 1.0f, 1.0f + 0x1p-6f, 1.0f + 0x1p-7f, -2.5f, 0x1.c4p+127f});
    const Tensor<float> host = pw::cast<float>(pw::cast<bf16>(x));
    for (std::size_t i = 0; i < x.size(); ++i) CHECK(host[i] == want[i]);
    Tensor<bf16, Cuda> d;
    pw::cuda::convert(Tensor<float, Cuda>(x), d, "test");
    Tensor<float, Cuda> back;
    pw::cuda::convert(d, back, "test");
    const Tensor<float> dev = pw::to_host(back);
    for (std::size_t i = 0; i < x.size(); ++i) CHECK(dev[i] == want[i]);
    // bf16 -> double -> bf16 is exact.
    Tensor<double, Cuda> wide;
    pw::cuda::convert(d, wide, "test");
    const Tensor<double> w = pw::to_host(wide);
    for (std::size_t i = 0; i < x.size(); ++i) CHECK(w[i] == double(want[i]));
}

TEST_CASE("Linear, LayerNorm, GELU and the policies in bf16 on the device follow fp32 on the CPU") {
    std::mt19937 rng(7);
    Bf16Worst w{"modules"};
    using L = pw::BasicLinear<float>;
    using DL = pw::BasicLinear<bf16, Cuda>;
    // A Linear with 300 inputs: dot products of 300 bf16 terms, summed in fp32.
    // With a bf16 running sum the error would be near 2^-8 sqrt(300), here it
    // is one rounding of the output.
    {
        Bf16Worst wide{"Linear(300, 33)"};
        L cpu(300, 33);
        DL dev(300, 33);
        randomize_bf16(cpu, rng, 0.1);
        bf16_parity(cpu, dev, Shape{37, 300}, rng, wide, 6e-3);
    }
    {
        pw::BasicLayerNorm<float> cpu({70});
        pw::BasicLayerNorm<bf16, Cuda> dev({70});
        randomize_bf16(cpu, rng);
        bf16_parity(cpu, dev, Shape{9, 70}, rng, w, 1e-2);
    }
    {
        pw::Sequential<L, pw::BasicGelu<float>, L> cpu(L(24, 40), {}, L(40, 12));
        pw::Sequential<DL, pw::BasicGelu<bf16, Cuda>, DL> dev(DL(24, 40), {}, DL(40, 12));
        randomize_bf16(cpu, rng);
        bf16_parity(cpu, dev, Shape{11, 24}, rng, w, 1.5e-2);
    }
    {
        pw::Tune<L, pw::LoRA<4, 8>> cpu(L(48, 20));
        pw::Tune<DL, pw::LoRA<4, 8>> dev(DL(48, 20));
        randomize_bf16(cpu, rng);
        bf16_parity(cpu, dev, Shape{13, 48}, rng, w, 1e-2);
    }
    {
        pw::Tune<L, pw::Adapter<6>> cpu(L(32, 32));
        pw::Tune<DL, pw::Adapter<6>> dev(DL(32, 32));
        randomize_bf16(cpu, rng);
        bf16_parity(cpu, dev, Shape{10, 32}, rng, w, 1e-2);
    }
    {
        pw::Tune<L, pw::ScaleShift> cpu(L(16, 24));
        pw::Tune<DL, pw::ScaleShift> dev(DL(16, 24));
        randomize_bf16(cpu, rng);
        bf16_parity(cpu, dev, Shape{7, 16}, rng, w, 1e-2);
    }
    {
        pw::Tune<L, pw::BiasOnly> cpu(L(16, 8));
        pw::Tune<DL, pw::BiasOnly> dev(DL(16, 8));
        randomize_bf16(cpu, rng);
        bf16_parity(cpu, dev, Shape{5, 16}, rng, w, 1e-2);
    }
}

TEST_CASE("A BertLayer and a BertModel with LoRA in bf16 on the device follow fp32 on the CPU") {
    std::mt19937 rng(11);
    Bf16Worst w{"BertLayer"};
    {
        const pw::BertConfig c = tiny_bert<float>(1, 24, 3);
        pw::BertLayer<pw::bert::LoRAQueryValue<4, 8>, float> cpu(c);
        pw::BertLayer<pw::bert::LoRAQueryValue<4, 8>, bf16, Cuda> dev(c);
        randomize_bf16(cpu, rng, 0.3);
        std::vector<std::int32_t> mask(3 * 7, 1);
        mask[6] = mask[13] = mask[12] = 0;
        // The key weight's gradient comes from differences of softmax terms (it
        // would vanish for equal scores): it has the largest error, 2.65e-2 on the CPU execution.
        bf16_parity(cpu, dev, Shape{3, 7, 24}, rng, w, 4e-2, mask);
    }
}

#ifdef PATCHWORK_CPU_CUDA
TEST_CASE("bf16 GEMMs run in cuBLAS's default math mode (tensor cores); the handle keeps its own mode") {
    // The CPU execution's cuBLAS records the math mode of each GemmEx call. Under the handle's pedantic mode
    // (exact fp32 for float GEMMs) a GPU would run bf16 GEMMs without tensor cores.
    cublasHandle_t h = pw::cuda::context().blas();
    std::mt19937 rng(98);
    pw::BasicLinear<bf16, Cuda> lin(8, 4);
    const Tensor<bf16, Cuda> x(pw::cast<bf16>(random_tensor<float>(Shape{3, 8}, rng)));
    h->last_gemm_ex_math = CUBLAS_PEDANTIC_MATH;
    const Tensor<bf16, Cuda> y = lin.forward(x);  // bf16 -> bf16
    CHECK(h->last_gemm_ex_math == CUBLAS_DEFAULT_MATH);
    CHECK(h->math == CUBLAS_PEDANTIC_MATH);
    pw::cuda::context().set_tf32(true);
    h->last_gemm_ex_math = CUBLAS_PEDANTIC_MATH;
    pw::zero_grad(lin);
    lin.backward(y);  // the weight gradient: bf16 -> fp32
    CHECK(h->last_gemm_ex_math == CUBLAS_DEFAULT_MATH);
    CHECK(h->math == CUBLAS_TF32_TENSOR_OP_MATH);
    pw::cuda::context().set_tf32(false);
    Tensor<bf16, Cuda> a(pw::cast<bf16>(random_tensor<float>(Shape{2, 3, 4}, rng)));
    Tensor<bf16, Cuda> c(Shape{2, 3, 3});
    h->last_gemm_ex_math = CUBLAS_PEDANTIC_MATH;
    pw::cuda::gemm_batched(false, true, bf16(1.0f), a, a, bf16(0.0f), c, "test");  // attention's batched GEMMs
    CHECK(h->last_gemm_ex_math == CUBLAS_DEFAULT_MATH);
    CHECK(h->math == CUBLAS_PEDANTIC_MATH);
}
#endif

TEST_CASE("AdamW on bf16 parameters updates an fp32 master copy") {
    // Steps of lr = 1e-4 from w = 1: each is below half a bf16 step at 1
    // (2^-8 / 2), so a bf16-only update would leave w at 1 for ever. The
    // master copy takes every step exactly as the CPU's fp32 AdamW does, and
    // the bf16 value is its rounding.
    const std::size_t n = 300;
    pw::Parameter<float> cpu("w", pw::Role::weight, Shape{n});
    pw::Parameter<bf16, Cuda> dev("w", pw::Role::weight, Shape{n});
    cpu.value = Tensor<float>(Shape{n}, 1.0f);
    dev.value = Tensor<bf16, Cuda>(pw::cast<bf16>(cpu.value));
    pw::BasicAdamW<float> opt_cpu({&cpu}, {.lr = 1e-4, .weight_decay = 0.01});
    pw::BasicAdamW<bf16, Cuda> opt_dev({&dev}, {.lr = 1e-4, .weight_decay = 0.01});
    std::mt19937 rng(5);
    for (int step = 0; step < 40; ++step) {
        // Gradients of one sign: every step moves w down by about lr.
        Tensor<float> g = random_tensor<float>(Shape{n}, rng);
        for (auto& v : g) v = std::abs(v) + 0.1f;
        cpu.grad = g;
        pw::copy(g, dev.grad);
        opt_cpu.step();
        opt_dev.step();
    }
    const Tensor<float> got = pw::cast<float>(pw::to_host(dev.value));
    std::size_t moved = 0;
    for (std::size_t i = 0; i < n; ++i) {
        // The fp32 master equals the CPU's value to fp32 rounding; the bf16 value is its rounding.
        const float want = float(bf16(cpu.value[i]));
        const float ulp = std::abs(want) * 0x1p-7f;  // a bf16 step near the value
        INFO("element " << i << ": cpu " << cpu.value[i] << ", device " << got[i]);
        CHECK(std::abs(got[i] - want) <= (got[i] == want ? 0.0f : ulp));
        moved += got[i] != 1.0f;
    }
    // 40 steps of about 1e-4 each: every element has drifted by more than half a bf16 step below 1 (2^-9).
    CHECK(moved == n);
    CHECK(opt_dev.state_size() == 3 * n);  // m, v and the master copy
}

TEST_CASE("A bf16 LoRA BertModel with a head trains on the device like the fp32 model on the CPU") {
    std::mt19937 rng(3);
    const pw::BertConfig c = tiny_bert<float>(2, 16, 2);
    using Spec = pw::bert::LoRAQueryValue<2, 4>;
    pw::BertModel<pw::BertEncoder<Spec, float>> cpu(c);
    pw::BertModel<pw::BertEncoder<Spec, bf16, Cuda>> dev(c);
    randomize_bf16(cpu, rng, 0.3);
    pw::search::copy_parameters(cpu, dev);
    pw::BasicLinear<float> head(16, 4);
    pw::BasicLinear<bf16, Cuda> dev_head(16, 4);
    randomize_bf16(head, rng, 0.3);
    pw::search::copy_parameters(head, dev_head);
    pw::BasicPooler<float> pool;
    pw::BasicPooler<bf16, Cuda> dev_pool;
    CHECK(pw::trainable_count(cpu) == pw::trainable_count(dev));
    auto params = pw::trainable_parameters(cpu);
    auto dev_params = pw::trainable_parameters(dev);
    for (auto* p : pw::trainable_parameters(head)) params.push_back(p);
    for (auto* p : pw::trainable_parameters(dev_head)) dev_params.push_back(p);
    pw::BasicAdamW<float> opt(params, {.lr = 2e-2});
    pw::BasicAdamW<bf16, Cuda> dev_opt(dev_params, {.lr = 2e-2});
    pw::TokenBatch batch;
    batch.batch = 4;
    batch.tokens = 6;
    for (std::size_t i = 0; i < batch.batch * batch.tokens; ++i) batch.ids.push_back(std::int32_t(rng() % c.vocab_size));
    batch.mask.assign(batch.batch * batch.tokens, 1);
    batch.mask[5] = batch.mask[10] = batch.mask[11] = 0;
    const std::vector<int> labels = {0, 3, 1, 3};
    std::vector<double> lc, ld;
    for (int step = 0; step < 6; ++step) {
        opt.zero_grad();
        dev_opt.zero_grad();
        const auto loss = pw::cross_entropy(head.forward(pool.forward(cpu.forward(batch), batch)), labels);
        const auto dev_loss =
            pw::cross_entropy(dev_head.forward(dev_pool.forward(dev.forward(batch), batch)), labels);
        static_assert(std::is_same_v<decltype(dev_loss.value), float>, "the loss of bf16 logits is reported in fp32");
        lc.push_back(loss.value);
        ld.push_back(dev_loss.value);
        cpu.backward(pool.backward(head.backward(loss.grad)));
        dev.backward(dev_pool.backward(dev_head.backward(dev_loss.grad)));
        // Clipping reads the fp32 gradients of the bf16 parameters.
        const double norm = pw::clip_grad_norm(params, 0.5), dev_norm = pw::clip_grad_norm(dev_params, 0.5);
        INFO("step " << step << ": gradient norm fp32 CPU " << norm << ", bf16 device " << dev_norm);
        CHECK(std::abs(norm - dev_norm) < 3e-2 * norm);
        opt.step();
        dev_opt.step();
    }
    for (std::size_t i = 0; i < lc.size(); ++i) {
        INFO("step " << i << ": fp32 CPU " << lc[i] << ", bf16 device " << ld[i]);
        CHECK(std::abs(lc[i] - ld[i]) < 3e-2 * std::max(1.0, lc[i]));
    }
    CHECK(ld.back() < ld.front() - 0.1);
    // The trained bf16 model copies back into an fp32 one exactly (bf16 -> float is exact).
    pw::BertModel<pw::BertEncoder<Spec, float>> back(c);
    pw::search::copy_parameters(dev, back);
    std::vector<Tensor<float>> dv;
    dev.visit([&](auto& p) { dv.push_back(pw::cast<float>(pw::to_host(p.value))); });
    std::size_t i = 0;
    back.visit([&](auto& p) {
        REQUIRE(i < dv.size());
        CHECK(rel_error(dv[i++], p.value) == 0.0);
    });
}

namespace {
/// The per-row patch kinds of a mixed-task batch (ScaleShift, Adapter, NormPatch on LayerNorm, LoRA, BitFit) in
/// one body, 4 tasks with heads.
template <class T, class D>
using Bf16PatchedBody =
    pw::Sequential<pw::Tune<pw::BasicLinear<T, D>, pw::ScaleShift>, pw::BasicGelu<T, D>,
                   pw::Tune<pw::BasicLinear<T, D>, pw::Adapter<4>>, pw::Tune<pw::BasicLayerNorm<T, D>, pw::NormPatch>,
                   pw::Tune<pw::BasicLinear<T, D>, pw::LoRA<3, 6>>, pw::Tune<pw::BasicLinear<T, D>, pw::BiasOnly>>;

template <class T, class D>
pw::MultiTask<Bf16PatchedBody<T, D>, pw::BasicLinear<T, D>> bf16_multitask() {
    std::vector<pw::BasicLinear<T, D>> heads;
    for (int k = 0; k < 4; ++k) heads.emplace_back(24, 5);
    return {Bf16PatchedBody<T, D>(pw::Tune<pw::BasicLinear<T, D>, pw::ScaleShift>(40, 48), pw::BasicGelu<T, D>{},
                                  pw::Tune<pw::BasicLinear<T, D>, pw::Adapter<4>>(48, 48),
                                  pw::Tune<pw::BasicLayerNorm<T, D>, pw::NormPatch>(48),
                                  pw::Tune<pw::BasicLinear<T, D>, pw::LoRA<3, 6>>(48, 32),
                                  pw::Tune<pw::BasicLinear<T, D>, pw::BiasOnly>(32, 24)),
            std::move(heads)};
}
}  // namespace

TEST_CASE("MultiTask in bf16 on the device: mixed-task batches in one pass and grouped follow fp32 on the CPU") {
    std::mt19937 rng(97);
    auto cpu = bf16_multitask<float, Cpu>();
    auto dev = bf16_multitask<bf16, Cuda>();
    randomize_bf16(cpu, rng);  // every bank its own values
    Bf16Worst w{"MultiTask, mixed batches"};
    const std::vector<int> ids{3, 0, 2, 2, 1, 0, 3, 3, 1, 0, 2, 1, 0};
    for (const bool one_pass : {true, false}) {
        CAPTURE(one_pass);
        cpu.set_one_pass(one_pass);
        dev.set_one_pass(one_pass);
        cpu.set_input_grad(true);
        dev.set_input_grad(true);
        pw::search::copy_parameters(cpu, dev);
        const Tensor<float> x = bf16_rounded(random_tensor<float>(Shape{ids.size(), 40}, rng));
        const Tensor<bf16, Cuda> xd(pw::cast<bf16>(x));
        const Tensor<float>& y = cpu.forward(x, ids);
        const Tensor<bf16, Cuda>& yd = dev.forward(xd, ids);
        CHECK(dev.last_mixed_pass() == (one_pass ? pw::MixedPass::one_pass : pw::MixedPass::grouped));
        w.check(y, yd, "mixed forward", 1.5e-2);
        const Tensor<float> g = bf16_rounded(random_tensor<float>(y.shape(), rng));
        pw::zero_grad(cpu);
        pw::zero_grad(dev);
        w.check(cpu.backward(g), dev.backward(Tensor<bf16, Cuda>(pw::cast<bf16>(g))), "mixed input gradient", 1.5e-2);
        w.gradients(cpu, dev, 2.5e-2);
    }
    // One SGD step on a mixed batch: each bank steps through its own fp32 master, so each bf16 value after the
    // step is the rounding of w - lr g with the device's own fp32 gradient g (compared with the CPU's above),
    // computed here on the host in fp32. Then the loss at the new point against the CPU's step.
    // Heads scaled down to logits of order 1 (random weights give logits of order 30, whose bf16 rounding,
    // 2^-3 there, moves a saturated softmax far more than fp32 training would see).
    cpu.visit([&](auto& p) {
        if (p.name().find(".head.") != std::string::npos) {
            Tensor<float> v = p.value;
            for (auto& e : v) e *= 0.1f;
            p.value = bf16_rounded(v);
        }
    });
    cpu.set_one_pass(true);
    dev.set_one_pass(true);
    pw::search::copy_parameters(cpu, dev);
    constexpr float lr = 0.1f;
    pw::SGD oc(pw::trainable_parameters(cpu), {.lr = lr});
    pw::BasicSGD<bf16, Cuda> od(pw::trainable_parameters(dev), {.lr = lr});
    std::vector<Tensor<float>> before, dev_grads;
    for (int step = 0; step < 2; ++step) {
        const Tensor<float> x = bf16_rounded(random_tensor<float>(Shape{ids.size(), 40}, rng));
        std::vector<int> labels;
        for (std::size_t r = 0; r < ids.size(); ++r) labels.push_back(int(rng() % 5));
        oc.zero_grad();
        od.zero_grad();
        const auto lc = pw::cross_entropy(cpu.forward(x, ids), labels);
        const auto ld = pw::cross_entropy(dev.forward(Tensor<bf16, Cuda>(pw::cast<bf16>(x)), ids), labels);
        std::printf("MultiTask SGD, %s the step: loss %.6g (CPU fp32) %.6g (device bf16)\n", step ? "after" : "before",
                    double(lc.value), double(ld.value));
        CHECK(std::abs(double(ld.value) - double(lc.value)) < 2e-2 * std::abs(double(lc.value)));
        if (step == 1) break;
        cpu.backward(lc.grad);
        dev.backward(ld.grad);
        dev.visit([&](auto& p) {
            before.push_back(pw::cast<float>(pw::to_host(p.value)));
            dev_grads.push_back(p.trainable() ? pw::to_host(p.grad) : Tensor<float>());
        });
        oc.step();
        od.step();
    }
    std::size_t i = 0, moved = 0, total = 0, off_by_one = 0;
    dev.visit([&](auto& p) {
        const Tensor<float>& w0 = before[i];
        const Tensor<float>& g = dev_grads[i++];
        const Tensor<float> w1 = pw::cast<float>(pw::to_host(p.value));
        if (!p.trainable()) {
            CHECK(std::equal(w0.begin(), w0.end(), w1.begin()));
            return;
        }
        std::size_t moved_here = 0;
        for (std::size_t j = 0; j < w0.size(); ++j) {
            const float want = float(bf16(w0[j] - lr * g[j]));
            const float ulp = std::abs(want) * 0x1p-7f;  // fp32 contraction on a GPU may flip a tie's rounding
            INFO(p.name() << "[" << j << "]: before " << w0[j] << ", gradient " << g[j] << ", after " << w1[j]);
            CHECK(std::abs(w1[j] - want) <= (w1[j] == want ? 0.0f : ulp));
            off_by_one += w1[j] != want;
            moved_here += w1[j] != w0[j];
        }
        INFO(p.name() << ": " << moved_here << " of " << w0.size() << " elements moved");
        CHECK(moved_here > 0);  // every bank and head took its step
        moved += moved_here;
        total += w0.size();
    });
    std::printf("MultiTask, one SGD step (bf16): %zu of %zu trainable elements moved, %zu one bf16 step off\n", moved,
                total, off_by_one);

    // Patches leave a bf16 model as BF16 files: into a fresh bf16 device model bit for bit, into the fp32 CPU
    // model exactly (bf16 to float is exact).
    pw::testing::TempDir dir("patchwork_bf16_patch");
    pw::save_patch(dev, dir / "task2.safetensors", 2);
    const pw::SafetensorsFile file = pw::read_safetensors(dir / "task2.safetensors");
    REQUIRE(file.size() > 0);
    for (const auto& e : file.entries()) CHECK(e.dtype == "BF16");
    auto fresh = bf16_multitask<bf16, Cuda>();
    pw::load_patch(fresh, dir / "task2.safetensors", 2);
    auto host = bf16_multitask<float, Cpu>();
    pw::load_patch(host, dir / "task2.safetensors", 2);
    std::vector<Tensor<bf16>> saved;
    dev.visit([&](auto& p) {
        if (p.task() == 2) saved.push_back(pw::to_host(p.value));
    });
    std::size_t k = 0;
    fresh.visit([&](auto& p) {
        if (p.task() != 2) return;
        const Tensor<bf16> v = pw::to_host(p.value);
        CHECK(std::equal(v.begin(), v.end(), saved[k].begin(), [](bf16 a, bf16 b) {
            return std::bit_cast<std::uint16_t>(a) == std::bit_cast<std::uint16_t>(b);
        }));
        ++k;
    });
    CHECK(k == saved.size());
    k = 0;
    host.visit([&](auto& p) {
        if (p.task() != 2) return;
        const Tensor<float> want = pw::cast<float>(saved[k++]);
        CHECK(std::equal(want.begin(), want.end(), p.value.begin()));
    });
}

TEST_CASE("fit, evaluate and fit_multitask take a bf16 device model and float batches") {
    // The host batches stay float; each input is rounded to bf16 on its way to the device (the inputs here are
    // bf16 numbers already, so both models see the same values). Labels follow a fixed rule, so training lowers
    // the loss; the bf16 run follows the fp32 CPU run epoch by epoch.
    std::mt19937 rng(99);
    using Net = pw::Sequential<pw::Tune<pw::BasicLinear<float>, pw::LoRA<4, 8>>, pw::BasicGelu<float>,
                               pw::BasicLinear<float>>;
    using DevNet = pw::Sequential<pw::Tune<pw::BasicLinear<bf16, Cuda>, pw::LoRA<4, 8>>, pw::BasicGelu<bf16, Cuda>,
                                  pw::BasicLinear<bf16, Cuda>>;
    Net cpu(pw::Tune<pw::BasicLinear<float>, pw::LoRA<4, 8>>(12, 16), pw::BasicGelu<float>{},
            pw::BasicLinear<float>(16, 3));
    DevNet dev(pw::Tune<pw::BasicLinear<bf16, Cuda>, pw::LoRA<4, 8>>(12, 16), pw::BasicGelu<bf16, Cuda>{},
               pw::BasicLinear<bf16, Cuda>(16, 3));
    randomize_bf16(cpu, rng, 0.4);
    pw::search::copy_parameters(cpu, dev);
    const auto make_batches = [&](std::size_t count, std::size_t rows, std::size_t width, int classes) {
        std::vector<pw::Batch<float>> batches;
        for (std::size_t i = 0; i < count; ++i) {
            pw::Batch<float> b{bf16_rounded(random_tensor<float>(Shape{rows, width}, rng)), {}};
            for (std::size_t r = 0; r < rows; ++r)  // the class: which of `classes` slices of [-1, 1] x[r, 0] is in
                b.labels.push_back(
                    std::clamp(int(std::floor((b.x(r, 0) + 1.0f) * float(classes) / 2.0f)), 0, classes - 1));
            batches.push_back(std::move(b));
        }
        return pw::VectorSource<float>(std::move(batches));
    };
    pw::VectorSource<float> train = make_batches(4, 16, 12, 3), test = make_batches(2, 16, 12, 3);
    pw::AdamW oc(pw::trainable_parameters(cpu), {.lr = 2e-2});
    pw::BasicAdamW<bf16, Cuda> od(pw::trainable_parameters(dev), {.lr = 2e-2});
    const pw::TrainOptions options{.epochs = 4, .clip_norm = 1.0, .verbose = false};
    const pw::History hc = pw::fit(cpu, oc, train, options);
    const pw::History hd = pw::fit(dev, od, train, options);
    REQUIRE(hd.epochs.size() == hc.epochs.size());
    for (std::size_t e = 0; e < hc.epochs.size(); ++e) {
        std::printf("fit epoch %zu: loss %.5f (CPU fp32) %.5f (device bf16)\n", e, hc.epochs[e].loss,
                    hd.epochs[e].loss);
        CHECK(std::abs(hd.epochs[e].loss - hc.epochs[e].loss) < 1e-2 * hc.epochs[e].loss);
        REQUIRE(hd.epochs[e].accuracy.has_value());
    }
    CHECK(hd.epochs.back().loss < 0.9 * hd.epochs.front().loss);
    const pw::Evaluation ec = pw::evaluate(cpu, test), ed = pw::evaluate(dev, test);
    CHECK(ed.samples == 32);
    CHECK(std::abs(ed.loss - ec.loss) < 3e-2 * ec.loss);
    CHECK(std::abs(ed.accuracy - ec.accuracy) <= 2.0 / 32);

    // fit_multitask on the bf16 MultiTask: one source per task, per-task losses as on the CPU.
    auto mc = bf16_multitask<float, Cpu>();
    auto md = bf16_multitask<bf16, Cuda>();
    randomize_bf16(mc, rng, 0.25);
    pw::search::copy_parameters(mc, md);
    std::vector<pw::VectorSource<float>> sources;
    for (int k = 0; k < 4; ++k) sources.push_back(make_batches(2, 8, 40, 5));
    pw::SGD sc(pw::trainable_parameters(mc), {.lr = 1e-2});
    pw::BasicSGD<bf16, Cuda> sd(pw::trainable_parameters(md), {.lr = 1e-2});
    const pw::MultiTaskTrainOptions mo{.epochs = 1, .verbose = false};
    const auto rc = pw::fit_multitask(mc, sc, sources, mo);
    const auto rd = pw::fit_multitask(md, sd, sources, mo);
    for (std::size_t k = 0; k < 4; ++k) {
        std::printf("fit_multitask task %zu: loss %.5f (CPU fp32) %.5f (device bf16)\n", k, rc.epochs[0].loss[k],
                    rd.epochs[0].loss[k]);
        CHECK(rd.epochs[0].steps[k] == 2);
        CHECK(std::abs(rd.epochs[0].loss[k] - rc.epochs[0].loss[k]) < 1e-2 * rc.epochs[0].loss[k]);
    }
    const pw::Evaluation tc = pw::evaluate_task(mc, 2, sources[2]), td = pw::evaluate_task(md, 2, sources[2]);
    CHECK(std::abs(td.loss - tc.loss) < 3e-2 * tc.loss);
}

TEST_CASE("Search in bf16 on the device follows the fp32 search on the CPU: gates, gradients, DARTS, derive") {
    // alpha is a bf16 parameter (fp32 gradient, fp32 master in Adam); the gates, their noise and dL/dalpha are
    // fp32, computed by the mixing kernel from alpha converted exactly to fp32.
    using Cands = pw::Search<pw::Frozen, pw::Adapter<3>, pw::LoRA<2, 4>, pw::ScaleShift, pw::FineTune>;
    using CpuSearched = pw::Tune<pw::BasicLinear<float>, Cands>;
    using DevSearched = pw::Tune<pw::BasicLinear<bf16, Cuda>, Cands>;
    std::mt19937 rng(100);
    Bf16Worst w{"Search"};
    for (const bool gumbel : {false, true}) {
        CAPTURE(gumbel);
        CpuSearched cpu(24, 16);
        DevSearched dev(24, 16);
        randomize_bf16(cpu, rng, 0.5);  // alpha too: five distinct gates
        const pw::search::GateConfig gates{.mode = gumbel ? pw::search::GateMode::gumbel : pw::search::GateMode::softmax,
                                           .tau = 0.7};
        cpu.inner().set_gates(gates);
        dev.inner().set_gates(gates);
        if (gumbel) {
            const std::vector<float> noise{0.3f, -0.2f, 0.9f, 0.1f, -0.6f};
            cpu.inner().fix_noise(noise);
            dev.inner().fix_noise(noise);
        }
        bf16_parity(cpu, dev, Shape{9, 24}, rng, w, 2.5e-2);  // every gradient, alpha's included
        // The gates come from the same alpha (bf16 numbers on both sides), in fp32.
        const auto& gc = cpu.inner().gate_state();
        const auto& gd = dev.inner().gate_state();
        static_assert(std::is_same_v<std::decay_t<decltype(gd.soft)>, std::vector<float>>, "fp32 gates");
        REQUIRE(gd.soft.size() == 5);
        for (std::size_t k = 0; k < 5; ++k) {
            CHECK(std::abs(gd.soft[k] - gc.soft[k]) <= 1e-6f);
            CHECK(std::abs(gd.used[k] - gc.used[k]) <= 1e-6f);
        }
        const auto pc = cpu.inner().probabilities(), pd = dev.inner().probabilities();
        for (std::size_t k = 0; k < 5; ++k) CHECK(pd[k] == pc[k]);
        // A penalty on the gates adds the same alpha gradient (fp32 on both sides).
        pw::zero_grad(cpu);
        pw::zero_grad(dev);
        const pw::search::Penalty pen{.lambda = 0.8};
        const double vc = pw::search::penalty(cpu, pen, 0), vd = pw::search::penalty(dev, pen, 0);
        CHECK(std::abs(vd - vc) <= 1e-6 * std::abs(vc));
        w.check(cpu.inner().alpha.grad, dev.inner().alpha.grad, "alpha gradient of the penalty", 1e-5);
    }

    // search::run on float batches: the same steps and alpha steps, losses and softmax(alpha) close to the
    // fp32 run; then derive the same scheme and move the weights into the fixed type on the CPU.
    using CpuNet = pw::Sequential<CpuSearched, pw::BasicRelu<float>, pw::BasicLinear<float>>;
    using DevNet = pw::Sequential<DevSearched, pw::BasicRelu<bf16, Cuda>, pw::BasicLinear<bf16, Cuda>>;
    CpuNet cpu(CpuSearched(24, 16), pw::BasicRelu<float>{}, pw::BasicLinear<float>(16, 3));
    DevNet dev(DevSearched(24, 16), pw::BasicRelu<bf16, Cuda>{}, pw::BasicLinear<bf16, Cuda>(16, 3));
    randomize_bf16(cpu, rng, 0.3);
    pw::search::copy_parameters(cpu, dev);
    std::vector<pw::Batch<float>> tb, vb;
    for (int i = 0; i < 6; ++i) {
        pw::Batch<float> b{bf16_rounded(random_tensor<float>(Shape{8, 24}, rng)), {}};
        for (int r = 0; r < 8; ++r) b.labels.push_back(b.x(std::size_t(r), 0) > 0 ? 1 : (b.x(std::size_t(r), 1) > 0 ? 2 : 0));
        (i < 4 ? tb : vb).push_back(std::move(b));
    }
    pw::VectorSource<float> train(tb), val(vb);
    const auto step_cpu = [](auto& m, const pw::Batch<float>& b) {
        auto ce = pw::cross_entropy(m.forward(b.x), b.labels);
        m.backward(ce.grad);
        return double(ce.value);
    };
    const auto step_dev = [](auto& m, const pw::Batch<float>& b) {
        const Tensor<bf16, Cuda> x(pw::cast<bf16>(b.x));
        auto ce = pw::cross_entropy(m.forward(x), b.labels);
        m.backward(ce.grad);
        return double(ce.value);
    };
    const pw::search::SearchOptions opts{.epochs = 2,
                                         .penalty = {.lambda = 0.5},
                                         .alpha = {.lr = 0.05, .beta1 = 0.5, .beta2 = 0.999, .eps = 1e-8},
                                         .log_every = 2};
    pw::SGD opt_cpu(pw::search::weight_parameters(cpu), {.lr = 1e-2});
    pw::BasicSGD<bf16, Cuda> opt_dev(pw::search::weight_parameters(dev), {.lr = 1e-2});
    const auto rc = pw::search::run(cpu, opt_cpu, train, val, step_cpu, opts);
    const auto rd = pw::search::run(dev, opt_dev, train, val, step_dev, opts);
    CHECK(rd.steps == rc.steps);
    CHECK(rd.alpha_steps == rc.alpha_steps);
    CHECK(rd.alpha_steps > 0);
    std::printf("Search DARTS: last loss %.5f (CPU fp32) %.5f (device bf16), penalty %.5f / %.5f\n",
                rc.last_train_loss, rd.last_train_loss, rc.last_penalty, rd.last_penalty);
    CHECK(std::abs(rd.last_train_loss - rc.last_train_loss) < 2e-2 * rc.last_train_loss);
    const auto pc = cpu.get<0>().inner().probabilities(), pd = dev.get<0>().inner().probabilities();
    double moved = 0;
    for (std::size_t k = 0; k < 5; ++k) {
        CHECK(std::abs(pd[k] - pc[k]) < 5e-3);  // alpha moved by ~0.05 a step; bf16 stores it to 2^-9 relative
        moved = std::max(moved, std::abs(pc[k] - 0.2));
    }
    CHECK(moved > 1e-2);  // the search moved the gates
    const std::vector<std::size_t> scheme{2};  // LoRA on both sides, whatever each argmax says
    pw::search::derive(cpu, scheme);
    pw::search::derive(dev, scheme);
    CpuNet again(CpuSearched(24, 16), pw::BasicRelu<float>{}, pw::BasicLinear<float>(16, 3));
    again.get<0>().inner().derive(2);
    pw::search::copy_parameters(dev, again);  // bf16 -> fp32, exact
    const Tensor<float> x = bf16_rounded(random_tensor<float>(Shape{5, 24}, rng));
    w.check(again.forward(x), dev.forward(Tensor<bf16, Cuda>(pw::cast<bf16>(x))), "derived forward", 1e-2);
}
