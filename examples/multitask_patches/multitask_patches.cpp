// K tasks for the price of one backbone, on Fashion-MNIST.
//
// 1. Pre-train a small MobileNet-style CNN on classes 0-6 (mobilenet.hpp, which
//    examples/gpu_multitask builds on the device):
//      Unflatten(28x28x1)  Conv 3x3/2 (1->32) BN ReLU
//      [DW 3x3 (32) BN ReLU  PW 1x1 (32->64) BN ReLU]
//      [DW 3x3/2 (64) BN ReLU  PW 1x1 (64->128) BN ReLU]  GlobalAvgPool -> 128 features
// 2. Four tasks share it, each with its own patch and head:
//      task 0  the 10 classes
//      task 1  a coarse grouping: tops {0,2,4,6}, trousers and dresses {1,3}, footwear {5,7,9}, bags {8}
//      task 2  the 10 classes on inverted images (1 - x)
//      task 3  classes 7, 8, 9 only: never seen in pre-training
// 3. For each patch type (head only, BiasOnly, NormPatch, DepthwisePatch,
//    Adapter<8>) and for full fine-tuning (every parameter per task), train each
//    task on its own (single-task). Then train NormPatch banks jointly with
//    fit_multitask: with the shared weights frozen (the same trainable set as
//    single-task NormPatch; round robin, proportional, and proportional with
//    one optimiser state per task), and with the shared weights trained by all
//    tasks. Print accuracy per task, parameters per task (% of the backbone),
//    and storage for the K tasks.
// 4. With --seeds N, repeat all of it (pre-training included) for seeds
//    seed, seed+1, ..., seed+N-1 and print mean +- sample standard deviation
//    per row and task; --csv FILE writes one line per (seed, row, task).
#include <chrono>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <patchwork/patchwork.hpp>

#include "../common/cli.hpp"
#include "mobilenet.hpp"

namespace pw = patchwork;

namespace {

using Body = mobilenet::Body<>;
using mobilenet::kFeatures;
using mobilenet::kTasks;

Body make_body() { return mobilenet::make_body(); }

struct Options {
    std::size_t pretrain_epochs = 6;
    std::size_t epochs = 5;
    std::size_t train = 3000;  ///< training images per task (the first N of the split)
    std::size_t test = 2000;   ///< test images (the first N of the split)
    std::size_t pretrain = 4000;  ///< training images after the tasks' ones; classes 0-6 of them pre-train
    std::size_t batch = 64;
    double lr = 5e-3;
    double joint_lr = 0;  ///< learning rate of the joint row whose shared weights train; 0: lr / 2
    std::uint64_t seed = 1;
    std::size_t seeds = 1;
    std::string csv;
    std::string data_dir = pw::fashion_mnist_default_dir;
    bool quiet = false;
};

constexpr const char* kUsage =
    "usage: multitask_patches [--pretrain-epochs N] [--pretrain N] [--epochs N] [--train N] [--test N] [--batch N]\n"
    "                         [--lr X] [--joint-lr X] [--seed N] [--seeds N] [--csv FILE] [--data DIR] [--quiet]\n"
    "  --pretrain N  pre-training pool: the N training images after the tasks' (default 4000; classes 0-6 used)\n"
    "  --seeds N     run everything (pre-training included) for seeds seed .. seed+N-1 (default 1)\n"
    "  --csv FILE    write seed,row,task,accuracy,parameters per line (for plot.py)\n"
    "  --joint-lr X  learning rate of the joint row whose shared weights train (default lr / 2)";

using example_cli::bad;
using example_cli::parse_positive;
using example_cli::parse_uint;

Options parse(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        const auto value = [&]() -> std::string {
            if (i + 1 >= argc) bad(std::string(a) + " needs a value");
            return argv[++i];
        };
        if (a == "--help" || a == "-h") {
            std::puts(kUsage);
            std::exit(0);
        } else if (a == "--pretrain-epochs") o.pretrain_epochs = parse_uint(a, value(), 1);
        else if (a == "--pretrain") o.pretrain = parse_uint(a, value(), 64);
        else if (a == "--epochs") o.epochs = parse_uint(a, value(), 1);
        else if (a == "--train") o.train = parse_uint(a, value(), 64);
        else if (a == "--test") o.test = parse_uint(a, value(), 10);
        else if (a == "--batch") o.batch = parse_uint(a, value(), 1);
        else if (a == "--lr") o.lr = parse_positive(a, value());
        else if (a == "--joint-lr") o.joint_lr = parse_positive(a, value());
        else if (a == "--seed") o.seed = parse_uint(a, value(), 0);
        else if (a == "--seeds") o.seeds = parse_uint(a, value(), 1);
        else if (a == "--csv") {
            o.csv = value();
            if (o.csv.empty()) bad("--csv needs a file name");
        } else if (a == "--data") o.data_dir = value();
        else if (a == "--quiet") o.quiet = true;
        else bad("unknown option " + std::string(a));
    }
    if (o.train + o.pretrain > 60000)
        bad("--train + --pretrain must be at most 60000 (the training split), got " +
            std::to_string(o.train + o.pretrain));
    if (o.seeds > 1000) bad("--seeds must be at most 1000, got " + std::to_string(o.seeds));
    if (o.joint_lr == 0) o.joint_lr = o.lr / 2;
    return o;
}

/// The four tasks' train and test sets, and their class counts.
struct Tasks {
    std::vector<pw::Dataset<float>> train, test;
    std::vector<std::size_t> classes;
};

struct Result {
    std::string name;
    std::vector<double> accuracy;
    std::size_t per_task = 0;  ///< parameters one task adds (bank + statistics + head)
    std::size_t patch = 0;     ///< of which the bank (the trained backbone parameters)
    std::size_t shared = 0;    ///< parameters stored once
    double seconds = 0;
};

template <class MT>
void count(MT& m, Result& r) {
    r.patch = m.patch_size();
    m.visit([&](pw::Parameter<float>& p) {
        if (p.task() == pw::shared_task) r.shared += p.size();
        else if (p.task() == 0) r.per_task += p.size();
    });
}

template <class MT>
void evaluate_all(MT& m, const Tasks& t, Result& r) {
    pw::set_training(m, false);
    for (std::size_t k = 0; k < kTasks; ++k) {
        pw::Batcher<float> test(t.test[k], {.batch_size = 500, .shuffle = false});
        r.accuracy.push_back(pw::evaluate_task(m, int(k), test).accuracy);
    }
}

std::vector<pw::Linear> make_heads(const Tasks& t, std::uint64_t seed) {
    pw::manual_seed(seed);
    std::vector<pw::Linear> h;
    for (std::size_t k = 0; k < kTasks; ++k) h.emplace_back(kFeatures, t.classes[k]);
    return h;
}

double since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Each task trained on its own: only its bank and head train.
template <class MT>
Result single_task(const std::string& name, MT& m, const Tasks& t, const Options& o, std::uint64_t seed,
                   bool batch_norm_training) {
    Result r{name, {}, 0, 0, 0};
    count(m, r);
    const auto t0 = std::chrono::steady_clock::now();
    for (std::size_t k = 0; k < kTasks; ++k) {
        m.train_only(int(k));
        m.set_active_task(int(k));
        pw::set_training(m, batch_norm_training);
        pw::Batcher<float> batches(t.train[k], {.batch_size = o.batch, .seed = seed + k});
        pw::AdamW opt{pw::trainable_parameters(m), {.lr = o.lr, .weight_decay = 1e-4}};
        const std::size_t steps = o.epochs * batches.batches();
        pw::fit(m, opt, batches,
                {.epochs = o.epochs, .schedule = pw::WarmupCosine{steps / 20, steps}, .log_every = 0, .verbose = false});
    }
    r.seconds = since(t0);
    evaluate_all(m, t, r);
    if (!o.quiet) std::printf("  %-44s done in %.1f s\n", name.c_str(), r.seconds);
    return r;
}

// -- joint training --------------------------------------------------------------

/// One task's batches; notes in *drawn which task fit_multitask took a batch of last.
struct TaggedSource {
    using Scalar = float;
    pw::Batcher<float> source;
    int task = 0;
    int* drawn = nullptr;

    void start_epoch(std::size_t epoch) { source.start_epoch(epoch); }
    [[nodiscard]] std::size_t batches() const noexcept { return source.batches(); }
    [[nodiscard]] const pw::Batch<float>& batch(std::size_t i) {
        *drawn = task;
        return source.batch(i);
    }
};

/// One AdamW over every trainable parameter; the learning rate follows a
/// warm-up + cosine schedule over all of fit_multitask's steps.
struct ScheduledAdamW {
    using Scalar = float;
    pw::AdamW opt;
    pw::WarmupCosine schedule;
    std::size_t steps = 0;

    void step() {
        opt.set_lr_factor(schedule(steps++));
        opt.step();
    }
    void zero_grad() { opt.zero_grad(); }
    void set_lr_factor(double f) { opt.set_lr_factor(f); }
    [[nodiscard]] double lr() const { return opt.lr(); }
};

/// One AdamW per task (its bank and head), stepped only on that task's
/// batches, each with its own warm-up + cosine schedule over its own steps:
/// what single-task training does, interleaved. Needs the shared weights frozen.
struct PerTaskAdamW {
    using Scalar = float;
    std::vector<std::unique_ptr<pw::AdamW>> opts;
    std::vector<pw::WarmupCosine> schedules;
    std::vector<std::size_t> steps;
    const int* drawn = nullptr;

    void step() {
        const auto k = std::size_t(*drawn);
        opts[k]->set_lr_factor(schedules[k](steps[k]++));
        opts[k]->step();
    }
    void zero_grad() {
        for (auto& o : opts) o->zero_grad();
    }
    void set_lr_factor(double f) {
        for (auto& o : opts) o->set_lr_factor(f);
    }
    [[nodiscard]] double lr() const { return opts.front()->lr(); }
};

enum class JointOptimiser { one_for_all, per_task };

/// All tasks trained together with fit_multitask (BatchNorm in training mode,
/// AdamW weight decay 1e-4, warm-up 5% + cosine decay, o.epochs epochs of
/// fit_multitask: each epoch is as many steps as the four task sets have batches).
template <class MT>
Result joint(const std::string& name, MT& m, const Tasks& t, const Options& o, std::uint64_t seed, double lr,
             pw::TaskSampling sampling, JointOptimiser which) {
    Result r{name, {}, 0, 0, 0};
    count(m, r);
    int drawn = 0;
    std::vector<TaggedSource> sources;
    std::size_t total = 0;
    for (std::size_t k = 0; k < kTasks; ++k) {
        sources.push_back({pw::Batcher<float>(t.train[k], {.batch_size = o.batch, .seed = seed + k}), int(k), &drawn});
        total += sources.back().batches();
    }
    total *= o.epochs;
    pw::set_training(m, true);
    const pw::MultiTaskTrainOptions fit_options{.epochs = o.epochs, .sampling = sampling, .seed = seed};
    const auto t0 = std::chrono::steady_clock::now();
    if (which == JointOptimiser::one_for_all) {
        ScheduledAdamW opt{pw::AdamW{pw::trainable_parameters(m), {.lr = lr, .weight_decay = 1e-4}},
                           pw::WarmupCosine{total / 20, total}};
        pw::fit_multitask(m, opt, sources, fit_options);
    } else {
        PerTaskAdamW opt;
        opt.drawn = &drawn;
        for (std::size_t k = 0; k < kTasks; ++k) {
            std::vector<pw::Parameter<float>*> params;
            for (auto* p : pw::trainable_parameters(m)) {
                if (p->task() == pw::shared_task)
                    throw pw::ConfigError("one optimiser per task needs the shared weights frozen");
                if (p->task() == int(k)) params.push_back(p);
            }
            opt.opts.push_back(std::make_unique<pw::AdamW>(params, pw::AdamWOptions{.lr = lr, .weight_decay = 1e-4}));
            const std::size_t steps = o.epochs * sources[k].batches();  // what single-task training takes
            opt.schedules.push_back(pw::WarmupCosine{steps / 20, steps});
            opt.steps.push_back(0);
        }
        pw::fit_multitask(m, opt, sources, fit_options);
    }
    r.seconds = since(t0);
    evaluate_all(m, t, r);
    if (!o.quiet) std::printf("  %-44s done in %.1f s\n", r.name.c_str(), r.seconds);
    return r;
}

// -- one seed --------------------------------------------------------------------

struct Data {
    pw::Dataset<float> pre_train, pre_test;
    Tasks t;
};

struct SeedRun {
    double pretrained_accuracy = 0;
    std::size_t backbone = 0;
    std::vector<Result> rows;
    double seconds = 0;
};

SeedRun run_seed(const Data& d, const Options& o, std::uint64_t seed) {
    const Tasks& t = d.t;
    const auto t_start = std::chrono::steady_clock::now();
    SeedRun run;
    pw::manual_seed(seed);
    // 1. Pre-train.
    pw::Sequential<Body, pw::Linear> base(make_body(), pw::Linear(kFeatures, 7));
    base.set_input_grad(false);
    {
        pw::Batcher<float> batches(d.pre_train, {.batch_size = o.batch, .seed = seed});
        pw::AdamW opt{pw::trainable_parameters(base), {.lr = 5e-3, .weight_decay = 1e-4}};
        const std::size_t steps = o.pretrain_epochs * batches.batches();
        pw::fit(base, opt, batches,
                {.epochs = o.pretrain_epochs, .schedule = pw::WarmupCosine{steps / 20, steps}, .log_every = 0,
                 .verbose = !o.quiet});
        pw::set_training(base, false);
        pw::Batcher<float> tb(d.pre_test, {.batch_size = 500, .shuffle = false});
        run.pretrained_accuracy = pw::evaluate(base, tb).accuracy;
        std::printf("seed %llu: pre-trained accuracy on classes 0-6: %.2f%%\n", (unsigned long long)seed,
                    100 * run.pretrained_accuracy);
    }
    const Body& body = base.get<0>();
    run.backbone = pw::parameter_count(const_cast<Body&>(body));
    const std::uint64_t head_seed = seed + 6;  // every row starts from the same heads
    auto& rows = run.rows;

    {
        pw::MultiTask<pw::Tune<Body, pw::Frozen>, pw::Linear> m(pw::Tune<Body, pw::Frozen>(body),
                                                                make_heads(t, head_seed));
        rows.push_back(single_task("head only", m, t, o, seed, false));
    }
    {
        pw::MultiTask<pw::Tune<Body, pw::BiasOnly>, pw::Linear> m(pw::Tune<Body, pw::BiasOnly>(body),
                                                                  make_heads(t, head_seed));
        rows.push_back(single_task("BiasOnly + head", m, t, o, seed, true));
    }
    {
        pw::MultiTask<pw::Tune<Body, pw::NormPatch>, pw::Linear> m(pw::Tune<Body, pw::NormPatch>(body),
                                                                   make_heads(t, head_seed));
        rows.push_back(single_task("NormPatch + head", m, t, o, seed, true));
    }
    {
        pw::MultiTask<pw::Tune<Body, pw::DepthwisePatch>, pw::Linear> m(pw::Tune<Body, pw::DepthwisePatch>(body),
                                                                        make_heads(t, head_seed));
        rows.push_back(single_task("DepthwisePatch + head", m, t, o, seed, true));
    }
    {
        using Tuned = pw::Tune<Body, pw::Adapter<8>>;
        pw::MultiTask<Tuned, pw::Linear> m(Tuned(body), make_heads(t, head_seed));
        rows.push_back(single_task("Adapter<8> + head", m, t, o, seed, true));
    }
    {
        // Every parameter per task: K independent fully fine-tuned models.
        pw::MultiTask<pw::Tune<Body, pw::FineTune>, pw::Linear> m(pw::Tune<Body, pw::FineTune>(body),
                                                                  make_heads(t, head_seed));
        rows.push_back(single_task("FineTune (K full models)", m, t, o, seed, true));
    }
    // Joint, shared weights frozen: exactly the trainable set of "NormPatch + head".
    {
        pw::MultiTask<pw::Tune<Body, pw::NormPatch>, pw::Linear> m(pw::Tune<Body, pw::NormPatch>(body),
                                                                   make_heads(t, head_seed));
        rows.push_back(joint("NormPatch joint (shared frozen)", m, t, o, seed, o.lr, pw::TaskSampling::round_robin,
                             JointOptimiser::one_for_all));
    }
    {
        pw::MultiTask<pw::Tune<Body, pw::NormPatch>, pw::Linear> m(pw::Tune<Body, pw::NormPatch>(body),
                                                                   make_heads(t, head_seed));
        rows.push_back(joint("NormPatch joint (shared frozen, proportional)", m, t, o, seed, o.lr,
                             pw::TaskSampling::proportional, JointOptimiser::one_for_all));
    }
    {
        pw::MultiTask<pw::Tune<Body, pw::NormPatch>, pw::Linear> m(pw::Tune<Body, pw::NormPatch>(body),
                                                                   make_heads(t, head_seed));
        rows.push_back(joint("NormPatch joint (shared frozen, prop., per-task opt.)", m, t, o, seed, o.lr,
                             pw::TaskSampling::proportional, JointOptimiser::per_task));
    }
    {
        // Norm banks per task, every other backbone weight shared and trained by all tasks.
        constexpr unsigned norm = pw::role_bit(pw::Role::norm_scale) | pw::role_bit(pw::Role::norm_shift);
        pw::MultiTask<pw::Tune<Body, pw::FineTune>, pw::Linear> m(pw::Tune<Body, pw::FineTune>(body),
                                                                  make_heads(t, head_seed), pw::PerTaskRoles{norm});
        rows.push_back(joint("NormPatch joint (shared trains)", m, t, o, seed, o.joint_lr,
                             pw::TaskSampling::round_robin, JointOptimiser::one_for_all));
    }
    run.seconds = since(t_start);
    return run;
}

// -- reporting -------------------------------------------------------------------

std::string fmt(pw::MeanSd s, bool with_sd) {
    char buf[64];
    if (with_sd) std::snprintf(buf, sizeof buf, "%6.2f +- %4.2f", s.mean, s.sd);
    else std::snprintf(buf, sizeof buf, "%6.2f", s.mean);
    return buf;
}

double mean_of(const std::vector<double>& v) {
    double m = 0;
    for (double x : v) m += x;
    return m / double(v.size());
}

void print_seed_table(const SeedRun& run) {
    std::printf("%-54s %8s %8s %8s %8s %8s %10s %9s %12s %8s\n", "patch", "task0", "task1", "task2", "task3", "bank",
                "% backbone", "per task", "K-task store", "time(s)");
    for (const auto& r : run.rows) {
        std::printf("%-54s", r.name.c_str());
        for (double a : r.accuracy) std::printf(" %7.2f%%", 100 * a);
        std::printf(" %8zu %9.2f%% %9zu %12zu %8.1f\n", r.patch, 100.0 * double(r.patch) / double(run.backbone),
                    r.per_task, r.shared + kTasks * r.per_task, r.seconds);
    }
}

/// Accuracy (%) of row `row`, task `task` (task == kTasks: mean over tasks), one value per seed.
std::vector<double> values(const std::vector<SeedRun>& runs, std::size_t row, std::size_t task) {
    std::vector<double> v;
    for (const auto& run : runs)
        v.push_back(100 * (task < kTasks ? run.rows[row].accuracy[task] : mean_of(run.rows[row].accuracy)));
    return v;
}

std::size_t find_row(const std::vector<SeedRun>& runs, const std::string& name) {
    for (std::size_t i = 0; i < runs[0].rows.size(); ++i)
        if (runs[0].rows[i].name == name) return i;
    throw pw::Error("no row named " + name);
}

void print_summary(const std::vector<SeedRun>& runs, const std::vector<std::uint64_t>& seeds) {
    const bool sd = runs.size() > 1;
    const auto& rows = runs[0].rows;
    std::vector<double> pre;
    for (const auto& run : runs) pre.push_back(100 * run.pretrained_accuracy);
    std::printf("\n== %zu seed%s (", runs.size(), runs.size() > 1 ? "s" : "");
    for (std::size_t i = 0; i < seeds.size(); ++i)
        std::printf("%s%llu", i ? ", " : "", (unsigned long long)seeds[i]);
    std::printf("): accuracy (%%)%s ==\n", sd ? ", mean +- sample standard deviation" : "");
    std::printf("pre-trained accuracy on classes 0-6: %s%%\n", fmt(pw::mean_sd(pre), sd).c_str());
    const int w = sd ? 14 : 6;
    std::printf("%-54s %*s %*s %*s %*s %*s %10s %9s %8s\n", "patch", w, "task0", w, "task1", w, "task2", w, "task3", w,
                "mean", "% backbone", "per task", "time(s)");
    for (std::size_t i = 0; i < rows.size(); ++i) {
        std::printf("%-54s", rows[i].name.c_str());
        for (std::size_t k = 0; k <= kTasks; ++k) std::printf(" %s", fmt(pw::mean_sd(values(runs, i, k)), sd).c_str());
        std::vector<double> secs;
        for (const auto& run : runs) secs.push_back(run.rows[i].seconds);
        std::printf(" %9.2f%% %9zu %8.1f\n", 100.0 * double(rows[i].patch) / double(runs[0].backbone),
                    rows[i].per_task, pw::mean_sd(secs).mean);
    }

    // Share of full fine-tuning's gain over head-only training, on the seed means.
    const std::size_t head = find_row(runs, "head only"), full = find_row(runs, "FineTune (K full models)");
    std::printf("\nshare of FineTune's gain over head only (%% of (FineTune - head only), on the means):\n");
    std::printf("%-54s %7s %7s %7s %7s %7s\n", "patch", "task0", "task1", "task2", "task3", "mean");
    for (std::size_t i = 0; i < rows.size(); ++i) {
        if (i == head || i == full) continue;
        std::printf("%-54s", rows[i].name.c_str());
        for (std::size_t k = 0; k <= kTasks; ++k) {
            const double h = pw::mean_sd(values(runs, head, k)).mean, f = pw::mean_sd(values(runs, full, k)).mean;
            std::printf(" %6.0f%%", 100 * (pw::mean_sd(values(runs, i, k)).mean - h) / (f - h));
        }
        std::printf("\n");
    }

    // Joint against single-task, paired by seed (same pre-trained backbone and heads).
    const std::size_t single = find_row(runs, "NormPatch + head");
    std::printf("\njoint minus single-task, accuracy points, paired by seed%s:\n",
                sd ? " (mean +- sample standard deviation of the differences)" : "");
    std::printf("%-54s %-26s %*s %*s %*s %*s %*s\n", "joint row", "against", w, "task0", w, "task1", w, "task2", w,
                "task3", w, "mean");
    for (std::size_t i = 0; i < rows.size(); ++i) {
        if (rows[i].name.rfind("NormPatch joint", 0) != 0) continue;
        const bool frozen = rows[i].name.find("shared frozen") != std::string::npos;
        const std::size_t ref = frozen ? single : full;
        std::printf("%-54s %-26s", rows[i].name.c_str(), rows[ref].name.c_str());
        for (std::size_t k = 0; k <= kTasks; ++k) {
            const auto a = values(runs, i, k), b = values(runs, ref, k);
            std::vector<double> diff;
            for (std::size_t s = 0; s < a.size(); ++s) diff.push_back(a[s] - b[s]);
            pw::MeanSd st = pw::mean_sd(diff);
            char buf[64];
            if (sd) std::snprintf(buf, sizeof buf, "%+6.2f +- %4.2f", st.mean, st.sd);
            else std::snprintf(buf, sizeof buf, "%+6.2f", st.mean);
            std::printf(" %s", buf);
        }
        std::printf("\n");
    }
}

void write_csv_header(std::ofstream& f) {
    f << "seed,row,task,accuracy,bank,per_task,shared,backbone,bank_pct,per_task_pct,train_seconds\n";
}

void write_csv(std::ofstream& f, std::uint64_t seed, const SeedRun& run) {
    for (const auto& r : run.rows)
        for (std::size_t k = 0; k < kTasks; ++k) {
            char line[512];
            std::snprintf(line, sizeof line, "%llu,\"%s\",%zu,%.6f,%zu,%zu,%zu,%zu,%.4f,%.4f,%.2f\n",
                          (unsigned long long)seed, r.name.c_str(), k, r.accuracy[k], r.patch, r.per_task, r.shared,
                          run.backbone, 100.0 * double(r.patch) / double(run.backbone),
                          100.0 * double(r.per_task) / double(run.backbone), r.seconds);
            f << line;
        }
    f.flush();
    if (!f) throw pw::IoError("writing the CSV file failed");
}

}  // namespace

int main(int argc, char** argv) try {
    const Options o = parse(argc, argv);
    const auto wall0 = std::chrono::steady_clock::now();

    std::ofstream csv;
    if (!o.csv.empty()) {
        csv.open(o.csv);
        if (!csv) throw pw::IoError("cannot open " + o.csv + " for writing");
        write_csv_header(csv);
    }

    // The data do not depend on the seed: the first o.train training images are
    // the tasks', the next o.pretrain (classes 0-6 of them) the pre-training set.
    const auto train_all = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::train, o.train + o.pretrain);
    const auto test_all = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::test, o.test);
    std::vector<std::size_t> pre_idx, task_idx;
    for (std::size_t i = 0; i < train_all.size(); ++i) (i < o.train ? task_idx : pre_idx).push_back(i);
    const auto pre_pool = pw::gather(train_all, std::span<const std::size_t>(pre_idx));
    Data d;
    d.pre_train = pw::filter_classes(pre_pool, {0, 1, 2, 3, 4, 5, 6}, true);
    d.pre_test = pw::filter_classes(test_all, {0, 1, 2, 3, 4, 5, 6}, true);
    const auto task_pool = pw::gather(train_all, std::span<const std::size_t>(task_idx));
    for (int k = 0; k < int(kTasks); ++k) {
        d.t.train.push_back(mobilenet::make_task(task_pool, k));
        d.t.test.push_back(mobilenet::make_task(test_all, k));
    }
    d.t.classes.assign(std::begin(mobilenet::kClasses), std::end(mobilenet::kClasses));
    std::printf("pre-training on %zu images of classes 0-6; %zu task images, %zu test images; %zu seed%s\n",
                d.pre_train.size(), task_pool.size(), test_all.size(), o.seeds, o.seeds > 1 ? "s" : "");

    std::vector<SeedRun> runs;
    std::vector<std::uint64_t> seeds;
    for (std::size_t s = 0; s < o.seeds; ++s) {
        const std::uint64_t seed = o.seed + s;
        runs.push_back(run_seed(d, o, seed));
        seeds.push_back(seed);
        std::printf("\nseed %llu (%.1f s)\n", (unsigned long long)seed, runs.back().seconds);
        print_seed_table(runs.back());
        if (csv.is_open()) write_csv(csv, seed, runs.back());
        std::fflush(stdout);
    }

    std::printf("\nbackbone: %zu parameters; K = %zu tasks (10 classes, coarse 4, inverted 10, unseen 3)\n",
                runs[0].backbone, kTasks);
    std::size_t full = 0;
    for (std::size_t k = 0; k < kTasks; ++k) full += runs[0].backbone + (kFeatures + 1) * d.t.classes[k];
    std::printf("bank: per-task backbone parameters; per task: bank + BatchNorm statistics + head;\n"
                "K-task store: shared parameters + K x per task. K separate models (backbone + head each, without\n"
                "BatchNorm statistics) would store %zu parameters\n", full);
    print_summary(runs, seeds);
    if (csv.is_open()) std::printf("\nwrote %s\n", o.csv.c_str());
    std::printf("wall time %.1f s\n", since(wall0));
    return 0;
} catch (const pw::Error& e) {
    std::cerr << "multitask_patches: " << e.what() << '\n';
    return 1;
}
