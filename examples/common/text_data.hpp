#pragma once
// What the examples on the pre-trained transformer share (text_transfer,
// text_multitask, text_search, text_overparam, distributed): command-line
// number parsing, tokenized WordNet splits, a seeded subset of a split, padded
// token batches, and the encoder + pooling + head model.
#include <sys/resource.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <patchwork/patchwork.hpp>

namespace text_examples {

namespace pw = patchwork;

/// An integer flag value >= min; anything else is a ConfigError naming the program and flag.
inline std::uint64_t parse_uint(std::string_view program, std::string_view flag, std::string_view s,
                                std::uint64_t min) {
    std::uint64_t v = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc{} || end != s.data() + s.size() || v < min)
        throw pw::ConfigError(pw::detail::concat(program, ": ", flag, " needs an integer >= ", min, ", got '", s, "'"));
    return v;
}

/// A positive, finite number (a learning rate).
inline double parse_positive(std::string_view program, std::string_view flag, const std::string& s) {
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    if (end != s.c_str() + s.size() || !(v > 0) || !std::isfinite(v))
        throw pw::ConfigError(pw::detail::concat(program, ": ", flag, " needs a positive number, got '", s, "'"));
    return v;
}

/// "a,b,,c" -> {a, b, c}.
inline std::vector<std::string> split_list(const std::string& s) {
    std::vector<std::string> out;
    std::size_t start = 0;
    while (start <= s.size()) {
        const std::size_t end = std::min(s.find(',', start), s.size());
        if (end > start) out.push_back(s.substr(start, end - start));
        start = end + 1;
    }
    return out;
}

/// An adaptation method of an example: its flag name, table label and the
/// default learning rate of its own parameters.
struct Method {
    const char* name;
    const char* label;
    double lr;
};

/// The method called `name`, or a ConfigError listing the program's methods.
inline const Method& find_method(std::string_view program, std::span<const Method> methods, std::string_view name) {
    for (const auto& m : methods)
        if (name == m.name) return m;
    std::string known;
    for (const auto& m : methods) known += (known.empty() ? "" : ", ") + std::string(m.name);
    throw pw::ConfigError(pw::detail::concat(program, ": unknown method '", name, "' (", known, ")"));
}

/// The flags every text example takes (the program sets its own defaults).
struct RunOptions {
    std::filesystem::path model = pw::hf::model_cache_dir();
    std::filesystem::path wordnet = pw::wordnet_default_dir;
    std::vector<std::string> methods;
    std::size_t seeds = 1;
    std::uint64_t seed = 1;
    std::uint64_t data_seed = 0;
    std::size_t train = 0;  ///< training synsets (per task where there are several)
    std::size_t test = 0;
    std::size_t epochs = 2;
    std::size_t batch = 16;
    std::size_t max_length = 64;
    double head_lr = 2e-3;
    std::map<std::string, double> lr;  ///< per method, over the method's default
    std::string csv;
    bool quiet = false;
};

/// Parses argv into `o`: --model, --wordnet, --methods a,b, --seeds, --seed,
/// --data-seed, --train, --test, --epochs, --batch, --max-length, --head-lr,
/// --lr-METHOD, --csv, --quiet, then `extra(flag, value)` for the program's
/// own flags (it returns false for a flag it does not know; `value()` takes
/// the flag's argument). `method(name)` returns the canonical name of a
/// method or throws. Errors are ConfigErrors naming the program and the flag.
template <class Method, class Extra>
void parse_args(std::string_view program, int argc, char** argv, RunOptions& o, Method method, Extra extra) {
    for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        const auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw pw::ConfigError(pw::detail::concat(program, ": ", a, " needs a value"));
            return argv[++i];
        };
        const auto count = [&](std::uint64_t min) { return parse_uint(program, a, value(), min); };
        if (a == "--model") o.model = value();
        else if (a == "--wordnet") o.wordnet = value();
        else if (a == "--methods") {
            o.methods = split_list(value());
            for (const auto& m : o.methods) (void)method(m);
        } else if (a == "--seeds") o.seeds = count(1);
        else if (a == "--seed") o.seed = count(0);
        else if (a == "--data-seed") o.data_seed = count(0);
        else if (a == "--train") o.train = count(1);
        else if (a == "--test") o.test = count(1);
        else if (a == "--epochs") o.epochs = count(1);
        else if (a == "--batch") o.batch = count(1);
        else if (a == "--max-length") o.max_length = count(3);
        else if (a == "--head-lr") o.head_lr = parse_positive(program, a, value());
        else if (a.starts_with("--lr-")) o.lr[std::string(method(a.substr(5)))] = parse_positive(program, a, value());
        else if (a == "--csv") o.csv = value();
        else if (a == "--quiet") o.quiet = true;
        else if (!extra(a, value))
            throw pw::ConfigError(pw::detail::concat(program, ": unknown option '", a, "' (see the comment at the top of "
                                                     "examples/", program, "/", program, ".cpp)"));
    }
}

/// True (after saying what is missing and how to get it) when the model or
/// WordNet is not there; the examples then exit 77, which tests count as skipped.
inline bool inputs_missing(const RunOptions& o) {
    if (!std::filesystem::exists(o.model / "model.safetensors")) {
        std::printf("no model at %s: run scripts/fetch-model first\n", o.model.string().c_str());
        return true;
    }
    if (!std::filesystem::exists(o.wordnet / "data.noun")) {
        std::printf("no WordNet at %s (Debian package wordnet-base)\n", o.wordnet.string().c_str());
        return true;
    }
    return false;
}

/// Prints an error on stderr, prefixed with the program's name unless it already starts with it.
inline void report_error(std::string_view program, const std::exception& e) {
    const std::string_view what = e.what();
    if (what.starts_with(program)) std::fprintf(stderr, "%s\n", e.what());
    else std::fprintf(stderr, "%.*s: %s\n", int(program.size()), program.data(), e.what());
}

/// Tokenized examples of one split.
struct Split {
    std::vector<pw::Encoding> enc;
    std::vector<int> labels;
    [[nodiscard]] std::size_t size() const noexcept { return enc.size(); }
};

/// A random subset of `n` examples of `part` (all of them when n is larger), in a seeded order.
inline std::vector<const pw::TextExample*> subset(const std::vector<pw::TextExample>& part, std::size_t n,
                                                  pw::Rng& rng) {
    std::vector<std::size_t> order(part.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    pw::detail::shuffle_indices(order, rng);
    order.resize(std::min(n, order.size()));
    std::vector<const pw::TextExample*> out;
    for (std::size_t i : order) out.push_back(&part[i]);
    return out;
}

/// Appends a seeded subset of `n` examples of `part`, tokenized (no padding, at most max_length tokens).
inline void add_subset(Split& out, const std::vector<pw::TextExample>& part, std::size_t n, pw::Rng& rng,
                       const pw::WordPieceTokenizer& tok, std::size_t max_length) {
    for (const pw::TextExample* e : subset(part, n, rng)) {
        out.enc.push_back(tok.encode(e->text, {.max_length = max_length, .padding = pw::Padding::none}));
        out.labels.push_back(e->label);
    }
}

/// One row of a batch: example `index` of `split`.
struct RowRef {
    const Split* split = nullptr;
    std::size_t index = 0;
};

/// The rows as one batch padded to its longest sequence; labels[i] is row i's label.
inline pw::TokenBatch make_batch(std::span<const RowRef> rows, std::int32_t pad, std::vector<int>& labels) {
    pw::TokenBatch b;
    b.batch = rows.size();
    for (const RowRef& r : rows) b.tokens = std::max(b.tokens, r.split->enc[r.index].size());
    b.ids.assign(b.batch * b.tokens, pad);
    b.token_types.assign(b.batch * b.tokens, 0);
    b.mask.assign(b.batch * b.tokens, 0);
    labels.clear();
    for (std::size_t k = 0; k < rows.size(); ++k) {
        const pw::Encoding& e = rows[k].split->enc[rows[k].index];
        const auto at = std::ptrdiff_t(k * b.tokens);
        std::copy(e.ids.begin(), e.ids.end(), b.ids.begin() + at);
        std::copy(e.token_type_ids.begin(), e.token_type_ids.end(), b.token_types.begin() + at);
        std::fill_n(b.mask.begin() + at, e.size(), 1);
        labels.push_back(rows[k].split->labels[rows[k].index]);
    }
    return b;
}

/// Examples idx[begin, end) of one split as a padded batch.
inline pw::TokenBatch make_batch(const Split& s, const std::vector<std::size_t>& idx, std::size_t begin,
                                 std::size_t end, std::int32_t pad, std::vector<int>& labels) {
    std::vector<RowRef> rows;
    for (std::size_t k = begin; k < end; ++k) rows.push_back({&s, idx[k]});
    return make_batch(rows, pad, labels);
}

/// 0, 1, ..., n-1.
inline std::vector<std::size_t> iota(std::size_t n) {
    std::vector<std::size_t> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = i;
    return v;
}

/// Noun supersense (the single-task examples): the seeded split of
/// wordnet_task, then seeded subsets of `train` training and `test` test
/// synsets and, drawn after them so that the first two are the same for any
/// `val`, `val` validation synsets.
struct NounData {
    std::size_t classes = 0;
    std::int32_t pad = 0;
    Split train, test, val;
};

inline NounData load_noun_supersense(const RunOptions& o, const pw::WordPieceTokenizer& tok, std::size_t val = 0) {
    const pw::WordNet wn = pw::load_wordnet(o.wordnet);
    const pw::TextSplits s = pw::wordnet_task(wn, pw::WordNetTask::noun_supersense, {.seed = o.data_seed});
    NounData d;
    d.classes = s.class_names.size();
    d.pad = tok.pad_id();
    pw::Rng rng(pw::detail::mix64(o.data_seed + 17));
    add_subset(d.train, s.train, o.train, rng, tok, o.max_length);
    add_subset(d.test, s.test, o.test, rng, tok, o.max_length);
    if (val > 0) add_subset(d.val, s.validation, val, rng, tok, o.max_length);
    return d;
}

/// The four WordNet tasks of the multi-task examples.
inline constexpr std::size_t kTasks = 4;
inline constexpr std::array<pw::WordNetTask, kTasks> kTaskKinds = {
    pw::WordNetTask::noun_supersense, pw::WordNetTask::verb_supersense, pw::WordNetTask::adjective_kind,
    pw::WordNetTask::part_of_speech};
inline constexpr std::array<const char*, kTasks> kTaskNames = {"noun supersense", "verb supersense",
                                                               "adjective kind", "part of speech"};

/// One task's class count and tokenized subsets.
struct Task {
    std::size_t classes = 0;
    Split train, test;
};

/// Per task, the seeded split of wordnet_task, then seeded subsets of
/// `o.train` training and `o.test` test synsets (the same for every example).
inline std::array<Task, kTasks> load_four_tasks(const RunOptions& o, const pw::WordPieceTokenizer& tok) {
    const pw::WordNet wn = pw::load_wordnet(o.wordnet);
    std::array<Task, kTasks> tasks;
    for (std::size_t k = 0; k < kTasks; ++k) {
        const pw::TextSplits s = pw::wordnet_task(wn, kTaskKinds[k], {.seed = o.data_seed});
        Task& t = tasks[k];
        t.classes = s.class_names.size();
        pw::Rng rng(pw::detail::mix64(o.data_seed + 17 + k));
        add_subset(t.train, s.train, o.train, rng, tok, o.max_length);
        add_subset(t.test, s.test, o.test, rng, tok, o.max_length);
    }
    return tasks;
}

/// A pre-trained encoder, mean pooling and a linear head as one model: what
/// search::run, derive, dist::DataParallel and the optimisers walk (visit,
/// visit_children).
template <class Body>
struct Classifier {
    using Scalar = float;
    Body body;
    pw::Pooler pool;
    pw::Linear head;

    template <class F>
    void visit(F&& f) {
        body.visit(f);
        head.visit(f);
    }
    template <class F>
    void visit_children(F&& f) {
        f(body);
        f(pool);
        f(head);
    }
    /// Mean-pooled logits of a batch.
    const pw::Tensor<float>& forward(const pw::TokenBatch& x) { return head.forward(pool.forward(body.forward(x), x)); }
    /// Backward of forward's logits; nothing below the head when the body has
    /// nothing to train. The head's gradients are reported complete before the
    /// encoder's backward (data-parallel training may send them meanwhile).
    void backward(const pw::Tensor<float>& g) {
        const bool body_trains = pw::any_trainable(body);
        head.set_input_grad(body_trains);
        const auto& de = head.backward(g);
        pw::gradients_ready(head);
        if (body_trains) body.backward(pool.backward(de));
    }
};

/// Peak resident memory of this process, MiB.
inline double peak_rss_mib() {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return double(u.ru_maxrss) / 1024.0;
}

}  // namespace text_examples
