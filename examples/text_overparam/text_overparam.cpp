// Overparameterised per-task heads on the pre-trained all-MiniLM-L6-v2, collapsed
// after training (seed 002 on a real model): four WordNet tasks read one frozen
// encoder, and each task's linear head is trained either directly or through a
// product of factors that multiplies back into the same compact head, so every
// method has exactly the same inference cost.
//
//   task 0  noun supersense (26 classes)   task 1  verb supersense (15)
//   task 2  adjective kind (2)             task 3  part of speech (4)
//   (text: the synset's lemmas and its gloss; io/wordnet.hpp)
//
//   method    head of task t (W_t: [26, 384], trained, then used as it is)
//   compact   W_t trained directly (a Linear per task)
//   expand    W_t = U_t M_t V_t, every factor the task's own (OverParam<>)
//   shared    W_t = U M_t V: U [26, h] and V [h, 384] shared by the four tasks,
//             M_t [h, h] per task (OverParam<SharedFactor, TaskFactor, SharedFactor>)
//   with h = --expansion * 26. Each task also has its own bias b_t, trained
//   beside its head in every method: logits_t = x W_t^T + b_t.
//
// The encoder is frozen in every method, so the mean-pooled sentence
// embeddings are computed once and the heads train on them. The factors start
// from the compact head's own initial weight (OverParamInit::from_weight:
// U_t M_t V_t = W_t exactly at step 0; in `shared` every task starts from task
// 0's draw), so the methods differ only in how the same linear maps are
// trained. After training the factors are collapsed into W_t; the program
// checks that the collapsed heads give the same test logits (within 1e-4) and
// the same parameter count as the compact heads, and exits 1 otherwise.
//
// Every head is 26 wide (the widest task): a row's loss and prediction read its
// task's first C_t logits (pw::cross_entropy with a class count per row), so
// the other rows of a narrower task's W_t never train or matter, and the
// parameter counts below count only the used rows.
//
// Training: AdamW (weight decay 0.01) at --lr, batches of --batch rows of one
// task, the batches of all tasks shuffled together each epoch, --epochs epochs,
// 10 % linear warm-up then cosine decay. A seed sets the heads, the factors and
// the batch order; the data are the same for every run (--data-seed).
//
//   scripts/fetch-model     # once: caches the model
//   build/examples/text_overparam/text_overparam [--methods compact,expand,shared]
//       [--seeds 3] [--train 400] [--test 300] [--epochs 10] [--batch 16] [--lr 0.002]
//       [--expansion 4] [--max-length 64] [--csv FILE] [--model DIR] [--wordnet DIR]
//
// Exit status 77 (and a message) when the model or WordNet is not there.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include <patchwork/patchwork.hpp>

#include "../common/text_data.hpp"

namespace pw = patchwork;
namespace tx = text_examples;

namespace {

using tx::kTasks;
using tx::kTaskNames;

const std::vector<tx::Method>& methods() {
    static const std::vector<tx::Method> m = {
        {"compact", "compact heads trained directly", 0.0},
        {"expand", "per-task factors U_t M_t V_t, collapsed", 0.0},
        {"shared", "shared U, V and per-task M_t, collapsed", 0.0},
    };
    return m;
}

struct Options : tx::RunOptions {
    Options() {
        methods = {"compact", "expand", "shared"};
        seeds = 3;
        train = 400;  // per task
        test = 300;
        epochs = 10;
    }
    double lr = 2e-3;
    std::size_t expansion = 4;
};

Options parse(int argc, char** argv) {
    Options o;
    tx::parse_args(
        "text_overparam", argc, argv, o,
        [](std::string_view m) { return tx::find_method("text_overparam", methods(), m).name; },
        [&](std::string_view flag, const auto& value) {
            if (flag == "--lr") o.lr = tx::parse_positive("text_overparam", flag, value());
            else if (flag == "--expansion") o.expansion = tx::parse_uint("text_overparam", flag, value(), 1);
            else return false;
            return true;
        });
    return o;
}

/// One task's sentence embeddings (mean-pooled, from the frozen encoder) and labels.
struct Features {
    pw::Tensor<float> x;  ///< [N, 384]
    std::vector<int> labels;
};

struct Task {
    std::size_t classes = 0;
    Features train, test;
};

/// Embeds a tokenized split with the frozen model, 64 texts at a time.
Features embed(pw::BertModel<pw::BertEncoder<>>& model, const tx::Split& s, std::int32_t pad) {
    pw::Pooler pool;
    Features f;
    f.x = pw::Tensor<float>(pw::Shape{s.size(), model.out_features()});
    const std::vector<std::size_t> all = tx::iota(s.size());
    std::vector<int> labels;
    for (std::size_t b = 0; b < s.size(); b += 64) {
        const std::size_t e = std::min(s.size(), b + 64);
        const pw::TokenBatch x = tx::make_batch(s, all, b, e, pad, labels);
        const auto& h = pool.forward(model.forward(x), x);
        std::copy(h.data(), h.data() + h.size(), f.x.data() + b * model.out_features());
    }
    f.labels = s.labels;
    return f;
}

std::array<Task, kTasks> load_tasks(const Options& o, std::size_t& width) {
    const auto tok = pw::WordPieceTokenizer::from_vocab(o.model / "vocab.txt");
    auto model = pw::hf::load_bert<pw::BertModel<pw::BertEncoder<>>>(o.model);
    const auto text = tx::load_four_tasks(o, tok);  // the subsets text_multitask draws
    std::array<Task, kTasks> tasks;
    width = 0;
    for (std::size_t k = 0; k < kTasks; ++k) {
        tasks[k].classes = text[k].classes;
        tasks[k].train = embed(model, text[k].train, tok.pad_id());
        tasks[k].test = embed(model, text[k].test, tok.pad_id());
        width = std::max(width, tasks[k].classes);
    }
    return tasks;
}

// ---- the heads -------------------------------------------------------------------

using Factored = pw::Tune<pw::Linear, pw::FineTune, pw::OverParam<>>;
using SharedFactored =
    pw::Tune<pw::Linear, pw::FineTune, pw::OverParam<pw::SharedFactor, pw::TaskFactor, pw::SharedFactor>>;

/// The four heads of one method, without their biases: forward(x, t) = x W_t^T.
class Heads {
public:
    Heads(std::string_view method, std::size_t in, std::size_t width, std::size_t expansion, std::uint64_t seed)
        : method_(method) {
        compact_.reserve(kTasks);
        expand_.reserve(kTasks);
        for (std::size_t t = 0; t < kTasks; ++t) {
            compact_.emplace_back(in, width, false);
            pw::initialize(compact_.back(), seed * 131 + t);
        }
        pw::manual_seed(seed * 7919 + expansion);  // the factors' random parts
        if (method_ == "expand")
            for (std::size_t t = 0; t < kTasks; ++t)
                expand_.emplace_back(compact_[t], pw::OverParamOptions{.expansion = expansion});
        if (method_ == "shared")
            shared_.emplace_back(compact_[0], pw::OverParamOptions{.expansion = expansion, .tasks = kTasks});
    }

    const pw::Tensor<float>& forward(const pw::Tensor<float>& x, std::size_t t) {
        if (!expand_.empty()) return expand_[t].forward(x);
        if (!shared_.empty()) {
            shared_[0].inner().set_task(t);
            return shared_[0].forward(x);
        }
        return compact_[t].forward(x);
    }
    void backward(const pw::Tensor<float>& g, std::size_t t) {
        if (!expand_.empty()) expand_[t].backward(g);
        else if (!shared_.empty()) shared_[0].backward(g);
        else compact_[t].backward(g);
    }
    template <class F>
    void visit(F&& f) {
        for (auto& m : compact_)
            if (expand_.empty() && shared_.empty()) m.visit(f);
        for (auto& m : expand_) m.visit(f);
        for (auto& m : shared_) m.visit(f);
    }
    /// Multiplies the factors back into the compact heads (nothing for `compact`).
    void collapse() {
        for (auto& m : expand_) m.inner().collapse();
        for (auto& m : shared_) m.inner().collapse();
    }
    void set_input_grad(bool on) {
        for (auto& m : compact_) m.set_input_grad(on);
        for (auto& m : expand_) m.set_input_grad(on);
        for (auto& m : shared_) m.set_input_grad(on);
    }

private:
    std::string method_;
    std::vector<pw::Linear> compact_;
    std::vector<Factored> expand_;
    std::vector<SharedFactored> shared_;
};

struct Run {
    std::array<double, kTasks> accuracy{};
    std::size_t training_parameters = 0, inference_parameters = 0;
    double max_collapse_diff = 0, seconds = 0;
};

/// One task's test logits (x W_t^T + b_t) and how many rows its first C_t get right.
struct Evaluated {
    std::vector<float> logits;
    std::size_t correct = 0;
};

Evaluated evaluate(Heads& h, pw::Parameter<float>& bias, const Features& f, std::size_t t, std::size_t classes) {
    pw::Tensor<float> y = h.forward(f.x, t);
    auto m = y.matrix();
    m.rowwise() += bias.value.matrix().row(0);
    Evaluated e;
    e.logits.assign(y.data(), y.data() + y.size());
    e.correct = pw::count_correct(y, f.labels, classes);
    return e;
}

Run run(const Options& o, const std::array<Task, kTasks>& tasks, std::size_t width, std::string_view method,
        std::uint64_t seed) {
    const std::size_t in = tasks[0].train.x.cols();
    Heads heads(method, in, width, o.expansion, seed);
    heads.set_input_grad(false);
    std::vector<pw::Parameter<float>> biases;
    for (std::size_t t = 0; t < kTasks; ++t) {
        biases.emplace_back("bias", pw::Role::bias, pw::Shape{1, width});
        biases.back().value.zero();
        biases.back().set_prefix("head" + std::to_string(t));
    }
    std::vector<pw::Parameter<float>*> params;
    heads.visit([&](pw::Parameter<float>& p) {
        if (p.trainable()) params.push_back(&p);
    });
    for (auto& b : biases) params.push_back(&b);
    pw::AdamW opt(params, {.lr = o.lr, .weight_decay = 0.01});

    // Every task's batches, shuffled together each epoch.
    struct Slot {
        std::size_t task, begin;
    };
    std::vector<Slot> slots;
    for (std::size_t t = 0; t < kTasks; ++t)
        for (std::size_t b = 0; b < tasks[t].train.labels.size(); b += o.batch) slots.push_back({t, b});
    const std::size_t total = slots.size() * o.epochs;
    const pw::WarmupCosine schedule{.warmup_steps = std::max<std::size_t>(1, total / 10), .total_steps = total};
    std::array<std::vector<std::size_t>, kTasks> order;
    for (std::size_t t = 0; t < kTasks; ++t) order[t] = tx::iota(tasks[t].train.labels.size());
    pw::Rng rng(pw::detail::mix64(seed));
    std::vector<std::size_t> slot_order = tx::iota(slots.size());
    pw::Tensor<float> x;
    std::vector<int> labels;
    std::size_t step = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (std::size_t epoch = 0; epoch < o.epochs; ++epoch) {
        for (auto& ord : order) pw::detail::shuffle_indices(ord, rng);
        pw::detail::shuffle_indices(slot_order, rng);
        for (std::size_t si : slot_order) {
            const Slot s = slots[si];
            const Features& f = tasks[s.task].train;
            const std::size_t n = std::min(f.labels.size(), s.begin + o.batch) - s.begin;
            x.resize(pw::Shape{n, in});
            labels.resize(n);
            for (std::size_t r = 0; r < n; ++r) {
                const std::size_t i = order[s.task][s.begin + r];
                x.matrix().row(r) = f.x.matrix().row(i);
                labels[r] = f.labels[i];
            }
            opt.set_lr_factor(schedule(step++));
            for (auto* p : params) p->grad.zero();
            pw::Tensor<float> y = heads.forward(x, s.task);
            y.matrix().rowwise() += biases[s.task].value.matrix().row(0);
            const std::vector<std::size_t> classes(n, tasks[s.task].classes);
            const auto ce = pw::cross_entropy(y, labels, classes);
            // d(x W^T + b)/db: the column sums of the logits' gradient.
            biases[s.task].grad.matrix().row(0) += ce.grad.matrix().colwise().sum();
            heads.backward(ce.grad, s.task);
            opt.step();
        }
    }
    Run r;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (auto* p : params) r.training_parameters += p->size();

    // Test, collapse, test again: the collapsed heads must compute the same logits.
    std::array<std::vector<float>, kTasks> before;
    for (std::size_t t = 0; t < kTasks; ++t) {
        const Evaluated e = evaluate(heads, biases[t], tasks[t].test, t, tasks[t].classes);
        r.accuracy[t] = double(e.correct) / double(tasks[t].test.labels.size());
        before[t] = e.logits;
    }
    heads.collapse();
    for (std::size_t t = 0; t < kTasks; ++t) {
        const Evaluated e = evaluate(heads, biases[t], tasks[t].test, t, tasks[t].classes);
        for (std::size_t i = 0; i < e.logits.size(); ++i)
            r.max_collapse_diff = std::max(r.max_collapse_diff, double(std::abs(e.logits[i] - before[t][i])));
        // The heads' used rows (C_t of the 26) and their biases: what inference reads.
        r.inference_parameters += tasks[t].classes * (in + 1);
    }
    std::size_t collapsed = 0;
    heads.visit([&](pw::Parameter<float>& p) { collapsed += p.size(); });
    if (collapsed != kTasks * width * in)
        throw pw::Error(pw::detail::concat("text_overparam: ", method, " collapsed into ", collapsed,
                                           " head weights, the compact heads have ", kTasks * width * in));
    return r;
}

}  // namespace

int main(int argc, char** argv) try {
    const Options o = parse(argc, argv);
    if (tx::inputs_missing(o)) return 77;
    const auto t0 = std::chrono::steady_clock::now();
    std::size_t width = 0;
    const auto tasks = load_tasks(o, width);
    std::printf("four tasks, %zu training and %zu test synsets each (data seed %llu), embedded once by the frozen "
                "encoder in %.0f s\n",
                o.train, o.test, (unsigned long long)o.data_seed,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    std::printf("heads %zu wide, expansion %zu (inner width %zu), AdamW lr %g, batch %zu, %zu epochs, %zu seeds from "
                "%llu\n",
                width, o.expansion, o.expansion * width, o.lr, o.batch, o.epochs, o.seeds,
                (unsigned long long)o.seed);
    std::ofstream csv;
    if (!o.csv.empty()) {
        csv.open(o.csv);
        if (!csv) throw pw::IoError("text_overparam: cannot write " + o.csv);
        csv << "method,seed,task,accuracy,training_parameters,inference_parameters,max_collapse_diff,seconds\n";
    }
    std::printf("\n| method | training parameters | inference parameters |");
    for (const char* n : kTaskNames) std::printf(" %s %% |", n);
    std::printf(" mean %% | largest logit change at collapse |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    bool ok = true;
    for (const auto& name : o.methods) {
        const tx::Method& m = tx::find_method("text_overparam", methods(), name);
        std::array<std::vector<double>, kTasks> acc;
        std::vector<double> mean;
        Run last;
        double worst = 0;
        for (std::size_t s = 0; s < o.seeds; ++s) {
            const std::uint64_t seed = o.seed + s;
            last = run(o, tasks, width, m.name, seed);
            worst = std::max(worst, last.max_collapse_diff);
            double sum = 0;
            for (std::size_t t = 0; t < kTasks; ++t) {
                acc[t].push_back(last.accuracy[t]);
                sum += last.accuracy[t];
                if (csv)
                    csv << m.name << ',' << seed << ',' << t << ',' << last.accuracy[t] << ','
                        << last.training_parameters << ',' << last.inference_parameters << ','
                        << last.max_collapse_diff << ',' << last.seconds << '\n';
            }
            mean.push_back(sum / kTasks);
        }
        std::printf("| %s | %zu | %zu |", m.label, last.training_parameters, last.inference_parameters);
        for (std::size_t t = 0; t < kTasks; ++t) {
            const pw::MeanSd a = pw::mean_sd(acc[t]);
            std::printf(" %.1f +- %.1f |", 100 * a.mean, 100 * a.sd);
        }
        const pw::MeanSd a = pw::mean_sd(mean);
        std::printf(" %.1f +- %.1f | %.2g |\n", 100 * a.mean, 100 * a.sd, worst);
        std::fflush(stdout);
        if (!(worst <= 1e-4)) ok = false;
    }
    std::printf("training parameters: every weight, factor and bias that trains (all 26 rows); inference "
                "parameters: the used rows of W_t and b_t\n");
    if (!ok) {
        std::fprintf(stderr, "text_overparam: a collapsed head changed the test logits by more than 1e-4\n");
        return 1;
    }
    return 0;
} catch (const pw::Error& e) {
    tx::report_error("text_overparam", e);
    return 1;
}
