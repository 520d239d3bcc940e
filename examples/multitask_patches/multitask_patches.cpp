// K tasks for the price of one backbone, on Fashion-MNIST.
//
// 1. Pre-train a small MobileNet-style CNN on classes 0-6:
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
//    task on its own (single-task), and NormPatch banks once more jointly with
//    the shared weights (fit_multitask, round robin). Print accuracy per task,
//    parameters per task (% of the backbone), and storage for the K tasks.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <string_view>
#include <vector>

#include <patchwork/patchwork.hpp>

namespace pw = patchwork;

namespace {

using Body = pw::Sequential<pw::Unflatten, pw::Conv2d, pw::BatchNorm2d, pw::Relu,                 //
                            pw::DepthwiseConv2d, pw::BatchNorm2d, pw::Relu, pw::Conv2d, pw::BatchNorm2d, pw::Relu,
                            pw::DepthwiseConv2d, pw::BatchNorm2d, pw::Relu, pw::Conv2d, pw::BatchNorm2d, pw::Relu,
                            pw::GlobalAvgPool>;
constexpr std::size_t kFeatures = 128, kTasks = 4;

Body make_body() {
    return Body(pw::Unflatten(28, 28, 1), pw::Conv2d(1, 32, 3, {.stride = 2, .padding = 1}), pw::BatchNorm2d(32),
                pw::Relu{}, pw::DepthwiseConv2d(32, 3, {.padding = 1}), pw::BatchNorm2d(32), pw::Relu{},
                pw::Conv2d(32, 64, 1), pw::BatchNorm2d(64), pw::Relu{},
                pw::DepthwiseConv2d(64, 3, {.stride = 2, .padding = 1}), pw::BatchNorm2d(64), pw::Relu{},
                pw::Conv2d(64, kFeatures, 1), pw::BatchNorm2d(kFeatures), pw::Relu{}, pw::GlobalAvgPool{});
}

struct Options {
    std::size_t pretrain_epochs = 6;
    std::size_t epochs = 5;
    std::size_t train = 3000;  ///< training images per task (the first N of the split)
    std::size_t test = 2000;   ///< test images (the first N of the split)
    std::size_t batch = 64;
    double lr = 5e-3;
    std::uint64_t seed = 1;
    std::string data_dir = pw::fashion_mnist_default_dir;
    bool quiet = false;
};

Options parse(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        const auto value = [&]() -> std::string {
            if (i + 1 >= argc)
                throw pw::ConfigError(std::string("multitask_patches: ") + std::string(a) + " needs a value");
            return argv[++i];
        };
        if (a == "--help" || a == "-h") {
            std::puts("usage: multitask_patches [--pretrain-epochs N] [--epochs N] [--train N] [--test N] [--batch N]\n"
                      "                         [--lr X] [--seed N] [--data DIR] [--quiet]");
            std::exit(0);
        } else if (a == "--pretrain-epochs") o.pretrain_epochs = std::stoul(value());
        else if (a == "--epochs") o.epochs = std::stoul(value());
        else if (a == "--train") o.train = std::stoul(value());
        else if (a == "--test") o.test = std::stoul(value());
        else if (a == "--batch") o.batch = std::stoul(value());
        else if (a == "--lr") o.lr = std::stod(value());
        else if (a == "--seed") o.seed = std::stoull(value());
        else if (a == "--data") o.data_dir = value();
        else if (a == "--quiet") o.quiet = true;
        else throw pw::ConfigError("multitask_patches: unknown option " + std::string(a) + " (try --help)");
    }
    return o;
}

/// The four tasks' train and test sets, and their class counts.
struct Tasks {
    std::vector<pw::Dataset<float>> train, test;
    std::vector<std::size_t> classes;
};

pw::Dataset<float> make_task(const pw::Dataset<float>& ds, int task) {
    static const int coarse[10] = {0, 1, 0, 1, 0, 2, 0, 2, 3, 2};
    switch (task) {
        case 0: return ds;
        case 1: {
            auto out = ds;
            for (auto& l : out.labels) l = coarse[l];
            return out;
        }
        case 2: {
            auto out = ds;
            for (auto& v : out.images) v = 1.0f - v;
            return out;
        }
        default: return pw::filter_classes(ds, {7, 8, 9}, true);
    }
}

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

/// Each task trained on its own: only its bank and head train.
template <class MT>
Result single_task(const std::string& name, MT& m, const Tasks& t, const Options& o, bool batch_norm_training) {
    Result r{name, {}, 0, 0, 0};
    count(m, r);
    const auto t0 = std::chrono::steady_clock::now();
    for (std::size_t k = 0; k < kTasks; ++k) {
        m.train_only(int(k));
        m.set_active_task(int(k));
        pw::set_training(m, batch_norm_training);
        pw::Batcher<float> batches(t.train[k], {.batch_size = o.batch, .seed = o.seed + k});
        pw::AdamW opt{pw::trainable_parameters(m), {.lr = o.lr, .weight_decay = 1e-4}};
        const std::size_t steps = o.epochs * batches.batches();
        pw::fit(m, opt, batches,
                {.epochs = o.epochs, .schedule = pw::WarmupCosine{steps / 20, steps}, .log_every = 0, .verbose = false});
    }
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    evaluate_all(m, t, r);
    if (!o.quiet) std::printf("  %-28s done in %.1f s\n", name.c_str(), r.seconds);
    return r;
}

}  // namespace

int main(int argc, char** argv) try {
    const Options o = parse(argc, argv);
    pw::manual_seed(o.seed);
    const auto wall0 = std::chrono::steady_clock::now();

    const auto train_all = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::train, o.train + 4000);
    const auto test_all = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::test, o.test);
    // Pre-training uses images after the first o.train (the tasks' own) of classes 0-6.
    std::vector<std::size_t> pre_idx, task_idx;
    for (std::size_t i = 0; i < train_all.size(); ++i) (i < o.train ? task_idx : pre_idx).push_back(i);
    const auto pre_pool = pw::gather(train_all, std::span<const std::size_t>(pre_idx));
    const auto pre_train = pw::filter_classes(pre_pool, {0, 1, 2, 3, 4, 5, 6}, true);
    const auto task_pool = pw::gather(train_all, std::span<const std::size_t>(task_idx));
    Tasks t;
    for (int k = 0; k < int(kTasks); ++k) {
        t.train.push_back(make_task(task_pool, k));
        t.test.push_back(make_task(test_all, k));
    }
    t.classes = {10, 4, 10, 3};
    std::printf("pre-training on %zu images of classes 0-6; %zu task images, %zu test images\n", pre_train.size(),
                task_pool.size(), test_all.size());

    // 1. Pre-train.
    pw::Sequential<Body, pw::Linear> base(make_body(), pw::Linear(kFeatures, 7));
    base.set_input_grad(false);
    {
        pw::Batcher<float> batches(pre_train, {.batch_size = o.batch, .seed = o.seed});
        pw::AdamW opt{pw::trainable_parameters(base), {.lr = 5e-3, .weight_decay = 1e-4}};
        const std::size_t steps = o.pretrain_epochs * batches.batches();
        pw::fit(base, opt, batches,
                {.epochs = o.pretrain_epochs, .schedule = pw::WarmupCosine{steps / 20, steps}, .log_every = 0,
                 .verbose = !o.quiet});
        pw::set_training(base, false);
        const auto pre_test = pw::filter_classes(test_all, {0, 1, 2, 3, 4, 5, 6}, true);
        pw::Batcher<float> tb(pre_test, {.batch_size = 500, .shuffle = false});
        std::printf("pre-trained accuracy on classes 0-6: %.2f%%\n", 100 * pw::evaluate(base, tb).accuracy);
    }
    const Body& body = base.get<0>();
    const std::size_t backbone = pw::parameter_count(const_cast<Body&>(body));

    std::vector<Result> rows;
    {
        pw::MultiTask<pw::Tune<Body, pw::Frozen>, pw::Linear> m(pw::Tune<Body, pw::Frozen>(body), make_heads(t, 7));
        rows.push_back(single_task("head only", m, t, o, false));
    }
    {
        pw::MultiTask<pw::Tune<Body, pw::BiasOnly>, pw::Linear> m(pw::Tune<Body, pw::BiasOnly>(body), make_heads(t, 7));
        rows.push_back(single_task("BiasOnly + head", m, t, o, true));
    }
    {
        pw::MultiTask<pw::Tune<Body, pw::NormPatch>, pw::Linear> m(pw::Tune<Body, pw::NormPatch>(body),
                                                                   make_heads(t, 7));
        rows.push_back(single_task("NormPatch + head", m, t, o, true));
    }
    {
        pw::MultiTask<pw::Tune<Body, pw::DepthwisePatch>, pw::Linear> m(pw::Tune<Body, pw::DepthwisePatch>(body),
                                                                        make_heads(t, 7));
        rows.push_back(single_task("DepthwisePatch + head", m, t, o, true));
    }
    {
        using Tuned = pw::Tune<Body, pw::Adapter<8>>;
        pw::MultiTask<Tuned, pw::Linear> m(Tuned(body), make_heads(t, 7));
        rows.push_back(single_task("Adapter<8> + head", m, t, o, true));
    }
    {
        // Every parameter per task: K independent fully fine-tuned models.
        pw::MultiTask<pw::Tune<Body, pw::FineTune>, pw::Linear> m(pw::Tune<Body, pw::FineTune>(body),
                                                                  make_heads(t, 7));
        rows.push_back(single_task("FineTune (K full models)", m, t, o, true));
    }
    {
        // Joint: norm banks per task, every other backbone weight shared and trained by all tasks.
        constexpr unsigned norm = pw::role_bit(pw::Role::norm_scale) | pw::role_bit(pw::Role::norm_shift);
        pw::MultiTask<pw::Tune<Body, pw::FineTune>, pw::Linear> m(pw::Tune<Body, pw::FineTune>(body),
                                                                  make_heads(t, 7), pw::PerTaskRoles{norm});
        Result r{"NormPatch joint (shared trains)", {}, 0, 0, 0};
        count(m, r);
        std::vector<pw::Batcher<float>> sources;
        for (std::size_t k = 0; k < kTasks; ++k) sources.emplace_back(t.train[k], pw::BatchOptions{.batch_size = o.batch, .seed = o.seed + k});
        pw::AdamW opt{pw::trainable_parameters(m), {.lr = o.lr / 2, .weight_decay = 1e-4}};
        const auto t0 = std::chrono::steady_clock::now();
        pw::set_training(m, true);
        pw::fit_multitask(m, opt, sources, {.epochs = o.epochs, .sampling = pw::TaskSampling::round_robin});
        r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        evaluate_all(m, t, r);
        if (!o.quiet) std::printf("  %-28s done in %.1f s\n", r.name.c_str(), r.seconds);
        rows.push_back(r);
    }

    std::printf("\nbackbone: %zu parameters; K = %zu tasks (10 classes, coarse 4, inverted 10, unseen 3)\n", backbone,
                kTasks);
    std::printf("%-32s %9s %9s %9s %9s %8s %11s %9s %12s %8s\n", "patch", "task0", "task1", "task2", "task3", "bank",
                "% backbone", "per task", "K-task store", "time(s)");
    for (const auto& r : rows) {
        std::printf("%-32s", r.name.c_str());
        for (double a : r.accuracy) std::printf(" %8.2f%%", 100 * a);
        std::printf(" %8zu %10.2f%% %9zu %12zu %8.1f\n", r.patch, 100.0 * double(r.patch) / double(backbone),
                    r.per_task, r.shared + kTasks * r.per_task, r.seconds);
    }
    std::size_t full = 0;
    for (std::size_t k = 0; k < kTasks; ++k) full += backbone + (kFeatures + 1) * t.classes[k];
    std::printf("bank: per-task backbone parameters; per task: bank + BatchNorm statistics + head;\n"
                "K-task store: shared parameters + K x per task. K separate models (backbone + head each, without\n"
                "BatchNorm statistics) would store %zu parameters\n", full);
    std::printf("wall time %.1f s\n",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count());
    return 0;
} catch (const pw::Error& e) {
    std::cerr << "multitask_patches: " << e.what() << '\n';
    return 1;
}
