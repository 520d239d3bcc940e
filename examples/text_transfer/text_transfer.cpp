// Text transfer on the pre-trained all-MiniLM-L6-v2: WordNet noun supersense
// (26 classes; text = the synset's lemmas and its gloss) learned with each
// adaptation method under the same budget, side by side.
//
//   method     trainable besides the head            model type
//   head       nothing (frozen encoder)              BertModel<BertEncoder<>>
//   bitfit     the bias of every Linear (BitFit)      BertModel<BertEncoder<>, BiasOnly>
//   ln         every LayerNorm scale and shift       BertModel<BertEncoder<>, NormPatch>
//   pfeiffer   one adapter per layer (after the FFN) BertEncoder<bert::Pfeiffer<24>>   (reduction 16)
//   houlsby    two adapters per layer                BertEncoder<bert::Houlsby<24>>    (reduction 16)
//   lora       LoRA r=8, alpha=16 on query, value    BertEncoder<bert::LoRAQueryValue<8, 16>>
//   finetune   every parameter                       BertModel<BertEncoder<>, FineTune>
//
// Every run: mean pooling over the real tokens, a Linear(384, 26) head,
// cross-entropy, AdamW (weight decay 0.01 on every trainable parameter), a
// linear warm-up over the first 10 % of the steps then cosine decay to 0, no
// dropout, the same examples, batch size, epochs and maximum length for every
// method. The learning rate is the method's own (--lr-METHOD; defaults in
// `methods()` below); the head always uses --head-lr. A run's seed sets the
// head, the injected parameters (adapters, LoRA A) and the batch order; the
// data are the same for every run (--data-seed).
//
// Data: the seeded 80/10/10 split of wordnet_task (io/wordnet.hpp), then a
// random subset of --train training and --test test synsets (the default run
// is such a subset, sized to finish in under 10 minutes on 2 cores; the
// flags scale it up). Test accuracy is reported, with mean and sample
// standard deviation over --seeds runs, the trainable parameters besides the
// head and their share of full fine-tuning's, and seconds per epoch.
//
//   scripts/fetch-model     # once: caches the model
//   build/examples/text_transfer/text_transfer [--methods head,lora,...] [--seeds 1]
//       [--train 400] [--test 400] [--epochs 2] [--batch 16] [--max-length 64]
//       [--csv FILE] [--dump-data FILE] [--model DIR] [--wordnet DIR]
//
// --csv writes one line per (method, seed) for plot.py; --dump-data writes
// the tokenized examples (JSON lines: split, label, ids) for the PyTorch + PEFT
// side (text_transfer_torch.py), so both sides train on identical inputs.
// The peak resident memory printed last is the process's; run one method per
// process to read it per method. Threads: one, unless the build has OpenMP
// (meson -Dopenmp=enabled; then OMP_NUM_THREADS); the example is compiled with
// -march=native (examples/meson.build).
//
// Exit status 77 (and a message) when the model or WordNet is not there.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>
#include <patchwork/patchwork.hpp>

#include "../common/text_data.hpp"

namespace pw = patchwork;
namespace fs = std::filesystem;
namespace tx = text_examples;

namespace {

struct Options : tx::RunOptions {
    Options() {
        methods = {"head", "bitfit", "ln", "pfeiffer", "houlsby", "lora", "finetune"};
        train = 400;
        test = 400;
    }
    std::string dump;
};

using tx::Method;

/// The methods, in table order, with their default learning rates: 1e-3 for
/// the small parameter sets (BitFit, LN tuning, adapters; Houlsby et al. and
/// Ben Zaken et al. use 1e-4 to 1e-3), 5e-4 for LoRA, 5e-5 for full fine-tuning.
const std::vector<Method>& methods() {
    static const std::vector<Method> m = {
        {"head", "head only (frozen encoder)", 0.0},   {"bitfit", "BitFit (Linear biases)", 1e-3},
        {"ln", "LN tuning (NormPatch)", 1e-3},         {"pfeiffer", "Pfeiffer adapter (24)", 1e-3},
        {"houlsby", "Houlsby adapters (24)", 1e-3},    {"lora", "LoRA r=8 on query, value", 5e-4},
        {"finetune", "full fine-tuning", 5e-5},
    };
    return m;
}

const Method& find_method(std::string_view name) { return tx::find_method("text_transfer", methods(), name); }

Options parse(int argc, char** argv) {
    Options o;
    tx::parse_args("text_transfer", argc, argv, o, [](std::string_view m) { return find_method(m).name; },
                   [&](std::string_view flag, const auto& value) {
                       if (flag != "--dump-data") return false;
                       o.dump = value();
                       return true;
                   });
    return o;
}

using tx::Split;

using Data = tx::NounData;

Data load_data(const Options& o, const pw::WordPieceTokenizer& tok) { return tx::load_noun_supersense(o, tok); }

using tx::make_batch;

void dump_data(const Data& d, const std::string& path) {
    std::ofstream out(path);
    const auto add = [&](const char* split, const Split& s) {
        for (std::size_t i = 0; i < s.enc.size(); ++i)
            out << nlohmann::json{{"split", split}, {"label", s.labels[i]}, {"ids", s.enc[i].ids}}.dump() << '\n';
    };
    add("train", d.train);
    add("test", d.test);
    if (!out.flush()) throw pw::IoError("text_transfer: cannot write " + path);
}

struct RunResult {
    double accuracy = 0;
    std::size_t trainable = 0;  ///< besides the head
    double seconds_per_epoch = 0;
    double final_loss = 0;
};

template <class Model>
RunResult run(const Options& o, const Data& d, const Method& m, std::uint64_t seed) {
    pw::manual_seed(seed);  // the injected parameters are drawn at construction
    Model model = pw::hf::load_bert<Model>(o.model);
    pw::Linear head(model.out_features(), d.classes);
    pw::initialize(head, seed);
    pw::Pooler pool;
    RunResult r;
    r.trainable = pw::trainable_count(model);
    const double lr = o.lr.contains(m.name) ? o.lr.at(m.name) : m.lr;
    pw::AdamW opt(pw::trainable_parameters(head), {.lr = o.head_lr, .weight_decay = 0.01});
    if (r.trainable > 0) opt.add_group(pw::trainable_parameters(model), {.lr = lr, .weight_decay = 0.01});
    const std::size_t n = d.train.enc.size(), steps_per_epoch = (n + o.batch - 1) / o.batch;
    const std::size_t total = steps_per_epoch * o.epochs;
    const pw::WarmupCosine schedule{.warmup_steps = std::max<std::size_t>(1, total / 10), .total_steps = total};

    std::vector<std::size_t> order = tx::iota(n);
    pw::Rng rng(pw::detail::mix64(seed));
    std::vector<int> labels;
    std::size_t step = 0;
    double seconds = 0, loss_sum = 0;
    for (std::size_t epoch = 0; epoch < o.epochs; ++epoch) {
        pw::detail::shuffle_indices(order, rng);
        const auto t0 = std::chrono::steady_clock::now();
        loss_sum = 0;
        for (std::size_t b = 0; b < n; b += o.batch) {
            const pw::TokenBatch x = make_batch(d.train, order, b, std::min(n, b + o.batch), d.pad, labels);
            opt.set_lr_factor(schedule(step++));
            pw::zero_grad(model);
            pw::zero_grad(head);
            const auto& e = pool.forward(model.forward(x), x);
            const auto ce = pw::cross_entropy(head.forward(e), labels);
            head.set_input_grad(r.trainable > 0);
            const auto& de = head.backward(ce.grad);
            if (r.trainable > 0) model.backward(pool.backward(de));
            opt.step();
            loss_sum += ce.value;
        }
        seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (!o.quiet)
            std::printf("    %-9s seed %llu  epoch %zu: mean loss %.4f  (%.1f s)\n", m.name, (unsigned long long)seed,
                        epoch + 1, loss_sum / double(steps_per_epoch), seconds);
    }
    r.seconds_per_epoch = seconds / double(o.epochs);
    r.final_loss = loss_sum / double(steps_per_epoch);

    const std::vector<std::size_t> all = tx::iota(d.test.size());
    std::size_t correct = 0;
    for (std::size_t b = 0; b < all.size(); b += 64) {
        const pw::TokenBatch x = make_batch(d.test, all, b, std::min(all.size(), b + 64), d.pad, labels);
        correct += pw::count_correct(head.forward(pool.forward(model.forward(x), x)), labels);
    }
    r.accuracy = double(correct) / double(all.size());
    return r;
}

RunResult run_method(const Options& o, const Data& d, const Method& m, std::uint64_t seed) {
    using Enc = pw::BertEncoder<>;
    const std::string_view name = m.name;
    if (name == "head") return run<pw::BertModel<Enc>>(o, d, m, seed);
    if (name == "bitfit") return run<pw::BertModel<Enc, pw::BiasOnly>>(o, d, m, seed);
    if (name == "ln") return run<pw::BertModel<Enc, pw::NormPatch>>(o, d, m, seed);
    if (name == "pfeiffer") return run<pw::BertModel<pw::BertEncoder<pw::bert::Pfeiffer<24>>>>(o, d, m, seed);
    if (name == "houlsby") return run<pw::BertModel<pw::BertEncoder<pw::bert::Houlsby<24>>>>(o, d, m, seed);
    if (name == "lora") return run<pw::BertModel<pw::BertEncoder<pw::bert::LoRAQueryValue<8, 16>>>>(o, d, m, seed);
    return run<pw::BertModel<Enc, pw::FineTune>>(o, d, m, seed);
}

}  // namespace

int main(int argc, char** argv) try {
    const Options o = parse(argc, argv);
    if (tx::inputs_missing(o)) return 77;
    const auto tok = pw::WordPieceTokenizer::from_vocab(o.model / "vocab.txt");
    const Data d = load_data(o, tok);
    std::size_t tokens = 0;
    for (const auto& e : d.train.enc) tokens += e.size();
    std::printf("noun supersense, %zu classes: %zu training and %zu test synsets (data seed %llu), %.1f tokens per "
                "training text on average (at most %zu)\n",
                d.classes, d.train.enc.size(), d.test.enc.size(), (unsigned long long)o.data_seed,
                double(tokens) / double(d.train.enc.size()), o.max_length);
    std::printf("%zu epochs, batch %zu, AdamW (weight decay 0.01), 10%% warm-up then cosine, head lr %g, %zu seeds "
                "from %llu\n",
                o.epochs, o.batch, o.head_lr, o.seeds, (unsigned long long)o.seed);
    if (!o.dump.empty()) {
        dump_data(d, o.dump);
        std::printf("tokenized data written to %s\n", o.dump.c_str());
    }

    std::ofstream csv;
    if (!o.csv.empty()) {
        csv.open(o.csv);
        if (!csv) throw pw::IoError("text_transfer: cannot write " + o.csv);
        csv << "method,seed,accuracy,trainable,seconds_per_epoch,final_loss,lr\n";
    }
    struct Row {
        const Method* m;
        std::vector<double> acc, secs;
        std::size_t trainable = 0;
    };
    std::vector<Row> rows;
    for (const auto& name : o.methods) {
        const Method& m = find_method(name);
        Row row{&m, {}, {}, 0};
        for (std::size_t s = 0; s < o.seeds; ++s) {
            const std::uint64_t seed = o.seed + s;
            const RunResult r = run_method(o, d, m, seed);
            row.acc.push_back(r.accuracy);
            row.secs.push_back(r.seconds_per_epoch);
            row.trainable = r.trainable;
            std::printf("  %-9s seed %llu: test accuracy %.4f, %zu trainable besides the head, %.1f s per epoch\n",
                        m.name, (unsigned long long)seed, r.accuracy, r.trainable, r.seconds_per_epoch);
            std::fflush(stdout);
            if (csv)
                csv << m.name << ',' << seed << ',' << r.accuracy << ',' << r.trainable << ',' << r.seconds_per_epoch
                    << ',' << r.final_loss << ',' << (o.lr.contains(m.name) ? o.lr.at(m.name) : m.lr) << '\n';
        }
        rows.push_back(std::move(row));
    }

    // Full fine-tuning's trainable count: every parameter of the encoder and embeddings.
    pw::BertModel<pw::BertEncoder<>> shape_only(pw::hf::read_bert_config(o.model / "config.json"));
    const std::size_t full = pw::parameter_count(shape_only);
    std::printf("\n| method | trainable (besides the head) | %% of full fine-tuning | test accuracy (mean +- sd) | "
                "s per epoch |\n|---|---:|---:|---:|---:|\n");
    for (const Row& r : rows) {
        const pw::MeanSd a = pw::mean_sd(r.acc), t = pw::mean_sd(r.secs);
        std::printf("| %s | %zu | %.3f %% | %.2f +- %.2f %% | %.1f |\n", r.m->label, r.trainable,
                    100.0 * double(r.trainable) / double(full), 100 * a.mean, 100 * a.sd, t.mean);
    }
    std::printf("peak resident memory of this process: %.0f MiB\n", tx::peak_rss_mib());
    return 0;
} catch (const pw::Error& e) {
    tx::report_error("text_transfer", e);
    return 1;
}
