// PEFT LoRA adapter files (transformer/peft.hpp) against the fixtures of
// tests/data/peft, made by PEFT 0.21.2 (make_fixtures.py): a tiny random BERT,
// a LoRA adapter (r = 4, lora_alpha = 8, query and value) saved by PEFT, a
// padded batch and PEFT's last hidden states in float32 and float64.
//
// With PATCHWORK_PEFT_EXPORT=<dir> set, the training test also writes the
// adapter patchwork trained and patchwork's hidden states there, for
// scripts/check-peft-roundtrip.py (PeftModel.from_pretrained on that folder).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "temp_dir.hpp"
#include "patchwork/core/random.hpp"
#include "patchwork/io/safetensors.hpp"
#include "patchwork/transformer/bert.hpp"
#include "patchwork/transformer/hf_checkpoint.hpp"
#include "patchwork/transformer/peft.hpp"

namespace pw = patchwork;
namespace fs = std::filesystem;
using pw::testing::TempDir;

namespace {

fs::path data_dir() {
    const char* d = std::getenv("PATCHWORK_TEST_DATA");
    return fs::path(d && *d ? d : "tests/data") / "peft";
}

template <class T, std::size_t R = 4, std::size_t A = 8>
using LoraBert = pw::BertModel<pw::BertEncoder<pw::bert::LoRAQueryValue<R, A>, T>>;

template <class Model>
Model tiny() {
    return pw::hf::load_bert<Model>(data_dir() / "base");
}

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

pw::TokenBatch batch(const pw::SafetensorsFile& f) {
    const pw::SafetensorsEntry* e = f.find("input_ids");
    REQUIRE(e != nullptr);
    pw::TokenBatch b;
    b.batch = std::size_t(e->shape.at(0));
    b.tokens = std::size_t(e->shape.at(1));
    b.ids = ints(f, "input_ids");
    b.token_types = ints(f, "token_type_ids");
    b.mask = ints(f, "attention_mask");
    return b;
}

/// Largest relative error ||h_bt - r_bt|| / ||r_bt|| over the real tokens.
template <class T>
double worst_token_error(const pw::Tensor<T>& h, const pw::Tensor<double>& ref, const pw::TokenBatch& b) {
    REQUIRE(h.size() == ref.size());
    const std::size_t D = h.cols();
    double worst = 0;
    for (std::size_t r = 0; r < b.batch * b.tokens; ++r) {
        if (!b.mask[r]) continue;
        double num = 0, den = 0;
        for (std::size_t k = 0; k < D; ++k) {
            const double d = double(h.data()[r * D + k]) - ref.data()[r * D + k];
            num += d * d;
            den += ref.data()[r * D + k] * ref.data()[r * D + k];
        }
        worst = std::max(worst, std::sqrt(num / den));
    }
    return worst;
}

template <class E, class F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const E& e) {
        return e.what();
    }
    return "(no error of the expected type thrown)";
}
#define CHECK_ERROR(Type, expr, file, word)                                         \
    do {                                                                            \
        const std::string msg_ = error_of<Type>([&] { expr; });                     \
        INFO("message: ", msg_);                                                    \
        CHECK(msg_.find((file).string()) != std::string::npos);                     \
        CHECK(msg_.find(word) != std::string::npos);                                \
    } while (0)

std::string slurp(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    REQUIRE_MESSAGE(in, "cannot read ", p.string());
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_text(const fs::path& p, const std::string& s) {
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out << s;
}

/// A copy of the fixture adapter in `dir`, with the config edited by `edit_config`
/// and the tensors by `edit_tensors(name, tensor) -> new name ("" drops it)`.
template <class C, class Tn>
void edited_copy(const fs::path& dir, C&& edit_config, Tn&& edit_tensors) {
    fs::create_directories(dir);
    auto j = nlohmann::json::parse(slurp(data_dir() / "adapter/adapter_config.json"));
    edit_config(j);
    write_text(dir / "adapter_config.json", j.dump(2));
    const auto f = pw::read_safetensors(data_dir() / "adapter/adapter_model.safetensors");
    std::vector<std::pair<std::string, pw::Tensor<float>>> keep;
    for (const auto& e : f.entries()) {
        pw::Tensor<float> t = f.tensor<float>(e.name);
        const std::string name = edit_tensors(e.name, t);
        if (!name.empty()) keep.emplace_back(name, std::move(t));
    }
    pw::SafetensorsWriter w;
    for (auto& [n, t] : keep) w.add(n, t);
    w.add_metadata("format", "pt");
    w.save(dir / "adapter_model.safetensors");
}
const auto same_config = [](nlohmann::json&) {};
const auto same_tensors = [](const std::string& n, pw::Tensor<float>&) { return n; };

/// LoRA on the feed-forward output only: PEFT's target "output.dense" would select attention.output.dense too.
struct OutputOnly : pw::bert::Plain {
    template <class L>
    using output = pw::Tune<L, pw::LoRA<2>>;
};

pw::hf::PeftSaveOptions named(std::string base) {
    pw::hf::PeftSaveOptions o;
    o.base_model_name_or_path = std::move(base);
    return o;
}

template <class Model>
auto lora_factors(Model& m) {
    using T = typename Model::Scalar;
    std::vector<pw::Parameter<T>*> out;
    for (std::size_t i = 0; i < m.encoder.size(); ++i) {
        auto& att = m.encoder.layer(i).attention;
        for (auto* p : {&att.query.inner().a, &att.query.inner().b, &att.value.inner().a, &att.value.inner().b})
            out.push_back(p);
    }
    return out;
}

template <class T>
void check_peft_outputs(const char* ref_name, double tolerance) {
    const auto ref = pw::read_safetensors(data_dir() / "outputs.safetensors");
    const pw::TokenBatch b = batch(ref);
    auto model = tiny<LoraBert<T>>();
    // Before loading, B = 0: the base model's output, far from PEFT's with the adapter.
    const double before_base = worst_token_error(model.forward(b), ref.tensor<double>("base_last_hidden_state"), b);
    const double before = worst_token_error(model.forward(b), ref.tensor<double>(ref_name), b);
    CHECK(before_base <= 1e-5);
    CHECK(before > 0.1);
    pw::hf::load_peft_lora(model, data_dir() / "adapter");
    CHECK(model.encoder.layer(1).attention.value.inner().scale() == T(2));
    const double after = worst_token_error(model.forward(b), ref.tensor<double>(ref_name), b);
    MESSAGE(std::string(sizeof(T) == 4 ? "float32" : "float64"), " model against PEFT's ", std::string(ref_name),
            ": worst token vector relative error ", after, " (", before, " before loading the adapter)");
    CHECK(after <= tolerance);
}

}  // namespace

TEST_CASE("a PEFT-saved LoRA adapter on a tiny BERT reproduces PEFT's hidden states") {
    check_peft_outputs<float>("last_hidden_state", 1e-5);
    check_peft_outputs<double>("last_hidden_state_f64", 1e-12);
}

TEST_CASE("load_peft_lora sets the scale from lora_alpha / r, whatever the model's Alpha") {
    const auto ref = pw::read_safetensors(data_dir() / "outputs.safetensors");
    const pw::TokenBatch b = batch(ref);
    auto model = tiny<LoraBert<float, 4, 4>>();  // alpha 4: scale 1 until the file says 8 / 4
    CHECK(model.encoder.layer(0).attention.query.inner().scale() == 1.0f);
    pw::hf::load_peft_lora(model, data_dir() / "adapter");
    CHECK(model.encoder.layer(0).attention.query.inner().scale() == 2.0f);
    CHECK(worst_token_error(model.forward(b), ref.tensor<double>("last_hidden_state"), b) <= 1e-5);
}

TEST_CASE("the prefix base_model.model.bert. of a task model's adapter is accepted") {
    TempDir tmp("peft");
    edited_copy(tmp.path, same_config, [](const std::string& n, pw::Tensor<float>&) {
        return "base_model.model.bert." + n.substr(std::string("base_model.model.").size());
    });
    const auto ref = pw::read_safetensors(data_dir() / "outputs.safetensors");
    const pw::TokenBatch b = batch(ref);
    auto model = tiny<LoraBert<float>>();
    pw::hf::load_peft_lora(model, tmp.path);
    CHECK(worst_token_error(model.forward(b), ref.tensor<double>("last_hidden_state"), b) <= 1e-5);
}

TEST_CASE("modules_to_save: refused, or skipped when asked (a task model's head)") {
    TempDir tmp("peft");
    const fs::path d = tmp / "cls";
    edited_copy(d, [](nlohmann::json& j) { j["modules_to_save"] = {"classifier"}; },
                [](const std::string& n, pw::Tensor<float>&) { return n; });
    {  // add the head's tensor under PEFT's name
        const auto f = pw::read_safetensors(d / "adapter_model.safetensors");
        std::vector<pw::Tensor<float>> ts;
        for (const auto& e : f.entries()) ts.push_back(f.tensor<float>(e.name));
        pw::SafetensorsWriter w;
        for (std::size_t i = 0; i < ts.size(); ++i) w.add(f.entries()[i].name, ts[i]);
        const pw::Tensor<float> head(pw::Shape{3, 32});
        w.add("base_model.model.classifier.weight", head);
        w.save(d / "adapter_model.safetensors");
    }
    auto model = tiny<LoraBert<float>>();
    CHECK_ERROR(pw::ConfigError, pw::hf::load_peft_lora(model, d), d / "adapter_config.json", "\"modules_to_save\"");
    pw::hf::PeftLoadOptions skip;
    skip.skip_modules_to_save = true;
    pw::hf::load_peft_lora(model, d, skip);
    const auto ref = pw::read_safetensors(data_dir() / "outputs.safetensors");
    const pw::TokenBatch b = batch(ref);
    CHECK(worst_token_error(model.forward(b), ref.tensor<double>("last_hidden_state"), b) <= 1e-5);
}

TEST_CASE("a saved adapter has exactly PEFT's config, keys, shapes and values") {
    auto model = tiny<LoraBert<float>>();
    pw::hf::load_peft_lora(model, data_dir() / "adapter");
    TempDir tmp("peft");
    const fs::path out = tmp / "saved";
    pw::hf::save_peft_lora(model, out, named("tiny-random-bert"));
    CHECK(tmp.listing() == std::set<std::string>{"saved"});  // no temporary left beside it
    std::set<std::string> files;
    for (const auto& e : fs::directory_iterator(out)) files.insert(e.path().filename().string());
    CHECK(files == std::set<std::string>{"adapter_config.json", "adapter_model.safetensors"});

    // The config: the same fields and values as PEFT's, and the same text (sorted keys, indent 2).
    const std::string peft_text = slurp(data_dir() / "adapter/adapter_config.json");
    const std::string ours_text = slurp(out / "adapter_config.json");
    const auto peft_cfg = nlohmann::json::parse(peft_text), ours = nlohmann::json::parse(ours_text);
    for (const auto& item : peft_cfg.items()) {  // not bound: INFO takes the key (clang 14)
        const std::string& k = item.key();
        const auto& v = item.value();
        INFO("field ", k);
        REQUIRE(ours.contains(k));
        CHECK(ours[k] == v);
    }
    for (const auto& item : ours.items()) {
        const std::string& k = item.key();
        INFO("field ", k);
        CHECK(peft_cfg.contains(k));
    }
    CHECK(ours_text == peft_text);

    // The tensors: the same names, dtypes, shapes and (loaded, then saved) bit-identical values.
    const auto theirs = pw::read_safetensors(data_dir() / "adapter/adapter_model.safetensors");
    const auto saved = pw::read_safetensors(out / "adapter_model.safetensors");
    REQUIRE(saved.size() == theirs.size());
    CHECK(saved.size() == 8);
    for (std::size_t i = 0; i < saved.size(); ++i) {
        const auto &s = saved.entries()[i], &t = theirs.entries()[i];
        INFO("tensor ", t.name);
        CHECK(s.name == t.name);
        CHECK(s.dtype == t.dtype);
        CHECK(s.shape == t.shape);
        const auto sb = saved.bytes(s), tb = theirs.bytes(t);
        CHECK((sb.size() == tb.size() && std::memcmp(sb.data(), tb.data(), sb.size()) == 0));
    }
    CHECK(saved.metadata() == theirs.metadata());

    // task_type and the prefix of a task model.
    pw::hf::PeftSaveOptions cls_options;
    cls_options.task_type = "SEQ_CLS";
    cls_options.bert_prefix = true;
    pw::hf::save_peft_lora(model, tmp / "cls", cls_options);
    const auto cls = nlohmann::json::parse(slurp(tmp / "cls/adapter_config.json"));
    CHECK(cls["task_type"] == "SEQ_CLS");
    CHECK(cls["base_model_name_or_path"].is_null());
    CHECK(!cls.contains("auto_mapping"));
    CHECK(pw::read_safetensors(tmp / "cls/adapter_model.safetensors")
              .contains("base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"));
}

TEST_CASE("save then load is bit-identical, and a second save writes the same bytes") {
    auto a = tiny<LoraBert<float>>();
    pw::Rng rng(7);
    for (auto* p : lora_factors(a))
        for (std::size_t i = 0; i < p->size(); ++i) p->value.data()[i] = float(rng.normal()) * 0.3f;
    a.encoder.layer(0).attention.query.inner().set_scale(1.5f);
    CHECK_ERROR(pw::ConfigError, pw::hf::save_peft_lora(a, fs::path("unused")), fs::path("unused"), "scales differ");
    for (std::size_t i = 0; i < a.encoder.size(); ++i) {
        a.encoder.layer(i).attention.query.inner().set_scale(0.75f);
        a.encoder.layer(i).attention.value.inner().set_scale(0.75f);
    }
    TempDir tmp("peft");
    pw::hf::save_peft_lora(a, tmp / "one");
    CHECK(nlohmann::json::parse(slurp(tmp / "one/adapter_config.json"))["lora_alpha"] == 3);
    auto b = tiny<LoraBert<float>>();
    pw::hf::load_peft_lora(b, tmp / "one");
    const auto fa = lora_factors(a), fb = lora_factors(b);
    for (std::size_t k = 0; k < fa.size(); ++k) {
        REQUIRE(fa[k]->value.shape() == fb[k]->value.shape());
        CHECK(std::memcmp(fa[k]->value.data(), fb[k]->value.data(), fa[k]->size() * sizeof(float)) == 0);
    }
    CHECK(b.encoder.layer(1).attention.value.inner().scale() == 0.75f);
    const auto ref = pw::read_safetensors(data_dir() / "outputs.safetensors");
    const pw::TokenBatch bt = batch(ref);
    const pw::Tensor<float> ha = a.forward(bt);
    const pw::Tensor<float>& hb = b.forward(bt);
    CHECK(std::memcmp(ha.data(), hb.data(), ha.size() * sizeof(float)) == 0);
    pw::hf::save_peft_lora(b, tmp / "two");
    CHECK(slurp(tmp / "one/adapter_model.safetensors") == slurp(tmp / "two/adapter_model.safetensors"));
    CHECK(slurp(tmp / "one/adapter_config.json") == slurp(tmp / "two/adapter_config.json"));
}

TEST_CASE("bad adapter folders: a clear error naming the file and the problem, and the model unchanged") {
    TempDir tmp("peft");
    auto model = tiny<LoraBert<float>>();
    const auto factors = lora_factors(model);
    const pw::Tensor<float> a0 = factors[0]->value;
    const auto unchanged = [&] {
        CHECK(std::memcmp(a0.data(), factors[0]->value.data(), a0.size() * sizeof(float)) == 0);
        CHECK(model.encoder.layer(0).attention.query.inner().scale() == 2.0f);
    };
    const auto load = [&](const fs::path& d) { pw::hf::load_peft_lora(model, d); };
    const auto copy = [&](const std::string& name, auto&& cfg, auto&& tensors) {
        const fs::path d = tmp / name;
        edited_copy(d, cfg, tensors);
        return d;
    };

    SUBCASE("missing files") {
        const fs::path none = tmp / "nothing";
        CHECK_ERROR(pw::IoError, load(none), none / "adapter_config.json", "missing");
        const fs::path d = copy("no_weights", same_config, same_tensors);
        fs::remove(d / "adapter_model.safetensors");
        CHECK_ERROR(pw::IoError, load(d), d / "adapter_model.safetensors", "missing");
    }
    SUBCASE("not JSON") {
        const fs::path d = copy("bad_json", same_config, same_tensors);
        write_text(d / "adapter_config.json", "{\"peft_type\": \"LORA\", \"r\": ");
        CHECK_ERROR(pw::IoError, load(d), d / "adapter_config.json", "not valid JSON");
    }
    SUBCASE("another PEFT method") {
        const fs::path d = copy("ia3", [](nlohmann::json& j) { j["peft_type"] = "IA3"; }, same_tensors);
        CHECK_ERROR(pw::ConfigError, load(d), d / "adapter_config.json", "\"IA3\"");
    }
    SUBCASE("rank mismatch") {
        auto r8 = tiny<LoraBert<float, 8, 16>>();
        CHECK_ERROR(pw::ConfigError, pw::hf::load_peft_lora(r8, data_dir() / "adapter"),
                    data_dir() / "adapter" / "adapter_config.json", "rank mismatch");
        CHECK_ERROR(pw::ConfigError, pw::hf::load_peft_lora(r8, data_dir() / "adapter"),
                    data_dir() / "adapter" / "adapter_config.json", "encoder.layer.0.attention.self.query");
    }
    SUBCASE("unsupported options") {
        for (const auto& option : std::vector<std::pair<std::string, nlohmann::json>>{
                 {"use_rslora", true},
                 {"use_dora", true},
                 {"bias", "all"},
                 {"fan_in_fan_out", true},
                 {"modules_to_save", {"classifier"}},
                 {"rank_pattern", {{"value", 8}}},
                 {"layers_to_transform", {0}}}) {
            const std::string& key = option.first;  // not bound: INFO and the lambda take them (clang 14)
            const nlohmann::json& value = option.second;
            INFO(key);
            const fs::path d = copy("opt_" + key, [&](nlohmann::json& j) { j[key] = value; }, same_tensors);
            CHECK_ERROR(pw::ConfigError, load(d), d / "adapter_config.json", "\"" + key + "\"");
        }
    }
    SUBCASE("target modules that do not match the model's LoRA slots") {
        const fs::path more = copy("qkv", [](nlohmann::json& j) { j["target_modules"] = {"query", "key", "value"}; },
                                   same_tensors);
        CHECK_ERROR(pw::ConfigError, load(more), more / "adapter_config.json",
                    "selects encoder.layer.0.attention.self.key, which has no LoRA slot");
        const fs::path fewer = copy("q", [](nlohmann::json& j) { j["target_modules"] = {"query"}; }, same_tensors);
        CHECK_ERROR(pw::ConfigError, load(fewer), fewer / "adapter_config.json",
                    "does not select encoder.layer.0.attention.self.value");
        const fs::path regex = copy("regex", [](nlohmann::json& j) { j["target_modules"] = ".*\\.(query|value)"; },
                                    same_tensors);
        // PEFT's string form (a regular expression) selecting the same modules loads.
        auto other = tiny<LoraBert<float, 4, 4>>();
        pw::hf::load_peft_lora(other, regex);
        CHECK(other.encoder.layer(0).attention.query.inner().scale() == 2.0f);
    }
    SUBCASE("a missing tensor") {
        const std::string key = "base_model.model.encoder.layer.1.attention.self.value.lora_A.weight";
        const fs::path d = copy("missing_key", same_config,
                                [&](const std::string& n, pw::Tensor<float>&) { return n == key ? "" : n; });
        CHECK_ERROR(pw::IoError, load(d), d / "adapter_model.safetensors", "missing tensor '" + key + "'");
    }
    SUBCASE("an unexpected tensor") {
        const fs::path d = copy("extra_key", same_config, [](const std::string& n, pw::Tensor<float>&) {
            return n == "base_model.model.encoder.layer.1.attention.self.value.lora_A.weight"
                       ? "base_model.model.encoder.layer.1.attention.self.key.lora_A.weight"
                       : n;
        });
        // value's lora_A is then missing; the key tensor alone: add it beside a full set.
        edited_copy(tmp / "extra_key2", same_config, same_tensors);
        const auto f = pw::read_safetensors(tmp / "extra_key2/adapter_model.safetensors");
        std::vector<pw::Tensor<float>> ts;
        for (const auto& e : f.entries()) ts.push_back(f.tensor<float>(e.name));
        pw::SafetensorsWriter w;
        for (std::size_t i = 0; i < ts.size(); ++i) w.add(f.entries()[i].name, ts[i]);
        w.add("base_model.model.encoder.layer.1.attention.self.key.lora_A.weight", ts[0]);
        w.save(tmp / "extra_key2/adapter_model.safetensors");
        CHECK_ERROR(pw::IoError, load(tmp / "extra_key2"), tmp / "extra_key2/adapter_model.safetensors",
                    "unexpected tensor 'base_model.model.encoder.layer.1.attention.self.key.lora_A.weight'");
        CHECK_ERROR(pw::IoError, load(d), d / "adapter_model.safetensors", "missing tensor");
    }
    SUBCASE("a tensor of the wrong shape") {
        const std::string key = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight";
        const fs::path d = copy("wrong_shape", same_config, [&](const std::string& n, pw::Tensor<float>& t) {
            if (n == key) t = pw::Tensor<float>(pw::Shape{4, 32});
            return n;
        });
        CHECK_ERROR(pw::IoError, load(d), d / "adapter_model.safetensors", "'" + key + "' has shape");
        CHECK_ERROR(pw::IoError, load(d), d / "adapter_model.safetensors", "wrong shape");
    }
    unchanged();
}

TEST_CASE("save_peft_lora refuses what PEFT's LoraConfig cannot describe") {
    auto plain = tiny<pw::BertModel<pw::BertEncoder<pw::bert::Plain, float>>>();
    TempDir tmp("peft");
    CHECK_ERROR(pw::ConfigError, pw::hf::save_peft_lora(plain, tmp / "x"), tmp / "x", "no LoRA slot");
    auto out = tiny<pw::BertModel<pw::BertEncoder<OutputOnly, float>>>();
    CHECK_ERROR(pw::ConfigError, pw::hf::save_peft_lora(out, tmp / "y"), tmp / "y", "attention.output.dense");
    CHECK(!fs::exists(tmp / "y"));
}

TEST_CASE("a LoRA adapter trained by patchwork on the tiny BERT, saved for PEFT") {
    // A few plain gradient steps on L = 1/2 sum over real tokens of ||h - target||^2,
    // from PEFT's adapter as the starting point and a seeded random target.
    const auto ref = pw::read_safetensors(data_dir() / "outputs.safetensors");
    const pw::TokenBatch b = batch(ref);
    auto model = tiny<LoraBert<float>>();
    pw::hf::load_peft_lora(model, data_dir() / "adapter");
    pw::Rng rng(11);
    const std::size_t N = b.batch * b.tokens, D = model.out_features();
    std::vector<float> target(N * D);
    for (auto& v : target) v = float(rng.normal());
    const auto loss_and_grad = [&](pw::Tensor<float>& g) {
        const auto& h = model.forward(b);
        g = pw::Tensor<float>(h.shape());
        double loss = 0;
        for (std::size_t i = 0; i < N * D; ++i) {
            const float d = b.mask[i / D] ? h.data()[i] - target[i] : 0.0f;
            g.data()[i] = d;
            loss += 0.5 * double(d) * d;
        }
        return loss;
    };
    pw::Tensor<float> g;
    const double first = loss_and_grad(g);
    double last = first;
    for (int step = 0; step < 20; ++step) {
        pw::zero_grad(model);
        model.backward(g);
        for (auto* p : lora_factors(model)) p->value.vector() -= 0.002f * p->grad.vector();
        last = loss_and_grad(g);
    }
    MESSAGE("LoRA training on the tiny BERT: loss ", first, " -> ", last, " in 20 steps");
    CHECK(last < 0.9 * first);
    if (const char* dir = std::getenv("PATCHWORK_PEFT_EXPORT"); dir && *dir) {
        const fs::path out(dir);
        pw::hf::save_peft_lora(model, out, named(fs::absolute(data_dir() / "base").string()));
        const auto& h = model.forward(b);
        pw::SafetensorsWriter w;
        w.add("last_hidden_state", h);
        w.save(out / "patchwork_outputs.safetensors");
        MESSAGE("wrote the adapter and patchwork's hidden states to ", out.string());
    }
}
