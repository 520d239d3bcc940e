#pragma once
// Hugging Face BERT checkpoints: config.json and model.safetensors.
//
//   auto model = pw::hf::load_bert<pw::BertModel<pw::BertEncoder<pw::bert::LoRAQueryValue<8, 16>>>>(dir);
//   pw::hf::save_bert(model, out_dir);   // config.json + model.safetensors, Hugging Face names
//
// Names follow transformers' BertModel, with or without the "bert." prefix a
// task model (BertForSequenceClassification, ...) adds:
//   embeddings.{word,position,token_type}_embeddings.weight, embeddings.LayerNorm.{weight,bias}
//   encoder.layer.{i}.attention.self.{query,key,value}.{weight,bias}
//   encoder.layer.{i}.attention.output.dense.{weight,bias}, ...attention.output.LayerNorm.{weight,bias}
//   encoder.layer.{i}.intermediate.dense.{weight,bias}
//   encoder.layer.{i}.output.dense.{weight,bias}, encoder.layer.{i}.output.LayerNorm.{weight,bias}
// Each maps to the pre-trained parameter under whatever policy wraps its slot
// (base_module). F32, F64, F16 and BF16 tensors are converted on load. Every
// expected tensor must be present with its shape (else IoError naming it and
// the file); a tensor the model does not use is an error too, unless it is
// listed in LoadOptions::ignore (by default the pooler and the position_ids
// buffer, which BertModel does not use) or allow_unused is set. Nothing
// changes in the model unless the whole file checks out. Searched layers'
// selection candidates (copies of the base) get the loaded weights as well.
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "patchwork/io/atomic_file.hpp"
#include "patchwork/io/safetensors.hpp"
#include "patchwork/transformer/bert.hpp"

namespace patchwork::hf {

struct LoadOptions {
    /// Tensors the file may hold that the model does not use (names without the
    /// "bert." prefix; an entry ending in '.' matches every name it begins).
    std::vector<std::string> ignore = {"pooler.", "embeddings.position_ids"};
    /// Accept any other unused tensor as well.
    bool allow_unused = false;
    /// Build the model with the checkpoint's dropout rates (BERT: 0.1) instead of none.
    bool dropout = false;
};

namespace detail {

[[noreturn]] inline void fail(const std::filesystem::path& file, const std::string& what) {
    throw IoError(patchwork::detail::concat(file.string(), ": ", what));
}

inline float half_to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
    std::uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                ++e;
                man <<= 1;
            } while ((man & 0x400u) == 0);
            bits = sign | std::uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | man << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    return std::bit_cast<float>(bits);
}

/// Read an F32, F64, F16 or BF16 entry into dst, converting to T (F16 here; the others in SafetensorsFile::read_into).
template <class T>
void read_converted(const SafetensorsFile& f, const SafetensorsEntry& e, T* dst, const std::filesystem::path& file) {
    if (e.dtype == "F32" || e.dtype == "F64" || e.dtype == "BF16") {
        f.read_into(e, dst);
        return;
    }
    if (e.dtype != "F16")
        fail(file, patchwork::detail::concat("tensor '", e.name, "' has dtype ", e.dtype,
                                             "; BERT weights are read from F32, F64, F16 or BF16"));
    const auto bytes = f.bytes(e);
    for (std::size_t i = 0; i < std::size_t(e.numel()); ++i) {
        const auto lo = std::uint16_t(std::to_integer<unsigned>(bytes[2 * i]));
        const auto hi = std::uint16_t(std::to_integer<unsigned>(bytes[2 * i + 1]));
        dst[i] = T(half_to_float(std::uint16_t(lo | hi << 8)));
    }
}

inline std::size_t get_size(const nlohmann::json& j, const char* key, const std::filesystem::path& file,
                            std::size_t fallback, bool required) {
    if (!j.contains(key)) {
        if (required) fail(file, patchwork::detail::concat("config has no \"", key, "\""));
        return fallback;
    }
    const auto& v = j.at(key);
    if (!v.is_number_integer() || v.get<long long>() <= 0)
        fail(file, patchwork::detail::concat("config field \"", key, "\" must be a positive integer, got ", v.dump()));
    return std::size_t(v.get<long long>());
}
inline double get_number(const nlohmann::json& j, const char* key, double fallback,
                         const std::filesystem::path& file) {
    if (!j.contains(key)) return fallback;
    const auto& v = j.at(key);
    if (!v.is_number()) fail(file, patchwork::detail::concat("config field \"", key, "\" must be a number, got ", v.dump()));
    return v.get<double>();
}

/// Write `text` to `path` through a temporary file and a rename.
inline void write_text_atomically(const std::filesystem::path& path, const std::string& text) {
    // A uniquely named temporary beside the target, synced, then renamed over it (io/atomic_file.hpp).
    patchwork::detail::AtomicFile file(path, "hf");
    errno = 0;
    const bool written = std::fwrite(text.data(), 1, text.size(), file.file) == text.size();
    file.commit(written, errno);
}

}  // namespace detail

/// Parse a Hugging Face BERT config.json. Throws IoError naming the file and the field.
[[nodiscard]] inline BertConfig read_bert_config(const std::filesystem::path& file, const LoadOptions& options = {}) {
    std::ifstream in(file, std::ios::binary);
    if (!in) detail::fail(file, "cannot open the config (missing or unreadable)");
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        detail::fail(file, std::string("config is not valid JSON: ") + e.what());
    }
    if (!j.is_object()) detail::fail(file, "config is not a JSON object");
    if (j.contains("model_type") && j["model_type"] != "bert")
        detail::fail(file, "model_type is " + j["model_type"].dump() + ", not \"bert\"");
    if (j.contains("hidden_act") && j["hidden_act"] != "gelu")
        detail::fail(file, "hidden_act is " + j["hidden_act"].dump() +
                               "; patchwork's BERT uses the exact (erf) GELU, \"gelu\"");
    if (j.contains("position_embedding_type") && j["position_embedding_type"] != "absolute")
        detail::fail(file, "position_embedding_type is " + j["position_embedding_type"].dump() +
                               "; only \"absolute\" positions are supported");
    BertConfig c;
    c.vocab_size = detail::get_size(j, "vocab_size", file, 0, true);
    c.hidden_size = detail::get_size(j, "hidden_size", file, 0, true);
    c.num_hidden_layers = detail::get_size(j, "num_hidden_layers", file, 0, true);
    c.num_attention_heads = detail::get_size(j, "num_attention_heads", file, 0, true);
    c.intermediate_size = detail::get_size(j, "intermediate_size", file, 0, true);
    c.max_position_embeddings = detail::get_size(j, "max_position_embeddings", file, 512, false);
    c.type_vocab_size = detail::get_size(j, "type_vocab_size", file, 2, false);
    c.layer_norm_eps = detail::get_number(j, "layer_norm_eps", 1e-12, file);
    if (options.dropout) {
        c.hidden_dropout_prob = detail::get_number(j, "hidden_dropout_prob", 0.1, file);
        c.attention_probs_dropout_prob = detail::get_number(j, "attention_probs_dropout_prob", 0.1, file);
    }
    if (j.contains("pad_token_id") && j["pad_token_id"].is_number_integer()) c.pad_token_id = j["pad_token_id"].get<int>();
    try {
        c.check();
    } catch (const ConfigError& e) {
        detail::fail(file, e.what());
    }
    return c;
}

/// The pre-trained parameters of `model` under their Hugging Face names (no "bert." prefix).
template <class Model>
[[nodiscard]] auto bert_parameters(Model& model) {
    using T = typename Model::Scalar;
    std::vector<std::pair<std::string, Parameter<T>*>> out;
    auto& e = model.embeddings;
    out.emplace_back("embeddings.word_embeddings.weight", &e.word.weight);
    out.emplace_back("embeddings.position_embeddings.weight", &e.position.weight);
    out.emplace_back("embeddings.token_type_embeddings.weight", &e.token_type.weight);
    out.emplace_back("embeddings.LayerNorm.weight", &e.norm.scale);
    out.emplace_back("embeddings.LayerNorm.bias", &e.norm.shift);
    auto& enc = base_module(model.encoder);
    for (std::size_t i = 0; i < enc.size(); ++i) {
        auto& layer = base_module(enc.layer(i));
        const std::string p = "encoder.layer." + std::to_string(i) + ".";
        const auto linear = [&](const std::string& name, auto& slot) {
            auto& l = base_module(slot);
            out.emplace_back(p + name + ".weight", &l.weight);
            out.emplace_back(p + name + ".bias", &l.bias);
        };
        const auto norm = [&](const std::string& name, auto& slot) {
            auto& n = base_module(slot);
            out.emplace_back(p + name + ".weight", &n.scale);
            out.emplace_back(p + name + ".bias", &n.shift);
        };
        linear("attention.self.query", layer.attention.query);
        linear("attention.self.key", layer.attention.key);
        linear("attention.self.value", layer.attention.value);
        linear("attention.output.dense", layer.attention_output);
        norm("attention.output.LayerNorm", layer.attention_norm);
        linear("intermediate.dense", layer.intermediate);
        linear("output.dense", layer.output);
        norm("output.LayerNorm", layer.output_norm);
    }
    return out;
}

/// Load the weights of a Hugging Face BertModel checkpoint into `model`.
template <class Model>
void load_bert_weights(Model& model, const std::filesystem::path& file, const LoadOptions& options = {}) {
    using T = typename Model::Scalar;
    const SafetensorsFile f = read_safetensors(file);
    const std::string prefix = f.contains("bert.embeddings.word_embeddings.weight") ? "bert." : "";
    const auto params = bert_parameters(model);
    std::vector<const SafetensorsEntry*> found;
    found.reserve(params.size());
    for (const auto& [name, p] : params) {
        const SafetensorsEntry* e = f.find(prefix + name);
        if (!e) detail::fail(file, "missing tensor '" + prefix + name + "' (expected shape " +
                                       patchwork::detail::concat(p->value.shape()) + ")");
        if (!(f.shape(*e) == p->value.shape()))
            detail::fail(file, patchwork::detail::concat("tensor '", e->name, "' has shape ", f.shape(*e),
                                                         " but the model expects ", p->value.shape()));
        if (e->dtype != "F32" && e->dtype != "F64" && e->dtype != "F16" && e->dtype != "BF16")
            detail::fail(file, patchwork::detail::concat("tensor '", e->name, "' has dtype ", e->dtype,
                                                         "; BERT weights are read from F32, F64, F16 or BF16"));
        found.push_back(e);
    }
    if (!options.allow_unused) {
        for (const SafetensorsEntry& e : f.entries()) {
            bool used = false;
            for (const SafetensorsEntry* u : found) used = used || u == &e;
            if (used) continue;
            std::string name = e.name;
            if (!prefix.empty() && name.rfind(prefix, 0) == 0) name = name.substr(prefix.size());
            bool ignored = false;
            for (const std::string& ig : options.ignore)
                ignored = ignored || (!ig.empty() && ig.back() == '.' ? name.rfind(ig, 0) == 0 : name == ig);
            if (!ignored)
                detail::fail(file, "unused tensor '" + e.name +
                                       "' (the BERT model has no such parameter; LoadOptions::ignore or allow_unused "
                                       "accepts it)");
        }
    }
    for (std::size_t i = 0; i < params.size(); ++i) detail::read_converted<T>(f, *found[i], params[i].second->value.data(), file);
    // Searched modules keep trainable copies of their base for selection
    // candidates (FineTune, ...): give them the loaded weights too.
    for_each_module(model, [](auto& m) {
        if constexpr (requires { m.sync_copies(); }) m.sync_copies();
    });
}

/// Where scripts/fetch-model caches a Hugging Face model folder:
/// $PATCHWORK_MODEL_DIR/<name> when that variable is set, else
/// $HOME/.cache/patchwork/models/<name>.
[[nodiscard]] inline std::filesystem::path model_cache_dir(const std::string& name = "all-MiniLM-L6-v2") {
    if (const char* d = std::getenv("PATCHWORK_MODEL_DIR"); d && *d) return std::filesystem::path(d) / name;
    const char* home = std::getenv("HOME");
    return std::filesystem::path(home && *home ? home : "/root") / ".cache/patchwork/models" / name;
}

/// Build a Model (a BertModel<...>) from a Hugging Face model folder: config.json and model.safetensors.
template <class Model>
[[nodiscard]] Model load_bert(const std::filesystem::path& dir, const LoadOptions& options = {}) {
    Model model(read_bert_config(dir / "config.json", options));
    load_bert_weights(model, dir / "model.safetensors", options);
    return model;
}

/// Write `model` as a Hugging Face BertModel folder (config.json and
/// model.safetensors, names without a prefix) that transformers'
/// BertModel.from_pretrained reads. The pre-trained tensors are written as they
/// are: merge LoRA updates first (merge()) to keep them, and save injected
/// parameters separately (save_parameters).
template <class Model>
void save_bert(Model& model, const std::filesystem::path& dir) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) detail::fail(dir, "cannot create the folder: " + ec.message());
    const BertConfig& c = model.config();
    nlohmann::json j = {{"architectures", {"BertModel"}},
                        {"model_type", "bert"},
                        {"vocab_size", c.vocab_size},
                        {"hidden_size", c.hidden_size},
                        {"num_hidden_layers", c.num_hidden_layers},
                        {"num_attention_heads", c.num_attention_heads},
                        {"intermediate_size", c.intermediate_size},
                        {"max_position_embeddings", c.max_position_embeddings},
                        {"type_vocab_size", c.type_vocab_size},
                        {"layer_norm_eps", c.layer_norm_eps},
                        {"hidden_act", "gelu"},
                        {"hidden_dropout_prob", 0.1},
                        {"attention_probs_dropout_prob", 0.1},
                        {"initializer_range", 0.02},
                        {"pad_token_id", c.pad_token_id},
                        {"position_embedding_type", "absolute"}};
    SafetensorsWriter w;
    for (const auto& [name, p] : bert_parameters(model)) w.add(name, p->value);
    w.add_metadata("format", "pt");
    w.save(dir / "model.safetensors");
    detail::write_text_atomically(dir / "config.json", j.dump(2) + "\n");
}

}  // namespace patchwork::hf
