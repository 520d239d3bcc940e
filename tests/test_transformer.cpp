// Transformer layers and the BERT model on a tiny random configuration:
// gradient checks in double, the key-padding mask, dropout, policies on the
// attention and feed-forward slots, trainable counts, and the checkpoint loader.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "temp_dir.hpp"
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/attention.hpp"
#include "patchwork/layers/dropout.hpp"
#include "patchwork/layers/embedding.hpp"
#include "patchwork/multitask/multitask.hpp"
#include "patchwork/policies/bias_only.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/norm_patch.hpp"
#include "patchwork/policies/scale_shift.hpp"
#include "patchwork/search/search_module.hpp"
#include "patchwork/search/derive.hpp"
#include "patchwork/transformer/bert.hpp"
#include "patchwork/transformer/hf_checkpoint.hpp"

namespace pw = patchwork;

namespace {

pw::BertConfig tiny_config() {
    pw::BertConfig c;
    c.vocab_size = 23;
    c.hidden_size = 8;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 2;
    c.intermediate_size = 12;
    c.max_position_embeddings = 9;
    c.type_vocab_size = 2;
    c.layer_norm_eps = 1e-12;
    return c;
}

/// all-MiniLM-L6-v2's architecture (random weights; for parameter counts).
pw::BertConfig minilm_config() {
    pw::BertConfig c;
    c.vocab_size = 30522;
    c.hidden_size = 384;
    c.num_hidden_layers = 6;
    c.num_attention_heads = 12;
    c.intermediate_size = 1536;
    return c;
}

/// Two sequences of 5 tokens; the second has 3 real tokens and 2 padded.
pw::TokenBatch tiny_batch(std::int32_t pad_id = 0) {
    pw::TokenBatch b;
    b.batch = 2;
    b.tokens = 5;
    b.ids = {1, 7, 4, 9, 2, 1, 12, 2, pad_id, pad_id};
    b.token_types = {0, 0, 0, 1, 1, 0, 0, 0, 0, 0};
    b.mask = {1, 1, 1, 1, 1, 1, 1, 1, 0, 0};
    return b;
}

/// A BertModel (plus mean pooling) seen as a module of a dummy input, so that
/// gradcheck can probe every trainable parameter, embeddings included.
template <class Model>
struct ModelProbe {
    using Scalar = double;
    Model model;
    pw::TokenBatch batch;
    pw::BasicPooler<double> pooler;
    bool pool = false;
    pw::Tensor<double> dx;

    const pw::Tensor<double>& forward(const pw::Tensor<double>&) {
        const auto& h = model.forward(batch);
        return pool ? pooler.forward(h, batch) : h;
    }
    const pw::Tensor<double>& backward(const pw::Tensor<double>& dy) {
        model.backward(pool ? pooler.backward(dy) : dy);
        dx = pw::Tensor<double>(pw::Shape{1});
        return dx;
    }
    template <class F>
    void visit(F&& f) {
        model.visit(f);
    }
    void set_input_grad(bool) {}
};

template <class Model>
ModelProbe<Model> make_probe(std::uint64_t seed = 3) {
    ModelProbe<Model> p{Model(tiny_config()), tiny_batch(), pw::BasicPooler<double>(), false, {}};
    pw::Rng rng(seed);
    pw::testing::randomize_parameters(p.model, rng, 0.3);
    return p;
}

/// The key bias's gradient is exactly zero in exact arithmetic (it adds q.b_k
/// to every score of a row, which the softmax ignores), so its relative error
/// is meaningless; it is checked to be negligible instead.
bool is_key_bias(const std::string& n) { return n.size() >= 8 && n.compare(n.size() - 8, 8, "key.bias") == 0; }

template <class M>
void check_key_bias(M& m) {
    m.visit([&](auto& p) {
        if (!p.trainable() || !is_key_bias(p.name())) return;
        INFO(p.name());
        CHECK(p.grad.vector().norm() < 1e-9);
    });
}

/// check_gradients, with the key bias checked by check_key_bias.
template <class M>
void check_module(M& m, const pw::Shape& in) {
    const auto report = pw::testing::gradcheck(m, in, 1);
    for (const auto& entry : report.error) {  // not bound: INFO takes them (clang 14)
        const auto& name = entry.first;
        const auto err = entry.second;
        if (is_key_bias(name)) continue;
        INFO("gradient of ", name, ": relative error ", err);
        CHECK(err < 1e-6);
    }
    check_key_bias(m);
}

/// Gradient check of a layer-shaped module on [2, 5, 8] inputs whose second
/// sequence has three padded positions, after randomising its parameters.
template <class M>
void check_masked_layer(M& m, std::uint64_t seed) {
    pw::Rng rng(seed);
    pw::testing::randomize_parameters(m, rng, 0.3);
    const std::vector<std::int32_t> mask = {1, 1, 1, 1, 0, 1, 1, 0, 0, 0};
    pw::AttentionMask scope(mask, 2, 5);
    check_module(m, pw::Shape{2, 5, 8});
}

/// Gradient check of a whole-model probe. Steps of 1e-5: the probed sum is
/// large next to some gradient entries, so smaller steps lose them to rounding.
template <class M>
void check_probe(M& probe, double tolerance = 1e-6) {
    const auto report = pw::testing::gradcheck(probe, pw::Shape{1}, 5, 1e-5);
    CHECK(report.error.size() > 1);
    for (const auto& entry : report.error) {  // not bound: INFO takes them (clang 14)
        const auto& name = entry.first;
        const auto err = entry.second;
        if (is_key_bias(name)) continue;
        INFO("gradient of ", name, ": relative error ", err);
        CHECK(err < tolerance);
    }
    check_key_bias(probe.model);
}

template <class M>
std::size_t trainable(M& m) {
    return pw::trainable_count(m);
}

using Lin = pw::BasicLinear<double>;

/// A ScaleShift patch after every layer.
struct ScaleShiftSpec : pw::bert::Plain {
    template <class B>
    using layer = pw::Tune<B, pw::ScaleShift>;
};
/// Each layer searched among frozen, an adapter after it, and fine-tuning.
struct SearchSpec : pw::bert::Plain {
    template <class B>
    using layer = pw::Tune<B, pw::Search<pw::Frozen, pw::Adapter<2>, pw::FineTune>>;
};
/// A layer searched among frozen, LayerNorm tuning, LoRA on query and
/// value, an adapter after it, and fine-tuning.
using LayerCands = pw::Search<pw::Frozen, pw::NormPatch, pw::LoRA<2, 4>, pw::Adapter<2>, pw::FineTune>;
constexpr std::size_t kLayerLoRA = 2;  // LoRA<2, 4>'s place in LayerCands

}  // namespace

TEST_CASE("self-attention: gradients of input and projections, with and without a padding mask") {
    pw::BasicSelfAttention<double, Lin, Lin, Lin> att(8, 2);
    pw::Rng rng(7);
    pw::testing::randomize_parameters(att, rng, 0.4);
    check_module(att, pw::Shape{2, 5, 8});
    const std::vector<std::int32_t> mask = {1, 1, 1, 0, 0, 1, 1, 1, 1, 1};
    pw::AttentionMask scope(mask, 2, 5);
    check_module(att, pw::Shape{2, 5, 8});
    // Padded keys get exactly zero weight; real keys' weights sum to one.
    pw::Tensor<double> x(pw::Shape{2, 5, 8});
    pw::init::normal(x, rng, 0, 1);
    att.forward(x);
    const auto& p = att.probabilities();
    for (std::size_t h = 0; h < 2; ++h)
        for (std::size_t i = 0; i < 5; ++i) {
            const double* row = p.data() + ((0 * 2 + h) * 5 + i) * 5;
            CHECK(row[3] == 0.0);
            CHECK(row[4] == 0.0);
            CHECK(row[0] + row[1] + row[2] == doctest::Approx(1.0).epsilon(1e-12));
        }
}

TEST_CASE("self-attention: a sequence without real tokens and a mask of the wrong size are errors") {
    pw::BasicSelfAttention<double, Lin, Lin, Lin> att(8, 2);
    att.set_path("encoder.layer0.attention");
    pw::Tensor<double> x(pw::Shape{2, 5, 8}, 0.5);
    {
        const std::vector<std::int32_t> mask = {1, 1, 1, 0, 0, 0, 0, 0, 0, 0};
        pw::AttentionMask scope(mask, 2, 5);
        CHECK_THROWS_WITH_AS(att.forward(x), doctest::Contains("sequence 1"), pw::ShapeError);
    }
    {
        const std::vector<std::int32_t> mask(12, 1);
        pw::AttentionMask scope(mask, 3, 4);
        CHECK_THROWS_WITH_AS(att.forward(x), doctest::Contains("encoder.layer0.attention"), pw::ShapeError);
    }
    CHECK_THROWS_AS((pw::BasicSelfAttention<double, Lin, Lin, Lin>(8, 3)), pw::ConfigError);
}

TEST_CASE("bert layer: gradients (plain, masked)") {
    pw::BertLayer<pw::bert::Plain, double> layer(tiny_config());
    check_masked_layer(layer, 11);
}

TEST_CASE("bert model: gradients of every parameter, embeddings and mean pooling included (FineTune)") {
    auto probe = make_probe<pw::BertModel<pw::BertEncoder<pw::bert::Plain, double>, pw::FineTune>>();
    check_probe(probe);
    probe.pool = true;
    check_probe(probe);
}

TEST_CASE("bert model: policies on the slots, gradients and what trains") {
    SUBCASE("LoRA on query and value") {
        auto probe = make_probe<pw::BertModel<pw::BertEncoder<pw::bert::LoRAQueryValue<2, 4>, double>>>();
        std::size_t lora = 0;
        probe.model.visit([&](auto& p) {
            if (p.trainable()) {
                CHECK(p.role() == pw::Role::lora);
                CHECK((p.name().find(".query.lora.") != std::string::npos ||
                       p.name().find(".value.lora.") != std::string::npos));
                lora += p.size();
            }
        });
        CHECK(lora == 2 * 2 * (2 * 8 + 8 * 2));
        check_probe(probe);
    }
    SUBCASE("Houlsby adapters with LayerNorm tuning") {
        auto probe = make_probe<pw::BertModel<pw::BertEncoder<pw::bert::Houlsby<3>, double>, pw::NormPatch>>();
        // adapters: 2 per layer of 2 d r + r + d; norms: 2 per layer + embeddings, 2 d each.
        CHECK(trainable(probe.model) == 2 * 2 * (2 * 8 * 3 + 3 + 8) + 5 * 2 * 8);
        check_probe(probe);
    }
    SUBCASE("Pfeiffer adapters") {
        auto probe = make_probe<pw::BertModel<pw::BertEncoder<pw::bert::Pfeiffer<3>, double>>>();
        CHECK(trainable(probe.model) == 2 * (2 * 8 * 3 + 3 + 8));
        check_probe(probe);
    }
    SUBCASE("BitFit") {
        auto probe = make_probe<pw::BertModel<pw::BertEncoder<pw::bert::Plain, double>, pw::BiasOnly>>();
        // per layer: q, k, v, attention output biases (4 d), intermediate (f), output (d).
        std::size_t biases = 0;
        probe.model.visit([&](auto& p) {
            if (p.role() == pw::Role::bias) biases += p.size();
        });
        CHECK(trainable(probe.model) == biases);
        CHECK(biases == 2 * (4 * 8 + 12 + 8));
        check_probe(probe);
    }
    SUBCASE("ScaleShift after every layer") {
        auto probe = make_probe<pw::BertModel<pw::BertEncoder<ScaleShiftSpec, double>>>();
        std::size_t ss = 0;
        probe.model.visit([&](auto& p) { ss += p.role() == pw::Role::scale_shift ? p.size() : 0; });
        CHECK(ss == 2 * 2 * 8);
        CHECK(trainable(probe.model) == ss);
        check_probe(probe);
    }
    SUBCASE("encoder-only selection by a Tune around the encoder") {
        auto probe = make_probe<pw::BertModel<pw::Tune<pw::BertEncoder<pw::bert::Plain, double>, pw::BiasOnly>>>();
        CHECK_FALSE(probe.model.embeddings.norm.shift.trainable());  // outside the Tune: frozen
        CHECK(probe.model.encoder.inner().layer(0).intermediate.bias.trainable());
        CHECK(trainable(probe.model) == 2 * (4 * 8 + 12 + 8));
        check_probe(probe);
    }
    SUBCASE("frozen model: nothing trains, backward leaves no gradient behind") {
        auto m = pw::BertModel<pw::BertEncoder<pw::bert::Plain, double>>(tiny_config());
        CHECK(trainable(m) == 0);
        CHECK_FALSE(pw::any_trainable(m));
    }
}

TEST_CASE("bert model: per-layer architecture search over a BertLayer") {
    // Loading a checkpoint reaches the FineTune candidate's copy of each layer too.
    {
        using Plain = pw::BertModel<pw::BertEncoder<pw::bert::Plain, double>>;
        using Searched = pw::BertModel<pw::BertEncoder<SearchSpec, double>>;
        Plain plain(tiny_config());
        pw::Rng rng(17);
        pw::testing::randomize_parameters(plain, rng, 0.3);
        pw::testing::TempDir dir;
        pw::hf::save_bert(plain, dir.path);
        Searched searched = pw::hf::load_bert<Searched>(dir.path);
        const pw::TokenBatch b = tiny_batch();
        const pw::Tensor<double> expected = plain.forward(b);
        // Every candidate mixes to the plain model's output: Frozen is the base, the
        // adapter and LoRA start as the identity, and the copies hold the loaded weights.
        const pw::Tensor<double> got = searched.forward(b);
        for (std::size_t i = 0; i < got.size(); ++i) CHECK(got[i] == doctest::Approx(expected[i]).epsilon(1e-12));
        // The searches sit in the spec's layer slot, which the model's type does not spell.
        const auto report = pw::search::derive(searched, {1, 2});
        CHECK(report.fixed_type.empty());
        CHECK(report.fixed_type_note.find("inside a spec") != std::string::npos);
        CHECK(report.modules.size() == 2);
    }
    auto probe = make_probe<pw::BertModel<pw::BertEncoder<SearchSpec, double>>>();
    std::size_t arch = 0;
    probe.model.visit([&](auto& p) { arch += p.role() == pw::Role::architecture ? p.size() : 0; });
    CHECK(arch == 2 * 3);
    check_probe(probe);
}

TEST_CASE("layer search over frozen, LN tuning, LoRA, adapter and fine-tuning: parameters and gradients") {
    pw::Tune<pw::BertLayer<pw::bert::Plain, double>, LayerCands> layer(tiny_config());
    layer.set_path("encoder.layer0");
    // What each candidate would train: LN scale and shift (2 norms of 2 d), LoRA on
    // query and value (2 of r (d + d)), the adapter (2 d r + r + d), the whole layer.
    const auto n = layer.inner().candidate_parameters();
    CHECK(n[0] == 0);
    CHECK(n[1] == 2 * 2 * 8);
    CHECK(n[kLayerLoRA] == 2 * 2 * (8 + 8));
    CHECK(n[3] == 2 * 8 * 2 + 2 + 8);
    CHECK(n[4] == layer.inner().base_parameters());
    // Every branch's parameters, alpha included, against finite differences (masked).
    check_masked_layer(layer, 31);
}

TEST_CASE("LoRA on a whole BertLayer: query and value, from the layer's pre-trained weights") {
    pw::BertLayer<pw::bert::Plain, double> layer(tiny_config());
    layer.set_path("encoder.layer0");
    pw::Rng rng(23);
    pw::testing::randomize_parameters(layer, rng, 0.3);
    using Tuned = pw::Tune<pw::BertLayer<pw::bert::Plain, double>, pw::LoRA<2, 4>>;
    static_assert(std::is_same_v<Tuned::Inner, pw::BertLayer<pw::bert::WithLoRA<pw::bert::Plain, 2, 4>, double>>);
    Tuned tuned(layer);
    tuned.set_path("encoder.layer0");
    // Only the factors train; everything else holds the source's values, so a fresh
    // LoRA (B = 0) computes the source layer exactly.
    std::vector<std::string> names;
    tuned.visit([&](auto& p) {
        if (p.trainable()) {
            CHECK(p.role() == pw::Role::lora);
            names.push_back(p.name());
        }
    });
    CHECK(names == std::vector<std::string>{"encoder.layer0.attention.query.lora.a",
                                            "encoder.layer0.attention.query.lora.b",
                                            "encoder.layer0.attention.value.lora.a",
                                            "encoder.layer0.attention.value.lora.b"});
    pw::Tensor<double> x(pw::Shape{2, 5, 8});
    pw::init::normal(x, rng, 0, 1);
    const pw::Tensor<double> want = layer.forward(x);
    const pw::Tensor<double> got = tuned.forward(x);
    for (std::size_t i = 0; i < got.size(); ++i) CHECK(got[i] == want[i]);
    // Gradients with non-zero B, masked.
    check_masked_layer(tuned, 37);
}

TEST_CASE("a layer search derived to LoRA is Tune<BertLayer, LoRA>: fixed type, names, weights and outputs") {
    using Layer = pw::BertLayer<pw::bert::Plain, double>;
    // Tune<BertLayer, LoRA> is the layer of bert::LoRAQueryValue: the same slots.
    using Fixed = pw::Tune<Layer, pw::LoRA<2, 4>>;
    using QV = pw::BertLayer<pw::bert::LoRAQueryValue<2, 4>, double>;
    static_assert(std::is_same_v<Fixed::Inner::Query, QV::Query> && std::is_same_v<Fixed::Inner::Value, QV::Value> &&
                  std::is_same_v<Fixed::Inner::Key, QV::Key> && std::is_same_v<Fixed::Inner::Output, QV::Output>);
    Layer pre(tiny_config());
    pw::Rng rng(29);
    pw::testing::randomize_parameters(pre, rng, 0.3);
    pw::Tune<Layer, LayerCands> searched(pre);
    searched.set_path("encoder.layer0");
    const auto report = pw::search::derive(searched, {kLayerLoRA});
    CHECK(report.fixed_type.find("LoRA<2, 4>") != std::string::npos);
    CHECK(report.fixed_type.find("Search") == std::string::npos);
    CHECK(report.trainable == 2 * 2 * (8 + 8));
    CHECK(pw::trainable_count(searched) == report.trainable);
    // Train the factors away from zero, then move them into the fixed type.
    searched.visit([&](auto& p) {
        if (p.role() == pw::Role::lora) pw::init::normal(p.value, rng, 0, 0.3);
    });
    Fixed fixed(pre);
    fixed.set_path("encoder.layer0");
    pw::search::copy_parameters(searched, fixed);  // checks every name and shape
    CHECK(pw::trainable_count(fixed) == report.trainable);
    pw::Tensor<double> x(pw::Shape{2, 5, 8});
    pw::init::normal(x, rng, 0, 1);
    const std::vector<std::int32_t> mask = {1, 1, 1, 1, 0, 1, 1, 0, 0, 0};
    pw::AttentionMask scope(mask, 2, 5);
    const pw::Tensor<double> want = fixed.forward(x);
    const pw::Tensor<double> got = searched.forward(x);
    for (std::size_t i = 0; i < got.size(); ++i) CHECK(got[i] == want[i]);
}

TEST_CASE("padding never changes real positions: outputs and gradients are bit-identical") {
    using Model = pw::BertModel<pw::BertEncoder<pw::bert::LoRAQueryValue<4, 8>, float>, pw::BiasOnly>;
    pw::manual_seed(5);
    Model a(tiny_config());
    pw::Rng rng(9);
    a.visit([&](auto& p) { pw::init::normal(p.value, rng, 0.0, 0.3); });
    Model b = a;
    pw::TokenBatch x = tiny_batch(0);
    pw::TokenBatch y = tiny_batch(0);
    y.ids[8] = 17;  // other pad ids
    y.ids[9] = 21;
    y.token_types[8] = 1;
    // Another pad embedding row as well: the pad id's table row differs between the models.
    for (std::size_t j = 0; j < 8; ++j) b.embeddings.word.weight.value(0, j) += float(j + 1);
    pw::Pooler pa, pb;
    const pw::Tensor<float> ha = a.forward(x);
    const pw::Tensor<float> hb = b.forward(y);
    for (std::size_t r = 0; r < 10; ++r) {
        if (!x.mask[r]) continue;
        for (std::size_t j = 0; j < 8; ++j) CHECK(ha(r, j) == hb(r, j));
    }
    const pw::Tensor<float> ea = pa.forward(ha, x);
    const pw::Tensor<float> eb = pb.forward(hb, y);
    for (std::size_t i = 0; i < ea.size(); ++i) CHECK(ea[i] == eb[i]);
    pw::Tensor<float> g(ea.shape());
    pw::init::normal(g, rng, 0, 1);
    pw::zero_grad(a);
    pw::zero_grad(b);
    a.backward(pa.backward(g));
    b.backward(pb.backward(g));
    std::vector<const pw::Parameter<float>*> ga, gb;
    a.visit([&](auto& p) { if (p.trainable()) ga.push_back(&p); });
    b.visit([&](auto& p) { if (p.trainable()) gb.push_back(&p); });
    REQUIRE(ga.size() == gb.size());
    REQUIRE(ga.size() > 10);
    for (std::size_t i = 0; i < ga.size(); ++i) {
        INFO(ga[i]->name());
        CHECK(std::memcmp(ga[i]->grad.data(), gb[i]->grad.data(), ga[i]->grad.size() * sizeof(float)) == 0);
    }
}

TEST_CASE("embeddings: frozen tables own no gradient; ids out of range name the table") {
    pw::BertEmbeddings<float> e(tiny_config());
    e.set_path("embeddings");
    e.visit([](auto& p) { p.set_trainable(false); });
    const auto out = e.forward(tiny_batch());
    CHECK(out.shape() == pw::Shape{2, 5, 8});
    e.backward(out);
    CHECK(e.word.weight.grad.empty());
    pw::TokenBatch bad = tiny_batch();
    bad.ids[3] = 23;
    CHECK_THROWS_WITH_AS(e.forward(bad), doctest::Contains("embeddings.word"), pw::ShapeError);
    bad = tiny_batch();
    bad.mask.pop_back();
    CHECK_THROWS_AS(e.forward(bad), pw::ShapeError);
    pw::TokenBatch longer;
    longer.batch = 1;
    longer.tokens = 10;
    longer.ids.assign(10, 1);
    CHECK_THROWS_WITH_AS(e.forward(longer), doctest::Contains("positions"), pw::ShapeError);
}

/// Self-attention whose dropout draws the same masks at every forward (the
/// generator restarts), so finite differences see one fixed function.
struct FixedMaskAttention : pw::ModuleBase {
    using Scalar = double;
    static constexpr unsigned roles = pw::BasicSelfAttention<double, Lin, Lin, Lin>::roles;
    static constexpr bool fixed_width = true;
    static constexpr const char* kind() { return "attention"; }
    pw::BasicSelfAttention<double, Lin, Lin, Lin> att{8, 2, 0.3};
    std::size_t out_features() const { return att.out_features(); }
    const pw::Tensor<double>& forward(const pw::Tensor<double>& x) {
        att.set_dropout_seed(11);
        return att.forward(x);
    }
    const pw::Tensor<double>& backward(const pw::Tensor<double>& g) {
        att.set_input_grad(input_grad_);
        return att.backward(g);
    }
    template <class F>
    void visit(F&& f) {
        att.visit(f);
    }
    void reset_parameters(pw::Rng& rng) { att.reset_parameters(rng); }
    void set_path(const std::string& p) { att.set_path(p); }
};

TEST_CASE("self-attention with dropout on the probabilities: exact gradients for a fixed mask") {
    FixedMaskAttention m;
    m.att.set_training(true);
    pw::Rng rng(17);
    pw::testing::randomize_parameters(m, rng, 0.4);
    // The mask drops about 30 % of the weights of every row, and is the same at every forward.
    pw::Tensor<double> x(pw::Shape{2, 5, 8});
    pw::init::normal(x, rng, 0, 1);
    const pw::Tensor<double> y1 = m.forward(x);
    const pw::Tensor<double> y2 = m.forward(x);
    CHECK(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(double)) == 0);
    m.att.set_training(false);
    const pw::Tensor<double> y_eval = m.forward(x);
    m.att.set_training(true);
    double diff = 0;
    for (std::size_t i = 0; i < y1.size(); ++i) diff = std::max(diff, std::abs(y1[i] - y_eval[i]));
    CHECK(diff > 1e-3);  // dropout changes the output while training
    check_module(m, pw::Shape{2, 5, 8});
    const std::vector<std::int32_t> mask = {1, 1, 1, 0, 0, 1, 1, 1, 1, 1};
    pw::AttentionMask scope(mask, 2, 5);
    check_module(m, pw::Shape{2, 5, 8});
}

TEST_CASE("dropout: identity when off or evaluating, seeded inverted mask when training") {
    pw::BasicDropout<double> d(0.25, 42);
    pw::Tensor<double> x(pw::Shape{200, 50}, 1.0);
    d.set_training(false);
    CHECK(&d.forward(x) == &x);
    d.set_training(true);
    const pw::Tensor<double> y = d.forward(x);
    std::size_t zeros = 0;
    double sum = 0;
    for (double v : y) {
        zeros += v == 0.0;
        CHECK((v == 0.0 || v == doctest::Approx(1.0 / 0.75)));
        sum += v;
    }
    CHECK(double(zeros) / double(y.size()) == doctest::Approx(0.25).epsilon(0.05));
    CHECK(sum / double(y.size()) == doctest::Approx(1.0).epsilon(0.03));
    // Backward uses the same mask.
    pw::Tensor<double> g(x.shape(), 2.0);
    const auto& dx = d.backward(g);
    for (std::size_t i = 0; i < y.size(); ++i) CHECK(dx[i] == 2.0 * y[i]);
    // Same seed, same masks.
    pw::BasicDropout<double> d2(0.25, 42);
    const pw::Tensor<double> y2 = d2.forward(x);
    CHECK(std::memcmp(y.data(), y2.data(), y.size() * sizeof(double)) == 0);
    CHECK_THROWS_AS(d.set_rate(1.0), pw::ConfigError);
    // set_training(model, false) reaches every dropout of a model.
    pw::BertConfig c = tiny_config();
    c.hidden_dropout_prob = 0.1;
    c.attention_probs_dropout_prob = 0.1;
    pw::BertModel<pw::BertEncoder<pw::bert::Plain, double>> m(c);
    const pw::Tensor<double> t1 = m.forward(tiny_batch());
    const pw::Tensor<double> t2 = m.forward(tiny_batch());
    CHECK(t1[0] != t2[0]);
    std::size_t switched = 0;
    pw::for_each_module(m, [&](auto& mod) {
        if constexpr (requires { mod.set_training(false); }) {
            mod.set_training(false);
            ++switched;
        }
    });
    CHECK(switched == 1 + 2 * 3);
    const pw::Tensor<double> t3 = m.forward(tiny_batch());
    const pw::Tensor<double> t4 = m.forward(tiny_batch());
    CHECK(std::memcmp(t3.data(), t4.data(), t3.size() * sizeof(double)) == 0);
}

TEST_CASE("trainable counts on all-MiniLM-L6-v2's architecture match PEFT's") {
    const auto c = minilm_config();
    pw::BertModel<pw::BertEncoder<pw::bert::LoRAQueryValue<8, 16>>> lora(c);
    CHECK(trainable(lora) == 6 * 2 * (8 * 384 + 384 * 8));  // 73,728
    pw::BertModel<pw::BertEncoder<>, pw::FineTune> full(c);
    const std::size_t embeddings = (30522 + 512 + 2) * 384 + 2 * 384;
    const std::size_t layer = 4 * (384 * 384 + 384) + 2 * 2 * 384 + 2 * (384 * 1536) + 1536 + 384;
    CHECK(trainable(full) == embeddings + 6 * layer);
    CHECK(pw::parameter_count(lora) == embeddings + 6 * layer + 73728);
}

TEST_CASE("half-precision conversion") {
    CHECK(pw::hf::detail::half_to_float(0x3C00) == 1.0f);
    CHECK(pw::hf::detail::half_to_float(0xC000) == -2.0f);
    CHECK(pw::hf::detail::half_to_float(0x7BFF) == 65504.0f);
    CHECK(pw::hf::detail::half_to_float(0x0001) == std::ldexp(1.0f, -24));
    CHECK(pw::hf::detail::half_to_float(0x3555) == doctest::Approx(0.333251953125f));
    CHECK(std::isinf(pw::hf::detail::half_to_float(0x7C00)));
}

namespace {

/// Write config.json for `c` and a model.safetensors of `model`'s tensors under
/// HF names (with `prefix`), plus `extra` tensors, as float.
template <class Model>
void write_checkpoint(Model& model, const std::filesystem::path& dir, const std::string& prefix,
                      bool drop_one = false, bool misshape = false, bool extra = false) {
    pw::hf::save_bert(model, dir);
    pw::SafetensorsWriter w;
    std::vector<pw::Tensor<float>> keep;
    const auto params = pw::hf::bert_parameters(model);
    keep.reserve(params.size() + 2);
    for (std::size_t i = 0; i < params.size(); ++i) {
        if (drop_one && i == 7) continue;
        pw::Tensor<float> t = params[i].second->value;
        if (misshape && i == 9) t.reshape(pw::Shape{t.size()});
        keep.push_back(std::move(t));
        w.add(prefix + params[i].first, keep.back());
    }
    keep.emplace_back(pw::Shape{8, 8}, 0.5f);
    w.add(prefix + "pooler.dense.weight", keep.back());
    if (extra) {
        keep.emplace_back(pw::Shape{3}, 1.f);
        w.add(prefix + "cls.predictions.bias", keep.back());
    }
    w.save(dir / "model.safetensors");
}

}  // namespace

TEST_CASE("checkpoint: save and reload are bit-identical, with or without the bert. prefix") {
    using Model = pw::BertModel<pw::BertEncoder<pw::bert::LoRAQueryValue<2, 4>>>;
    pw::manual_seed(13);
    Model m(tiny_config());
    pw::testing::TempDir dir;
    pw::hf::save_bert(m, dir.path);
    const Model r = pw::hf::load_bert<Model>(dir.path);
    Model& rr = const_cast<Model&>(r);
    const auto pa = pw::hf::bert_parameters(m), pb = pw::hf::bert_parameters(rr);
    REQUIRE(pa.size() == 5 + 2 * 16);
    for (std::size_t i = 0; i < pa.size(); ++i) {
        INFO(pa[i].first);
        CHECK(pa[i].first == pb[i].first);
        CHECK(std::memcmp(pa[i].second->value.data(), pb[i].second->value.data(),
                          pa[i].second->value.size() * sizeof(float)) == 0);
    }
    CHECK(rr.config().hidden_size == 8);
    CHECK(rr.config().layer_norm_eps == 1e-12);
    // The freshly loaded model keeps its policies: only LoRA trains.
    CHECK(pw::trainable_count(rr) == 2 * 2 * (2 * 8 + 8 * 2));

    pw::testing::TempDir prefixed;
    write_checkpoint(m, prefixed.path, "bert.");
    Model p = pw::hf::load_bert<Model>(prefixed.path);
    CHECK(std::memcmp(p.embeddings.word.weight.value.data(), m.embeddings.word.weight.value.data(),
                      m.embeddings.word.weight.value.size() * sizeof(float)) == 0);
}

TEST_CASE("checkpoint: missing, misshaped and unused tensors and bad configs are errors naming them") {
    using Model = pw::BertModel<pw::BertEncoder<>>;
    Model m(tiny_config());
    const auto names = pw::hf::bert_parameters(m);
    {
        pw::testing::TempDir dir;
        write_checkpoint(m, dir.path, "", true);
        CHECK_IO_ERROR(pw::hf::load_bert<Model>(dir.path), dir / "model.safetensors", names[7].first);
        CHECK_IO_ERROR(pw::hf::load_bert<Model>(dir.path), dir / "model.safetensors", "missing");
    }
    {
        pw::testing::TempDir dir;
        write_checkpoint(m, dir.path, "", false, true);
        CHECK_IO_ERROR(pw::hf::load_bert<Model>(dir.path), dir / "model.safetensors", names[9].first);
        CHECK_IO_ERROR(pw::hf::load_bert<Model>(dir.path), dir / "model.safetensors", "shape");
    }
    {
        pw::testing::TempDir dir;
        write_checkpoint(m, dir.path, "bert.", false, false, true);
        CHECK_IO_ERROR(pw::hf::load_bert<Model>(dir.path), dir / "model.safetensors", "bert.cls.predictions.bias");
        CHECK_IO_ERROR(pw::hf::load_bert<Model>(dir.path), dir / "model.safetensors", "unused");
        pw::hf::LoadOptions lax;
        lax.allow_unused = true;
        CHECK_NOTHROW((void)pw::hf::load_bert<Model>(dir.path, lax));
    }
    {
        pw::testing::TempDir dir;
        write_checkpoint(m, dir.path, "bert.");
        CHECK_NOTHROW((void)pw::hf::load_bert<Model>(dir.path));
        pw::hf::LoadOptions strict;
        strict.ignore.clear();
        CHECK_IO_ERROR(pw::hf::load_bert<Model>(dir.path, strict), dir / "model.safetensors", "bert.pooler.dense.weight");
    }
    {
        pw::testing::TempDir dir;
        pw::hf::save_bert(m, dir.path);
        std::ofstream(dir / "config.json") << R"({"model_type": "bert", "vocab_size": 23, "hidden_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 12})";
        CHECK_IO_ERROR(pw::hf::load_bert<Model>(dir.path), dir / "config.json", "num_attention_heads");
        std::ofstream(dir / "config.json") << R"({"hidden_act": "relu", "vocab_size": 23})";
        CHECK_IO_ERROR(pw::hf::load_bert<Model>(dir.path), dir / "config.json", "hidden_act");
        std::ofstream(dir / "config.json") << R"({"vocab_size": 23, "hidden_size": 8})";
        CHECK_IO_ERROR(pw::hf::load_bert<Model>(dir.path), dir / "config.json", "num_hidden_layers");
        std::ofstream(dir / "config.json") << "{not json";
        CHECK_IO_ERROR(pw::hf::load_bert<Model>(dir.path), dir / "config.json", "JSON");
    }
    pw::testing::TempDir empty;
    CHECK_IO_ERROR(pw::hf::load_bert<Model>(empty.path), empty / "config.json", "missing");
}

namespace {

/// Row r of a [B, T, D] tensor as [1, T, D].
pw::Tensor<double> row_of(const pw::Tensor<double>& x, std::size_t r) {
    const std::size_t n = x.dim(1) * x.dim(2);
    pw::Tensor<double> out(pw::Shape{1, x.dim(1), x.dim(2)});
    std::copy(x.data() + r * n, x.data() + (r + 1) * n, out.data());
    return out;
}

/// A mixed-task batch of sequences through MultiTask<BERT encoder, head>, against
/// one single-task pass per sequence: outputs and every gradient.
template <class MT>
void check_mixed_against_single(MT& mt, const pw::Tensor<double>& x, const std::vector<int>& tasks,
                                const std::vector<std::int32_t>& mask, pw::MixedPass pass = pw::MixedPass::one_pass) {
    const std::size_t B = x.dim(0), T = x.dim(1);
    pw::Rng rng(31);
    pw::Tensor<double> y, g;
    std::vector<pw::Tensor<double>> mixed_grads;
    {
        pw::AttentionMask scope(mask, B, T);
        pw::zero_grad(mt);
        y = mt.forward(x, tasks);
        CHECK(mt.last_mixed_pass() == pass);
        g = pw::Tensor<double>(y.shape());
        pw::init::normal(g, rng, 0, 1);
        mt.backward(g);
        mt.visit([&](auto& p) {
            if (p.trainable()) mixed_grads.push_back(p.grad);
        });
    }
    pw::zero_grad(mt);
    const std::size_t per_row = y.size() / B;
    for (std::size_t r = 0; r < B; ++r) {
        const std::vector<std::int32_t> row_mask(mask.begin() + long(r * T), mask.begin() + long((r + 1) * T));
        pw::AttentionMask scope(row_mask, 1, T);
        const pw::Tensor<double> xr = row_of(x, r);
        const auto& yr = mt.forward(xr, tasks[r]);
        for (std::size_t i = 0; i < per_row; ++i) CHECK(yr[i] == doctest::Approx(y[r * per_row + i]).epsilon(1e-12));
        pw::Tensor<double> gr(yr.shape());
        std::copy(g.data() + r * per_row, g.data() + (r + 1) * per_row, gr.data());
        mt.backward(gr);
    }
    std::size_t i = 0;
    mt.visit([&](auto& p) {
        if (!p.trainable()) return;
        INFO(p.name());
        REQUIRE(i < mixed_grads.size());
        CHECK(pw::testing::relative_error(p.grad, mixed_grads[i]) < 1e-12);
        ++i;
    });
    CHECK(i == mixed_grads.size());
    CHECK(i > 4);
}

}  // namespace

TEST_CASE("pooler as a module: the mask scope, gradient check, errors") {
    const pw::TokenBatch b = tiny_batch();
    for (const pw::Pooling mode : {pw::Pooling::mean, pw::Pooling::cls}) {
        INFO("cls pooling: ", mode == pw::Pooling::cls);
        pw::BasicPooler<double> pool(mode);
        pw::Rng rng(12);
        pw::Tensor<double> h(pw::Shape{2, 5, 8});
        pw::init::normal(h, rng, 0.0, 1.0);
        // forward(h) under a mask scope equals forward(h, batch), and only real positions count.
        const pw::Tensor<double> with_batch = pool.forward(h, b);
        pw::AttentionMask scope(b.mask, b.batch, b.tokens);
        const pw::Tensor<double> with_scope = pool.forward(h);
        CHECK(pw::testing::relative_error(with_scope, with_batch) == 0.0);
        if (mode == pw::Pooling::mean) {
            double second = 0;  // sequence 1, feature 3: the mean of its 3 real tokens
            for (std::size_t t = 0; t < 3; ++t) second += h(5 + t, 3);
            CHECK(with_scope(1, 3) == doctest::Approx(second / 3).epsilon(1e-14));
        }
        check_module(pool, pw::Shape{2, 5, 8});
        const pw::Tensor<double> dh = pool.backward(pw::Tensor<double>(pw::Shape{2, 8}, 1.0));
        for (std::size_t j = 0; j < 8; ++j) CHECK(dh(8, j) == 0.0);  // a padded position gets no gradient
    }
    pw::BasicPooler<double> pool;
    pool.set_path("backbone.1");
    const pw::Tensor<double> h(pw::Shape{3, 5, 8});
    {
        pw::AttentionMask scope(tiny_batch().mask, 2, 5);
        CHECK_THROWS_WITH_AS(pool.forward(h), doctest::Contains("backbone.1: the attention mask is 2 x 5"),
                             pw::ShapeError);
    }
    const std::vector<std::int32_t> empty_row = {1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0};
    pw::AttentionMask scope(empty_row, 3, 5);
    CHECK_THROWS_WITH_AS(pool.forward(h), doctest::Contains("backbone.1: sequence 1 has no real token"),
                         pw::ShapeError);
    CHECK_THROWS_AS(pool.forward(pw::Tensor<double>(pw::Shape{3, 40})), pw::ShapeError);
}

// A backbone that ends in the pooler: the rows MultiTask sorts by task must
// pool with their own mask rows (one sequence vector per row, then the heads).
TEST_CASE("multitask: BERT encoder and pooler as the backbone, LoRA banks, padded rows in any order") {
    using Encoder = pw::Tune<pw::BertEncoder<pw::bert::LoRAQueryValue<2, 4>, double>, pw::Frozen>;
    using Backbone = pw::Sequential<Encoder, pw::BasicPooler<double>>;
    std::vector<Lin> heads;
    heads.emplace_back(8, 3);
    heads.emplace_back(8, 3);
    pw::MultiTask<Backbone, Lin> mt(Backbone(Encoder(tiny_config()), pw::BasicPooler<double>()), heads);
    CHECK(mt.one_pass_supported());
    pw::Rng rng(6);
    mt.visit([&](auto& p) { pw::init::normal(p.value, rng, 0.0, 0.3); });
    pw::Tensor<double> x(pw::Shape{4, 5, 8});
    pw::init::normal(x, rng, 0.0, 1.0);
    const std::vector<std::int32_t> mask = {1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0};
    check_mixed_against_single(mt, x, {1, 0, 1, 0}, mask);
    mt.set_one_pass(false);
    check_mixed_against_single(mt, x, {1, 0, 0, 1}, mask, pw::MixedPass::grouped);
}

TEST_CASE("multitask: one BERT encoder, LoRA banks per task, mixed batches whose rows are sequences") {
    using Encoder = pw::Tune<pw::BertEncoder<pw::bert::LoRAQueryValue<2, 4>, double>, pw::Frozen>;
    std::vector<Lin> heads;
    heads.emplace_back(8, 3);
    heads.emplace_back(8, 3);
    pw::MultiTask<Encoder, Lin> mt(Encoder(tiny_config()), heads);
    pw::Rng rng(4);
    mt.visit([&](auto& p) { pw::init::normal(p.value, rng, 0.0, 0.3); });
    pw::Tensor<double> x(pw::Shape{3, 5, 8});
    pw::init::normal(x, rng, 0.0, 1.0);
    SUBCASE("full sequences, tasks in any order") {
        check_mixed_against_single(mt, x, {1, 0, 1}, std::vector<std::int32_t>(15, 1));
    }
    SUBCASE("padded sequences, rows grouped by task") {
        check_mixed_against_single(mt, x, {0, 0, 1}, {1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0});
    }
    // The rows are sorted by task inside; each keeps its own attention-mask row.
    SUBCASE("padded sequences, tasks in any order") {
        check_mixed_against_single(mt, x, {1, 0, 1}, {1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0});
        check_mixed_against_single(mt, x, {1, 1, 0}, {1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1});
    }
    SUBCASE("padded sequences, one backbone pass per task (grouped)") {
        mt.set_one_pass(false);
        check_mixed_against_single(mt, x, {1, 0, 1}, {1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0},
                                   pw::MixedPass::grouped);
        mt.set_one_pass(true);
    }
    SUBCASE("a mask for another batch size is a clear error") {
        const std::vector<std::int32_t> mask(2 * 5, 1);
        pw::AttentionMask scope(mask, 2, 5);
        const std::vector<int> tasks{0, 1, 0};
        CHECK_THROWS_AS(mt.forward(x, tasks), pw::ShapeError);
    }
}
