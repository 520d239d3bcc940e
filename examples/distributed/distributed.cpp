// Data-parallel adaptation of the pre-trained all-MiniLM-L6-v2 on N processes:
// WordNet noun supersense (26 classes), the same task and pipeline as
// text_transfer, with each global batch split across the ranks and only the
// trainable gradients averaged (patchwork::dist over MPI).
//
//   scripts/fetch-model     # once: caches the model
//   mpirun -np 2 build/examples/distributed/distributed [--method lora] [--train 320] [--test 200]
//       [--epochs 2] [--batch 16] [--max-length 64] [--seed 1] [--exact] [--overlap 0|1]
//       [--bucket-kib 4096] [--save-peft DIR] [--model DIR] [--wordnet DIR] [--quiet]
//
// --method: lora (r=8, alpha=16 on query and value), adapter (one Pfeiffer
// adapter of 24 per layer), ln (every LayerNorm, NormPatch), bitfit (every
// Linear bias) or finetune (every parameter); the head always trains. --batch
// is the global batch: rank r of P takes rows [r B / P, (r + 1) B / P) of
// each. Every rank loads the data and the model; rank 0's initial values
// (head, adapters, LoRA A) are broadcast, so the run equals one process
// training on the whole batches, up to the order of floating-point sums
// (--exact: gather and sum in rank order, bit-reproducible).
//
// Printed: the trainable parameters and the bytes all-reduced per step
// (measured by the communicator, this rank's contribution), the mean step
// time and where it went (compute against waiting for the reduction), the
// loss per epoch (mean over all ranks' samples) and the test accuracy
// (evaluated on shards, summed). --save-peft writes the LoRA adapter in PEFT's
// layout from rank 0 only (atomically). Threads per process: one, or
// OMP_NUM_THREADS with an OpenMP build (meson -Dopenmp=enabled), which is how
// docs/distributed.md compares 1 process x 2 threads with 2 processes x 1.
//
// Exit status 77 (and a message) when the model or WordNet is not there; 1
// when the ranks end with different parameters (checked by checksum).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <patchwork/dist/data_parallel.hpp>
#include <patchwork/dist/mpi.hpp>
#include <patchwork/patchwork.hpp>

#include "../common/text_data.hpp"

namespace pw = patchwork;
namespace dist = patchwork::dist;
namespace tx = text_examples;

namespace {

/// A global batch of sequences and their labels; ShardedSource splits it by
/// rows through the batch_rows / slice_rows overloads below (found by
/// argument-dependent lookup: the library's customisation point for batch types).
struct TextBatch {
    pw::TokenBatch x;
    std::vector<int> labels;
};
std::size_t batch_rows(const TextBatch& b) { return b.labels.size(); }
TextBatch slice_rows(const TextBatch& b, std::size_t begin, std::size_t end) {
    return {dist::slice_rows(b.x, begin, end),
            std::vector<int>(b.labels.begin() + std::ptrdiff_t(begin), b.labels.begin() + std::ptrdiff_t(end))};
}

/// The global batches of a split: a seeded shuffle per epoch, the same on every rank.
class TextBatches {
public:
    TextBatches(const tx::Split& split, std::size_t batch, std::int32_t pad, std::uint64_t seed, bool shuffle)
        : split_(split), batch_(batch), pad_(pad), seed_(seed), shuffle_(shuffle), order_(tx::iota(split.size())) {}
    void start_epoch(std::size_t epoch) {
        order_ = tx::iota(split_.size());
        if (!shuffle_) return;
        pw::Rng rng(pw::detail::mix64(seed_ ^ pw::detail::mix64(epoch + 1)));
        pw::detail::shuffle_indices(order_, rng);
    }
    [[nodiscard]] std::size_t batches() const { return (split_.size() + batch_ - 1) / batch_; }
    const TextBatch& batch(std::size_t i) {
        const std::size_t b = i * batch_, e = std::min(split_.size(), b + batch_);
        current_.x = tx::make_batch(split_, order_, b, e, pad_, current_.labels);
        return current_;
    }

private:
    const tx::Split& split_;
    std::size_t batch_;
    std::int32_t pad_;
    std::uint64_t seed_;
    bool shuffle_;
    std::vector<std::size_t> order_;
    TextBatch current_;
};


struct Options : tx::RunOptions {
    Options() {
        train = 320;
        test = 200;
        batch = 16;
    }
    std::string method = "lora";
    bool exact = false;
    bool overlap = false;
    std::size_t bucket_kib = 4096;
    std::string save_peft;
};

/// Learning rates of text_transfer's methods (docs/results.md section 5).
double method_lr(std::string_view m) {
    if (m == "lora") return 5e-4;
    if (m == "finetune") return 5e-5;
    return 1e-3;
}

Options parse(int argc, char** argv) {
    Options o;
    tx::parse_args(
        "distributed", argc, argv, o, [](std::string_view m) { return std::string(m); },
        [&](std::string_view flag, const auto& value) {
            if (flag == "--method") {
                o.method = value();
                if (o.method != "lora" && o.method != "adapter" && o.method != "ln" && o.method != "bitfit" &&
                    o.method != "finetune")
                    throw pw::ConfigError("distributed: --method is one of lora, adapter, ln, bitfit, finetune; got '" +
                                          o.method + "'");
            } else if (flag == "--exact") {
                o.exact = true;
            } else if (flag == "--overlap") {
                o.overlap = tx::parse_uint("distributed", flag, value(), 0) != 0;
            } else if (flag == "--bucket-kib") {
                o.bucket_kib = tx::parse_uint("distributed", flag, value(), 1);
            } else if (flag == "--save-peft") {
                o.save_peft = value();
            } else {
                return false;
            }
            return true;
        });
    return o;
}

template <class Body>
int train(dist::Communicator& comm, const Options& o, const tx::NounData& d) {
    const bool root = comm.rank() == 0;
    pw::manual_seed(o.seed + 1000 * std::uint64_t(comm.rank()));  // rank 0's draws win: synchronize_model below
    tx::Classifier<Body> model{pw::hf::load_bert<Body>(o.model), pw::Pooler{}, pw::Linear(384, d.classes)};
    pw::initialize(model.head, o.seed + std::uint64_t(comm.rank()));
    model.head.set_path("head");
    dist::synchronize_model(comm, model);

    const std::size_t trainable = pw::trainable_count(model);
    pw::AdamW inner(pw::trainable_parameters(model.head), {.lr = o.head_lr, .weight_decay = 0.01});
    if (pw::any_trainable(model.body))
        inner.add_group(pw::trainable_parameters(model.body), {.lr = method_lr(o.method), .weight_decay = 0.01});
    dist::DataParallel opt(comm, inner,
                           {.bucket_bytes = o.bucket_kib * 1024, .overlap = o.overlap, .exact_order = o.exact});

    TextBatches global(d.train, o.batch, d.pad, o.seed, true);
    dist::ShardedSource shard(comm, global);
    const std::size_t total = global.batches() * o.epochs;
    const pw::WarmupCosine schedule{.warmup_steps = std::max<std::size_t>(1, total / 10), .total_steps = total};
    if (root)
        std::printf("%d rank(s), method %s: %zu trainable parameters (%.2f %% of %zu), global batch %zu\n",
                    comm.size(), o.method.c_str(), trainable, 100.0 * double(trainable) / double(pw::parameter_count(model)),
                    pw::parameter_count(model), o.batch);

    using clock = std::chrono::steady_clock;
    std::size_t step = 0;
    double step_seconds = 0, wait_seconds = 0;
    for (std::size_t epoch = 0; epoch < o.epochs; ++epoch) {
        shard.start_epoch(epoch);
        double loss_sum[2] = {0, 0};  // sum of loss x rows, rows
        for (std::size_t i = 0; i < shard.batches(); ++i, ++step) {
            opt.set_lr_factor(schedule(step));
            const auto t0 = clock::now();
            const double wait0 = comm.stats().wait_seconds;
            const TextBatch& b = shard.batch(i);
            const auto r = pw::optimizer_step(model, opt, [&] {
                const auto ce = pw::cross_entropy(model.forward(b.x), b.labels);
                model.backward(ce.grad);
                return double(ce.value);
            });
            step_seconds += std::chrono::duration<double>(clock::now() - t0).count();
            wait_seconds += comm.stats().wait_seconds - wait0;
            loss_sum[0] += r.loss * double(b.labels.size());
            loss_sum[1] += double(b.labels.size());
        }
        comm.allreduce_sum(loss_sum, 2, "the epoch loss all-reduce");
        if (root && !o.quiet)
            std::printf("  epoch %zu: mean loss %.4f over %.0f samples\n", epoch + 1, loss_sum[0] / loss_sum[1],
                        loss_sum[1]);
    }

    // Test accuracy: every rank its shard of each test batch, counts summed.
    TextBatches test(d.test, 64, d.pad, 0, false);
    dist::ShardedSource test_shard(comm, test);
    test_shard.start_epoch(0);
    double counts[2] = {0, 0};
    for (std::size_t i = 0; i < test_shard.batches(); ++i) {
        const TextBatch& b = test_shard.batch(i);
        counts[0] += double(pw::count_correct(model.forward(b.x), b.labels));
        counts[1] += double(b.labels.size());
    }
    comm.allreduce_sum(counts, 2, "the test count all-reduce");

    if (!o.save_peft.empty()) {
        if constexpr (requires { pw::hf::save_peft_lora(model.body, o.save_peft); })
            dist::on_root(comm, [&] { pw::hf::save_peft_lora(model.body, o.save_peft); });
        else
            throw pw::ConfigError("distributed: --save-peft needs --method lora");
    }
    dist::check_in_sync(comm, model);  // every rank ends with the same parameters
    if (root) {
        const auto& red = opt.last_reduction();
        std::printf("bytes all-reduced per step: %zu (%zu buckets, %zu sent during backward)%s\n", opt.bytes_per_step(),
                    red.buckets, red.early, o.exact ? ", exact order (all-gather)" : "");
        std::printf("step: %.1f ms mean over %zu steps, of which %.1f ms waiting for the reduction\n",
                    1e3 * step_seconds / double(step), step, 1e3 * wait_seconds / double(step));
        std::printf("test accuracy: %.2f %% on %.0f synsets\n", 100 * counts[0] / counts[1], counts[1]);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    dist::MpiEnvironment env(argc, argv);
    dist::MpiCommunicator comm;
    Options o;
    try {
        o = parse(argc, argv);
    } catch (const std::exception& e) {
        if (comm.rank() == 0) tx::report_error("distributed", e);
        return 2;
    }
    if (tx::inputs_missing(o)) return 77;
    return dist::run_guarded(comm, [&] {
        const pw::WordPieceTokenizer tok = pw::WordPieceTokenizer::from_vocab(o.model / "vocab.txt");
        const tx::NounData d = tx::load_noun_supersense(o, tok);
        using Enc = pw::BertEncoder<>;
        if (o.method == "lora") return train<pw::BertModel<pw::BertEncoder<pw::bert::LoRAQueryValue<8, 16>>>>(comm, o, d);
        if (o.method == "adapter") return train<pw::BertModel<pw::BertEncoder<pw::bert::Pfeiffer<24>>>>(comm, o, d);
        if (o.method == "ln") return train<pw::BertModel<Enc, pw::NormPatch>>(comm, o, d);
        if (o.method == "bitfit") return train<pw::BertModel<Enc, pw::BiasOnly>>(comm, o, d);
        return train<pw::BertModel<Enc, pw::FineTune>>(comm, o, d);
    });
}
