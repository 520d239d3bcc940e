// Cascaded multi-task adaptation by architecture search, in miniature.
//
// A three-stage cascade in the spirit of speech enhancement -> recognition ->
// understanding, built from Fashion-MNIST:
//   stage 0  "enhancer"     784 -> 256 -> 784, a denoiser pre-trained on corruption A (Gaussian noise)
//   stage 1  "recogniser"   784 -> 256 -> 10,  a classifier pre-trained on clean images
//   stage 2  "understander" 10 -> 32 -> 4,     maps the recogniser's logits to a coarse intent
//                                              (top / bottom / footwear / bag), pre-trained on clean data
// The new end-to-end task: images under corruption B (salt-and-pepper noise
// and an occluding patch), predict the coarse intent, with the fine class as
// the recogniser's auxiliary loss. Every block of every stage is searched over
// {Frozen, Adapter<16>, FineTune}; the schemes compared, each over several seeds:
//   all frozen (no training), adapters everywhere, full fine-tuning, a
//   hand-crafted scheme, and search (first-order DARTS with a parameter
//   penalty) at several lambda values followed by training the derived scheme.
// Output: a table (trainable parameters as % of full fine-tuning, coarse and
// fine test accuracy, mean and spread over seeds), and CSV files for plots.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <numeric>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <patchwork/patchwork.hpp>

#include "cascade_model.hpp"

namespace pw = patchwork;
namespace search = pw::search;

namespace {

using namespace cascade;

struct Options {
    std::size_t train = 10000;       ///< training images of the new task
    std::size_t val = 2000;          ///< held-out images for the architecture step
    std::size_t test = 5000;         ///< test images
    std::size_t pretrain = 20000;    ///< images for pre-training each stage
    std::size_t pretrain_epochs = 4;
    std::size_t epochs = 6;          ///< training epochs of each scheme
    std::size_t search_epochs = 4;
    std::size_t warmup_epochs = 1;   ///< weight-only epochs before the first alpha step
    std::size_t seeds = 3;
    std::vector<double> lambdas = {0.1, 0.3, 1.0};
    double frozen_cost = 0.0;        ///< fraction of a module's parameters charged to Frozen
    double aux_weight = 0.5;         ///< weight of the recogniser's fine-class loss
    double lr = 1e-3;
    /// Adam learning rate of alpha. DARTS' 3e-4 (the library default) is meant
    /// for tens of thousands of steps; this miniature searches for a few
    /// hundred, where alpha would barely leave its initial value.
    double alpha_lr = 3e-3;
    std::string gates = "gumbel";
    std::string out = "cascade-search-out";
    std::string data_dir = pw::fashion_mnist_default_dir;
    bool quiet = false;
};

void usage() {
    std::puts(
        "usage: cascade_search [options]\n"
        "  --train N            training images of the new task (default 10000)\n"
        "  --val N              held-out images for the architecture step (default 2000)\n"
        "  --test N             test images (default 5000)\n"
        "  --pretrain N         images for pre-training each stage (default 20000)\n"
        "  --pretrain-epochs N  (default 4)\n"
        "  --epochs N           training epochs of each scheme (default 6)\n"
        "  --search-epochs N    epochs of the search (default 4)\n"
        "  --warmup-epochs N    weight-only epochs before alpha moves (default 1)\n"
        "  --seeds N            seeds per scheme (default 3)\n"
        "  --lambdas a,b,...    penalty weights to search with (default 0.1,0.3,1.0)\n"
        "  --frozen-cost X      fraction of a module's parameters charged to Frozen (default 0)\n"
        "  --aux-weight X       weight of the recogniser's fine-class loss (default 0.5)\n"
        "  --gates softmax|gumbel  gate relaxation (default gumbel, tau 1 -> 0.1)\n"
        "  --lr X               AdamW learning rate (default 1e-3)\n"
        "  --alpha-lr X         Adam learning rate of the architecture weights (default 3e-3)\n"
        "  --out DIR            where the CSV files go (default cascade-search-out)\n"
        "  --data DIR           Fashion-MNIST directory\n"
        "  --quiet              no progress lines");
}

std::vector<double> parse_list(const std::string& s) {
    std::vector<double> v;
    std::stringstream ss(s);
    for (std::string item; std::getline(ss, item, ',');) v.push_back(std::stod(item));
    if (v.empty()) throw pw::ConfigError("cascade_search: --lambdas needs at least one value");
    return v;
}

Options parse(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        const auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw pw::ConfigError("cascade_search: " + std::string(a) + " needs a value");
            return argv[++i];
        };
        if (a == "--help" || a == "-h") {
            usage();
            std::exit(0);
        } else if (a == "--train") o.train = std::stoul(value());
        else if (a == "--val") o.val = std::stoul(value());
        else if (a == "--test") o.test = std::stoul(value());
        else if (a == "--pretrain") o.pretrain = std::stoul(value());
        else if (a == "--pretrain-epochs") o.pretrain_epochs = std::stoul(value());
        else if (a == "--epochs") o.epochs = std::stoul(value());
        else if (a == "--search-epochs") o.search_epochs = std::stoul(value());
        else if (a == "--warmup-epochs") o.warmup_epochs = std::stoul(value());
        else if (a == "--seeds") o.seeds = std::stoul(value());
        else if (a == "--lambdas") o.lambdas = parse_list(value());
        else if (a == "--frozen-cost") o.frozen_cost = std::stod(value());
        else if (a == "--aux-weight") o.aux_weight = std::stod(value());
        else if (a == "--gates") o.gates = value();
        else if (a == "--lr") o.lr = std::stod(value());
        else if (a == "--alpha-lr") o.alpha_lr = std::stod(value());
        else if (a == "--out") o.out = value();
        else if (a == "--data") o.data_dir = value();
        else if (a == "--quiet") o.quiet = true;
        else throw pw::ConfigError("cascade_search: unknown option " + std::string(a) + " (try --help)");
    }
    if (o.gates != "gumbel" && o.gates != "softmax")
        throw pw::ConfigError("cascade_search: --gates must be softmax or gumbel, got " + o.gates);
    if (o.seeds == 0 || o.epochs == 0) throw pw::ConfigError("cascade_search: --seeds and --epochs must be positive");
    return o;
}

// ---- data ----------------------------------------------------------------------

/// Corruption A (pre-training of the enhancer): additive Gaussian noise, sigma 0.35.
void corrupt_a(float* img, pw::Rng& rng) {
    for (std::size_t i = 0; i < kPixels; ++i) img[i] = std::clamp(img[i] + float(rng.normal(0, 0.35)), 0.0f, 1.0f);
}

/// Corruption B (the new task): 25% salt-and-pepper pixels and a 9x9 white patch.
void corrupt_b(float* img, pw::Rng& rng) {
    for (std::size_t i = 0; i < kPixels; ++i) {
        const double u = rng.uniform();
        if (u < 0.125) img[i] = 0.0f;
        else if (u < 0.25) img[i] = 1.0f;
    }
    const std::size_t r0 = std::size_t(rng.uniform(0, 19)), c0 = std::size_t(rng.uniform(0, 19));
    for (std::size_t r = r0; r < r0 + 9; ++r)
        for (std::size_t c = c0; c < c0 + 9; ++c) img[r * 28 + c] = 1.0f;
}

template <class F>
pw::Dataset<float> corrupted(const pw::Dataset<float>& clean, F&& corrupt, std::uint64_t seed) {
    pw::Dataset<float> out = clean;
    pw::Rng rng(seed);
    for (std::size_t n = 0; n < out.size(); ++n) corrupt(out.images.data() + n * kPixels, rng);
    return out;
}

/// Same images, labels replaced by the coarse intent.
pw::Dataset<float> coarse(const pw::Dataset<float>& ds) {
    pw::Dataset<float> out = ds;
    for (auto& l : out.labels) l = kCoarseOf[l];
    return out;
}

/// A batch source of (input, target) rows for the enhancer's MSE pre-training:
/// the corrupted image in x, the clean one kept beside it.
struct PairSource {
    using Scalar = float;
    const pw::Dataset<float>* noisy = nullptr;
    const pw::Dataset<float>* clean = nullptr;
    std::size_t batch_size = 64;
    std::vector<std::size_t> order{};
    pw::Batch<float> current{};
    pw::Tensor<float> target{};
    void start_epoch(std::size_t e) {
        order.resize(noisy->size());
        std::iota(order.begin(), order.end(), 0);
        pw::Rng rng(1000 + e);
        for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[std::size_t(rng.next() % i)]);
    }
    [[nodiscard]] std::size_t batches() const { return noisy->size() / batch_size; }
    const pw::Batch<float>& batch_at(std::size_t b) {
        current.x.resize(pw::Shape{batch_size, kPixels});
        target.resize(pw::Shape{batch_size, kPixels});
        current.labels.clear();
        for (std::size_t k = 0; k < batch_size; ++k) {
            const std::size_t i = order[b * batch_size + k];
            std::copy_n(noisy->images.data() + i * kPixels, kPixels, current.x.data() + k * kPixels);
            std::copy_n(clean->images.data() + i * kPixels, kPixels, target.data() + k * kPixels);
        }
        return current;
    }
    const pw::Batch<float>& batch(std::size_t b) { return batch_at(b); }
    // The targets of the batch last returned (the loss reads them).
};

// ---- pre-training ----------------------------------------------------------------

struct Pretrained {
    Enhancer enhancer;
    Recogniser recogniser;
    Understander understander;
};

template <class M, class S, class L>
void train_plain(M& model, S& source, std::size_t epochs, double lr, L&& loss, bool quiet) {
    pw::AdamW opt{pw::trainable_parameters(model), {.lr = lr, .weight_decay = 1e-4}};
    const std::size_t steps = epochs * source.batches();
    pw::fit(model, opt, source, loss,
            {.epochs = epochs, .schedule = pw::WarmupCosine{steps / 20, steps}, .log_every = 0, .verbose = !quiet});
}

Pretrained pretrain(const pw::Dataset<float>& clean, const Options& o) {
    pw::manual_seed(7);
    Pretrained p{Enhancer(EnhBlock(pw::Linear(kPixels, kHidden), pw::Relu{}), pw::Linear(kHidden, kPixels)),
                 Recogniser(RecBlock(pw::Linear(kPixels, kHidden), pw::LayerNorm(kHidden), pw::Relu{}),
                            pw::Linear(kHidden, kFine)),
                 Understander(UndBlock(pw::Linear(kFine, kIntentHidden), pw::Relu{}), pw::Linear(kIntentHidden, kCoarse))};
    {
        if (!o.quiet) std::cout << "-- pre-training the enhancer (denoise corruption A)\n";
        const auto noisy = corrupted(clean, corrupt_a, 11);
        PairSource src{.noisy = &noisy, .clean = &clean};
        p.enhancer.set_input_grad(false);
        train_plain(p.enhancer, src, o.pretrain_epochs, 2e-3,
                    [&](const pw::Tensor<float>& y, const pw::Batch<float>&) { return pw::mse(y, src.target); },
                    o.quiet);
    }
    {
        if (!o.quiet) std::cout << "-- pre-training the recogniser (clean images, 10 classes)\n";
        pw::Batcher<float> src(clean, {.batch_size = 64, .seed = 12});
        p.recogniser.set_input_grad(false);
        train_plain(p.recogniser, src, o.pretrain_epochs, 2e-3, pw::CrossEntropyLoss{}, o.quiet);
    }
    {
        if (!o.quiet) std::cout << "-- pre-training the understander (recogniser logits -> coarse intent)\n";
        pw::Dataset<float> logits;
        logits.images = pw::Tensor<float>(pw::Shape{clean.size(), kFine});
        for (std::size_t b = 0; b < clean.size(); b += 1000) {
            const std::size_t n = std::min<std::size_t>(1000, clean.size() - b);
            pw::Tensor<float> x(pw::Shape{n, kPixels});
            std::copy_n(clean.images.data() + b * kPixels, n * kPixels, x.data());
            const auto& y = p.recogniser.forward(x);
            std::copy_n(y.data(), n * kFine, logits.images.data() + b * kFine);
        }
        logits.labels = coarse(clean).labels;
        pw::Batcher<float> src(logits, {.batch_size = 64, .seed = 13});
        p.understander.set_input_grad(false);
        train_plain(p.understander, src, o.pretrain_epochs, 2e-3, pw::CrossEntropyLoss{}, o.quiet);
    }
    return p;
}

/// The searchable cascade built around the pre-trained stages.
Model make_model(const Pretrained& p) {
    using E = pw::Sequential<S<EnhBlock>, S<pw::Linear>>;
    using R = pw::Sequential<S<RecBlock>, S<pw::Linear>>;
    using U = pw::Sequential<S<UndBlock>, S<pw::Linear>>;
    Model m(E(S<EnhBlock>(p.enhancer.get<0>()), S<pw::Linear>(p.enhancer.get<1>())),
            R(S<RecBlock>(p.recogniser.get<0>()), S<pw::Linear>(p.recogniser.get<1>())),
            U(S<UndBlock>(p.understander.get<0>()), S<pw::Linear>(p.understander.get<1>())));
    m.set_input_grad(false);
    return m;
}

// ---- training and evaluation -----------------------------------------------------

/// The cascaded multi-task loss: coarse intent on the last stage, plus the fine
/// class on the recogniser's output with weight aux_weight.
struct CascadeLoss {
    Model* model = nullptr;
    double aux_weight = 0.5;
    pw::Loss<float> operator()(const pw::Tensor<float>& y, const pw::Batch<float>& b) const {
        coarse_labels.resize(b.labels.size());
        for (std::size_t i = 0; i < b.labels.size(); ++i) coarse_labels[i] = kCoarseOf[b.labels[i]];
        auto final_loss = pw::cross_entropy(y, coarse_labels);
        if (aux_weight > 0) {
            auto aux = pw::cross_entropy(model->output<1>(), b.labels);
            model->add_stage_grad<1>(aux.grad, float(aux_weight));
            final_loss.value += float(aux_weight) * aux.value;
        }
        return final_loss;
    }
    mutable std::vector<int> coarse_labels{};
};

struct Accuracy {
    double coarse = 0, fine = 0;
};

Accuracy evaluate(Model& m, const pw::Dataset<float>& test) {
    std::size_t right_c = 0, right_f = 0;
    for (std::size_t b = 0; b < test.size(); b += 1000) {
        const std::size_t n = std::min<std::size_t>(1000, test.size() - b);
        pw::Tensor<float> x(pw::Shape{n, kPixels});
        std::copy_n(test.images.data() + b * kPixels, n * kPixels, x.data());
        const auto& y = m.forward(x);
        const auto& f = m.output<1>();
        for (std::size_t i = 0; i < n; ++i) {
            const int label = test.labels[b + i];
            const float* yr = y.data() + i * kCoarse;
            const float* fr = f.data() + i * kFine;
            right_c += int(std::max_element(yr, yr + kCoarse) - yr) == kCoarseOf[label];
            right_f += int(std::max_element(fr, fr + kFine) - fr) == label;
        }
    }
    return {double(right_c) / double(test.size()), double(right_f) / double(test.size())};
}

void train_scheme(Model& m, const pw::Dataset<float>& train, const Options& o, std::uint64_t seed) {
    if (pw::trainable_count(m) == 0) return;
    pw::Batcher<float> src(train, {.batch_size = 64, .seed = seed});
    pw::AdamW opt{pw::trainable_parameters(m), {.lr = o.lr, .weight_decay = 1e-4}};
    const std::size_t steps = o.epochs * src.batches();
    pw::fit(m, opt, src, CascadeLoss{&m, o.aux_weight},
            {.epochs = o.epochs, .schedule = pw::WarmupCosine{steps / 20, steps}, .clip_norm = 5.0, .log_every = 0,
             .verbose = false});
}

struct Run {
    std::string scheme;
    std::uint64_t seed = 0;
    double lambda = -1;
    std::vector<std::string> choices;
    std::size_t trainable = 0, full = 0;
    Accuracy acc;
    double seconds = 0, search_seconds = 0;
    std::string fixed_type;
};

std::string join(const std::vector<std::string>& v, const char* sep) {
    std::string s;
    for (std::size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
    return s;
}

/// Build from the pre-trained stages, derive `choices`, train, evaluate.
Run run_fixed(const std::string& name, const std::vector<std::size_t>& choices, const Pretrained& p,
              const pw::Dataset<float>& train, const pw::Dataset<float>& test, const Options& o, std::uint64_t seed) {
    pw::manual_seed(seed);
    Model m = make_model(p);
    const auto report = search::derive(m, choices);
    const auto t0 = std::chrono::steady_clock::now();
    train_scheme(m, train, o, seed);
    Run r;
    r.scheme = name;
    r.seed = seed;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (const auto& d : report.modules) r.choices.push_back(d.chosen);
    r.trainable = report.trainable;
    r.full = report.full;
    r.acc = evaluate(m, test);
    r.fixed_type = report.fixed_type;
    return r;
}

Run run_search(double lambda, const Pretrained& p, const pw::Dataset<float>& train, const pw::Dataset<float>& val,
               const pw::Dataset<float>& test, const Options& o, std::uint64_t seed, std::ofstream& gates_csv) {
    pw::manual_seed(seed);
    Model m = make_model(p);
    pw::Batcher<float> tsrc(train, {.batch_size = 64, .seed = seed});
    pw::Batcher<float> vsrc(val, {.batch_size = 64, .seed = seed + 1});
    pw::AdamW wopt{search::weight_parameters(m), {.lr = o.lr, .weight_decay = 1e-4}};
    CascadeLoss loss{&m, o.aux_weight};
    const auto step = [&](Model& model, const pw::Batch<float>& b) {
        const auto& y = model.forward(b.x);
        auto l = loss(y, b);
        model.backward(l.grad);
        return double(l.value);
    };
    search::SearchOptions so;
    so.epochs = o.search_epochs;
    so.gates.mode = o.gates == "gumbel" ? search::GateMode::gumbel : search::GateMode::softmax;
    so.penalty.lambda = lambda;
    so.alpha.lr = o.alpha_lr;
    so.penalty.frozen_cost = search::FrozenCost::constant(o.frozen_cost);
    so.alpha_warmup = o.warmup_epochs * tsrc.batches();
    so.log_every = 10;
    so.seed = seed;
    const auto t0 = std::chrono::steady_clock::now();
    const auto res = search::run(m, wopt, tsrc, vsrc, step, so);
    const double search_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (const auto& s : res.history) {
        gates_csv << lambda << ',' << seed << ',' << s.step;
        for (const auto& pm : s.probabilities)
            for (double v : pm) gates_csv << ',' << v;
        gates_csv << '\n';
    }
    const auto scheme = search::argmax_scheme(m);
    // Second stage: the derived scheme, trained from the pre-trained weights.
    std::ostringstream name;
    name << "search lambda=" << lambda;
    Run r = run_fixed(name.str(), scheme, p, train, test, o, seed);
    r.lambda = lambda;
    r.search_seconds = search_seconds;
    return r;
}

}  // namespace

int main(int argc, char** argv) try {
    const Options o = parse(argc, argv);
    const auto t_start = std::chrono::steady_clock::now();
    std::filesystem::create_directories(o.out);

    const auto train_all = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::train);
    const auto test_all = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::test);
    if (o.pretrain + o.train + o.val > train_all.size())
        throw pw::ConfigError("cascade_search: --pretrain + --train + --val exceed the 60000 training images");
    // Disjoint slices: pre-training, the new task's training and held-out splits.
    std::vector<std::size_t> idx(train_all.size());
    std::iota(idx.begin(), idx.end(), 0);
    const auto slice = [&](std::size_t from, std::size_t n) {
        return pw::gather(train_all, std::span<const std::size_t>(idx.data() + from, n));
    };
    const auto pre = slice(0, o.pretrain);
    const auto train = corrupted(slice(o.pretrain, o.train), corrupt_b, 21);
    const auto val = corrupted(slice(o.pretrain + o.train, o.val), corrupt_b, 22);
    const auto test_clean = pw::subset(test_all, o.test);
    const auto test = corrupted(test_clean, corrupt_b, 23);
    const auto test_a = corrupted(test_clean, corrupt_a, 24);

    const Pretrained p = pretrain(pre, o);
    {
        Model m = make_model(p);
        search::derive(m, std::vector<std::size_t>(kModules, kFrozen));
        const auto a = evaluate(m, test_a);
        std::printf("pre-trained cascade on corruption A: coarse %.2f%%, fine %.2f%%\n", 100 * a.coarse, 100 * a.fine);
        const auto b = evaluate(m, test);
        std::printf("pre-trained cascade on corruption B: coarse %.2f%%, fine %.2f%% (the new task)\n",
                    100 * b.coarse, 100 * b.fine);
    }

    std::vector<Run> runs;
    std::ofstream gates_csv(o.out + "/gates.csv");
    {
        Model m = make_model(p);
        gates_csv << "lambda,seed,step";
        search::for_each_searched(m, [&](auto& s) {
            for (const auto& l : s.candidate_labels()) gates_csv << ',' << s.path() << ':' << l;
        });
        gates_csv << '\n';
    }
    const std::vector<std::size_t> hand = {kAdapter, kAdapter, kAdapter, kFineTune, kFineTune, kFineTune};
    for (std::size_t si = 0; si < o.seeds; ++si) {
        const std::uint64_t seed = 100 + si;
        if (!o.quiet) std::printf("-- seed %llu\n", static_cast<unsigned long long>(seed));
        runs.push_back(run_fixed("all frozen", std::vector<std::size_t>(kModules, kFrozen), p, train, test, o, seed));
        runs.push_back(run_fixed("adapters everywhere", std::vector<std::size_t>(kModules, kAdapter), p, train, test,
                                 o, seed));
        runs.push_back(run_fixed("full fine-tuning", std::vector<std::size_t>(kModules, kFineTune), p, train, test, o,
                                 seed));
        runs.push_back(run_fixed("hand-crafted", hand, p, train, test, o, seed));
        for (double lambda : o.lambdas) runs.push_back(run_search(lambda, p, train, val, test, o, seed, gates_csv));
        if (!o.quiet)
            for (std::size_t i = runs.size() - 4 - o.lambdas.size(); i < runs.size(); ++i)
                std::printf("   %-22s %6.2f%% of full  coarse %.2f%%  fine %.2f%%  [%s]\n", runs[i].scheme.c_str(),
                            100.0 * double(runs[i].trainable) / double(runs[i].full), 100 * runs[i].acc.coarse,
                            100 * runs[i].acc.fine, join(runs[i].choices, " ").c_str());
    }

    // Per-run CSV and the summary table.
    std::ofstream csv(o.out + "/runs.csv");
    csv << "scheme,lambda,seed,trainable,full,percent,coarse_acc,fine_acc,train_s,search_s,choices\n";
    for (const auto& r : runs)
        csv << r.scheme << ',' << r.lambda << ',' << r.seed << ',' << r.trainable << ',' << r.full << ','
            << 100.0 * double(r.trainable) / double(r.full) << ',' << r.acc.coarse << ',' << r.acc.fine << ','
            << r.seconds << ',' << r.search_seconds << ',' << join(r.choices, " ") << '\n';
    std::map<std::string, std::vector<const Run*>> by_scheme;
    std::vector<std::string> order;
    for (const auto& r : runs) {
        if (!by_scheme.count(r.scheme)) order.push_back(r.scheme);
        by_scheme[r.scheme].push_back(&r);
    }
    std::ofstream summary(o.out + "/summary.csv");
    // The same, one block per scheme (for gnuplot's index and columnheader).
    std::ofstream blocks(o.out + "/summary.dat");
    summary << "scheme,percent_mean,percent_sd,coarse_mean,coarse_sd,fine_mean,fine_sd\n";
    std::printf("\n%-22s %16s %18s %18s  %s\n", "scheme", "% of full FT", "coarse acc (%)", "fine acc (%)",
                "schemes chosen (enh0 enh1 rec0 rec1 und0 und1)");
    for (const auto& name : order) {
        std::vector<double> pct, c, f;
        std::map<std::string, int> schemes;
        for (const Run* r : by_scheme[name]) {
            pct.push_back(100.0 * double(r->trainable) / double(r->full));
            c.push_back(100 * r->acc.coarse);
            f.push_back(100 * r->acc.fine);
            ++schemes[join(r->choices, " ")];
        }
        const auto sp = pw::mean_sd(pct), sc = pw::mean_sd(c), sf = pw::mean_sd(f);
        std::string chosen;
        for (const auto& [k, v] : schemes) chosen += (chosen.empty() ? "" : "; ") + std::to_string(v) + "x " + k;
        std::printf("%-22s %8.2f +- %5.2f %9.2f +- %5.2f %9.2f +- %5.2f  %s\n", name.c_str(), sp.mean, sp.sd, sc.mean,
                    sc.sd, sf.mean, sf.sd, chosen.c_str());
        blocks << '"' << name << "\"\n" << sp.mean << ' ' << sp.sd << ' ' << sc.mean << ' ' << sc.sd << ' ' << sf.mean
               << ' ' << sf.sd << "\n\n\n";
        summary << '"' << name << "\"," << sp.mean << ',' << sp.sd << ',' << sc.mean << ',' << sc.sd << ',' << sf.mean
                << ',' << sf.sd << '\n';
    }
    const Run* example = nullptr;
    for (const auto& r : runs)
        if (r.lambda >= 0) example = &r;
    if (example && !example->fixed_type.empty())
        std::printf("\nfixed type of the last searched scheme:\n  %s\n", example->fixed_type.c_str());
    const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    std::printf("\nwall time %.1f s; CSV files in %s/ (runs.csv, summary.csv, summary.dat, gates.csv)\n", total, o.out.c_str());
    return 0;
} catch (const pw::Error& e) {
    std::cerr << "cascade_search: " << e.what() << '\n';
    return 1;
}
