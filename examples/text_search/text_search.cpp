// Architecture search over adaptation policies per transformer layer of the
// pre-trained all-MiniLM-L6-v2, on WordNet noun supersense (26 classes; text =
// the synset's lemmas and its gloss): seed 000's claim on a real model.
//
// Every one of the six layers is searched among five candidates
//
//   frozen     the pre-trained layer                                  0 parameters
//   ln         LN tuning: its two LayerNorms' scale and shift (NormPatch)  1,536
//   lora       LoRA r=8, alpha=16 on query and value                  12,288
//   adapter    an adapter of 24 after the layer (ReLU)                18,840
//   finetune   the whole layer                                        1,774,464
//
// with first-order DARTS (search::run: softmax gates, the architecture step on
// held-out validation batches) and the trainable-parameter penalty
//   R = lambda * sum over layers and candidates of g_k P_k / P_layers
// (search/penalty.hpp; P_layers = the six layers' 10.6M parameters, so
// fine-tuning every layer costs lambda) at each --lambdas value. The argmax
// scheme is then derived and retrained from the pre-trained weights, and
// compared with fixed schemes under the same budget: fine-tuning every layer
// (finetune), LoRA everywhere (lora), and a hand-crafted scheme (hand: the two
// top layers fine-tuned, the four below frozen). The embeddings stay frozen in
// every scheme; the head (mean pooling, a Linear(384, 26)) always trains, at
// --head-lr.
//
// Training (search and retraining): AdamW (weight decay 0.01), batch --batch,
// each candidate's parameters at its own learning rate (--lr-ln, --lr-lora,
// --lr-adapter, --lr-finetune: the defaults of text_transfer, 1e-3, 5e-4, 1e-3
// and 5e-5). The search runs --search-epochs at constant rates with the
// architecture weights' Adam at --alpha-lr; retraining runs --epochs with 10 %
// linear warm-up then cosine decay, as text_transfer. A seed sets the head,
// the injected parameters and the batch order; the data are the same for every
// run (--data-seed).
//
// Data: the seeded 80/10/10 split of wordnet_task (io/wordnet.hpp); --train
// training synsets (weights), --val validation synsets (architecture steps) and
// --test test synsets, random subsets. The default run is sized to finish in
// about 10 minutes on 2 cores; the flags scale it up.
//
//   scripts/fetch-model     # once: caches the model
//   build/examples/text_search/text_search [--methods search,finetune,lora,hand]
//       [--lambdas 0,0.5] [--seeds 1] [--train 240] [--val 80] [--test 300] [--epochs 2]
//       [--search-epochs 1] [--alpha-lr 0.05] [--frozen-cost 0] [--batch 16]
//       [--max-length 64] [--csv FILE] [--gates-csv FILE] [--model DIR] [--wordnet DIR]
//
// The program checks itself: a derived scheme trains exactly the parameters its
// candidates add (LoRA everywhere as many as BertEncoder<bert::LoRAQueryValue<8,
// 16>>, fine-tuning everywhere every layer parameter), and exits 1 if not.
// Exit status 77 (and a message) when the model or WordNet is not there.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <string>
#include <string_view>
#include <vector>

#include <patchwork/patchwork.hpp>

#include "../common/text_data.hpp"

namespace pw = patchwork;
namespace tx = text_examples;
namespace search = patchwork::search;

namespace {

// ---- the searched model ------------------------------------------------------

using Candidates = pw::Search<pw::Frozen, pw::NormPatch, pw::LoRA<8, 16>, pw::Adapter<24>, pw::FineTune>;
constexpr std::size_t kFrozen = 0, kLoRA = 2, kFineTune = 4, kCandidates = 5;
/// The candidates' flag names (--lr-NAME) and their default learning rates.
constexpr std::array<const char*, kCandidates> kNames = {"frozen", "ln", "lora", "adapter", "finetune"};
constexpr std::array<double, kCandidates> kDefaultLr = {0.0, 1e-3, 5e-4, 1e-3, 5e-5};
/// One letter per candidate, for a scheme's short spelling ("FFFFTT").
constexpr std::array<char, kCandidates> kLetters = {'F', 'N', 'L', 'A', 'T'};

struct SearchedSpec : pw::bert::Plain {
    template <class B>
    using layer = pw::Tune<B, Candidates>;
};
using Body = pw::BertModel<pw::BertEncoder<SearchedSpec>>;

using Classifier = tx::Classifier<Body>;

// ---- options -------------------------------------------------------------------

struct Options : tx::RunOptions {
    Options() {
        methods = {"search", "finetune", "lora", "hand"};
        train = 240;
        test = 300;
    }
    std::size_t val = 80;
    std::vector<double> lambdas = {0.0, 0.5};
    std::size_t search_epochs = 1;
    double alpha_lr = 0.05;
    double frozen_cost = 0.0;
    std::string gates_csv;
};

/// --methods: the search, or one of the fixed schemes.
constexpr std::array<const char*, 4> kMethods = {"search", "finetune", "lora", "hand"};

std::string canonical(std::string_view name) {
    for (const char* m : kMethods)
        if (name == m) return m;
    for (const char* c : kNames)
        if (name == c && name != "frozen") return c;
    throw pw::ConfigError(pw::detail::concat("text_search: unknown method or candidate '", name,
                                             "' (methods: search, finetune, lora, hand; learning rates: --lr-ln, "
                                             "--lr-lora, --lr-adapter, --lr-finetune)"));
}

Options parse(int argc, char** argv) {
    Options o;
    tx::parse_args("text_search", argc, argv, o, canonical, [&](std::string_view flag, const auto& value) {
        const auto count = [&](std::uint64_t min) { return tx::parse_uint("text_search", flag, value(), min); };
        if (flag == "--val") o.val = count(1);
        else if (flag == "--search-epochs") o.search_epochs = count(1);
        else if (flag == "--alpha-lr") o.alpha_lr = tx::parse_positive("text_search", flag, value());
        else if (flag == "--gates-csv") o.gates_csv = value();
        else if (flag == "--frozen-cost" || flag == "--lambdas") {
            const std::string v = value();
            std::vector<double> xs;
            for (const auto& s : tx::split_list(v)) {
                char* end = nullptr;
                const double x = std::strtod(s.c_str(), &end);
                if (end != s.c_str() + s.size() || !(x >= 0) || !std::isfinite(x))
                    throw pw::ConfigError(pw::detail::concat("text_search: ", flag,
                                                             " needs numbers >= 0, got '", v, "'"));
                xs.push_back(x);
            }
            if (xs.empty() || (flag == "--frozen-cost" && xs.size() != 1))
                throw pw::ConfigError(pw::detail::concat("text_search: ", flag, " needs a value, got '", v, "'"));
            if (flag == "--lambdas") o.lambdas = xs;
            else o.frozen_cost = xs[0];
        } else return false;
        return true;
    });
    for (auto& m : o.methods)
        if (m != "search" && m != "finetune" && m != "lora" && m != "hand")
            throw pw::ConfigError(pw::detail::concat("text_search: '", m, "' is a candidate, not a method"));
    return o;
}

double candidate_lr(const Options& o, std::size_t k) {
    const auto it = o.lr.find(kNames[k]);
    return it != o.lr.end() ? it->second : kDefaultLr[k];
}

// ---- data ----------------------------------------------------------------------

using Data = tx::NounData;

/// text_transfer's training and test subsets, and --val validation synsets.
Data load_data(const Options& o, const pw::WordPieceTokenizer& tok) { return tx::load_noun_supersense(o, tok, o.val); }

/// A padded token batch and its labels.
struct TextBatch {
    pw::TokenBatch x;
    std::vector<int> labels;
};

/// One split in mini-batches, reshuffled per epoch from a seed (an EpochSource).
class TextSource {
public:
    TextSource(const tx::Split& s, std::size_t batch, std::int32_t pad, std::uint64_t seed)
        : split_(&s), batch_(batch), pad_(pad), seed_(seed), order_(tx::iota(s.size())) {}
    void start_epoch(std::size_t e) {
        order_ = tx::iota(split_->size());
        pw::Rng rng(pw::detail::mix64(seed_ + 0x9E3779B97F4A7C15ull * (e + 1)));
        pw::detail::shuffle_indices(order_, rng);
    }
    [[nodiscard]] std::size_t batches() const { return (split_->size() + batch_ - 1) / batch_; }
    const TextBatch& batch(std::size_t i) {
        const std::size_t b = i * batch_;
        cur_.x = tx::make_batch(*split_, order_, b, std::min(split_->size(), b + batch_), pad_, cur_.labels);
        return cur_;
    }

private:
    const tx::Split* split_;
    std::size_t batch_;
    std::int32_t pad_;
    std::uint64_t seed_;
    std::vector<std::size_t> order_;
    TextBatch cur_;
};
static_assert(pw::EpochSource<TextSource>);

// ---- training ------------------------------------------------------------------

/// The weight optimiser: the head at --head-lr, each candidate's parameters in
/// every searched layer at that candidate's rate (while searching every
/// branch's, once derived the chosen one's).
pw::AdamW weight_optimizer(Classifier& m, const Options& o) {
    pw::AdamW opt(pw::trainable_parameters(m.head), {.lr = o.head_lr, .weight_decay = 0.01});
    std::array<std::vector<pw::Parameter<float>*>, kCandidates> groups;
    search::for_each_searched(m.body, [&](auto& s) {
        const auto add = [&](std::size_t k, auto& branch) {
            branch.visit([&](pw::Parameter<float>& p) {
                if (p.trainable()) groups[k].push_back(&p);
            });
        };
        if (s.derived()) {
            s.visit([&](pw::Parameter<float>& p) {
                if (p.trainable()) groups[s.chosen()].push_back(&p);
            });
            return;
        }
        [&]<std::size_t... K>(std::index_sequence<K...>) {
            (add(K, s.template branch<K>()), ...);
        }(std::make_index_sequence<kCandidates>{});
    });
    for (std::size_t k = 0; k < kCandidates; ++k)
        if (!groups[k].empty()) opt.add_group(groups[k], {.lr = candidate_lr(o, k), .weight_decay = 0.01});
    return opt;
}

Classifier make_model(const Options& o, const Data& d, std::uint64_t seed) {
    pw::manual_seed(seed);  // the injected parameters are drawn at construction
    const std::size_t width = pw::hf::read_bert_config(o.model / "config.json").hidden_size;
    Classifier m{pw::hf::load_bert<Body>(o.model), pw::Pooler{}, pw::Linear(width, d.classes)};
    pw::initialize(m.head, seed);
    m.head.set_path("head");
    return m;
}

/// The parameters of every searched layer (its pre-trained module's).
std::size_t layer_parameters(Body& body) {
    std::size_t n = 0;
    search::for_each_searched(body, [&](auto& s) { n += s.base_parameters(); });
    return n;
}

/// Cross-entropy of a batch; its backward; the loss value.
double loss_step(Classifier& m, const TextBatch& b) {
    const auto ce = pw::cross_entropy(m.forward(b.x), b.labels);
    m.backward(ce.grad);
    return double(ce.value);
}

double test_accuracy(Classifier& m, const Data& d) {
    const std::vector<std::size_t> all = tx::iota(d.test.size());
    std::vector<int> labels;
    std::size_t correct = 0;
    for (std::size_t b = 0; b < all.size(); b += 64) {
        const pw::TokenBatch x = tx::make_batch(d.test, all, b, std::min(all.size(), b + 64), d.pad, labels);
        correct += pw::count_correct(m.forward(x), labels);
    }
    return double(correct) / double(all.size());
}

struct Run {
    std::string method;
    double lambda = -1;  ///< the search's, or -1 for a fixed scheme
    std::uint64_t seed = 0;
    std::string scheme;  ///< one letter per layer (F N L A T)
    std::size_t trainable = 0;  ///< besides the head
    double accuracy = 0, search_seconds = 0, seconds_per_epoch = 0;
};

std::string spell(const std::vector<std::size_t>& scheme) {
    std::string s;
    for (std::size_t k : scheme) s += kLetters[k];
    return s;
}

/// Builds the model, derives `scheme`, trains it for --epochs and tests it.
Run train_scheme(const Options& o, const Data& d, const std::vector<std::size_t>& scheme, std::uint64_t seed) {
    Classifier m = make_model(o, d, seed);
    // The parameters each layer's candidate adds, read before derive frees the others.
    std::size_t expected = 0, i = 0;
    search::for_each_searched(m.body, [&](auto& s) { expected += s.candidate_parameters()[scheme[i++]]; });
    (void)search::derive(m.body, scheme);
    Run r;
    r.seed = seed;
    r.scheme = spell(scheme);
    r.trainable = pw::trainable_count(m.body);
    if (r.trainable != expected)
        throw pw::Error(pw::detail::concat("text_search: scheme ", r.scheme, " trains ", r.trainable,
                                           " parameters, its candidates add ", expected));
    pw::AdamW opt = weight_optimizer(m, o);
    TextSource src(d.train, o.batch, d.pad, seed);
    const std::size_t total = src.batches() * o.epochs;
    const pw::WarmupCosine schedule{.warmup_steps = std::max<std::size_t>(1, total / 10), .total_steps = total};
    std::size_t step = 0;
    double seconds = 0;
    for (std::size_t epoch = 0; epoch < o.epochs; ++epoch) {
        src.start_epoch(epoch);
        const auto t0 = std::chrono::steady_clock::now();
        double loss = 0;
        for (std::size_t b = 0; b < src.batches(); ++b) {
            opt.set_lr_factor(schedule(step++));
            loss += pw::optimizer_step(m, opt, [&] { return loss_step(m, src.batch(b)); }).loss;
        }
        seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (!o.quiet)
            std::printf("      %s seed %llu epoch %zu: mean loss %.4f (%.1f s)\n", r.scheme.c_str(),
                        (unsigned long long)seed, epoch + 1, loss / double(src.batches()), seconds);
    }
    r.seconds_per_epoch = seconds / double(o.epochs);
    r.accuracy = test_accuracy(m, d);
    return r;
}

/// The search at `lambda`, then its argmax scheme retrained.
Run search_and_train(const Options& o, const Data& d, double lambda, std::uint64_t seed, std::ofstream& gates) {
    Classifier m = make_model(o, d, seed);
    pw::AdamW opt = weight_optimizer(m, o);
    TextSource train(d.train, o.batch, d.pad, seed), val(d.val, o.batch, d.pad, seed + 1000);
    search::SearchOptions so;
    so.epochs = o.search_epochs;
    so.gates.mode = search::GateMode::softmax;
    so.penalty.lambda = lambda;
    so.penalty.frozen_cost = search::FrozenCost::constant(o.frozen_cost);
    so.penalty.full = layer_parameters(m.body);  // fine-tuning every layer costs lambda
    so.alpha.lr = o.alpha_lr;
    so.log_every = 5;
    so.seed = seed;
    const auto t0 = std::chrono::steady_clock::now();
    const auto res = search::run(m, opt, train, val, loss_step, so);
    const double search_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (gates.is_open())
        for (const auto& s : res.history) {
            gates << lambda << ',' << seed << ',' << s.step;
            for (const auto& pm : s.probabilities)
                for (double v : pm) gates << ',' << v;
            gates << '\n';
        }
    const auto scheme = search::argmax_scheme(m.body);
    if (!o.quiet) {
        std::printf("    search lambda=%g seed %llu: %zu steps in %.0f s, last train loss %.3f, val loss %.3f; "
                    "softmax(alpha) per layer:\n",
                    lambda, (unsigned long long)seed, res.steps, search_seconds, res.last_train_loss,
                    res.last_val_loss);
        const auto& last = res.history.back();
        for (std::size_t l = 0; l < last.probabilities.size(); ++l) {
            std::printf("      layer %zu:", l);
            for (std::size_t k = 0; k < kCandidates; ++k) std::printf(" %s %.3f", kNames[k], last.probabilities[l][k]);
            std::printf("\n");
        }
    }
    Run r = train_scheme(o, d, scheme, seed);
    r.method = "search";
    r.lambda = lambda;
    r.search_seconds = search_seconds;
    return r;
}

/// The fixed schemes' choices for `layers` layers.
std::vector<std::size_t> fixed_scheme(std::string_view method, std::size_t layers) {
    if (method == "finetune") return std::vector<std::size_t>(layers, kFineTune);
    if (method == "lora") return std::vector<std::size_t>(layers, kLoRA);
    // hand: fine-tune the two top layers, freeze the rest.
    std::vector<std::size_t> s(layers, kFrozen);
    for (std::size_t l = layers >= 2 ? layers - 2 : 0; l < layers; ++l) s[l] = kFineTune;
    return s;
}

/// The library's own fixed types train what the derived schemes train.
/// Returns the parameters of the six layers (what fine-tuning every layer trains).
std::size_t check_counts(const Options& o) {
    const pw::BertConfig c = pw::hf::read_bert_config(o.model / "config.json");
    pw::BertModel<pw::BertEncoder<pw::bert::LoRAQueryValue<8, 16>>> lora(c);
    pw::BertModel<pw::BertEncoder<>, pw::FineTune> full(c);
    Body searched(c);
    std::size_t lora_sum = 0, layer_sum = 0;
    search::for_each_searched(searched, [&](auto& s) {
        lora_sum += s.candidate_parameters()[kLoRA];
        layer_sum += s.candidate_parameters()[kFineTune];
    });
    const std::size_t embeddings = pw::parameter_count(full.embeddings);
    if (lora_sum != pw::trainable_count(lora) || layer_sum + embeddings != pw::trainable_count(full))
        throw pw::Error(pw::detail::concat("text_search: LoRA candidates add ", lora_sum, " (LoRAQueryValue: ",
                                           pw::trainable_count(lora), "), FineTune candidates ", layer_sum,
                                           " + embeddings ", embeddings, " (FineTune: ", pw::trainable_count(full),
                                           ")"));
    if (pw::pretrained_parameters(searched) != pw::trainable_count(full))
        throw pw::Error(pw::detail::concat("text_search: the searched model counts ", pw::pretrained_parameters(searched),
                                           " pre-trained parameters, full fine-tuning trains ",
                                           pw::trainable_count(full)));
    return layer_sum;
}

}  // namespace

int main(int argc, char** argv) try {
    const Options o = parse(argc, argv);
    if (tx::inputs_missing(o)) return 77;
    const std::size_t full = check_counts(o);  // every layer's parameters
    const auto tok = pw::WordPieceTokenizer::from_vocab(o.model / "vocab.txt");
    const Data d = load_data(o, tok);
    std::printf("noun supersense, %zu classes: %zu training, %zu validation and %zu test synsets (data seed %llu)\n",
                d.classes, d.train.size(), d.val.size(), d.test.size(), (unsigned long long)o.data_seed);
    std::printf("candidates per layer: frozen, ln (lr %g), lora (lr %g), adapter (lr %g), finetune (lr %g); head lr "
                "%g; batch %zu; search %zu epoch(s), alpha lr %g, frozen cost %g; retraining %zu epoch(s)\n",
                candidate_lr(o, 1), candidate_lr(o, 2), candidate_lr(o, 3), candidate_lr(o, 4), o.head_lr, o.batch,
                o.search_epochs, o.alpha_lr, o.frozen_cost, o.epochs);
    std::fflush(stdout);

    std::ofstream csv, gates;
    if (!o.csv.empty()) {
        csv.open(o.csv);
        if (!csv) throw pw::IoError("text_search: cannot write " + o.csv);
        csv << "method,lambda,seed,scheme,trainable,accuracy,search_seconds,seconds_per_epoch\n";
    }
    if (!o.gates_csv.empty()) {
        gates.open(o.gates_csv);
        if (!gates) throw pw::IoError("text_search: cannot write " + o.gates_csv);
        gates << "lambda,seed,step,probabilities (layer-major: frozen, ln, lora, adapter, finetune)\n";
    }
    const std::size_t layers = pw::hf::read_bert_config(o.model / "config.json").num_hidden_layers;

    std::vector<Run> runs;
    const auto record = [&](Run r) {
        std::printf("  %-8s%s seed %llu: scheme %s, %zu trainable besides the head (%.3f %% of fine-tuning every layer), "
                    "test accuracy %.4f, %.1f s per epoch%s\n",
                    r.method.c_str(), r.lambda >= 0 ? pw::detail::concat(" lambda=", r.lambda).c_str() : "",
                    (unsigned long long)r.seed, r.scheme.c_str(), r.trainable,
                    100.0 * double(r.trainable) / double(full), r.accuracy, r.seconds_per_epoch,
                    r.lambda >= 0 ? pw::detail::concat(" (search ", int(r.search_seconds), " s)").c_str() : "");
        std::fflush(stdout);
        if (csv)
            csv << r.method << ',' << r.lambda << ',' << r.seed << ',' << r.scheme << ',' << r.trainable << ','
                << r.accuracy << ',' << r.search_seconds << ',' << r.seconds_per_epoch << '\n';
        runs.push_back(std::move(r));
    };
    for (const auto& method : o.methods)
        for (std::size_t s = 0; s < o.seeds; ++s) {
            const std::uint64_t seed = o.seed + s;
            if (method == "search") {
                for (double lambda : o.lambdas) record(search_and_train(o, d, lambda, seed, gates));
            } else {
                Run r = train_scheme(o, d, fixed_scheme(method, layers), seed);
                r.method = method;
                record(std::move(r));
            }
        }

    // One row per method (and lambda): accuracy mean +- sd over seeds, the schemes found.
    std::printf("\n| scheme | layers (F frozen, N LN, L LoRA, A adapter, T fine-tuned) | trainable besides the head "
                "(mean) | %% of fine-tuning every layer | test accuracy (mean +- sd) |\n|---|---|---:|---:|---:|\n");
    std::vector<std::pair<std::string, double>> keys;
    for (const Run& r : runs)
        if (std::find(keys.begin(), keys.end(), std::pair{r.method, r.lambda}) == keys.end())
            keys.emplace_back(r.method, r.lambda);
    for (const auto& [method, lambda] : keys) {
        std::vector<double> acc;
        std::string schemes;
        double trainable = 0;
        for (const Run& r : runs)
            if (r.method == method && r.lambda == lambda) {
                acc.push_back(r.accuracy);
                trainable += double(r.trainable);
                if (schemes.find(r.scheme) == std::string::npos) schemes += (schemes.empty() ? "" : ", ") + r.scheme;
            }
        trainable /= double(acc.size());
        const pw::MeanSd a = pw::mean_sd(acc);
        const std::string name = lambda >= 0 ? pw::detail::concat("search, lambda ", lambda) : method;
        std::printf("| %s | %s | %.0f | %.3f %% | %.2f +- %.2f %% |\n", name.c_str(), schemes.c_str(), trainable,
                    100.0 * trainable / double(full), 100 * a.mean, 100 * a.sd);
    }
    std::printf("fine-tuning every layer: %zu parameters (the embeddings stay frozen in every scheme)\n", full);
    std::printf("peak resident memory of this process: %.0f MiB\n", tx::peak_rss_mib());
    return 0;
} catch (const pw::Error& e) {
    tx::report_error("text_search", e);
    return 1;
}
