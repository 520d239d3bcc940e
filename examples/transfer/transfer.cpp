// Transfer learning with every policy, on Fashion-MNIST.
//
// 1. Pre-train an MLP on classes 0-4 (T-shirt, trouser, pullover, dress, coat).
// 2. Adapt it to classes 5-9 (sandal, shirt, sneaker, bag, ankle boot), with
//    few labelled samples per class, under each policy: a new head on a frozen
//    body, BiasOnly, NormPatch, Adapter, LoRA, and full fine-tuning.
// 3. Print a table: policy, trainable parameters, % of full fine-tuning, test
//    accuracy on the new classes, training time.
//
// The network is the one benchmarks/example_model.hpp times:
//   body = Linear(784,256) LayerNorm ReLU Linear(256,256) LayerNorm ReLU,  head = Linear(256,5)
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

constexpr std::size_t kIn = 784, kHidden = 256, kClasses = 5;

using Body = pw::Sequential<pw::Linear, pw::LayerNorm, pw::Relu, pw::Linear, pw::LayerNorm, pw::Relu>;
using LoraLinear = pw::Tune<pw::Linear, pw::LoRA<8, 16>>;
using LoraBody = pw::Sequential<LoraLinear, pw::LayerNorm, pw::Relu, LoraLinear, pw::LayerNorm, pw::Relu>;

struct Options {
    std::size_t pretrain_epochs = 8;
    std::size_t epochs = 20;
    std::size_t per_class = 1000;  ///< labelled samples per new class for adaptation
    std::size_t test_limit = 0;   ///< 0: the whole test split
    std::size_t batch = 64;
    double lr = 2e-3;
    std::uint64_t seed = 1;
    std::string data_dir = pw::fashion_mnist_default_dir;
    bool quiet = false;
};

void usage() {
    std::puts(
        "usage: transfer [options]\n"
        "  --pretrain-epochs N  epochs of pre-training on classes 0-4 (default 8)\n"
        "  --epochs N           epochs of adaptation per policy (default 20)\n"
        "  --per-class N        labelled training samples per new class (default 1000; 0 = all 6000)\n"
        "  --test-limit N       evaluate on the first N test images only (default: all)\n"
        "  --batch N            batch size (default 64)\n"
        "  --lr X               AdamW learning rate for adaptation (default 2e-3)\n"
        "  --seed N             seed for initialisation and shuffling (default 1)\n"
        "  --data DIR           Fashion-MNIST directory (default /usr/share/datasets/fashion-mnist)\n"
        "  --quiet              no per-epoch progress");
}

Options parse(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        const auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw pw::ConfigError(std::string("transfer: ") + std::string(a) + " needs a value");
            return argv[++i];
        };
        if (a == "--help" || a == "-h") {
            usage();
            std::exit(0);
        } else if (a == "--pretrain-epochs") o.pretrain_epochs = std::stoul(value());
        else if (a == "--epochs") o.epochs = std::stoul(value());
        else if (a == "--per-class") o.per_class = std::stoul(value());
        else if (a == "--test-limit") o.test_limit = std::stoul(value());
        else if (a == "--batch") o.batch = std::stoul(value());
        else if (a == "--lr") o.lr = std::stod(value());
        else if (a == "--seed") o.seed = std::stoull(value());
        else if (a == "--data") o.data_dir = value();
        else if (a == "--quiet") o.quiet = true;
        else throw pw::ConfigError("transfer: unknown option " + std::string(a) + " (try --help)");
    }
    return o;
}

/// The first `n` samples of each class (all when n == 0).
struct Row {
    std::string policy;
    std::size_t trainable = 0;
    double percent = 0;
    double accuracy = 0;
    double seconds = 0;
};

/// Adapt `model` (its body already holds the pre-trained weights) and measure it.
template <class M>
Row adapt(const std::string& name, M& model, const pw::Dataset<float>& train, const pw::Dataset<float>& test,
          const Options& o) {
    model.set_input_grad(false);
    pw::Batcher<float> batches(train, {.batch_size = o.batch, .seed = o.seed});
    pw::Batcher<float> test_batches(test, {.batch_size = 1000, .shuffle = false});
    pw::AdamW opt{pw::trainable_parameters(model), {.lr = o.lr, .weight_decay = 1e-4}};
    const std::size_t steps = o.epochs * batches.batches();
    if (!o.quiet) std::cout << "-- adapting with " << name << '\n';
    const auto t0 = std::chrono::steady_clock::now();
    pw::fit(model, opt, batches,
            {.epochs = o.epochs, .schedule = pw::WarmupCosine{steps / 20, steps}, .clip_norm = 5.0, .log_every = 0,
             .verbose = !o.quiet});
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const auto eval = pw::evaluate(model, test_batches);
    const auto report = pw::parameter_report(model);
    return {name, report.trainable, report.percent_of_full(), eval.accuracy, seconds};
}

}  // namespace

int main(int argc, char** argv) try {
    const Options o = parse(argc, argv);
    pw::manual_seed(o.seed);

    const auto train_all = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::train);
    auto test_all = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::test);
    if (o.test_limit) test_all = pw::subset(test_all, o.test_limit);
    const auto old_train = pw::filter_classes(train_all, {0, 1, 2, 3, 4}, true);
    const auto old_test = pw::filter_classes(test_all, {0, 1, 2, 3, 4}, true);
    const auto new_train = pw::first_per_class(pw::filter_classes(train_all, {5, 6, 7, 8, 9}, true), o.per_class);
    const auto new_test = pw::filter_classes(test_all, {5, 6, 7, 8, 9}, true);
    std::printf("pre-training on %zu images of classes 0-4; adapting on %zu images of classes 5-9 (%zu per class)\n",
                old_train.size(), new_train.size(), new_train.size() / kClasses);

    // 1. Pre-train body + head on the old classes.
    using Pretrain = pw::Sequential<Body, pw::Linear>;
    Pretrain base(Body(pw::Linear(kIn, kHidden), pw::LayerNorm(kHidden), pw::Relu{}, pw::Linear(kHidden, kHidden),
                       pw::LayerNorm(kHidden), pw::Relu{}),
                  pw::Linear(kHidden, kClasses));
    base.set_input_grad(false);
    {
        pw::Batcher<float> batches(old_train, {.batch_size = 128, .seed = o.seed});
        pw::Batcher<float> test_batches(old_test, {.batch_size = 1000, .shuffle = false});
        pw::AdamW opt{pw::trainable_parameters(base), {.lr = 2e-3, .weight_decay = 1e-4}};
        const std::size_t steps = o.pretrain_epochs * batches.batches();
        if (!o.quiet) std::cout << "-- pre-training\n";
        pw::fit(base, opt, batches,
                {.epochs = o.pretrain_epochs, .schedule = pw::WarmupCosine{steps / 20, steps}, .log_every = 0,
                 .verbose = !o.quiet});
        std::printf("pre-trained accuracy on classes 0-4: %.2f%%\n", 100 * pw::evaluate(base, test_batches).accuracy);
    }
    const Body& body = base.get<0>();

    // 2. Adapt to the new classes with each policy. Every run gets the same new head.
    const auto head = [&] {
        pw::manual_seed(o.seed + 1000);
        return pw::Linear(kHidden, kClasses);
    };
    std::vector<Row> rows;
    {
        pw::Sequential<pw::Tune<Body, pw::Frozen>, pw::Linear> m(pw::Tune<Body, pw::Frozen>(body), head());
        rows.push_back(adapt("head only (body Frozen)", m, new_train, new_test, o));
    }
    {
        pw::Sequential<pw::Tune<Body, pw::BiasOnly>, pw::Linear> m(pw::Tune<Body, pw::BiasOnly>(body), head());
        rows.push_back(adapt("BiasOnly + head", m, new_train, new_test, o));
    }
    {
        pw::Sequential<pw::Tune<Body, pw::NormPatch>, pw::Linear> m(pw::Tune<Body, pw::NormPatch>(body), head());
        rows.push_back(adapt("NormPatch + head", m, new_train, new_test, o));
    }
    {
        using Tuned = pw::Tune<Body, pw::Adapter<32>>;
        pw::Sequential<Tuned, pw::Linear> m(Tuned(body), head());
        rows.push_back(adapt("Adapter<32> + head", m, new_train, new_test, o));
    }
    {
        using Tuned = pw::Tune<LoraBody, pw::Frozen>;
        pw::Sequential<Tuned, pw::Linear> m(Tuned(LoraLinear(body.get<0>()), body.get<1>(), pw::Relu{},
                                                  LoraLinear(body.get<3>()), body.get<4>(), pw::Relu{}),
                                            head());
        rows.push_back(adapt("LoRA<8> + head", m, new_train, new_test, o));
    }
    {
        pw::Sequential<pw::Tune<Body, pw::FineTune>, pw::Linear> m(pw::Tune<Body, pw::FineTune>(body), head());
        rows.push_back(adapt("FineTune", m, new_train, new_test, o));
    }

    // 3. The table.
    std::printf("\n%-24s %12s %12s %14s %10s\n", "policy", "trainable", "% of full", "test accuracy", "time (s)");
    for (const auto& r : rows)
        std::printf("%-24s %12zu %11.2f%% %13.2f%% %10.1f\n", r.policy.c_str(), r.trainable, r.percent,
                    100 * r.accuracy, r.seconds);
    return 0;
} catch (const pw::Error& e) {
    std::cerr << "transfer: " << e.what() << '\n';
    return 1;
}
