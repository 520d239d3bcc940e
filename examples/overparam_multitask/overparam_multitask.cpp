// Overparameterised multi-task training that collapses into a compact model,
// on Fashion-MNIST.
//
// Three tasks share one compact trunk, each with its own linear head:
//   A: the 10 classes;
//   B: a coarse grouping: tops and dresses (T-shirt, pullover, dress, coat,
//      shirt), trousers, footwear (sandal, sneaker, ankle boot), bags;
//   C: the 10 classes on inverted images (1 - x).
// Trunk = Linear(784, w) ReLU Linear(w, w) ReLU, heads Linear(w, 10 | 4 | 10).
//
// For every trunk width w and seed, the same initial network is trained
//   (a) directly (every parameter of the compact network trains), and
//   (b) with each trunk Linear overparameterised as W = U M V
//       (Tune<Linear, FineTune, OverParam<>>, all three factors shared by the
//       tasks, inner width expansion * min(in, out), initialised so that
//       U M V is the compact weight: both runs start from the same function),
//       then collapsed into the compact trunk.
// Both are trained with the same optimiser, schedule and batches (one step =
// the sum of the three task losses). After collapse (b) has exactly the
// parameter count of (a) and runs the same layers: the program checks both
// and that collapsing did not change the outputs.
//
// Output: a table (mean and sample standard deviation over the seeds of the
// final test accuracy per task and of the training loss after the first and
// the last epoch) and a CSV with one row per run and epoch (training loss and
// test accuracies), for training curves.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <patchwork/patchwork.hpp>

namespace pw = patchwork;

namespace {

constexpr std::size_t kIn = 784;
constexpr std::size_t kTasks = 3;
constexpr std::size_t kClasses[kTasks] = {10, 4, 10};
constexpr const char* kTaskNames[kTasks] = {"A (10 classes)", "B (4 groups)", "C (inverted)"};
// Task B: tops and dresses 0, trousers 1, footwear 2, bags 3.
constexpr int kCoarse[10] = {0, 1, 0, 0, 0, 2, 0, 2, 3, 2};

using DirectTrunk = pw::Sequential<pw::Linear, pw::Relu, pw::Linear, pw::Relu>;
using OpLinear = pw::Tune<pw::Linear, pw::FineTune, pw::OverParam<>>;
using OpTrunk = pw::Sequential<OpLinear, pw::Relu, OpLinear, pw::Relu>;

struct Options {
    std::vector<std::size_t> widths{16, 32, 64};
    std::vector<std::size_t> expansions{2, 4};
    std::size_t seeds = 3;
    std::size_t epochs = 10;
    std::size_t train_limit = 30000;  ///< 0: all 60000
    std::size_t test_limit = 0;       ///< 0: all 10000
    std::size_t batch = 128;
    double lr = 2e-3;
    std::string csv = "overparam_curves.csv";
    std::string data_dir = pw::fashion_mnist_default_dir;
    bool quiet = false;
};

void usage() {
    std::puts(
        "usage: overparam_multitask [options]\n"
        "  --widths LIST      compact trunk widths, comma-separated (default 16,32,64)\n"
        "  --expansions LIST  OverParam expansion ratios (default 2,4; none = direct training only)\n"
        "  --seeds N          seeds per configuration (default 3)\n"
        "  --epochs N         training epochs (default 10)\n"
        "  --train-limit N    first N training images (default 30000; 0 = all 60000)\n"
        "  --test-limit N     first N test images (default: all 10000)\n"
        "  --batch N          batch size (default 128)\n"
        "  --lr X             AdamW learning rate (default 2e-3, cosine schedule)\n"
        "  --csv FILE         per-epoch curves (default overparam_curves.csv; '' = none)\n"
        "  --data DIR         Fashion-MNIST directory (default /usr/share/datasets/fashion-mnist)\n"
        "  --quiet            no per-run lines");
}

std::vector<std::size_t> parse_list(const std::string& s) {
    std::vector<std::size_t> out;
    if (s == "none") return out;  // --expansions none: direct training only
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ','))
        if (!item.empty()) out.push_back(std::stoul(item));
    if (std::find(out.begin(), out.end(), std::size_t(0)) != out.end())
        throw pw::ConfigError("overparam_multitask: an expansion or width must be positive, got 0 in '" + s + "'");
    if (out.empty()) throw pw::ConfigError("overparam_multitask: empty list '" + s + "'");
    return out;
}

Options parse(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        const auto value = [&]() -> std::string {
            if (i + 1 >= argc)
                throw pw::ConfigError("overparam_multitask: " + std::string(a) + " needs a value");
            return argv[++i];
        };
        if (a == "--help" || a == "-h") {
            usage();
            std::exit(0);
        } else if (a == "--widths") o.widths = parse_list(value());
        else if (a == "--expansions") o.expansions = parse_list(value());
        else if (a == "--seeds") o.seeds = std::stoul(value());
        else if (a == "--epochs") o.epochs = std::stoul(value());
        else if (a == "--train-limit") o.train_limit = std::stoul(value());
        else if (a == "--test-limit") o.test_limit = std::stoul(value());
        else if (a == "--batch") o.batch = std::stoul(value());
        else if (a == "--lr") o.lr = std::stod(value());
        else if (a == "--csv") o.csv = value();
        else if (a == "--data") o.data_dir = value();
        else if (a == "--quiet") o.quiet = true;
        else throw pw::ConfigError("overparam_multitask: unknown option " + std::string(a) + " (try --help)");
    }
    if (o.seeds == 0 || o.epochs == 0) throw pw::ConfigError("overparam_multitask: --seeds and --epochs must be positive");
    return o;
}

/// The three tasks' inputs and labels for one batch of images and fine labels.
struct TaskBatch {
    pw::Tensor<float> inverted;
    std::vector<int> labels[kTasks];
    void set(const pw::Tensor<float>& x, const std::vector<int>& fine) {
        inverted.resize(x.shape());
        inverted.vector() = 1.0f - x.vector().array();
        labels[0] = fine;
        labels[1].resize(fine.size());
        for (std::size_t i = 0; i < fine.size(); ++i) labels[1][i] = kCoarse[fine[i]];
        labels[2] = fine;
    }
    const pw::Tensor<float>& input(std::size_t task, const pw::Tensor<float>& x) const {
        return task == 2 ? inverted : x;
    }
};

struct EpochRow {
    double train_loss = 0;  ///< sum over tasks of the mean cross-entropy
    double accuracy[kTasks] = {0, 0, 0};
    double seconds = 0;
};

struct Run {
    std::vector<EpochRow> epochs;
    std::size_t trained_params = 0;    ///< parameters while training
    std::size_t inference_params = 0;  ///< after collapse (the compact network)
    double max_collapse_diff = 0;      ///< largest change of a logit caused by collapsing
    double seconds = 0;
};

template <class Trunk>
void evaluate_tasks(Trunk& trunk, std::vector<pw::Linear>& heads, const pw::Dataset<float>& test, double* acc,
                    std::vector<pw::Tensor<float>>* logits = nullptr) {
    pw::Batcher<float> batches(test, {.batch_size = 1000, .shuffle = false});
    std::size_t correct[kTasks] = {0, 0, 0};
    TaskBatch tb;
    for (std::size_t i = 0; i < batches.batches(); ++i) {
        const auto& b = batches.batch(i);
        tb.set(b.x, b.labels);
        for (std::size_t k = 0; k < kTasks; ++k) {
            const auto& y = heads[k].forward(trunk.forward(tb.input(k, b.x)));
            correct[k] += pw::count_correct(y, std::span<const int>(tb.labels[k]));
            if (logits) logits->push_back(y);
        }
    }
    for (std::size_t k = 0; k < kTasks; ++k) acc[k] = double(correct[k]) / double(test.size());
}

template <class Trunk>
Run train(Trunk& trunk, std::vector<pw::Linear>& heads, const pw::Dataset<float>& train_set,
          const pw::Dataset<float>& test, const Options& o, std::uint64_t seed) {
    Run run;
    std::vector<pw::Parameter<float>*> params = pw::trainable_parameters(trunk);
    for (auto& h : heads)
        for (auto* p : pw::trainable_parameters(h)) params.push_back(p);
    run.trained_params = pw::parameter_count(trunk);
    for (auto& h : heads) run.trained_params += pw::parameter_count(h);
    trunk.set_input_grad(false);

    pw::AdamW opt{params, {.lr = o.lr, .weight_decay = 0.0}};
    pw::Batcher<float> batches(train_set, {.batch_size = o.batch, .seed = seed});
    const std::size_t steps = o.epochs * batches.batches();
    const pw::WarmupCosine schedule{steps / 20, steps};
    TaskBatch tb;
    const auto t0 = std::chrono::steady_clock::now();
    std::size_t step = 0;
    for (std::size_t e = 0; e < o.epochs; ++e) {
        const auto te = std::chrono::steady_clock::now();
        batches.start_epoch(e);
        double loss_sum = 0;
        std::size_t samples = 0;
        for (std::size_t i = 0; i < batches.batches(); ++i, ++step) {
            opt.set_lr_factor(schedule(step));
            const auto& b = batches.batch(i);
            tb.set(b.x, b.labels);
            for (auto* p : params) p->zero_grad();
            double loss = 0;
            // One forward and backward per task; the trunk's gradients add up over the tasks.
            for (std::size_t k = 0; k < kTasks; ++k) {
                const auto& y = heads[k].forward(trunk.forward(tb.input(k, b.x)));
                auto ce = pw::cross_entropy(y, std::span<const int>(tb.labels[k]));
                loss += double(ce.value);
                trunk.backward(heads[k].backward(ce.grad));
            }
            opt.step();
            loss_sum += loss * double(b.labels.size());
            samples += b.labels.size();
        }
        EpochRow row;
        row.train_loss = loss_sum / double(samples);
        evaluate_tasks(trunk, heads, test, row.accuracy);
        row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - te).count();
        run.epochs.push_back(row);
    }
    run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return run;
}

std::string pm(pw::MeanSd s, double scale, int digits) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f ± %.*f", digits, s.mean * scale, digits, s.sd * scale);
    return buf;
}

}  // namespace

int main(int argc, char** argv) try {
    const Options o = parse(argc, argv);
    const auto wall0 = std::chrono::steady_clock::now();
    auto train_set = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::train);
    auto test = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::test);
    if (o.train_limit) train_set = pw::subset(train_set, o.train_limit);
    if (o.test_limit) test = pw::subset(test, o.test_limit);
    std::printf("tasks: A = 10 classes, B = 4 groups, C = 10 classes on inverted images; %zu training and %zu test "
                "images, %zu epochs, batch %zu, AdamW lr %g (cosine), %zu seeds\n",
                train_set.size(), test.size(), o.epochs, o.batch, o.lr, o.seeds);

    std::ofstream csv;
    if (!o.csv.empty()) {
        csv.open(o.csv);
        if (!csv) throw pw::IoError("overparam_multitask: cannot write " + o.csv);
        csv << "width,expansion,seed,epoch,train_loss,acc_a,acc_b,acc_c,seconds\n";
    }

    struct Key {
        std::size_t width, expansion;  // expansion 0: direct training
        bool operator<(const Key& k) const { return std::tie(width, expansion) < std::tie(k.width, k.expansion); }
    };
    std::map<Key, std::vector<Run>> runs;

    for (std::size_t w : o.widths) {
        for (std::size_t s = 0; s < o.seeds; ++s) {
            const std::uint64_t seed = 1 + s;
            // The compact network every variant starts from.
            pw::manual_seed(seed * 1000 + w);
            const pw::Linear l0(kIn, w), l1(w, w);
            std::vector<pw::Linear> heads0;
            for (std::size_t k = 0; k < kTasks; ++k) heads0.emplace_back(w, kClasses[k]);

            std::vector<std::size_t> variants{0};
            variants.insert(variants.end(), o.expansions.begin(), o.expansions.end());
            for (std::size_t e : variants) {
                auto heads = heads0;
                for (std::size_t k = 0; k < kTasks; ++k) heads[k].set_path("head" + std::to_string(k));
                Run run;
                if (e == 0) {
                    DirectTrunk trunk(l0, {}, l1, {});
                    run = train(trunk, heads, train_set, test, o, seed);
                    run.inference_params = pw::parameter_count(trunk);
                } else {
                    pw::manual_seed(seed * 7919 + e);
                    const pw::OverParamOptions op{.expansion = e};
                    OpTrunk trunk(OpLinear(l0, op), {}, OpLinear(l1, op), {});
                    run = train(trunk, heads, train_set, test, o, seed);
                    // Collapse, and check that nothing but the parameter count changed.
                    double acc[kTasks];
                    std::vector<pw::Tensor<float>> before, after;
                    evaluate_tasks(trunk, heads, test, acc, &before);
                    pw::collapse_overparam(trunk);
                    evaluate_tasks(trunk, heads, test, acc, &after);
                    for (std::size_t i = 0; i < before.size(); ++i)
                        for (std::size_t j = 0; j < before[i].size(); ++j)
                            run.max_collapse_diff =
                                std::max(run.max_collapse_diff, double(std::abs(before[i][j] - after[i][j])));
                    run.inference_params = pw::parameter_count(trunk);
                    DirectTrunk compact(l0, {}, l1, {});
                    if (run.inference_params != pw::parameter_count(compact))
                        throw pw::Error("overparam_multitask: the collapsed trunk is not the compact size");
                }
                for (auto& h : heads) run.inference_params += pw::parameter_count(h);
                for (std::size_t ep = 0; ep < run.epochs.size(); ++ep) {
                    const auto& r = run.epochs[ep];
                    if (csv)
                        csv << w << ',' << e << ',' << seed << ',' << ep + 1 << ',' << r.train_loss << ','
                            << r.accuracy[0] << ',' << r.accuracy[1] << ',' << r.accuracy[2] << ',' << r.seconds
                            << '\n';
                }
                if (!o.quiet) {
                    const auto& last = run.epochs.back();
                    std::printf("width %3zu %-12s seed %llu: loss %.4f, accuracy A %.2f%% B %.2f%% C %.2f%%, %.1f s\n",
                                w, e == 0 ? "direct" : ("overparam x" + std::to_string(e)).c_str(),
                                static_cast<unsigned long long>(seed), last.train_loss, 100 * last.accuracy[0],
                                100 * last.accuracy[1], 100 * last.accuracy[2], run.seconds);
                    std::fflush(stdout);
                }
                runs[{w, e}].push_back(std::move(run));
            }
        }
    }

    std::printf("\n%-6s %-14s %10s %10s %16s %16s %16s %16s %16s %16s %9s\n", "width", "training", "train par",
                "infer par", "acc A (%)", "acc B (%)", "acc C (%)", "mean acc (%)", "loss epoch 1", "loss last",
                "time (s)");
    for (const auto& [key, list] : runs) {
        std::vector<double> acc[kTasks], mean_acc, first_loss, last_loss, secs;
        double collapse_diff = 0;
        for (const auto& r : list) {
            double m = 0;
            for (std::size_t k = 0; k < kTasks; ++k) {
                acc[k].push_back(r.epochs.back().accuracy[k]);
                m += r.epochs.back().accuracy[k] / kTasks;
            }
            mean_acc.push_back(m);
            first_loss.push_back(r.epochs.front().train_loss);
            last_loss.push_back(r.epochs.back().train_loss);
            secs.push_back(r.seconds);
            collapse_diff = std::max(collapse_diff, r.max_collapse_diff);
        }
        const std::string name = key.expansion == 0 ? "direct" : "overparam x" + std::to_string(key.expansion);
        std::printf("%-6zu %-14s %10zu %10zu %16s %16s %16s %16s %16s %16s %9.1f\n", key.width, name.c_str(),
                    list.front().trained_params, list.front().inference_params, pm(pw::mean_sd(acc[0]), 100, 2).c_str(),
                    pm(pw::mean_sd(acc[1]), 100, 2).c_str(), pm(pw::mean_sd(acc[2]), 100, 2).c_str(),
                    pm(pw::mean_sd(mean_acc), 100, 2).c_str(), pm(pw::mean_sd(first_loss), 1, 3).c_str(),
                    pm(pw::mean_sd(last_loss), 1, 3).c_str(), pw::mean_sd(secs).mean);
        if (key.expansion != 0 && collapse_diff > 1e-3)
            throw pw::Error("overparam_multitask: collapsing changed a logit by " + std::to_string(collapse_diff));
    }
    std::printf("\ntasks: %s, %s, %s; mean ± sample sd over %zu seeds; collapse checked (same parameter count as "
                "direct, logits unchanged to float rounding)\n",
                kTaskNames[0], kTaskNames[1], kTaskNames[2], o.seeds);
    std::printf("wall time %.1f s\n",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count());
    return 0;
} catch (const pw::Error& e) {
    std::cerr << "overparam_multitask: " << e.what() << '\n';
    return 1;
} catch (const std::exception& e) {
    std::cerr << "overparam_multitask: " << e.what() << '\n';
    return 1;
}
