// The transformer layers on the device against the same layers on the CPU:
// SelfAttention (plain projections and LoRA on query and value, with and
// without a key-padding mask, attention dropout), Dropout, Embedding,
// BertEmbeddings, BertLayer under each spec (Plain, LoRAQueryValue, Houlsby,
// Pfeiffer, with and without dropout), a two-layer BertEncoder, a BertModel
// with AdamW steps, Pooler, a CPU model's weights copied onto the device, a
// multi-task model over a device encoder (per-task LoRA, one pass and
// grouped), and the errors. Forward, input gradient and every
// parameter gradient: fp32 within 1e-5 and double within 1e-12 (2-norm
// relative error), device outputs poisoned (NaN) before each run, odd batch
// and token counts.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "device_compare.hpp"

#include "patchwork/layers/attention.hpp"
#include "patchwork/layers/dropout.hpp"
#include "patchwork/layers/embedding.hpp"
#include "patchwork/multitask/multitask.hpp"
#include "patchwork/search/derive.hpp"
#include "patchwork/transformer/bert.hpp"

// The definitions of the transformer layers' device operations (nvcc only).
#include "patchwork/kernels/attention.cuh"

using namespace device_test;

namespace {

/// The largest relative error seen by a test case, printed at its end.
struct Worst {
    const char* what;
    double worst = 0;
    template <class T>
    void check(const Tensor<T>& cpu, const Tensor<T, Cuda>& dev, const std::string& item) {
        const double e = rel_error(cpu, pw::to_host(dev));
        worst = std::max(worst, e);
        INFO(item);
        CHECK(e < tolerance<T>());
    }
    template <class C, class G>
    void gradients(C& cpu, G& dev) {
        std::vector<const pw::Parameter<typename C::Scalar>*> src;
        cpu.visit([&](auto& p) { src.push_back(&p); });
        std::size_t i = 0;
        double scale = 1;  // the previous gradient's norm
        dev.visit([&](auto& p) {
            REQUIRE(i < src.size());
            const auto* c = src[i++];
            REQUIRE(c->name() == p.name());
            REQUIRE(c->trainable() == p.trainable());
            if (!p.trainable()) return;
            if (p.name().ends_with("key.bias")) {
                // Zero in exact arithmetic (a constant added to every score of a
                // softmax row changes nothing): both sides hold rounding noise,
                // so the difference is checked against the scale of the key
                // weight's gradient (visited just before).
                const Tensor<typename C::Scalar> d = pw::to_host(p.grad);
                double e = 0;
                for (std::size_t k = 0; k < d.size(); ++k) e += (double(d[k]) - double(c->grad[k])) * (double(d[k]) - double(c->grad[k]));
                INFO(p.name());
                CHECK(std::sqrt(e) < tolerance<typename C::Scalar>() * scale);
                return;
            }
            check(c->grad, p.grad, p.name());
            double n = 0;
            for (std::size_t k = 0; k < c->grad.size(); ++k) n += double(c->grad[k]) * double(c->grad[k]);
            scale = std::max(1.0, std::sqrt(n));
        });
        REQUIRE(i == src.size());
    }
    ~Worst() { std::printf("%s: largest relative error %.3g\n", what, worst); }
};

/// Every parameter of a CPU module drawn at random (LoRA and adapters start as the identity otherwise).
template <class M>
void randomize_transformer(M& m, std::mt19937& rng, double scale = 0.5) {
    m.visit([&](auto& p) { p.value = random_tensor<typename M::Scalar>(p.value.shape(), rng, scale); });
}

/// A key-padding mask [batch, tokens]: sequence b keeps its first tokens - (b % tokens) tokens.
std::vector<std::int32_t> padding_mask(std::size_t batch, std::size_t tokens) {
    std::vector<std::int32_t> m(batch * tokens, 1);
    for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t t = tokens - (b % tokens); t < tokens; ++t) m[b * tokens + t] = 0;
    return m;
}

/// Forward (device output poisoned first), input gradient and every parameter
/// gradient of a module on [B, T, D] inputs, CPU against device, with the mask
/// (empty: none) in scope for the forwards. `reseed(m)` runs before each
/// forward of either module (dropout draws the same masks on both).
template <class C, class G, class Reseed>
void parity(C& cpu, G& dev, const Shape& in, const std::vector<std::int32_t>& mask, std::mt19937& rng, Worst& w,
            Reseed&& reseed) {
    using T = typename C::Scalar;
    copy_parameters(cpu, dev);
    const Tensor<T> x = random_tensor<T>(in, rng);
    const Tensor<T, Cuda> xd(x);
    pw::AttentionMask scope(mask, in[0], in[1]);
    reseed(cpu);
    const Tensor<T>& y = cpu.forward(x);
    reseed(dev);
    const_cast<Tensor<T, Cuda>&>(dev.forward(xd)).poison();
    reseed(dev);
    w.check(y, dev.forward(xd), "forward");
    const Tensor<T> g = random_tensor<T>(y.shape(), rng);
    const Tensor<T, Cuda> gd(g);
    pw::zero_grad(cpu);
    const Tensor<T>& dx = cpu.backward(g);
    pw::zero_grad(dev);
    const Tensor<T, Cuda>& dxd = dev.backward(gd);
    if (cpu.input_grad()) w.check(dx, dxd, "input gradient");
    w.gradients(cpu, dev);
    // Once more into poisoned gradient buffers (every element must be written again).
    const_cast<Tensor<T, Cuda>&>(dxd).poison();
    pw::zero_grad(dev);
    reseed(dev);
    dev.forward(xd);
    const Tensor<T, Cuda>& dxd2 = dev.backward(gd);
    if (cpu.input_grad()) w.check(dx, dxd2, "input gradient, second run");
}

template <class C, class G>
void parity(C& cpu, G& dev, const Shape& in, const std::vector<std::int32_t>& mask, std::mt19937& rng, Worst& w) {
    parity(cpu, dev, in, mask, rng, w, [](auto&) {});
}

template <class T>
pw::BertConfig tiny_config(std::size_t layers, std::size_t hidden, std::size_t heads) {
    pw::BertConfig c;
    c.vocab_size = 37;
    c.hidden_size = hidden;
    c.num_hidden_layers = layers;
    c.num_attention_heads = heads;
    c.intermediate_size = hidden + 8;
    c.max_position_embeddings = 12;
    c.type_vocab_size = 2;
    c.layer_norm_eps = 1e-6;
    return c;
}

/// Every dropout generator of a BertLayer back to fixed seeds.
template <class L>
void reseed_layer(L& l) {
    l.attention.set_dropout_seed(11);
    l.attention_dropout.seed(12);
    l.output_dropout.seed(13);
}

struct Sizes {
    std::size_t batch, tokens, width, heads;
};

}  // namespace

TEST_CASE_TEMPLATE("SelfAttention on the device equals the CPU", T, float, double) {
    std::mt19937 rng(31);
    Worst w{"SelfAttention"};
    using Lin = pw::BasicLinear<T>;
    using DLin = pw::BasicLinear<T, Cuda>;
    // 130 tokens: softmax rows over several warps of a block (128 threads).
    std::vector<Sizes> sizes = {{1, 1, 4, 1}, {3, 5, 12, 3}, {2, 7, 16, 4}, {5, 3, 6, 2}, {1, 130, 4, 1}};
    if (!kCpu) sizes.push_back({4, 523, 64, 4});
    for (const Sizes s : sizes) {
        INFO("batch=" << s.batch << " tokens=" << s.tokens << " width=" << s.width << " heads=" << s.heads);
        for (bool masked : {false, true}) {
            const std::vector<std::int32_t> mask =
                masked ? padding_mask(s.batch, s.tokens) : std::vector<std::int32_t>{};
            pw::BasicSelfAttention<T, Lin, Lin, Lin> cpu(s.width, s.heads);
            pw::BasicSelfAttention<T, DLin, DLin, DLin> dev(s.width, s.heads);
            randomize_transformer(cpu, rng);
            parity(cpu, dev, Shape{s.batch, s.tokens, s.width}, mask, rng, w);
            // Padded keys get exactly zero weight on the device too.
            if (masked) {
                const Tensor<T> p = pw::to_host(dev.probabilities());
                CHECK(p.shape() == Shape{s.batch, s.heads, s.tokens, s.tokens});
                for (std::size_t i = 0; i < p.size(); ++i) {
                    const std::size_t b = i / (s.heads * s.tokens * s.tokens), j = i % s.tokens;
                    if (mask[b * s.tokens + j] == 0) CHECK(p[i] == T(0));
                }
            }
        }
    }
    // LoRA on query and value, the key frozen; no input gradient.
    using LQ = pw::Tune<Lin, pw::LoRA<2, 4>>;
    using DLQ = pw::Tune<DLin, pw::LoRA<2, 4>>;
    pw::BasicSelfAttention<T, LQ, pw::Tune<Lin, pw::Frozen>, LQ> cpu(12, 3);
    pw::BasicSelfAttention<T, DLQ, pw::Tune<DLin, pw::Frozen>, DLQ> dev(12, 3);
    randomize_transformer(cpu, rng);
    parity(cpu, dev, Shape{3, 6, 12}, padding_mask(3, 6), rng, w);
    cpu.set_input_grad(false);
    dev.set_input_grad(false);
    parity(cpu, dev, Shape{3, 6, 12}, padding_mask(3, 6), rng, w);
    const Tensor<T, Cuda> x(random_tensor<T>(Shape{3, 6, 12}, rng));  // alive until the backward
    dev.forward(x);
    CHECK(dev.backward(Tensor<T, Cuda>(Shape{3, 6, 12})).empty());
    // Attention dropout: the same generator draws the same masks on both.
    pw::BasicSelfAttention<T, Lin, Lin, Lin> cpu_d(8, 2, 0.3);
    pw::BasicSelfAttention<T, DLin, DLin, DLin> dev_d(8, 2, 0.3);
    randomize_transformer(cpu_d, rng);
    parity(cpu_d, dev_d, Shape{3, 5, 8}, padding_mask(3, 5), rng, w, [](auto& m) { m.set_dropout_seed(5); });
}

TEST_CASE("SelfAttention on the device names its path in errors") {
    using DLin = pw::BasicLinear<float, Cuda>;
    pw::BasicSelfAttention<float, DLin, DLin, DLin> dev(8, 2);
    dev.set_path("encoder.layer0.attention");
    const Tensor<float, Cuda> x(Shape{2, 3, 8});
    const std::vector<std::int32_t> wrong(5, 1);
    {
        pw::AttentionMask scope(wrong, 1, 5);
        CHECK_THROWS_AS(dev.forward(x), pw::ShapeError);
    }
    const std::vector<std::int32_t> empty_sequence{1, 1, 0, 0, 0, 0};
    pw::AttentionMask scope(empty_sequence, 2, 3);
    try {
        dev.forward(x);
        FAIL("expected a ShapeError");
    } catch (const pw::ShapeError& e) {
        CHECK(std::string(e.what()).find("encoder.layer0.attention") != std::string::npos);
        CHECK(std::string(e.what()).find("sequence 1") != std::string::npos);
    }
    CHECK_THROWS_AS(dev.forward(Tensor<float, Cuda>(Shape{2, 3, 6})), pw::ShapeError);
}

TEST_CASE_TEMPLATE("Dropout on the device draws the CPU's masks", T, float, double) {
    std::mt19937 rng(32);
    Worst w{"Dropout"};
    pw::BasicDropout<T> cpu(0.4, 77);
    pw::BasicDropout<T, Cuda> dev(0.4, 77);
    parity(cpu, dev, Shape{3, 5, 7}, {}, rng, w, [](auto& m) { m.seed(9); });
    // Evaluation mode and rate 0: the identity (the input itself comes back).
    dev.set_training(false);
    const Tensor<T, Cuda> x(random_tensor<T>(Shape{2, 3}, rng));
    CHECK(&dev.forward(x) == &x);
    CHECK(&dev.backward(x) == &x);
    pw::BasicDropout<T, Cuda> off;
    CHECK(&off.forward(x) == &x);
}

TEST_CASE_TEMPLATE("Embedding and BertEmbeddings on the device equal the CPU", T, float, double) {
    std::mt19937 rng(33);
    Worst w{"Embedding"};
    // Repeated ids: the deterministic scatter-add against the CPU's sequential loop.
    pw::BasicEmbedding<T> cpu(9, 6);
    pw::BasicEmbedding<T, Cuda> dev(9, 6);
    randomize_transformer(cpu, rng);
    copy_parameters(cpu, dev);
    const std::vector<std::int32_t> ids{3, 0, 3, 8, 3, 1, 0, 8, 2, 3, 5};
    const Shape out{1, 11, 6};
    w.check(cpu.forward(ids, out), dev.forward(ids, out), "embedding forward");
    const Tensor<T> g = random_tensor<T>(out, rng);
    const Tensor<T, Cuda> gd(g);
    pw::zero_grad(cpu);
    pw::zero_grad(dev);
    cpu.backward(g);
    dev.backward(gd);
    dev.backward(gd);  // accumulates
    cpu.backward(g);
    w.gradients(cpu, dev);
    // The scatter-add adds each id's rows in the CPU loop's order: the same bits.
    CHECK(rel_error(cpu.weight.grad, pw::to_host(dev.weight.grad)) == 0.0);
    const std::vector<std::int32_t> bad{1, 9};
    CHECK_THROWS_AS(dev.forward(bad, Shape{2, 6}), pw::ShapeError);

    // Word, position and token-type tables, LayerNorm, every part trainable.
    const pw::BertConfig c = tiny_config<T>(1, 10, 2);
    pw::BertEmbeddings<T> ce(c);
    pw::BertEmbeddings<T, Cuda> de(c);
    randomize_transformer(ce, rng);
    copy_parameters(ce, de);
    pw::TokenBatch batch;
    batch.batch = 3;
    batch.tokens = 5;
    for (std::size_t i = 0; i < 15; ++i) {
        batch.ids.push_back(std::int32_t(rng() % 5));  // few distinct ids: many repeats
        batch.token_types.push_back(std::int32_t(i % 5 >= 3));
    }
    batch.mask = padding_mask(3, 5);
    const Tensor<T>& y = ce.forward(batch);
    const_cast<Tensor<T, Cuda>&>(de.forward(batch)).poison();
    w.check(y, de.forward(batch), "bert embeddings forward");
    const Tensor<T> gy = random_tensor<T>(y.shape(), rng);
    const Tensor<T, Cuda> gyd(gy);
    pw::zero_grad(ce);
    pw::zero_grad(de);
    ce.backward(gy);
    de.backward(gyd);
    w.gradients(ce, de);
    pw::TokenBatch wrong = batch;
    wrong.ids[4] = 37;
    CHECK_THROWS_AS(de.forward(wrong), pw::ShapeError);
}

TEST_CASE_TEMPLATE("BertLayer on the device equals the CPU under each spec", T, float, double) {
    std::mt19937 rng(34);
    Worst w{"BertLayer"};
    const auto run = [&]<class Spec>(Spec, const pw::BertConfig& c, const Shape& in, bool masked) {
        pw::BertLayer<Spec, T> cpu(c);
        pw::BertLayer<Spec, T, Cuda> dev(c);
        randomize_transformer(cpu, rng, 0.3);
        parity(cpu, dev, in, masked ? padding_mask(in[0], in[1]) : std::vector<std::int32_t>{}, rng, w,
               [](auto& l) { reseed_layer(l); });
    };
    const pw::BertConfig c = tiny_config<T>(1, 12, 3);
    run(pw::bert::Plain{}, c, Shape{3, 5, 12}, true);
    run(pw::bert::Plain{}, c, Shape{1, 4, 12}, false);
    run(pw::bert::LoRAQueryValue<4, 8>{}, c, Shape{3, 5, 12}, true);
    run(pw::bert::Houlsby<5>{}, c, Shape{2, 7, 12}, true);
    run(pw::bert::Pfeiffer<3>{}, c, Shape{5, 3, 12}, true);
    // Training with every dropout on: the device draws the CPU's masks.
    pw::BertConfig cd = c;
    cd.hidden_dropout_prob = 0.2;
    cd.attention_probs_dropout_prob = 0.25;
    run(pw::bert::Plain{}, cd, Shape{3, 5, 12}, true);
    run(pw::bert::LoRAQueryValue<4, 8>{}, cd, Shape{2, 6, 12}, true);
}

TEST_CASE("A two-layer BertEncoder and a BertModel on the device equal the CPU, AdamW steps included") {
    using T = double;
    using Spec = pw::bert::LoRAQueryValue<4, 8>;
    std::mt19937 rng(35);
    Worst w{"BertEncoder / BertModel (double)"};
    const pw::BertConfig c = tiny_config<T>(2, 16, 4);
    {
        pw::BertEncoder<Spec, T> cpu(c);
        pw::BertEncoder<Spec, T, Cuda> dev(c);
        randomize_transformer(cpu, rng, 0.3);
        parity(cpu, dev, Shape{3, 7, 16}, padding_mask(3, 7), rng, w);
        parity(cpu, dev, Shape{2, 5, 16}, {}, rng, w);
    }
    // The model: LoRA on query and value, the rest fine-tuned (embeddings included).
    using Cm = pw::BertModel<pw::BertEncoder<Spec, T>, pw::FineTune>;
    using Dm = pw::BertModel<pw::BertEncoder<Spec, T, Cuda>, pw::FineTune>;
    Cm cpu(c);
    Dm dev(c);
    randomize_transformer(cpu, rng, 0.3);
    copy_parameters(cpu, dev);
    // The key biases' gradient is zero in exact arithmetic (softmax ignores a
    // constant added to a row of scores): Adam would turn the rounding noise
    // of two summation orders into steps of size lr, so they stay frozen here.
    const auto freeze_key_bias = [](auto& p) {
        if (p.name().ends_with("key.bias")) p.set_trainable(false);
    };
    cpu.visit(freeze_key_bias);
    dev.visit(freeze_key_bias);
    CHECK(pw::trainable_count(cpu) == pw::trainable_count(dev));
    pw::BasicAdamW<T> oc(pw::trainable_parameters(cpu), {.lr = 1e-2});
    pw::BasicAdamW<T, Cuda> od(pw::trainable_parameters(dev), {.lr = 1e-2});
    for (int step = 0; step < 3; ++step) {
        pw::TokenBatch batch;
        batch.batch = 3;
        batch.tokens = 5 + std::size_t(step);
        for (std::size_t i = 0; i < batch.batch * batch.tokens; ++i) {
            batch.ids.push_back(std::int32_t(rng() % c.vocab_size));
            batch.token_types.push_back(std::int32_t(rng() % 2));
        }
        batch.mask = padding_mask(batch.batch, batch.tokens);
        oc.zero_grad();
        od.zero_grad();
        const Tensor<T>& h = cpu.forward(batch);
        const Tensor<T, Cuda>& hd = dev.forward(batch);
        w.check(h, hd, "model forward");
        // L = <G, h> for a fixed random G: dL/dh = G.
        const Tensor<T> g = random_tensor<T>(h.shape(), rng);
        const Tensor<T, Cuda> gd(g);
        cpu.backward(g);
        dev.backward(gd);
        w.gradients(cpu, dev);
        oc.step();
        od.step();
    }
    std::vector<Tensor<T>> values;
    cpu.visit([&](auto& p) { values.push_back(p.value); });
    std::size_t i = 0;
    dev.visit([&](auto& p) { w.check(values[i++], p.value, p.name() + " after AdamW"); });
}

TEST_CASE_TEMPLATE("Pooler on the device and a CPU BertModel copied onto the device", T, float, double) {
    std::mt19937 rng(36);
    Worst w{"Pooler / copied BertModel"};
    for (pw::Pooling mode : {pw::Pooling::mean, pw::Pooling::cls}) {
        pw::BasicPooler<T> cpu(mode);
        pw::BasicPooler<T, Cuda> dev(mode);
        parity(cpu, dev, Shape{3, 5, 7}, padding_mask(3, 5), rng, w);
        parity(cpu, dev, Shape{2, 4, 9}, {}, rng, w);
    }
    // A CPU model (as a checkpoint loader builds it) moved to the device by
    // search::copy_parameters (names and shapes checked), then pooled.
    const pw::BertConfig c = tiny_config<T>(2, 12, 3);
    pw::BertModel<pw::BertEncoder<pw::bert::Pfeiffer<4>, T>> cpu(c);
    pw::BertModel<pw::BertEncoder<pw::bert::Pfeiffer<4>, T, Cuda>> dev(c);
    randomize_transformer(cpu, rng, 0.3);
    pw::search::copy_parameters(cpu, dev);
    pw::TokenBatch batch;
    batch.batch = 3;
    batch.tokens = 6;
    for (std::size_t i = 0; i < 18; ++i) batch.ids.push_back(std::int32_t(rng() % c.vocab_size));
    batch.mask = padding_mask(3, 6);
    pw::BasicPooler<T> cpu_pool;
    pw::BasicPooler<T, Cuda> dev_pool;
    const Tensor<T>& h = cpu.forward(batch);
    const Tensor<T, Cuda>& hd = dev.forward(batch);
    w.check(h, hd, "copied model forward");
    const Tensor<T>& p = cpu_pool.forward(h, batch);
    w.check(p, dev_pool.forward(hd, batch), "pooled");
    const Tensor<T> g = random_tensor<T>(p.shape(), rng);
    const Tensor<T, Cuda> gd(g);
    pw::zero_grad(cpu);
    pw::zero_grad(dev);
    cpu.backward(cpu_pool.backward(g));
    dev.backward(dev_pool.backward(gd));
    w.gradients(cpu, dev);
}

TEST_CASE("MultiTask over a device BertEncoder with per-task LoRA equals the CPU model, in one pass") {
    // The text multi-task setting on the device: a shared frozen encoder, per-task LoRA factors on query and
    // value (8 slots), a head per task; a batch of sequences of three tasks with padding, in one encoder pass
    // (the rows sorted by task carry their mask rows) and grouped by task.
    using T = double;
    using Spec = pw::bert::LoRAQueryValue<4, 8>;
    std::mt19937 rng(37);
    const pw::BertConfig c = tiny_config<T>(2, 16, 4);
    std::vector<pw::BasicLinear<T>> heads;
    std::vector<pw::BasicLinear<T, Cuda>> dev_heads;
    for (int k = 0; k < 3; ++k) {
        heads.emplace_back(16, 3);
        dev_heads.emplace_back(16, 3);
    }
    // Only the LoRA factors train (and so are per task); the rest of the encoder is the frozen base.
    const auto lora_only = [](auto& p) { p.set_trainable(p.role() == pw::Role::lora); };
    pw::BertEncoder<Spec, T> cpu_encoder(c);
    pw::BertEncoder<Spec, T, Cuda> dev_encoder(c);
    cpu_encoder.visit(lora_only);
    dev_encoder.visit(lora_only);
    pw::MultiTask<pw::BertEncoder<Spec, T>, pw::BasicLinear<T>> cpu(std::move(cpu_encoder), std::move(heads));
    pw::MultiTask<pw::BertEncoder<Spec, T, Cuda>, pw::BasicLinear<T, Cuda>> dev(std::move(dev_encoder),
                                                                                std::move(dev_heads));
    randomize_transformer(cpu, rng, 0.3);
    copy_parameters(cpu, dev);
    CHECK(dev.slot_count() == 8);
    CHECK(dev.one_pass_supported());
    const std::vector<int> ids{1, 0, 2, 1, 1};
    const std::vector<std::int32_t> mask = padding_mask(5, 6);
    const Tensor<T> x = random_tensor<T>(Shape{5, 6, 16}, rng);
    const Tensor<T, Cuda> xd(x);
    for (bool one_pass : {true, false}) {
        INFO("one pass: " << one_pass);
        cpu.set_one_pass(one_pass);
        dev.set_one_pass(one_pass);
        const pw::AttentionMask scope(mask, 5, 6);
        const Tensor<T>& y = cpu.forward(x, ids);
        const_cast<Tensor<T, Cuda>&>(dev.forward(xd, ids)).poison();
        const Tensor<T, Cuda>& yd = dev.forward(xd, ids);
        CHECK(dev.last_mixed_pass() == (one_pass ? pw::MixedPass::one_pass : pw::MixedPass::grouped));
        check_close(y, yd, "mixed forward");
        const Tensor<T> g = random_tensor<T>(y.shape(), rng);
        const Tensor<T, Cuda> gd(g);
        pw::zero_grad(cpu);
        pw::zero_grad(dev);
        cpu.set_input_grad(true);
        dev.set_input_grad(true);
        check_close(cpu.backward(g), dev.backward(gd), "mixed input gradient");
        check_gradients(cpu, dev);
    }
}
