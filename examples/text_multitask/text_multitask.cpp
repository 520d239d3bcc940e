// K tasks for the price of one pre-trained transformer: four WordNet tasks
// share one frozen all-MiniLM-L6-v2, each with its own small patch and head,
// trained jointly with mixed-task batches (a batch's rows belong to different
// tasks), against four separately fine-tuned models and four head-only models.
//
//   task 0  noun supersense   (26 noun lexicographer files)
//   task 1  verb supersense   (15 verb lexicographer files)
//   task 2  adjective kind    (descriptive adj.all against relational adj.pert)
//   task 3  part of speech    (noun, verb, adjective, adverb) of the synset
//   (text: the synset's lemmas and its gloss; io/wordnet.hpp)
//
//   method      per task                                    model
//   head        a head only (the encoder frozen)            MultiTask, no per-task parameters
//   ln          every encoder LayerNorm's scale and shift   NormPatch slots, one bank per task
//   bitfit      every encoder Linear's bias                 BiasOnly slots, one bank per task
//   lora        LoRA r=8, alpha=16 on query and value       LoRA factors, one bank per task
//   finetune    a whole fine-tuned model per task           four BertModel<..., FineTune>, trained separately
//   sequential  LoRA: tasks 0-2 trained jointly, then task 3 added and trained alone
//               (MultiTask::add_task, train_only); the logits of tasks 0-2 must
//               stay bit-identical (the program fails otherwise)
//
// The shared model: the pre-trained embeddings (frozen, shared) feed
// MultiTask<Sequential<BertEncoder, Pooler>, Linear>: the encoder with each
// task's bank bound per row, mean pooling over the real tokens, then the
// row's task head. The LoRA banks run a mixed batch in one encoder pass; the
// LayerNorm and bias banks run it as one pass per task present (same result,
// MultiTask's grouped path). A mixed batch's logits are one [rows, width]
// tensor, so every head of the shared model is as wide as the widest task
// (26); a row's loss (pw::cross_entropy with a class count per row) and
// prediction read only its task's first C_k logits, so the other head rows
// never train or matter, and they are not counted.
//
// Every run: cross-entropy, AdamW (weight decay 0.01), batch --batch, --epochs
// epochs over all tasks' training examples (shuffled together; the separately
// fine-tuned models each see their own task's examples in the same number of
// epochs), 10 % linear warm-up then cosine decay to 0, dropout off. Heads
// train at --head-lr, the method's parameters at its own rate (--lr-METHOD).
// A seed sets the heads, the LoRA factors and the batch order; the data are
// the same for every run (--data-seed).
//
// Data: per task, the seeded 80/10/10 split of wordnet_task, then a random
// subset of --train training and --test test synsets. Printed: test accuracy
// per task (mean +- sample sd over --seeds), parameters added per task and
// their share of the backbone, how much of full fine-tuning's gain over the
// head alone each patch recovers, and training time.
//
//   scripts/fetch-model     # once: caches the model
//   build/examples/text_multitask/text_multitask [--methods head,ln,...] [--seeds 1] [--train 150]
//       [--test 150] [--epochs 2] [--batch 16] [--max-length 64] [--csv FILE] [--model DIR] [--wordnet DIR]
//
// Threads: one, unless the build has OpenMP (then OMP_NUM_THREADS).
// Exit status 77 (and a message) when the model or WordNet is not there.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <patchwork/patchwork.hpp>

#include "../common/text_data.hpp"

namespace pw = patchwork;
namespace fs = std::filesystem;
namespace tx = text_examples;

namespace {

using tx::kTasks;
using tx::kTaskNames;

struct Options : tx::RunOptions {
    Options() {
        methods = {"head", "ln", "bitfit", "lora", "finetune", "sequential"};
        train = 150;  // per task
        test = 150;
    }
};

using tx::Method;

const std::vector<Method>& methods() {
    static const std::vector<Method> m = {
        {"head", "head only (frozen encoder)", 0.0},
        {"ln", "LN scale and shift per task (NormPatch)", 1e-3},
        {"bitfit", "Linear biases per task (BitFit)", 1e-3},
        {"lora", "LoRA r=8 on query, value per task", 5e-4},
        {"finetune", "four separately fine-tuned models", 5e-5},
        {"sequential", "LoRA, task 3 added after tasks 0-2", 5e-4},
    };
    return m;
}

const Method& find_method(std::string_view name) { return tx::find_method("text_multitask", methods(), name); }

Options parse(int argc, char** argv) {
    Options o;
    tx::parse_args("text_multitask", argc, argv, o, [](std::string_view m) { return find_method(m).name; },
                   [](std::string_view, const auto&) { return false; });
    return o;
}

struct Data {
    std::array<tx::Task, kTasks> tasks;
    std::size_t width = 0;  ///< the most classes of any task: the shared model's head width
    std::int32_t pad = 0;
};

Data load_data(const Options& o, const pw::WordPieceTokenizer& tok) {
    Data d;
    d.tasks = tx::load_four_tasks(o, tok);
    d.pad = tok.pad_id();
    for (const tx::Task& t : d.tasks) d.width = std::max(d.width, t.classes);
    return d;
}

/// The pre-trained embeddings and a MultiTask model over the pre-trained
/// encoder, built from BertModel<Encoder, Selection...> (whose policies decide
/// what is trainable, i.e. what becomes per task under `selector`).
template <class Encoder>
struct Shared {
    pw::BertEmbeddings<float> embeddings;
    pw::MultiTask<pw::Sequential<Encoder, pw::Pooler>, pw::Linear> model;

    template <class Model, class Selector>
    Shared(Model&& m, std::vector<pw::Linear> heads, Selector selector)
        : embeddings(std::move(m.embeddings)),
          model(pw::Sequential<Encoder, pw::Pooler>(std::move(m.encoder), pw::Pooler()), std::move(heads), selector) {
        model.set_input_grad(pw::any_trainable(embeddings));
    }
};

/// A head per task of `tasks`, `width` wide (0: the task's own class count).
std::vector<pw::Linear> make_heads(const Data& d, const std::vector<std::size_t>& tasks, std::size_t width,
                                   std::uint64_t seed) {
    std::vector<pw::Linear> heads;
    for (std::size_t k : tasks) {
        heads.emplace_back(std::size_t(384), width ? width : d.tasks[k].classes);
        pw::initialize(heads.back(), pw::detail::mix64(seed * 131 + k));
    }
    return heads;
}

/// Trains `s` on the training examples of `tasks` (task tasks[i] is the
/// model's task i, or model task `as_task` for a single task), all rows of all
/// tasks shuffled together into mixed batches. Heads train at head_lr, every
/// other trainable parameter (banks, shared weights, embeddings) at lr.
/// Returns the training seconds.
template <class S>
double train_mixed(S& s, const Data& d, const std::vector<std::size_t>& tasks, const std::vector<int>& model_task,
                   const Options& o, double lr, std::uint64_t seed, const char* name) {
    std::vector<pw::Parameter<float>*> heads, rest;
    for (int k : model_task)
        for (auto* p : pw::trainable_parameters(s.model.head(k))) heads.push_back(p);
    const auto is_head = [&](const pw::Parameter<float>* p) {
        return std::find(heads.begin(), heads.end(), p) != heads.end();
    };
    for (auto* p : pw::trainable_parameters(s.model))
        if (!is_head(p)) rest.push_back(p);
    for (auto* p : pw::trainable_parameters(s.embeddings)) rest.push_back(p);
    pw::AdamW opt(heads, {.lr = o.head_lr, .weight_decay = 0.01});
    if (!rest.empty()) opt.add_group(rest, {.lr = lr, .weight_decay = 0.01});

    struct Row {
        std::size_t slot;  ///< index into tasks / model_task
        std::size_t index;
    };
    std::vector<Row> rows;
    for (std::size_t i = 0; i < tasks.size(); ++i)
        for (std::size_t j = 0; j < d.tasks[tasks[i]].train.size(); ++j) rows.push_back({i, j});
    const std::size_t n = rows.size(), steps_per_epoch = (n + o.batch - 1) / o.batch;
    const std::size_t total = steps_per_epoch * o.epochs;
    const pw::WarmupCosine schedule{.warmup_steps = std::max<std::size_t>(1, total / 10), .total_steps = total};
    std::vector<std::size_t> order = tx::iota(n);
    pw::Rng rng(pw::detail::mix64(seed));
    const bool embeddings_train = pw::any_trainable(s.embeddings);
    std::vector<tx::RowRef> refs;
    std::vector<int> labels, ids;
    std::vector<std::size_t> classes;
    std::size_t step = 0;
    double seconds = 0;
    for (std::size_t epoch = 0; epoch < o.epochs; ++epoch) {
        pw::detail::shuffle_indices(order, rng);
        const auto t0 = std::chrono::steady_clock::now();
        double loss_sum = 0;
        for (std::size_t b = 0; b < n; b += o.batch) {
            refs.clear();
            ids.clear();
            classes.clear();
            for (std::size_t k = b; k < std::min(n, b + o.batch); ++k) {
                const Row& r = rows[order[k]];
                refs.push_back({&d.tasks[tasks[r.slot]].train, r.index});
                ids.push_back(model_task[r.slot]);
                classes.push_back(d.tasks[tasks[r.slot]].classes);
            }
            const pw::TokenBatch x = tx::make_batch(refs, d.pad, labels);
            opt.set_lr_factor(schedule(step++));
            pw::zero_grad(s.model);
            if (embeddings_train) pw::zero_grad(s.embeddings);
            pw::AttentionMask scope(x.mask, x.batch, x.tokens);
            const auto& z = s.model.forward(s.embeddings.forward(x), ids);
            const pw::Loss<float> ce = pw::cross_entropy(z, labels, classes);
            const auto& dh = s.model.backward(ce.grad);
            if (embeddings_train) s.embeddings.backward(dh);
            opt.step();
            loss_sum += ce.value;
        }
        seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (!o.quiet)
            std::printf("    %-10s seed %llu  epoch %zu: mean loss %.4f  (%.1f s)\n", name, (unsigned long long)seed,
                        epoch + 1, loss_sum / double(steps_per_epoch), seconds);
    }
    return seconds;
}

/// Test logits of data task `task` through model task `as_task`, and its accuracy.
template <class S>
double evaluate(S& s, const Data& d, std::size_t task, int as_task, std::vector<float>* logits = nullptr) {
    const tx::Split& test = d.tasks[task].test;
    const std::vector<std::size_t> all = tx::iota(test.size());
    std::vector<int> labels;
    std::size_t correct = 0;
    for (std::size_t b = 0; b < all.size(); b += 64) {
        const pw::TokenBatch x = tx::make_batch(test, all, b, std::min(all.size(), b + 64), d.pad, labels);
        pw::AttentionMask scope(x.mask, x.batch, x.tokens);
        const auto& z = s.model.forward(s.embeddings.forward(x), as_task);
        correct += pw::count_correct(z, labels, d.tasks[task].classes);
        if (logits) logits->insert(logits->end(), z.data(), z.data() + z.size());
    }
    return double(correct) / double(test.size());
}

struct RunResult {
    std::array<double, kTasks> accuracy{};
    std::size_t per_task = 0;  ///< encoder parameters one task adds (its bank; the whole model for finetune)
    double seconds = 0;        ///< training
    bool identical = true;     ///< sequential: tasks 0-2 unchanged by adding task 3
};

std::uint64_t head_width_scalars(const Data& d, std::size_t k) { return 384 * d.tasks[k].classes + d.tasks[k].classes; }

/// The shared model: every task's bank selected by the BertModel's policies.
template <class Spec, class... Selection>
RunResult run_shared(const Options& o, const Data& d, const Method& m, double lr, std::uint64_t seed) {
    pw::manual_seed(seed);  // the LoRA factors are drawn at construction
    using Encoder = pw::BertEncoder<Spec>;
    auto bert = pw::hf::load_bert<pw::BertModel<Encoder, Selection...>>(o.model);
    bert.embeddings.visit([](pw::Parameter<float>& p) { p.set_trainable(false); });  // shared and frozen
    const bool sequential = std::string_view(m.name) == "sequential";
    const std::vector<std::size_t> first = sequential ? std::vector<std::size_t>{0, 1, 2} : std::vector<std::size_t>{0, 1, 2, 3};
    Shared<Encoder> s(std::move(bert), make_heads(d, first, d.width, seed), pw::PerTaskTrainable{});
    RunResult r;
    r.per_task = s.model.patch_size();
    std::vector<int> ids(first.begin(), first.end());
    r.seconds = train_mixed(s, d, first, ids, o, lr, seed, m.name);
    if (!sequential) {
        for (std::size_t k = 0; k < kTasks; ++k) r.accuracy[k] = evaluate(s, d, k, int(k));
        return r;
    }
    // Sequential transfer: task 3 joins later; only its bank and head train.
    std::vector<float> before, after;
    for (std::size_t k = 0; k < 3; ++k) r.accuracy[k] = evaluate(s, d, k, int(k), &before);
    const int added = s.model.add_task(std::move(make_heads(d, {3}, d.width, seed).front()));
    s.model.train_only(added);
    r.seconds += train_mixed(s, d, {3}, {added}, o, lr, seed + 1000, m.name);
    for (std::size_t k = 0; k < 3; ++k) (void)evaluate(s, d, k, int(k), &after);
    r.identical = before.size() == after.size() &&
                  std::memcmp(before.data(), after.data(), before.size() * sizeof(float)) == 0;
    r.accuracy[3] = evaluate(s, d, 3, added);
    if (!o.quiet)
        std::printf("    sequential: %zu test logits of tasks 0-2 after adding task 3: %s\n", before.size(),
                    r.identical ? "bit-identical" : "CHANGED");
    return r;
}

/// Four separately fine-tuned models, each a one-task MultiTask with every
/// parameter shared (none per task) and trainable, embeddings included.
RunResult run_finetune(const Options& o, const Data& d, const Method& m, double lr, std::uint64_t seed) {
    RunResult r;
    for (std::size_t k = 0; k < kTasks; ++k) {
        auto bert = pw::hf::load_bert<pw::BertModel<pw::BertEncoder<>, pw::FineTune>>(o.model);
        r.per_task = pw::trainable_count(bert);
        Shared<pw::BertEncoder<>> s(std::move(bert), make_heads(d, {k}, 0, seed), pw::PerTaskRoles{0});
        r.seconds += train_mixed(s, d, {k}, {0}, o, lr, seed + k, m.name);
        r.accuracy[k] = evaluate(s, d, k, 0);
    }
    return r;
}

RunResult run_method(const Options& o, const Data& d, const Method& m, std::uint64_t seed) {
    const double lr = o.lr.contains(m.name) ? o.lr.at(m.name) : m.lr;
    const std::string_view name = m.name;
    if (name == "head") return run_shared<pw::bert::Plain>(o, d, m, lr, seed);
    if (name == "ln") return run_shared<pw::bert::Plain, pw::NormPatch>(o, d, m, lr, seed);
    if (name == "bitfit") return run_shared<pw::bert::Plain, pw::BiasOnly>(o, d, m, lr, seed);
    if (name == "lora" || name == "sequential") return run_shared<pw::bert::LoRAQueryValue<8, 16>>(o, d, m, lr, seed);
    return run_finetune(o, d, m, lr, seed);
}

}  // namespace

int main(int argc, char** argv) try {
    const Options o = parse(argc, argv);
    if (tx::inputs_missing(o)) return 77;
    const auto tok = pw::WordPieceTokenizer::from_vocab(o.model / "vocab.txt");
    const Data d = load_data(o, tok);
    for (std::size_t k = 0; k < kTasks; ++k)
        std::printf("task %zu, %s: %zu classes, %zu training and %zu test synsets\n", k, kTaskNames[k],
                    d.tasks[k].classes, d.tasks[k].train.size(), d.tasks[k].test.size());
    std::printf("%zu epochs, batch %zu (mixed tasks), AdamW (weight decay 0.01), 10%% warm-up then cosine, head lr %g, "
                "at most %zu tokens, %zu seeds from %llu, data seed %llu\n",
                o.epochs, o.batch, o.head_lr, o.max_length, o.seeds, (unsigned long long)o.seed,
                (unsigned long long)o.data_seed);

    std::ofstream csv;
    if (!o.csv.empty()) {
        csv.open(o.csv);
        if (!csv) throw pw::IoError("text_multitask: cannot write " + o.csv);
        csv << "method,seed,task,accuracy,per_task,seconds\n";
    }
    struct Row {
        const Method* m;
        std::array<std::vector<double>, kTasks> acc;
        std::vector<double> secs;
        std::size_t per_task = 0;
        bool identical = true;
    };
    std::vector<Row> rows;
    for (const auto& name : o.methods) {
        const Method& m = find_method(name);
        Row row{&m, {}, {}, 0, true};
        for (std::size_t i = 0; i < o.seeds; ++i) {
            const std::uint64_t seed = o.seed + i;
            const RunResult r = run_method(o, d, m, seed);
            for (std::size_t k = 0; k < kTasks; ++k) row.acc[k].push_back(r.accuracy[k]);
            row.secs.push_back(r.seconds);
            row.per_task = r.per_task;
            row.identical = row.identical && r.identical;
            std::printf("  %-10s seed %llu: accuracy %.4f %.4f %.4f %.4f, %zu encoder parameters per task, %.1f s\n",
                        m.name, (unsigned long long)seed, r.accuracy[0], r.accuracy[1], r.accuracy[2], r.accuracy[3],
                        r.per_task, r.seconds);
            std::fflush(stdout);
            if (csv)
                for (std::size_t k = 0; k < kTasks; ++k)
                    csv << m.name << ',' << seed << ',' << k << ',' << r.accuracy[k] << ',' << r.per_task << ','
                        << r.seconds << '\n';
        }
        rows.push_back(std::move(row));
    }

    pw::BertModel<pw::BertEncoder<>> shape_only(pw::hf::read_bert_config(o.model / "config.json"));
    const std::size_t backbone = pw::parameter_count(shape_only);
    std::printf("\nTest accuracy %% (mean +- sd over seeds); per task: encoder parameters one task adds besides its "
                "head (heads: %llu, %llu, %llu, %llu), %% of the %zu-parameter backbone.\n\n",
                (unsigned long long)head_width_scalars(d, 0), (unsigned long long)head_width_scalars(d, 1),
                (unsigned long long)head_width_scalars(d, 2), (unsigned long long)head_width_scalars(d, 3), backbone);
    std::printf("| method | per task | %% of backbone | %s | %s | %s | %s | mean | training s |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
                kTaskNames[0], kTaskNames[1], kTaskNames[2], kTaskNames[3]);
    const Row* head = nullptr;
    const Row* full = nullptr;
    for (const Row& r : rows) {
        head = std::string_view(r.m->name) == "head" ? &r : head;
        full = std::string_view(r.m->name) == "finetune" ? &r : full;
        std::printf("| %s | %zu | %.3f %% |", r.m->label, r.per_task, 100.0 * double(r.per_task) / double(backbone));
        double mean = 0;
        for (std::size_t k = 0; k < kTasks; ++k) {
            const pw::MeanSd a = pw::mean_sd(r.acc[k]);
            mean += a.mean / kTasks;
            std::printf(" %.1f +- %.1f |", 100 * a.mean, 100 * a.sd);
        }
        std::printf(" %.1f | %.0f |\n", 100 * mean, pw::mean_sd(r.secs).mean);
    }
    if (head && full) {
        std::printf("\nShare of full fine-tuning's gain over the head alone, (patch - head) / (finetune - head), from "
                    "the mean accuracies:\n\n| method | %s | %s | %s | %s |\n|---|---:|---:|---:|---:|\n",
                    kTaskNames[0], kTaskNames[1], kTaskNames[2], kTaskNames[3]);
        for (const Row& r : rows) {
            if (&r == head || &r == full) continue;
            std::printf("| %s |", r.m->label);
            for (std::size_t k = 0; k < kTasks; ++k) {
                const double h = pw::mean_sd(head->acc[k]).mean, f = pw::mean_sd(full->acc[k]).mean;
                const double p = pw::mean_sd(r.acc[k]).mean;
                if (f > h) std::printf(" %.0f %% |", 100 * (p - h) / (f - h));
                else std::printf(" (no gain) |");
            }
            std::printf("\n");
        }
    }
    std::printf("peak resident memory of this process: %.0f MiB\n", tx::peak_rss_mib());
    for (const Row& r : rows)
        if (!r.identical) {
            std::fprintf(stderr, "text_multitask: adding task 3 changed the outputs of tasks 0-2\n");
            return 1;
        }
    return 0;
} catch (const pw::Error& e) {
    tx::report_error("text_multitask", e);
    return 1;
}
