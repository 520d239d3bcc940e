#pragma once
// LoRA adapters of a BERT model in PEFT's file layout (peft 0.21.2):
//
//   pw::hf::save_peft_lora(model, dir, {.base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"});
//   pw::hf::load_peft_lora(model, dir);   // an adapter PEFT's save_pretrained wrote
//
// A folder holds adapter_config.json and adapter_model.safetensors. For each
// projection slot of the model that holds a LoRA module (policies/lora.hpp),
// the file has two tensors under the transformers module path:
//   base_model.model.encoder.layer.{i}.attention.self.query.lora_A.weight   A, [r, in]
//   base_model.model.encoder.layer.{i}.attention.self.query.lora_B.weight   B, [out, r]
// (likewise key, value, attention.output.dense, intermediate.dense,
// output.dense). PEFT's LoRA layer computes y = x W^T + b + s (x A^T) B^T with
// s = lora_alpha / r, the same form and the same A, B layout as LoRAModule,
// so the factors are copied as they are and the module's scale is set to
// lora_alpha / r. A task model (BertForSequenceClassification, ...) adds
// "bert." after "base_model.model."; the loader accepts both.
//
// The loader checks everything before it changes the model: peft_type "LORA";
// r and lora_alpha against every LoRA slot's rank (a LoRA<r> rank is part of
// the model's type, so a different r is an error, not a resize); the modules
// target_modules selects against the model's LoRA slots (each way round);
// every expected tensor present with its shape and no other tensor; options
// patchwork does not implement (use_rslora, use_dora, bias other than "none",
// modules_to_save, rank_pattern, alpha_pattern, layers_to_transform,
// fan_in_fan_out, ...) rejected; modules_to_save (a task head trained in
// full) is refused too, unless PeftLoadOptions::skip_modules_to_save leaves
// its tensors to the caller. File and JSON problems are IoError, settings
// that do not fit the model ConfigError; both name the file and the key.
//
// The writer produces the same config fields, with the same defaults, as
// peft 0.21.2's LoraConfig.save_pretrained, and the tensors of the model's
// scalar type (F32 for a float model, as PEFT writes them). Both files are
// written through a temporary file and a rename (io/atomic_file.hpp).
#include <array>
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "patchwork/io/atomic_file.hpp"
#include "patchwork/io/safetensors.hpp"
#include "patchwork/policies/lora.hpp"
#include "patchwork/transformer/bert.hpp"
#include "patchwork/transformer/hf_checkpoint.hpp"

namespace patchwork::hf {

struct PeftSaveOptions {
    /// "base_model_name_or_path": where PeftModel.from_pretrained finds the base model (a hub name or a folder).
    std::string base_model_name_or_path;
    /// "task_type" ("FEATURE_EXTRACTION", "SEQ_CLS", ...); empty writes null, as PEFT does for a bare BertModel.
    std::string task_type;
    /// "lora_dropout": the rate the adapter is meant to train with (patchwork's LoRA has none of its own).
    double lora_dropout = 0.0;
    /// "inference_mode": PEFT's save_pretrained writes true.
    bool inference_mode = true;
    /// Tensor names begin "base_model.model." and, for a task model's adapter, "bert." after it.
    bool bert_prefix = false;
};

struct PeftLoadOptions {
    /// Accept "modules_to_save" (a task head PEFT trains in full, e.g. "classifier") and leave its
    /// tensors ("base_model.model.<module>.weight", ...) unread: the caller reads them from the
    /// file itself. Otherwise such an adapter is refused.
    bool skip_modules_to_save = false;
};

namespace peft_detail {

template <class M>
inline constexpr bool is_lora = false;
template <class Inner, std::size_t R, std::size_t A>
inline constexpr bool is_lora<LoRAModule<Inner, R, A>> = true;

/// f(lora module) for the LoRA module inside a slot (through Tune and other wrappers), if there is one.
template <class M, class F>
void with_lora(M& m, F&& f) {
    if constexpr (is_lora<M>) f(m);
    else if constexpr (requires { m.inner(); }) with_lora(m.inner(), f);
}

/// One LoRA slot of the model: its transformers module path and its factors.
template <class T>
struct Slot {
    std::string path;  ///< "encoder.layer.0.attention.self.query"
    std::string name;  ///< the slot's name in target_modules: "query", "intermediate.dense", ...
    std::size_t rank = 0;
    std::size_t alpha = 0;
    double scale = 0;
    bool merged = false;
    Parameter<T>* a = nullptr;
    Parameter<T>* b = nullptr;
    std::function<void(T)> set_scale;
};

/// The projection slots of every layer as (transformers suffix, target_modules name, visitor).
template <class Layer, class F>
void for_each_projection(Layer& layer, F&& f) {
    f("attention.self.query", "query", layer.attention.query);
    f("attention.self.key", "key", layer.attention.key);
    f("attention.self.value", "value", layer.attention.value);
    f("attention.output.dense", "attention.output.dense", layer.attention_output);
    f("intermediate.dense", "intermediate.dense", layer.intermediate);
    f("output.dense", "output.dense", layer.output);
}

/// Every projection of the model (LoRA or not) by transformers path, and its LoRA slot if it has one.
template <class Model>
void scan(Model& model, std::vector<std::string>& projections, std::vector<Slot<typename Model::Scalar>>& slots) {
    using T = typename Model::Scalar;
    auto& enc = base_module(model.encoder);
    for (std::size_t i = 0; i < enc.size(); ++i) {
        auto& layer = base_module(enc.layer(i));
        const std::string p = "encoder.layer." + std::to_string(i) + ".";
        for_each_projection(layer, [&](const char* suffix, const char* name, auto& slot) {
            projections.push_back(p + suffix);
            with_lora(slot, [&](auto& lora) {
                using L = std::remove_reference_t<decltype(lora)>;
                static_assert(std::is_same_v<typename L::Scalar, T>);
                Slot<T> s;
                s.path = p + suffix;
                s.name = name;
                s.rank = L::rank;
                s.alpha = L::alpha;
                s.scale = double(lora.scale());
                s.merged = lora.merged();
                s.a = &lora.a;
                s.b = &lora.b;
                s.set_scale = [&lora](T v) { lora.set_scale(v); };
                slots.push_back(std::move(s));
            });
        });
    }
}

[[noreturn]] inline void io_fail(const std::filesystem::path& file, const std::string& what) {
    throw IoError(patchwork::detail::concat(file.string(), ": ", what));
}
[[noreturn]] inline void config_fail(const std::filesystem::path& file, const std::string& what) {
    throw ConfigError(patchwork::detail::concat(file.string(), ": ", what));
}

/// PEFT's module selection for a list of names: the module's full name equals
/// an entry or ends with "." + the entry; for a string: the whole name matches
/// it as a regular expression (Python's re.fullmatch; std::regex ECMAScript here).
inline bool targeted(const nlohmann::json& targets, const std::string& module_name, const std::filesystem::path& file) {
    if (targets.is_string()) {
        try {
            return std::regex_match(module_name, std::regex(targets.get<std::string>()));
        } catch (const std::regex_error& e) {
            config_fail(file, "\"target_modules\" " + targets.dump() + " is not a regular expression patchwork can read: " +
                                  e.what());
        }
    }
    for (const auto& t : targets) {
        const std::string s = t.get<std::string>();
        if (module_name == s || (module_name.size() > s.size() && module_name.compare(module_name.size() - s.size(), s.size(), s) == 0 &&
                            module_name[module_name.size() - s.size() - 1] == '.'))
            return true;
    }
    return false;
}

inline std::string slot_list(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
    return s.empty() ? "none" : s;
}

}  // namespace peft_detail

/// Write the LoRA factors of `model` (a BertModel with LoRA slots) as a PEFT
/// adapter folder: adapter_config.json and adapter_model.safetensors.
/// ConfigError when the model has no LoRA slot, or when PEFT's LoraConfig
/// cannot describe its slots (ranks or scales that differ between slots, a
/// slot on some layers only, LoRA on output.dense without attention.output.dense).
template <class Model>
void save_peft_lora(Model& model, const std::filesystem::path& dir, const PeftSaveOptions& options = {}) {
    using T = typename Model::Scalar;
    std::vector<std::string> projections;
    std::vector<peft_detail::Slot<T>> slots;
    peft_detail::scan(model, projections, slots);
    const auto fail = [&](const std::string& what) { peft_detail::config_fail(dir, "cannot save as a PEFT LoRA adapter: " + what); };
    if (slots.empty()) fail("the model has no LoRA slot");
    const auto& first = slots.front();
    for (const auto& s : slots) {
        if (s.rank != first.rank)
            fail(patchwork::detail::concat("LoRA ranks differ (", first.path, " has r = ", first.rank, ", ", s.path,
                                           " has r = ", s.rank, "); one r per adapter"));
        if (s.scale != first.scale)
            fail(patchwork::detail::concat("LoRA scales differ (", first.path, ": ", first.scale, ", ", s.path, ": ",
                                           s.scale, "); one lora_alpha per adapter"));
    }
    // target_modules: the slot names; they must select exactly the LoRA slots, in every layer.
    std::set<std::string> names;
    for (const auto& s : slots) names.insert(s.name);
    const nlohmann::json targets(std::vector<std::string>(names.begin(), names.end()));
    std::set<std::string> lora_paths;
    for (const auto& s : slots) lora_paths.insert(s.path);
    for (const auto& p : projections)
        if (peft_detail::targeted(targets, p, dir) != (lora_paths.count(p) != 0))
            fail("target_modules " + targets.dump() + " would " + (lora_paths.count(p) ? "miss " : "also select ") + p +
                 (lora_paths.count(p) ? ", a LoRA slot" : ", which has no LoRA slot") +
                 " (LoRA must sit on the same projections in every layer, and output.dense only with "
                 "attention.output.dense)");
    // lora_alpha: r * scale (alpha / r unless set_scale changed it); an integer when it is one.
    const double alpha = first.scale * double(first.rank);
    nlohmann::json lora_alpha = alpha;
    if (alpha == std::round(alpha) && std::abs(alpha) < 1e15) lora_alpha = static_cast<long long>(std::llround(alpha));

    const nlohmann::json null;
    nlohmann::json config = {
        {"alora_invocation_tokens", null},
        {"alpha_pattern", nlohmann::json::object()},
        {"arrow_config", null},
        {"base_model_name_or_path", options.base_model_name_or_path.empty() ? null
                                                                             : nlohmann::json(options.base_model_name_or_path)},
        {"bias", "none"},
        {"corda_config", null},
        {"ensure_weight_tying", false},
        {"eva_config", null},
        {"exclude_modules", null},
        {"fan_in_fan_out", false},
        {"inference_mode", options.inference_mode},
        {"init_lora_weights", true},
        {"kasa_config", null},
        {"layer_replication", null},
        {"layers_pattern", null},
        {"layers_to_transform", null},
        {"loftq_config", nlohmann::json::object()},
        {"lora_alpha", lora_alpha},
        {"lora_bias", false},
        {"lora_dropout", options.lora_dropout},
        {"lora_ga_config", null},
        {"megatron_config", null},
        {"megatron_core", "megatron.core"},
        {"modules_to_save", null},
        {"monteclora_config", null},
        {"peft_type", "LORA"},
        {"peft_version", "0.21.2"},
        {"qalora_group_size", 16},
        {"r", first.rank},
        {"rank_pattern", nlohmann::json::object()},
        {"revision", null},
        {"target_modules", targets},
        {"target_parameters", null},
        {"task_type", options.task_type.empty() ? null : nlohmann::json(options.task_type)},
        {"trainable_token_indices", null},
        {"use_bdlora", null},
        {"use_dora", false},
        {"use_qalora", false},
        {"use_rslora", false},
        {"velora_config", null}};
    // PEFT records the base model's class for a model outside its task mapping (a bare BertModel).
    if (options.task_type.empty())
        config["auto_mapping"] = {{"base_model_class", options.bert_prefix ? "BertForSequenceClassification" : "BertModel"},
                                  {"parent_library", "transformers.models.bert.modeling_bert"}};

    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) peft_detail::io_fail(dir, "cannot create the folder: " + ec.message());
    const std::string prefix = options.bert_prefix ? "base_model.model.bert." : "base_model.model.";
    SafetensorsWriter w;
    for (const auto& s : slots) {
        w.add(prefix + s.path + ".lora_A.weight", s.a->value);
        w.add(prefix + s.path + ".lora_B.weight", s.b->value);
    }
    w.add_metadata("format", "pt");
    w.save(dir / "adapter_model.safetensors");

    const std::string text = config.dump(2);  // sorted keys and two-space indent, as PEFT writes (no final newline)
    patchwork::detail::AtomicFile out(dir / "adapter_config.json", "adapter_config.json");
    const bool ok = std::fwrite(text.data(), 1, text.size(), out.file) == text.size();
    out.commit(ok, ok ? 0 : errno);
}

/// Load a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors)
/// into the LoRA slots of `model`: A and B copied, scale = lora_alpha / r.
/// The model is unchanged when anything fails.
template <class Model>
void load_peft_lora(Model& model, const std::filesystem::path& dir, const PeftLoadOptions& options = {}) {
    using T = typename Model::Scalar;
    using peft_detail::config_fail;
    using peft_detail::io_fail;
    const std::filesystem::path cfg_file = dir / "adapter_config.json";
    const std::filesystem::path st_file = dir / "adapter_model.safetensors";

    std::ifstream in(cfg_file, std::ios::binary);
    if (!in) io_fail(cfg_file, "cannot open the adapter config (missing or unreadable)");
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        io_fail(cfg_file, std::string("the adapter config is not valid JSON: ") + e.what());
    }
    if (!j.is_object()) io_fail(cfg_file, "the adapter config is not a JSON object");
    const auto has = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
    if (!j.contains("peft_type")) io_fail(cfg_file, "no \"peft_type\" (not a PEFT adapter config)");
    if (j["peft_type"] != "LORA")
        config_fail(cfg_file, "\"peft_type\" is " + j["peft_type"].dump() + "; patchwork loads LoRA adapters (\"LORA\") only");
    for (const char* key : {"r", "lora_alpha"})
        if (!j.contains(key) || !j[key].is_number() || !(j[key].get<double>() > 0))
            io_fail(cfg_file, patchwork::detail::concat("\"", key, "\" must be a positive number, got ",
                                                        j.contains(key) ? j[key].dump() : std::string("nothing")));
    if (!j["r"].is_number_integer()) io_fail(cfg_file, "\"r\" must be an integer, got " + j["r"].dump());
    const auto r = std::size_t(j["r"].get<long long>());
    const double lora_alpha = j["lora_alpha"].get<double>();
    // Options that change what the adapter computes and that patchwork's LoRA does not implement.
    const auto reject_true = [&](const char* key, const char* what) {
        if (has(key) && j[key] != false)
            config_fail(cfg_file, patchwork::detail::concat("\"", key, "\" is ", j[key].dump(), ": ", what,
                                                            " is not supported (patchwork's LoRA is y = x W^T + b + "
                                                            "(lora_alpha / r) (x A^T) B^T)"));
    };
    reject_true("use_rslora", "rank-stabilised scaling (lora_alpha / sqrt(r))");
    reject_true("use_dora", "DoRA (weight-decomposed LoRA)");
    reject_true("fan_in_fan_out", "a transposed (Conv1D) weight layout");
    reject_true("lora_bias", "a bias on lora_B");
    reject_true("use_qalora", "QALoRA");
    if (has("bias") && j["bias"] != "none")
        config_fail(cfg_file, "\"bias\" is " + j["bias"].dump() +
                                  ": trained biases in the adapter are not supported; only \"none\" is");
    std::vector<std::string> skipped;  // tensor name prefixes of modules_to_save, when accepted
    if (options.skip_modules_to_save && has("modules_to_save")) {
        if (!j["modules_to_save"].is_array() ||
            !std::all_of(j["modules_to_save"].begin(), j["modules_to_save"].end(), [](const auto& m) { return m.is_string(); }))
            io_fail(cfg_file, "\"modules_to_save\" must be a list of names, got " + j["modules_to_save"].dump());
        for (const auto& m : j["modules_to_save"]) skipped.push_back("base_model.model." + m.get<std::string>() + ".");
    }
    for (const char* key : {"rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "layers_pattern",
                            "layer_replication", "target_parameters", "trainable_token_indices", "alora_invocation_tokens",
                            "exclude_modules"})
        if (has(key) && !j[key].empty() && !(options.skip_modules_to_save && std::string(key) == "modules_to_save"))
            config_fail(cfg_file, patchwork::detail::concat("\"", key, "\" is ", j[key].dump(), ": not supported (",
                                                            "the adapter must put one r and lora_alpha on the same "
                                                            "projections of every layer, and nothing else)"));
    if (!has("target_modules")) io_fail(cfg_file, "no \"target_modules\"");
    const nlohmann::json& targets = j["target_modules"];
    if (!targets.is_string() && !(targets.is_array() && std::all_of(targets.begin(), targets.end(),
                                                                    [](const auto& t) { return t.is_string(); })))
        io_fail(cfg_file, "\"target_modules\" must be a list of names or a string, got " + targets.dump());

    std::vector<std::string> projections;
    std::vector<peft_detail::Slot<T>> slots;
    peft_detail::scan(model, projections, slots);
    std::set<std::string> lora_paths;
    for (const auto& s : slots) lora_paths.insert(s.path);
    for (const auto& p : projections) {
        const bool t = peft_detail::targeted(targets, p, cfg_file), l = lora_paths.count(p) != 0;
        if (t && !l)
            config_fail(cfg_file, "\"target_modules\" " + targets.dump() + " selects " + p +
                                      ", which has no LoRA slot in the model (the model's LoRA slots: " +
                                      peft_detail::slot_list(std::vector<std::string>(lora_paths.begin(), lora_paths.end())) +
                                      ")");
        if (l && !t)
            config_fail(cfg_file, "\"target_modules\" " + targets.dump() + " does not select " + p +
                                      ", a LoRA slot of the model");
    }
    for (const auto& s : slots) {
        if (s.rank != r)
            config_fail(cfg_file, patchwork::detail::concat("\"r\" is ", r, " but the model's LoRA slot ", s.path,
                                                            " has rank ", s.rank, " (rank mismatch)"));
        if (s.merged)
            throw Error(patchwork::detail::concat(st_file.string(), ": ", s.path,
                                                  ": the LoRA update is merged into the weight; unmerge() before loading an adapter"));
    }

    if (!std::filesystem::exists(st_file)) io_fail(st_file, "missing: the adapter folder has no adapter_model.safetensors");
    const SafetensorsFile f = read_safetensors(st_file);
    std::string prefix = "base_model.model.";
    for (const auto& e : f.entries())
        if (e.name.rfind("base_model.model.bert.", 0) == 0) prefix = "base_model.model.bert.";
    std::vector<std::pair<const SafetensorsEntry*, Parameter<T>*>> found;
    for (const auto& s : slots) {
        const std::array<std::pair<const char*, Parameter<T>*>, 2> factors{{{".lora_A.weight", s.a},
                                                                            {".lora_B.weight", s.b}}};
        for (const auto& [suffix, p] : factors) {
            const std::string key = prefix + s.path + suffix;
            const SafetensorsEntry* e = f.find(key);
            if (!e)
                io_fail(st_file, patchwork::detail::concat("missing tensor '", key, "' (expected shape ", p->value.shape(),
                                                           ")"));
            if (!(f.shape(*e) == p->value.shape()))
                io_fail(st_file, patchwork::detail::concat("tensor '", key, "' has shape ", f.shape(*e), " but ", s.path,
                                                           " expects ", p->value.shape(), " (wrong shape)"));
            if (e->dtype != "F32" && e->dtype != "F64" && e->dtype != "F16" && e->dtype != "BF16")
                io_fail(st_file, patchwork::detail::concat("tensor '", key, "' has dtype ", e->dtype,
                                                           "; LoRA factors are read from F32, F64, F16 or BF16"));
            found.emplace_back(e, p);
        }
    }
    for (const auto& e : f.entries()) {
        bool used = false;
        for (const auto& u : found) used = used || u.first == &e;
        for (const auto& sk : skipped) used = used || e.name.rfind(sk, 0) == 0;
        if (!used)
            io_fail(st_file, "unexpected tensor '" + e.name +
                                 "' (no LoRA slot of the model takes it; patchwork expects only lora_A and lora_B of "
                                 "the target modules)");
    }
    // Everything checks out: convert into buffers first, then change the model.
    std::vector<Tensor<T>> values;
    values.reserve(found.size());
    for (const auto& [e, p] : found) {
        values.emplace_back(p->value.shape());
        hf::detail::read_converted<T>(f, *e, values.back().data(), st_file);
    }
    for (std::size_t i = 0; i < found.size(); ++i)
        std::copy(values[i].data(), values[i].data() + values[i].size(), found[i].second->value.data());
    for (auto& s : slots) s.set_scale(T(lora_alpha / double(r)));
}

}  // namespace patchwork::hf
