// patchwork side of the transformer benchmarks on the pre-trained
// all-MiniLM-L6-v2, the same configurations as benchmarks/torch_bert.py:
//   infer-32x64, infer-1x16        frozen BertModel forward: sentences/s (batch / median s per forward)
//   lora-8x32, lora-32x64          one training step, LoRA r=8, alpha 16 on query and value
//   finetune-8x32, finetune-32x64  one training step, every weight trainable
// Random token ids from a seeded generator (1000..30521), token types 0, full
// mask. A step = zero_grad, forward, mean pooling, Linear(384, 4) head,
// cross-entropy against seeded labels, backward, AdamW (lr 1e-4, weight decay
// 0.01) on the trainable parameters. Median of --iters timed runs after
// --warmup. `--only NAME` runs one configuration and reports the process's
// peak RSS (ru_maxrss, model loading included) and the RSS before loading.
// Output: one JSON object a line, then a table for people ('#' lines).
// Exit 77 when the model is not cached (scripts/fetch-model).
//
//   bert_bench [--model DIR] [--iters 20] [--warmup 3] [--configs a,b] [--only NAME]
#include <sys/resource.h>
#include <time.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "bert_inputs.hpp"
#include "common.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/train/loss.hpp"
#include "patchwork/train/optimizer.hpp"
#include "patchwork/transformer/bert.hpp"
#include "patchwork/transformer/hf_checkpoint.hpp"

namespace pw = patchwork;
namespace fs = std::filesystem;

namespace {

double status_mib(const char* key) {
    std::ifstream f("/proc/self/status");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind(key, 0) == 0) return std::atof(line.c_str() + std::string(key).size() + 1) / 1024.0;
    return 0;
}

double cpu_seconds() {
    timespec t{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

/// CPU time (all threads of the process) of each timed run, median; beside the
/// wall time it shows how much of a run a loaded machine took away.
std::vector<double> cpu_times;

template <class F>
std::vector<double> timed(F&& f, int iters, int warmup) {
    for (int i = 0; i < warmup; ++i) f();
    std::vector<double> s;
    cpu_times.clear();
    for (int i = 0; i < iters; ++i) {
        const double c0 = cpu_seconds();
        const auto t0 = std::chrono::steady_clock::now();
        f();
        s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        cpu_times.push_back(cpu_seconds() - c0);
    }
    return s;
}

struct Row {
    std::string name;
    double median_ms, p10_ms, p90_ms;
    std::string note;
    double cpu_ms = bench::median(cpu_times) * 1e3;  ///< of the timings just taken
};

template <class Model>
Row train(const fs::path& dir, const std::string& name, std::size_t b, std::size_t t, int iters, int warmup) {
    Model model = pw::hf::load_bert<Model>(dir);
    pw::Linear head(384, 4);
    pw::initialize(head, 7);
    auto params = pw::trainable_parameters(model);
    for (auto* p : pw::trainable_parameters(head)) params.push_back(p);
    pw::AdamW opt(params, {.lr = 1e-4, .weight_decay = 0.01});
    const pw::TokenBatch x = bench::random_batch(b, t, 1234);
    pw::Rng rng(99);
    std::vector<int> labels(b);
    for (auto& l : labels) l = int(rng.next() % 4);
    pw::Pooler pool;
    float loss = 0;
    const auto step = [&] {
        pw::zero_grad(model);
        pw::zero_grad(head);
        const auto& e = pool.forward(model.forward(x), x);
        const auto ce = pw::cross_entropy(head.forward(e), labels);
        head.set_input_grad(true);
        model.backward(pool.backward(head.backward(ce.grad)));
        opt.step();
        loss = ce.value;
    };
    const auto s = timed(step, iters, warmup);
    std::size_t trainable = pw::trainable_count(model) + pw::trainable_count(head);
    const std::string kind = name.substr(0, name.find('-')), shape = name.substr(name.find('-') + 1);
    bench::emit("patchwork.bert.train." + kind + "." + shape, bench::median(s) * 1e3, "ms/step");
    return {name, bench::median(s) * 1e3, bench::quantile(s, 0.1) * 1e3, bench::quantile(s, 0.9) * 1e3,
            std::to_string(trainable) + " trainable, loss " + std::to_string(loss)};
}

Row infer(const fs::path& dir, const std::string& name, std::size_t b, std::size_t t, int iters, int warmup) {
    using Model = pw::BertModel<pw::BertEncoder<>>;
    Model model = pw::hf::load_bert<Model>(dir);
    const pw::TokenBatch x = bench::random_batch(b, t, 1234);
    const auto s = timed([&] { (void)model.forward(x); }, iters, warmup);
    const double med = bench::median(s);
    bench::emit("patchwork.bert.infer." + name.substr(name.find('-') + 1), double(b) / med, "sentences/s");
    return {name, med * 1e3, bench::quantile(s, 0.1) * 1e3, bench::quantile(s, 0.9) * 1e3,
            std::to_string(double(b) / med) + " sentences/s"};
}

Row run(const fs::path& dir, const std::string& name, int iters, int warmup) {
    using Lora = pw::BertModel<pw::BertEncoder<pw::bert::LoRAQueryValue<8, 16>>>;
    using Full = pw::BertModel<pw::BertEncoder<>, pw::FineTune>;
    if (name == "infer-32x64") return infer(dir, name, 32, 64, iters, warmup);
    if (name == "infer-1x16") return infer(dir, name, 1, 16, iters, warmup);
    if (name == "lora-8x32") return train<Lora>(dir, name, 8, 32, iters, warmup);
    if (name == "lora-32x64") return train<Lora>(dir, name, 32, 64, iters, warmup);
    if (name == "finetune-8x32") return train<Full>(dir, name, 8, 32, iters, warmup);
    if (name == "finetune-32x64") return train<Full>(dir, name, 32, 64, iters, warmup);
    std::fprintf(stderr, "bert_bench: unknown configuration %s\n", name.c_str());
    std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
    fs::path dir = pw::hf::model_cache_dir();
    int iters = 20, warmup = 3;
    std::string configs = "infer-32x64,infer-1x16,lora-8x32,lora-32x64,finetune-8x32,finetune-32x64", only;
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string a = argv[i];
        if (a == "--model") dir = argv[i + 1];
        else if (a == "--iters") iters = std::atoi(argv[i + 1]);
        else if (a == "--warmup") warmup = std::atoi(argv[i + 1]);
        else if (a == "--configs") configs = argv[i + 1];
        else if (a == "--only") only = argv[i + 1];
    }
    if (!fs::exists(dir / "model.safetensors")) {
        std::printf("# bert_bench: skipped: no model at %s (scripts/fetch-model)\n", dir.string().c_str());
        return 77;
    }
    const int threads = bench::configure_threads();
    if (!only.empty()) {
        const double before = status_mib("VmRSS");
        run(dir, only, iters, warmup);
        rusage u{};
        getrusage(RUSAGE_SELF, &u);
        const std::string kind = only.substr(0, only.find('-')), shape = only.substr(only.find('-') + 1);
        bench::emit("patchwork.bert.peak_rss." + kind + "." + shape, double(u.ru_maxrss) / 1024.0, "MiB");
        bench::emit("patchwork.bert.rss_before_load." + kind + "." + shape, before, "MiB");
        return 0;
    }
    std::vector<Row> rows;
    for (const auto& c : bench::split(configs)) rows.push_back(run(dir, c, iters, warmup));
    std::printf("# %s\n", bench::build_info(threads).c_str());
    double load = 0;
    if (FILE* f = std::fopen("/proc/loadavg", "r")) {
        if (std::fscanf(f, "%lf", &load) != 1) load = 0;
        std::fclose(f);
    }
    std::printf("# 1-minute load average %.2f after the timings\n", load);
    std::printf("# %-16s %10s %9s %9s %9s  notes\n", "config", "median ms", "p10 ms", "p90 ms", "cpu ms");
    for (const auto& r : rows)
        std::printf("# %-16s %10.2f %9.2f %9.2f %9.2f  %s\n", r.name.c_str(), r.median_ms, r.p10_ms, r.p90_ms,
                    r.cpu_ms, r.note.c_str());
    return 0;
}
