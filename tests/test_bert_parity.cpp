// all-MiniLM-L6-v2 against PyTorch: last hidden states and mean-pooled
// sentence embeddings of the 64 texts of tests/data/minilm (float32 and
// float64 models against transformers' float32 and float64 runs), and one LoRA
// training step (r = 8, alpha = 16 on query and value, a Linear(384, 4) head on
// mean pooling) against PEFT: the loss and all 26 gradient tensors.
//
// Needs the model (scripts/fetch-model; PATCHWORK_MODEL_DIR, default
// ~/.cache/patchwork/models) and the fixtures (PATCHWORK_TEST_DATA/minilm).
// Without either the program says why and exits 77, which meson counts as
// skipped. An unoptimised build (the sanitizer suite, -O0) runs a reduced
// check: the hidden states of 2 short texts, and no training step.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "patchwork/io/safetensors.hpp"
#include "patchwork/train/loss.hpp"
#include "patchwork/transformer/bert.hpp"
#include "patchwork/transformer/hf_checkpoint.hpp"

namespace pw = patchwork;
namespace fs = std::filesystem;

namespace {

#if defined(__OPTIMIZE__)
constexpr bool reduced = false;
#else
constexpr bool reduced = true;  // -O0: Eigen is ~50x slower
#endif

fs::path model_dir() { return pw::hf::model_cache_dir(); }
fs::path fixture_dir() {
    const char* d = std::getenv("PATCHWORK_TEST_DATA");
    return fs::path(d && *d ? d : "tests/data") / "minilm";
}

/// An I64 tensor of a fixture as int32 values.
std::vector<std::int32_t> ints(const pw::SafetensorsFile& f, const std::string& name) {
    const pw::SafetensorsEntry* e = f.find(name);
    REQUIRE_MESSAGE(e != nullptr, "fixture tensor ", name, " is missing");
    REQUIRE(e->dtype == "I64");
    const auto bytes = f.bytes(*e);
    std::vector<std::int32_t> out(std::size_t(e->numel()));
    for (std::size_t i = 0; i < out.size(); ++i) {
        std::int64_t v;
        std::memcpy(&v, bytes.data() + 8 * i, 8);
        out[i] = std::int32_t(v);
    }
    return out;
}

/// Rows `rows` of a [N, T] id fixture, cut to the longest of them (padding
/// past it changes no real position).
pw::TokenBatch batch_of(const pw::SafetensorsFile& f, const std::vector<std::size_t>& rows) {
    const auto ids = ints(f, "input_ids"), types = ints(f, "token_type_ids"), mask = ints(f, "attention_mask");
    const std::size_t T = f.find("input_ids")->shape[1];
    std::size_t longest = 0;
    for (std::size_t r : rows) {
        std::size_t n = 0;
        for (std::size_t t = 0; t < T; ++t) n += mask[r * T + t] != 0;
        longest = std::max(longest, n);
    }
    pw::TokenBatch b;
    b.batch = rows.size();
    b.tokens = longest;
    for (std::size_t r : rows)
        for (std::size_t t = 0; t < longest; ++t) {
            b.ids.push_back(ids[r * T + t]);
            b.token_types.push_back(types[r * T + t]);
            b.mask.push_back(mask[r * T + t]);
        }
    return b;
}

template <class T, class R>
double rel(const T* a, const R* b, std::size_t n) {
    double d = 0, nb = 0;
    for (std::size_t i = 0; i < n; ++i) {
        d += (double(a[i]) - double(b[i])) * (double(a[i]) - double(b[i]));
        nb += double(b[i]) * double(b[i]);
    }
    return std::sqrt(d) / std::sqrt(nb);
}

struct Stats {
    double max = 0;
    std::vector<double> all;
    void add(double e) {
        max = std::max(max, e);
        all.push_back(e);
    }
    double median() {
        if (all.empty()) return 0;
        std::sort(all.begin(), all.end());
        return all[all.size() / 2];
    }
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Runs the texts in batches of 16 consecutive rows (mixed lengths, padded to
/// each batch's longest) and compares every real token vector and every
/// sentence embedding with the fixture's packed rows.
template <class T>
void check_hidden_states(double tolerance_f32, double tolerance_f64, std::size_t texts = 64) {
    const auto ref = pw::read_safetensors(fixture_dir() / "reference.safetensors");
    using Model = pw::BertModel<pw::BertEncoder<pw::bert::Plain, T>>;
    const auto t0 = std::chrono::steady_clock::now();
    Model model = pw::hf::load_bert<Model>(model_dir());
    const double load_s = seconds_since(t0);
    const auto lengths = ints(ref, "lengths");
    const auto h32 = ref.tensor<double>("last_hidden_state_packed");
    const auto h64 = ref.tensor<double>("last_hidden_state_packed_f64");
    const auto e32 = ref.tensor<double>("sentence_embedding");
    const auto e64 = ref.tensor<double>("sentence_embedding_f64");
    const std::size_t D = 384, N = reduced ? 2 : std::min(texts, lengths.size());
    std::vector<std::size_t> offset(lengths.size() + 1, 0);
    for (std::size_t i = 0; i < lengths.size(); ++i) offset[i + 1] = offset[i] + std::size_t(lengths[i]);
    // Reduced run: the two shortest texts.
    std::vector<std::size_t> order(lengths.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    if (reduced)
        std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return lengths[a] < lengths[b]; });
    Stats tok32, tok64, emb32, emb64;
    pw::BasicPooler<T> pooler;
    const auto t1 = std::chrono::steady_clock::now();
    for (std::size_t start = 0; start < N; start += 16) {
        std::vector<std::size_t> rows(order.begin() + long(start), order.begin() + long(std::min(N, start + 16)));
        const pw::TokenBatch b = batch_of(ref, rows);
        const pw::Tensor<T>& h = model.forward(b);
        for (std::size_t i = 0; i < rows.size(); ++i)
            for (std::size_t t = 0; t < std::size_t(lengths[rows[i]]); ++t) {
                const T* mine = h.data() + (i * b.tokens + t) * D;
                const std::size_t packed = offset[rows[i]] + t;
                tok32.add(rel(mine, h32.data() + packed * D, D));
                tok64.add(rel(mine, h64.data() + packed * D, D));
            }
        const pw::Tensor<T>& e = pooler.forward(h, b);
        for (std::size_t i = 0; i < rows.size(); ++i) {
            emb32.add(rel(e.data() + i * D, e32.data() + rows[i] * D, D));
            emb64.add(rel(e.data() + i * D, e64.data() + rows[i] * D, D));
        }
    }
    const double run_s = seconds_since(t1);
    MESSAGE(std::string(sizeof(T) == 4 ? "float32" : "float64"), " model, ", N, " texts (", tok32.all.size(),
            " tokens), load ", load_s, " s, forward ", run_s, " s: per token vector, relative error against "
            "PyTorch float32 max ", tok32.max, " median ", tok32.median(), ", against float64 max ", tok64.max,
            " median ", tok64.median(), "; sentence embeddings against float32 max ", emb32.max, ", against float64 max ",
            emb64.max);
    CHECK(tok32.all.size() == (reduced || N < lengths.size() ? tok32.all.size() : offset.back()));
    CHECK(tok32.max <= tolerance_f32);
    CHECK(emb32.max <= tolerance_f32);
    CHECK(tok64.max <= tolerance_f64);
    CHECK(emb64.max <= tolerance_f64);
}

/// The LoRA step of lora_step.safetensors; `suffix` picks the reference run ("" float64, "_f32").
template <class T>
void check_lora_step(const std::string& grads, const std::string& loss_name, double tolerance) {
    const auto ref = pw::read_safetensors(fixture_dir() / "lora_step.safetensors");
    using Model = pw::BertModel<pw::BertEncoder<pw::bert::LoRAQueryValue<8, 16>, T>>;
    Model model = pw::hf::load_bert<Model>(model_dir());
    REQUIRE(pw::trainable_count(model) == 73728);
    // The initial factors, under PEFT's names.
    std::vector<std::pair<std::string, pw::Parameter<T>*>> factors;
    for (std::size_t i = 0; i < 6; ++i) {
        auto& layer = model.encoder.layer(i);
        const std::string p = "base_model.model.encoder.layer." + std::to_string(i) + ".attention.self.";
        auto& q = layer.attention.query.inner();
        auto& v = layer.attention.value.inner();
        factors.emplace_back(p + "query.lora_A.weight", &q.a);
        factors.emplace_back(p + "query.lora_B.weight", &q.b);
        factors.emplace_back(p + "value.lora_A.weight", &v.a);
        factors.emplace_back(p + "value.lora_B.weight", &v.b);
    }
    pw::BasicLinear<T> head(384, 4);
    factors.emplace_back("head.weight", &head.weight);
    factors.emplace_back("head.bias", &head.bias);
    for (auto& [name, p] : factors) {
        const auto t = ref.tensor<T>(name);
        REQUIRE(t.shape() == p->value.shape());
        p->value = t;
    }
    const std::vector<std::size_t> rows = {0, 1, 2, 3, 4, 5, 6, 7};
    const pw::TokenBatch b = batch_of(ref, rows);
    const auto label64 = ints(ref, "labels");
    const std::vector<int> labels(label64.begin(), label64.end());

    const auto t0 = std::chrono::steady_clock::now();
    pw::zero_grad(model);
    pw::zero_grad(head);
    pw::BasicPooler<T> pooler;
    const auto& h = model.forward(b);
    const auto& e = pooler.forward(h, b);
    const auto& logits = head.forward(e);
    const auto ce = pw::cross_entropy(logits, labels);
    head.set_input_grad(true);
    model.backward(pooler.backward(head.backward(ce.grad)));
    const double step_s = seconds_since(t0);

    const double ref_loss = ref.tensor<double>(loss_name)[0];
    const double loss_err = std::abs(double(ce.value) - ref_loss) / std::abs(ref_loss);
    double worst = 0;
    std::string worst_name;
    for (const auto& factor : factors) {  // not a structured binding: INFO captures name (clang 14)
        const std::string& name = factor.first;
        const auto* p = factor.second;
        const auto g = ref.tensor<double>(grads + "." + name);
        const double err = rel(p->grad.data(), g.data(), g.size());
        INFO(name, ": relative error ", err);
        CHECK(err <= tolerance);
        if (err > worst) worst = err, worst_name = name;
    }
    MESSAGE(std::string(sizeof(T) == 4 ? "float32" : "float64"), " LoRA step against ", grads, ": loss ", ce.value, " (reference ",
            ref_loss, ", relative error ", loss_err, "), worst gradient ", worst_name, " relative error ", worst,
            ", step ", step_s, " s");
    CHECK(loss_err <= tolerance);
}

}  // namespace

TEST_CASE("all-MiniLM-L6-v2 float32: hidden states and sentence embeddings equal transformers'") {
    check_hidden_states<float>(1e-5, 1e-5);
}

TEST_CASE("all-MiniLM-L6-v2 float64: hidden states of 16 texts equal transformers' float64 run") {
    if (reduced) return;
    check_hidden_states<double>(1e-5, 1e-10, 16);
}

TEST_CASE("LoRA step on all-MiniLM-L6-v2 equals PyTorch + PEFT") {
    if (reduced) {
        MESSAGE("skipped in an unoptimised build (a full training step of the real model)");
        return;
    }
    check_lora_step<float>("grad_f32", "loss_f32", 1e-4);
    check_lora_step<float>("grad", "loss", 1e-4);
    check_lora_step<double>("grad", "loss", 1e-9);
}

int main(int argc, char** argv) {
    const fs::path model = model_dir() / "model.safetensors";
    const fs::path fixtures = fixture_dir() / "reference.safetensors";
    if (!fs::exists(model)) {
        std::printf("test_bert_parity: skipped: no pre-trained model at %s (run scripts/fetch-model; it needs "
                    "network access or PATCHWORK_MODEL_WHEEL)\n",
                    model.string().c_str());
        return 77;
    }
    if (!fs::exists(fixtures) || !fs::exists(fixture_dir() / "lora_step.safetensors")) {
        std::printf("test_bert_parity: skipped: the reference fixtures are missing under %s\n",
                    fixture_dir().string().c_str());
        return 77;
    }
    if (reduced) std::printf("test_bert_parity: unoptimised build: reduced check (2 texts, no training step)\n");
    doctest::Context context(argc, argv);
    return context.run();
}
