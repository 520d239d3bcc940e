// Transfer learning on the GPU: the story of examples/transfer, with every
// module on the device (Device = pw::Cuda).
//
// 1. Pre-train an MLP on Fashion-MNIST classes 0-4:
//      body = Linear(784,256) LayerNorm ReLU Linear(256,256) LayerNorm ReLU,  head = Linear(256,5)
// 2. Adapt it to classes 5-9 (a new 5-way head) under each policy, all on the
//    device: head only (body Frozen), NormPatch, Adapter<32> (the fused adapter
//    kernel), LoRA<8, 16> on both body Linears (the fused low-rank kernel),
//    FineTune. Print trainable parameters, test accuracy and training time.
// 3. Architecture search on the device: each body Linear chooses among
//    Frozen, Adapter<16>, LoRA<8, 16> and FineTune (first-order DARTS with a
//    parameter penalty, search::run; weights on 80 % of the new training
//    images, architecture weights on the other 20 %), then derive keeps the
//    argmax per Linear and the derived model trains as the policies above.
//
// 4. LoRA on the pre-trained all-MiniLM-L6-v2, on the device: the checkpoint
//    is read into a CPU BertModel (as examples/text_transfer does), its
//    weights are copied into the same model built with Device = Cuda, and
//    LoRA r=8, alpha=16 on query and value trains with a Linear(384, 26) head
//    on WordNet noun supersense (the synset's lemmas and gloss; text_transfer's
//    data, seeded split and subsets): mean pooling over the real tokens,
//    cross-entropy, AdamW (weight decay 0.01), 10 % linear warm-up then cosine
//    decay. Per epoch: mean training loss, held-out accuracy and seconds.
//
// Images are loaded on the host and copied to the device batch by batch; the
// loss value comes back once per step. Token ids go to the device with each
// batch the same way. Without a CUDA device the program says so and exits
// with 77. A part whose files are missing (Fashion-MNIST for 1-3; the model,
// scripts/fetch-model, or WordNet for 4) is skipped with a message; when no
// part could run, the exit status is 77 too.
//
// Part 4's options (defaults sized for a GPU): --minilm on|off|only (only:
// parts 1-3 skipped; default on), --minilm-train N training glosses (2000),
// --minilm-test N held-out glosses (500), --minilm-epochs N (2),
// --minilm-max-length N tokens per text (64), --minilm-batch N (32),
// --minilm-lr X for LoRA (5e-4), --minilm-head-lr X (2e-3), --model DIR
// (scripts/fetch-model's cache), --wordnet DIR (/usr/share/wordnet).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "patchwork/cuda.cuh"

#include "../common/text_data.hpp"

namespace pw = patchwork;
namespace tx = text_examples;
using pw::Cuda;

namespace {

using Linear = pw::BasicLinear<float, Cuda>;
using LayerNorm = pw::BasicLayerNorm<float, Cuda>;
using Relu = pw::BasicRelu<float, Cuda>;
using Body = pw::Sequential<Linear, LayerNorm, Relu, Linear, LayerNorm, Relu>;
using LoraLinear = pw::Tune<Linear, pw::LoRA<8, 16>>;
using LoraBody = pw::Sequential<LoraLinear, LayerNorm, Relu, LoraLinear, LayerNorm, Relu>;
using SearchLinear = pw::Tune<Linear, pw::Search<pw::Frozen, pw::Adapter<16>, pw::LoRA<8, 16>, pw::FineTune>>;
using SearchBody = pw::Sequential<SearchLinear, LayerNorm, Relu, SearchLinear, LayerNorm, Relu>;

struct Options {
    std::size_t pretrain_epochs = 8;
    std::size_t epochs = 20;
    std::size_t per_class = 1000;  ///< labelled images per new class (0: all)
    std::size_t test_limit = 0;    ///< first N test images only (0: all)
    std::size_t train_limit = 0;   ///< first N training images only (0: all; smoke runs)
    std::size_t batch = 64;
    std::size_t search_epochs = 6;
    double lambda = 0.5;  ///< the search's parameter penalty
    double lr = 2e-3;
    std::uint64_t seed = 1;
    std::string data_dir = pw::fashion_mnist_default_dir;
    /// Part 4: "on" (after the MLP parts), "off", or "only" (the MLP parts skipped).
    std::string minilm = "on";
    std::size_t minilm_train = 2000;  ///< training glosses
    std::size_t minilm_test = 500;    ///< held-out glosses
    std::size_t minilm_epochs = 2;
    std::size_t minilm_max_length = 64;
    std::size_t minilm_batch = 32;
    double minilm_lr = 5e-4;  ///< LoRA factors (text_transfer's default for LoRA)
    double minilm_head_lr = 2e-3;
    std::filesystem::path model = pw::hf::model_cache_dir();
    std::filesystem::path wordnet = pw::wordnet_default_dir;
};

[[noreturn]] void usage(const std::string& why) {
    std::cerr << "gpu_transfer: " << why << "\n"
              << "usage: gpu_transfer [--pretrain-epochs N] [--epochs N] [--per-class N] [--test-limit N]\n"
                 "                    [--train-limit N] [--batch N] [--search-epochs N] [--lambda X] [--lr X]\n"
                 "                    [--seed N] [--data-dir DIR]\n"
                 "                    [--minilm on|off|only] [--minilm-train N] [--minilm-test N] [--minilm-epochs N]\n"
                 "                    [--minilm-max-length N] [--minilm-batch N] [--minilm-lr X] [--minilm-head-lr X]\n"
                 "                    [--model DIR] [--wordnet DIR]\n";
    std::exit(2);
}

Options parse(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        if (i + 1 >= argc) usage("missing value for " + std::string(a));
        const std::string v = argv[++i];
        try {
            if (a == "--pretrain-epochs") o.pretrain_epochs = std::stoul(v);
            else if (a == "--epochs") o.epochs = std::stoul(v);
            else if (a == "--per-class") o.per_class = std::stoul(v);
            else if (a == "--test-limit") o.test_limit = std::stoul(v);
            else if (a == "--train-limit") o.train_limit = std::stoul(v);
            else if (a == "--batch") o.batch = std::stoul(v);
            else if (a == "--search-epochs") o.search_epochs = std::stoul(v);
            else if (a == "--lambda") o.lambda = std::stod(v);
            else if (a == "--lr") o.lr = std::stod(v);
            else if (a == "--seed") o.seed = std::stoull(v);
            else if (a == "--data-dir") o.data_dir = v;
            else if (a == "--minilm") o.minilm = v;
            else if (a == "--minilm-train") o.minilm_train = std::stoul(v);
            else if (a == "--minilm-test") o.minilm_test = std::stoul(v);
            else if (a == "--minilm-epochs") o.minilm_epochs = std::stoul(v);
            else if (a == "--minilm-max-length") o.minilm_max_length = std::stoul(v);
            else if (a == "--minilm-batch") o.minilm_batch = std::stoul(v);
            else if (a == "--minilm-lr") o.minilm_lr = std::stod(v);
            else if (a == "--minilm-head-lr") o.minilm_head_lr = std::stod(v);
            else if (a == "--model") o.model = v;
            else if (a == "--wordnet") o.wordnet = v;
            else usage("unknown option " + std::string(a));
        } catch (const std::logic_error&) {
            usage("bad value '" + v + "' for " + std::string(a));
        }
    }
    if (o.batch == 0) usage("--batch must be positive");
    if (o.search_epochs == 0) usage("--search-epochs must be positive");
    if (o.minilm != "on" && o.minilm != "off" && o.minilm != "only") usage("--minilm takes on, off or only");
    if (o.minilm_train == 0 || o.minilm_test == 0 || o.minilm_epochs == 0 || o.minilm_batch == 0)
        usage("--minilm-train, --minilm-test, --minilm-epochs and --minilm-batch must be positive");
    if (o.minilm_max_length < 3) usage("--minilm-max-length must be at least 3 ([CLS], a token, [SEP])");
    if (!(o.minilm_lr > 0) || !(o.minilm_head_lr > 0)) usage("--minilm-lr and --minilm-head-lr must be positive");
    return o;
}

/// One epoch of training: each host batch is copied to the device, then forward, loss, backward, step.
template <class Model, class Opt>
double train_epoch(Model& model, Opt& opt, pw::Batcher<float>& batches, std::size_t epoch) {
    batches.start_epoch(epoch);
    double total = 0;
    pw::Tensor<float, Cuda> x;
    for (std::size_t i = 0; i < batches.batches(); ++i) {
        const auto& b = batches.batch(i);
        x = pw::to_device(b.x);
        opt.zero_grad();
        const auto loss = pw::cross_entropy(model.forward(x), std::span<const int>(b.labels));
        model.backward(loss.grad);
        opt.step();
        total += loss.value;
    }
    return total / double(batches.batches());
}

/// Accuracy over a dataset: logits come back to the host for the argmax.
template <class Model>
double accuracy(Model& model, const pw::Dataset<float>& data) {
    pw::Batcher<float> batches(data, {.batch_size = 1000, .shuffle = false});
    std::size_t right = 0;
    for (std::size_t i = 0; i < batches.batches(); ++i) {
        const auto& b = batches.batch(i);
        const pw::Tensor<float> logits = pw::to_host(model.forward(pw::to_device(b.x)));
        for (std::size_t r = 0; r < logits.rows(); ++r) {
            std::size_t best = 0;
            for (std::size_t c = 1; c < logits.cols(); ++c)
                if (logits(r, c) > logits(r, best)) best = c;
            right += int(best) == b.labels[r];
        }
    }
    return double(right) / double(data.size());
}

struct Row {
    std::string policy;
    std::size_t trainable = 0;
    double accuracy = 0, seconds = 0;
};

template <class Model>
Row adapt(const std::string& name, Model& model, const pw::Dataset<float>& train, const pw::Dataset<float>& test,
          const Options& o) {
    model.set_input_grad(false);
    pw::BasicAdamW<float, Cuda> opt(pw::trainable_parameters(model), {.lr = o.lr, .weight_decay = 1e-4});
    pw::Batcher<float> batches(train, {.batch_size = o.batch, .seed = o.seed});
    pw::cuda::synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    for (std::size_t e = 0; e < o.epochs; ++e) train_epoch(model, opt, batches, e);
    pw::cuda::synchronize();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return {name, pw::trainable_count(model), accuracy(model, test), seconds};
}

/// Parts 1-3 (the MLP on Fashion-MNIST).
void run_mlp(const Options& o) {
    auto train_all = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::train);
    if (o.train_limit) train_all = pw::subset(train_all, o.train_limit);
    auto test_all = pw::load_fashion_mnist<float>(o.data_dir, pw::Split::test);
    if (o.test_limit) test_all = pw::subset(test_all, o.test_limit);
    const auto old_train = pw::filter_classes(train_all, {0, 1, 2, 3, 4}, true);
    const auto old_test = pw::filter_classes(test_all, {0, 1, 2, 3, 4}, true);
    const auto new_train = pw::first_per_class(pw::filter_classes(train_all, {5, 6, 7, 8, 9}, true), o.per_class);
    const auto new_test = pw::filter_classes(test_all, {5, 6, 7, 8, 9}, true);

    // 1. Pre-train body + head on the old classes, on the device.
    pw::manual_seed(o.seed);
    // A plain Body (every parameter trains): a Body copied out of a Tune would
    // carry that Tune's decisions into the Tunes below.
    pw::Sequential<Body, Linear> base(
        Body(Linear(784, 256), LayerNorm(256), Relu{}, Linear(256, 256), LayerNorm(256), Relu{}), Linear(256, 5));
    {
        base.set_input_grad(false);
        pw::BasicAdamW<float, Cuda> opt(pw::trainable_parameters(base), {.lr = 2e-3, .weight_decay = 1e-4});
        pw::Batcher<float> batches(old_train, {.batch_size = 128, .seed = o.seed});
        for (std::size_t e = 0; e < o.pretrain_epochs; ++e) train_epoch(base, opt, batches, e);
        std::printf("pre-trained on %zu images of classes 0-4: %.2f%% test accuracy\n", old_train.size(),
                    100 * accuracy(base, old_test));
    }
    const Body& body = base.get<0>();

    // 2. Adapt to the new classes under each policy; every run starts from the same new head.
    pw::manual_seed(o.seed + 1);
    const Linear head(256, 5);
    std::vector<Row> rows;
    {
        pw::Sequential<pw::Tune<Body, pw::Frozen>, Linear> m(pw::Tune<Body, pw::Frozen>(body), head);
        rows.push_back(adapt("head only (body Frozen)", m, new_train, new_test, o));
    }
    {
        pw::Sequential<pw::Tune<Body, pw::NormPatch>, Linear> m(pw::Tune<Body, pw::NormPatch>(body), head);
        rows.push_back(adapt("NormPatch + head", m, new_train, new_test, o));
    }
    {
        pw::Sequential<pw::Tune<Body, pw::Adapter<32>>, Linear> m(pw::Tune<Body, pw::Adapter<32>>(body), head);
        rows.push_back(adapt("Adapter<32> + head", m, new_train, new_test, o));
    }
    {
        LoraBody lora(LoraLinear(body.get<0>()), body.get<1>(), Relu{}, LoraLinear(body.get<3>()), body.get<4>(),
                      Relu{});
        pw::Sequential<pw::Tune<LoraBody, pw::Frozen>, Linear> m(pw::Tune<LoraBody, pw::Frozen>(lora), head);
        rows.push_back(adapt("LoRA<8, 16> + head", m, new_train, new_test, o));
    }
    {
        pw::Sequential<pw::Tune<Body, pw::FineTune>, Linear> m(pw::Tune<Body, pw::FineTune>(body), head);
        rows.push_back(adapt("FineTune", m, new_train, new_test, o));
    }

    const double full = double(rows.back().trainable);

    // 3. Search per body Linear on the device, derive, retrain the derived scheme.
    using Searched = pw::Tune<SearchBody, pw::Frozen>;  // LayerNorms frozen; each Linear decides by search
    const auto searched_model = [&] {
        SearchBody sb(SearchLinear(body.get<0>()), body.get<1>(), Relu{}, SearchLinear(body.get<3>()), body.get<4>(),
                      Relu{});
        return pw::Sequential<Searched, Linear>(Searched(sb), head);
    };
    std::vector<std::size_t> choices;
    std::string scheme;
    {
        auto m = searched_model();
        m.set_input_grad(false);
        const auto [weights_part, alpha_part] = pw::split(new_train, 0.8, o.seed);
        pw::Batcher<float> tsrc(weights_part, {.batch_size = o.batch, .seed = o.seed});
        pw::Batcher<float> vsrc(alpha_part, {.batch_size = o.batch, .seed = o.seed + 1});
        pw::BasicAdamW<float, Cuda> wopt(pw::search::weight_parameters(m), {.lr = o.lr, .weight_decay = 1e-4});
        const auto step = [](auto& model, const pw::Batch<float>& b) {
            const auto loss = pw::cross_entropy(model.forward(pw::to_device(b.x)), std::span<const int>(b.labels));
            model.backward(loss.grad);
            return double(loss.value);
        };
        pw::search::SearchOptions so;
        so.epochs = o.search_epochs;
        so.penalty.lambda = o.lambda;
        so.alpha.lr = 3e-2;
        so.seed = o.seed;
        pw::cuda::synchronize();
        const auto t0 = std::chrono::steady_clock::now();
        pw::search::run(m, wopt, tsrc, vsrc, step, so);
        pw::cuda::synchronize();
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        choices = pw::search::argmax_scheme(m);
        const auto report = pw::search::derive(m);
        std::cout << "\nsearch on the device: " << o.search_epochs << " epochs, lambda " << o.lambda << ", "
                  << seconds << " s\n"
                  << report;
        for (const auto& d : report.modules) scheme += (scheme.empty() ? "" : ", ") + d.chosen;
    }
    {
        // The derived scheme from the pre-trained weights and the fresh head, trained as the rows above.
        auto m = searched_model();
        pw::search::derive(m, choices);
        rows.push_back(adapt("Search: " + scheme, m, new_train, new_test, o));
    }

    std::printf("\nadapting to classes 5-9 on %zu images, %zu epochs, batch %zu, AdamW lr %g\n", new_train.size(),
                o.epochs, o.batch, o.lr);
    std::printf("%-26s %10s %8s %9s %8s\n", "policy", "trainable", "% full", "accuracy", "time(s)");
    for (const auto& r : rows)
        std::printf("%-26s %10zu %7.2f%% %8.2f%% %8.2f\n", r.policy.c_str(), r.trainable,
                    100.0 * double(r.trainable) / full, 100 * r.accuracy, r.seconds);
}

/// Fashion-MNIST's four files (what load_fashion_mnist reads).
bool fashion_mnist_missing(const std::filesystem::path& dir) {
    for (const char* f : {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                          "t10k-labels-idx1-ubyte.gz"})
        if (!std::filesystem::exists(dir / f)) return true;
    return false;
}

// Part 4: the same types on both sides, so that copy_parameters pairs every
// tensor by name (LoRA's factors included: the device model starts where
// text_transfer's CPU model does, for the same seed).
using MiniLmSpec = pw::bert::LoRAQueryValue<8, 16>;
using HostMiniLm = pw::BertModel<pw::BertEncoder<MiniLmSpec>>;
using DeviceMiniLm = pw::BertModel<pw::BertEncoder<MiniLmSpec, float, Cuda>>;

/// Held-out accuracy: pooled logits come back to the host for the argmax.
template <class Model, class Head>
double text_accuracy(Model& model, pw::BasicPooler<float, Cuda>& pool, Head& head, const tx::Split& test,
                     std::int32_t pad) {
    const std::vector<std::size_t> all = tx::iota(test.size());
    std::vector<int> labels;
    std::size_t right = 0;
    for (std::size_t b = 0; b < all.size(); b += 64) {
        const pw::TokenBatch x = tx::make_batch(test, all, b, std::min(all.size(), b + 64), pad, labels);
        const pw::Tensor<float> logits = pw::to_host(head.forward(pool.forward(model.forward(x), x)));
        right += pw::count_correct(logits, labels);
    }
    return double(right) / double(test.size());
}

/// Part 4; false when the model or WordNet is missing (the part is skipped).
bool run_minilm(const Options& o) {
    tx::RunOptions ro;  // text_transfer's data: the same split, subsets and tokenization
    ro.model = o.model;
    ro.wordnet = o.wordnet;
    ro.train = o.minilm_train;
    ro.test = o.minilm_test;
    ro.max_length = o.minilm_max_length;
    if (tx::inputs_missing(ro)) {
        std::printf("gpu_transfer: skipping part 4 (LoRA on all-MiniLM-L6-v2)\n");
        return false;
    }
    const auto tok = pw::WordPieceTokenizer::from_vocab(o.model / "vocab.txt");
    const tx::NounData d = tx::load_noun_supersense(ro, tok);

    pw::manual_seed(o.seed);  // LoRA's A factors are drawn at construction, here the host model's
    DeviceMiniLm model = [&] {
        HostMiniLm host = pw::hf::load_bert<HostMiniLm>(o.model);
        DeviceMiniLm device(host.config());
        pw::search::copy_parameters(host, device);
        return device;
    }();
    pw::BasicLinear<float, Cuda> head(model.out_features(), d.classes);
    {
        pw::Linear host_head(model.out_features(), d.classes);
        pw::initialize(host_head, o.seed);
        pw::search::copy_parameters(host_head, head);
    }
    head.set_input_grad(true);  // the LoRA factors below it train
    pw::BasicPooler<float, Cuda> pool;  // mean over the real tokens
    const std::size_t lora = pw::trainable_count(model), heads = pw::trainable_count(head);
    const std::size_t full = pw::parameter_count(model) - lora;  // the pre-trained encoder and embeddings

    pw::BasicAdamW<float, Cuda> opt(pw::trainable_parameters(head), {.lr = o.minilm_head_lr, .weight_decay = 0.01});
    opt.add_group(pw::trainable_parameters(model), {.lr = o.minilm_lr, .weight_decay = 0.01});
    const std::size_t n = d.train.size(), steps_per_epoch = (n + o.minilm_batch - 1) / o.minilm_batch;
    const std::size_t total = steps_per_epoch * o.minilm_epochs;
    const pw::WarmupCosine schedule{.warmup_steps = std::max<std::size_t>(1, total / 10), .total_steps = total};

    std::size_t tokens = 0;
    for (const auto& e : d.train.enc) tokens += e.size();
    std::printf("\nLoRA r=8, alpha=16 on query and value of all-MiniLM-L6-v2, on the device: noun supersense, %zu "
                "classes, %zu training and %zu held-out glosses, %.1f tokens per training text (at most %zu)\n",
                d.classes, n, d.test.size(), double(tokens) / double(n), o.minilm_max_length);
    std::printf("trainable: %zu LoRA + %zu head = %zu (LoRA %.3f%% of the %zu pre-trained parameters); batch %zu, "
                "AdamW lr %g (head %g), 10%% warm-up then cosine\n",
                lora, heads, lora + heads, 100.0 * double(lora) / double(full), full, o.minilm_batch, o.minilm_lr,
                o.minilm_head_lr);
    std::printf("%5s %10s %9s %8s\n", "epoch", "mean loss", "accuracy", "time(s)");

    std::vector<std::size_t> order = tx::iota(n);
    pw::Rng rng(pw::detail::mix64(o.seed));
    std::vector<int> labels;
    std::size_t step = 0;
    for (std::size_t epoch = 0; epoch < o.minilm_epochs; ++epoch) {
        pw::detail::shuffle_indices(order, rng);
        pw::cuda::synchronize();
        const auto t0 = std::chrono::steady_clock::now();
        double loss_sum = 0;
        for (std::size_t b = 0; b < n; b += o.minilm_batch) {
            const pw::TokenBatch x = tx::make_batch(d.train, order, b, std::min(n, b + o.minilm_batch), d.pad, labels);
            opt.set_lr_factor(schedule(step++));
            opt.zero_grad();
            const auto& pooled = pool.forward(model.forward(x), x);
            const auto loss = pw::cross_entropy(head.forward(pooled), std::span<const int>(labels));
            model.backward(pool.backward(head.backward(loss.grad)));
            opt.step();
            loss_sum += loss.value;
        }
        pw::cuda::synchronize();
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::printf("%5zu %10.4f %8.2f%% %8.2f\n", epoch + 1, loss_sum / double(steps_per_epoch),
                    100 * text_accuracy(model, pool, head, d.test, d.pad), seconds);
        std::fflush(stdout);
    }
    return true;
}

}  // namespace

int main(int argc, char** argv) try {
    const Options o = parse(argc, argv);
    if (pw::cuda::device_count() == 0) {
        std::printf("gpu_transfer: no CUDA device is available; nothing to run (exit 77)\n");
        return 77;
    }
    bool ran = false;
    if (o.minilm != "only") {
        if (fashion_mnist_missing(o.data_dir)) {
            std::printf("gpu_transfer: no Fashion-MNIST at %s (Debian package dataset-fashion-mnist): "
                        "skipping parts 1-3\n",
                        o.data_dir.c_str());
        } else {
            run_mlp(o);
            ran = true;
        }
    }
    if (o.minilm != "off") ran = run_minilm(o) || ran;
    if (!ran) {
        std::printf("gpu_transfer: no part could run (exit 77)\n");
        return 77;
    }
    return 0;
} catch (const pw::Error& e) {
    std::cerr << "gpu_transfer: " << e.what() << '\n';
    return 1;
}
