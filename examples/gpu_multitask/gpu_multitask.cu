// K tasks for the price of one backbone, on the GPU: the story of
// examples/multitask_patches with every module on the device (Device = pw::Cuda).
//
// 1. Pre-train the MobileNet-style CNN of examples/multitask_patches
//    (mobilenet.hpp: convolutions, depthwise convolutions, BatchNorm2d, ReLU,
//    global average pooling) on Fashion-MNIST classes 0-6, on the device.
// 2. Four tasks share it (mobilenet.hpp: the 10 classes, a coarse 4-way
//    grouping, inverted images, the unseen classes 7-9), each with its own
//    patch and head. A task's head is 10 wide (one output width for a mixed
//    batch); its loss and its argmax read only its first C_k logits (the
//    per-row cross-entropy on the device), so the padding never matters.
//    For each patch, AdamW (weight decay 1e-4), 5 % warm-up then cosine:
//      a. NormPatch (BatchNorm2d scale, shift and running statistics per
//         task), one task at a time (fit on the device, one task's batches);
//      b. the same NormPatch banks trained on mixed-task batches: every batch
//         draws its rows from all four tasks, MultiTask::forward(x, task_ids),
//         one backward and one step per batch (on the device the rows are
//         grouped by task, since BatchNorm2d normalises whole batches: each
//         group with its own bank and statistics);
//      c. DepthwisePatch + NormPatch (per-task depthwise filters too), mixed batches.
//    Print accuracy per task, parameters per task, storage for the K tasks,
//    and training time.
// 3. The patches of row b leave the device: save_patch per task (safetensors,
//    written atomically), load_patch into a freshly built device model on the
//    same pre-trained backbone, and the reloaded model's test accuracy must be
//    the trained model's (exit status 1 if not).
//
// Without a CUDA device the program says so and exits with 77; without the
// Fashion-MNIST files (Debian's dataset-fashion-mnist, or --data DIR) too.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include "patchwork/cuda.cuh"

#include "../common/cli.hpp"
#include "../multitask_patches/mobilenet.hpp"

namespace pw = patchwork;
using pw::Cuda;
using mobilenet::kClasses;
using mobilenet::kFeatures;
using mobilenet::kTasks;

namespace {

using Body = mobilenet::Body<float, Cuda>;
using Head = pw::BasicLinear<float, Cuda>;
using AdamW = pw::BasicAdamW<float, Cuda>;
constexpr std::size_t kWidth = 10;  ///< every head's width (the widest task)

struct Options {
    std::size_t pretrain_epochs = 6;
    std::size_t epochs = 5;
    std::size_t train = 3000;     ///< training images per task (the first N of the split)
    std::size_t test = 2000;      ///< test images (the first N of the split)
    std::size_t pretrain = 4000;  ///< training images after the tasks' ones; classes 0-6 of them pre-train
    std::size_t batch = 64;
    double lr = 5e-3;
    std::uint64_t seed = 1;
    std::string data_dir = pw::fashion_mnist_default_dir;
    std::string patch_dir;  ///< where the patches go (default: a new directory under the system's temporary one)
};

constexpr const char* kUsage =
    "usage: gpu_multitask [--pretrain-epochs N] [--pretrain N] [--epochs N] [--train N] [--test N] [--batch N]\n"
    "                     [--lr X] [--seed N] [--data DIR] [--patch-dir DIR]\n"
    "  --pretrain N     pre-training pool: the N training images after the tasks' (default 4000; classes 0-6 used)\n"
    "  --patch-dir DIR  where the four tasks' patch files are written (default: a temporary directory, removed)";

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
        else if (a == "--pretrain") o.pretrain = parse_uint(a, value(), 16);
        else if (a == "--epochs") o.epochs = parse_uint(a, value(), 1);
        else if (a == "--train") o.train = parse_uint(a, value(), 16);
        else if (a == "--test") o.test = parse_uint(a, value(), 10);
        else if (a == "--batch") o.batch = parse_uint(a, value(), 2);
        else if (a == "--lr") o.lr = parse_positive(a, value());
        else if (a == "--seed") o.seed = parse_uint(a, value(), 0);
        else if (a == "--data") o.data_dir = value();
        else if (a == "--patch-dir") {
            o.patch_dir = value();
            if (o.patch_dir.empty()) bad("--patch-dir needs a directory");
        } else bad("unknown option " + std::string(a));
    }
    if (o.train + o.pretrain > 60000)
        bad("--train + --pretrain must be at most 60000 (the training split), got " +
            std::to_string(o.train + o.pretrain));
    return o;
}

double since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Data {
    pw::Dataset<float> pre_train, pre_test;
    std::vector<pw::Dataset<float>> train, test;  ///< per task
};

/// Rows of `ds` (indices) gathered into one host batch [rows, 784].
pw::Tensor<float> gather_images(const pw::Dataset<float>& ds, std::span<const std::size_t> idx) {
    const std::size_t f = ds.features();
    pw::Tensor<float> x(pw::Shape{idx.size(), f});
    for (std::size_t r = 0; r < idx.size(); ++r)
        std::copy_n(ds.images.data() + idx[r] * f, f, x.data() + r * f);
    return x;
}

/// Test accuracy of each task: the device logits come back to the host and
/// the argmax runs over the task's first C_k logits.
template <class MT>
std::vector<double> evaluate_all(MT& m, const Data& d) {
    pw::set_training(m, false);
    std::vector<double> acc;
    for (std::size_t k = 0; k < kTasks; ++k) {
        const auto& test = d.test[k];
        std::size_t right = 0;
        std::vector<std::size_t> idx;
        for (std::size_t b = 0; b < test.size(); b += 500) {
            idx.clear();
            for (std::size_t i = b; i < std::min(test.size(), b + 500); ++i) idx.push_back(i);
            const pw::Tensor<float> logits =
                pw::to_host(m.forward(pw::to_device(gather_images(test, idx)), int(k)));
            right += pw::count_correct(logits, std::span<const int>(test.labels).subspan(b, idx.size()), kClasses[k]);
        }
        acc.push_back(double(right) / double(test.size()));
    }
    return acc;
}

struct Row {
    std::string name;
    std::vector<double> accuracy;
    std::size_t per_task = 0;  ///< parameters one task adds (bank + statistics + head)
    std::size_t shared = 0;    ///< parameters stored once
    double seconds = 0;
    pw::MixedPass pass = pw::MixedPass::none;
};

template <class MT>
void count(MT& m, Row& r) {
    m.visit([&](pw::Parameter<float, Cuda>& p) {
        if (p.task() == pw::shared_task) r.shared += p.size();
        else if (p.task() == 0) r.per_task += p.size();
    });
}

std::vector<Head> make_heads(std::uint64_t seed) {
    pw::manual_seed(seed);
    std::vector<Head> h;
    for (std::size_t k = 0; k < kTasks; ++k) h.emplace_back(kFeatures, kWidth);
    return h;
}

/// Row a: each task on its own (its bank and head train), with fit on the device.
template <class MT>
void train_one_at_a_time(MT& m, const Data& d, const Options& o) {
    for (std::size_t k = 0; k < kTasks; ++k) {
        m.train_only(int(k));
        m.set_active_task(int(k));
        pw::set_training(m, true);
        pw::Batcher<float> batches(d.train[k], {.batch_size = o.batch, .seed = o.seed + k});
        AdamW opt{pw::trainable_parameters(m), {.lr = o.lr, .weight_decay = 1e-4}};
        const std::size_t steps = o.epochs * batches.batches();
        const std::vector<std::size_t> classes(o.batch, kClasses[k]);
        const auto loss = [&](const pw::Tensor<float, Cuda>& y, std::span<const int> labels) {
            return pw::cross_entropy(y, labels, std::span<const std::size_t>(classes).first(labels.size()));
        };
        pw::fit(m, opt, batches, loss,
                {.epochs = o.epochs, .schedule = pw::WarmupCosine{steps / 20, steps}, .log_every = 0, .verbose = false});
    }
}

/// Rows b and c: every task's bank and head train together on mixed-task
/// batches (each batch's rows drawn from all tasks, shuffled together).
/// Returns how the device computed the mixed batches.
template <class MT>
pw::MixedPass train_mixed(MT& m, const Data& d, const Options& o) {
    struct Ref {
        int task;
        std::size_t index;
    };
    std::vector<Ref> rows;
    for (std::size_t k = 0; k < kTasks; ++k)
        for (std::size_t i = 0; i < d.train[k].size(); ++i) rows.push_back({int(k), i});
    std::vector<std::size_t> order(rows.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    const std::size_t per_epoch = (rows.size() + o.batch - 1) / o.batch, total = per_epoch * o.epochs;
    const pw::WarmupCosine schedule{total / 20, total};
    AdamW opt{pw::trainable_parameters(m), {.lr = o.lr, .weight_decay = 1e-4}};
    pw::Rng rng(pw::detail::mix64(o.seed + 100));
    pw::set_training(m, true);
    m.set_input_grad(false);
    const std::size_t f = d.train[0].features();
    pw::Tensor<float> host_x;
    pw::Tensor<float, Cuda> x;
    std::vector<int> labels, ids;
    std::vector<std::size_t> classes;
    std::size_t step = 0;
    pw::MixedPass pass = pw::MixedPass::none;
    for (std::size_t epoch = 0; epoch < o.epochs; ++epoch) {
        pw::detail::shuffle_indices(order, rng);
        double loss_sum = 0;
        for (std::size_t b = 0; b < rows.size(); b += o.batch) {
            const std::size_t n = std::min(rows.size(), b + o.batch) - b;
            host_x.resize(pw::Shape{n, f});
            labels.clear();
            ids.clear();
            classes.clear();
            for (std::size_t r = 0; r < n; ++r) {
                const Ref& ref = rows[order[b + r]];
                const auto& ds = d.train[std::size_t(ref.task)];
                std::copy_n(ds.images.data() + ref.index * f, f, host_x.data() + r * f);
                labels.push_back(ds.labels[ref.index]);
                ids.push_back(ref.task);
                classes.push_back(kClasses[ref.task]);
            }
            x = pw::to_device(host_x);
            opt.set_lr_factor(schedule(step++));
            opt.zero_grad();
            const auto& z = m.forward(x, ids);
            pass = m.last_mixed_pass();
            const auto loss = pw::cross_entropy(z, labels, classes);
            m.backward(loss.grad);
            opt.step();
            loss_sum += loss.value;
        }
        std::printf("    epoch %zu: mean loss %.4f\n", epoch + 1, loss_sum / double(per_epoch));
    }
    return pass;
}

template <class Tuned>
using Model = pw::MultiTask<Tuned, Head>;

/// A multi-task model on the pre-trained backbone with `Policies`, fresh heads (the same for every row).
template <class... Policies>
Model<pw::Tune<Body, Policies...>> make_model(const Body& body, const Options& o) {
    using Tuned = pw::Tune<Body, Policies...>;
    return Model<Tuned>(Tuned(body), make_heads(o.seed + 6));
}

void print_rows(const std::vector<Row>& rows, std::size_t backbone) {
    std::printf("\n%-46s %8s %8s %8s %8s %8s %10s %12s %8s\n", "patch (on the device)", "task0", "task1", "task2",
                "task3", "per task", "% backbone", "K-task store", "time(s)");
    for (const auto& r : rows) {
        std::printf("%-46s", r.name.c_str());
        for (double a : r.accuracy) std::printf(" %7.2f%%", 100 * a);
        std::printf(" %8zu %9.2f%% %12zu %8.1f\n", r.per_task, 100.0 * double(r.per_task) / double(backbone),
                    r.shared + kTasks * r.per_task, r.seconds);
    }
}

const char* pass_name(pw::MixedPass p) {
    switch (p) {
        case pw::MixedPass::one_pass: return "one backbone pass";
        case pw::MixedPass::grouped: return "grouped by task";
        default: return "none";
    }
}

/// Row b's patches through files: save each task's, load them into a fresh
/// model on the same backbone, compare test accuracy. Returns whether all equal.
template <class MT>
bool patches_round_trip(MT& trained, const std::vector<double>& accuracy, const Body& body, const Data& d,
                        const Options& o) {
    namespace fs = std::filesystem;
    const bool temporary = o.patch_dir.empty();
    const fs::path dir = temporary ? fs::temp_directory_path() / ("gpu_multitask_patches_" +
                                                                   std::to_string(std::uint64_t(::getpid())))
                                   : fs::path(o.patch_dir);
    fs::create_directories(dir);
    std::uintmax_t bytes = 0;
    for (std::size_t k = 0; k < kTasks; ++k) {
        const fs::path file = dir / ("task" + std::to_string(k) + ".safetensors");
        pw::save_patch(trained, file, int(k), {{"example", "gpu_multitask"}});
        bytes += fs::file_size(file);
    }
    auto fresh = make_model<pw::NormPatch>(body, o);
    for (std::size_t k = 0; k < kTasks; ++k)
        pw::load_patch(fresh, dir / ("task" + std::to_string(k) + ".safetensors"), int(k));
    const std::vector<double> again = evaluate_all(fresh, d);
    std::printf("\npatches: %zu files, %ju bytes in all, in %s\n", kTasks, bytes, dir.string().c_str());
    std::printf("reloaded into a fresh device model:");
    for (double a : again) std::printf(" %.2f%%", 100 * a);
    const bool same = again == accuracy;
    std::printf("  (%s the trained model's)\n", same ? "equal to" : "DIFFERENT from");
    if (temporary) fs::remove_all(dir);
    return same;
}

}  // namespace

int main(int argc, char** argv) try {
    const Options o = parse(argc, argv);
    if (pw::cuda::device_count() == 0) {
        std::printf("gpu_multitask: no CUDA device is available; nothing to run (exit 77)\n");
        return 77;
    }
    for (const char* f : {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                          "t10k-labels-idx1-ubyte.gz"})
        if (!std::filesystem::exists(std::filesystem::path(o.data_dir) / f)) {
            std::printf("gpu_multitask: no Fashion-MNIST at %s (Debian package dataset-fashion-mnist, or --data DIR); "
                        "nothing to run (exit 77)\n",
                        o.data_dir.c_str());
            return 77;
        }
    const auto wall0 = std::chrono::steady_clock::now();

    // The data: the first o.train training images are the tasks', the next
    // o.pretrain (classes 0-6 of them) the pre-training set.
    const auto train_all = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::train, o.train + o.pretrain);
    const auto test_all = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::test, o.test);
    std::vector<std::size_t> pre_idx, task_idx;
    for (std::size_t i = 0; i < train_all.size(); ++i) (i < o.train ? task_idx : pre_idx).push_back(i);
    Data d;
    d.pre_train = pw::filter_classes(pw::gather(train_all, std::span<const std::size_t>(pre_idx)),
                                     {0, 1, 2, 3, 4, 5, 6}, true);
    d.pre_test = pw::filter_classes(test_all, {0, 1, 2, 3, 4, 5, 6}, true);
    const auto task_pool = pw::gather(train_all, std::span<const std::size_t>(task_idx));
    for (int k = 0; k < int(kTasks); ++k) {
        d.train.push_back(mobilenet::make_task(task_pool, k));
        d.test.push_back(mobilenet::make_task(test_all, k));
    }
    std::printf("on the device: pre-training on %zu images of classes 0-6; %zu task images, %zu test images\n",
                d.pre_train.size(), task_pool.size(), test_all.size());

    // 1. Pre-train body + a 7-way head on the device.
    pw::manual_seed(o.seed);
    pw::Sequential<Body, Head> base(mobilenet::make_body<float, Cuda>(), Head(kFeatures, 7));
    base.set_input_grad(false);
    {
        pw::Batcher<float> batches(d.pre_train, {.batch_size = o.batch, .seed = o.seed});
        AdamW opt{pw::trainable_parameters(base), {.lr = 5e-3, .weight_decay = 1e-4}};
        const std::size_t steps = o.pretrain_epochs * batches.batches();
        pw::cuda::synchronize();
        const auto t0 = std::chrono::steady_clock::now();
        pw::fit(base, opt, batches,
                {.epochs = o.pretrain_epochs, .schedule = pw::WarmupCosine{steps / 20, steps}, .log_every = 0,
                 .verbose = false});
        pw::cuda::synchronize();
        const double seconds = since(t0);
        pw::set_training(base, false);
        pw::Batcher<float> tb(d.pre_test, {.batch_size = 500, .shuffle = false});
        std::printf("pre-trained (%zu epochs, %.1f s): %.2f%% test accuracy on classes 0-6\n", o.pretrain_epochs,
                    seconds, 100 * pw::evaluate(base, tb).accuracy);
    }
    const Body& body = base.get<0>();
    const std::size_t backbone = pw::parameter_count(const_cast<Body&>(body));

    // 2. The four tasks under each patch.
    std::vector<Row> rows;
    const auto run = [&](auto& m, std::string name, bool mixed) -> Row& {
        Row r;
        r.name = std::move(name);
        count(m, r);
        std::printf("%s\n", r.name.c_str());
        pw::cuda::synchronize();
        const auto t0 = std::chrono::steady_clock::now();
        if (mixed) r.pass = train_mixed(m, d, o);
        else train_one_at_a_time(m, d, o);
        pw::cuda::synchronize();
        r.seconds = since(t0);
        r.accuracy = evaluate_all(m, d);
        rows.push_back(std::move(r));
        return rows.back();
    };
    {
        auto m = make_model<pw::NormPatch>(body, o);
        run(m, "NormPatch + head, one task at a time", false);
    }
    bool round_trip = false;
    {
        auto m = make_model<pw::NormPatch>(body, o);
        const Row& r = run(m, "NormPatch + head, mixed-task batches", true);
        std::printf("    mixed batches computed %s\n", pass_name(r.pass));
        round_trip = patches_round_trip(m, r.accuracy, body, d, o);
    }
    {
        auto m = make_model<pw::DepthwisePatch, pw::NormPatch>(body, o);
        run(m, "DepthwisePatch + NormPatch + head, mixed", true);
    }
    print_rows(rows, backbone);
    std::printf("backbone: %zu parameters; K = %zu tasks (10 classes, coarse 4, inverted 10, unseen 3); heads %zu wide\n"
                "per task: bank + BatchNorm statistics + head; K-task store: shared parameters + K x per task\n",
                backbone, kTasks, kWidth);
    std::printf("wall time %.1f s\n", since(wall0));
    return round_trip ? 0 : 1;
} catch (const pw::Error& e) {
    std::cerr << "gpu_multitask: " << e.what() << '\n';
    return 1;
}
