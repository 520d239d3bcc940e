// The transformer benchmarks of benchmarks/bert_bench.cpp on the GPU: the
// pre-trained all-MiniLM-L6-v2 loaded on the host, its weights copied into a
// device BertModel (search::copy_parameters), then timed with CUDA events.
// `python3 benchmarks/torch_bert.py --device cuda --configs <same>` is the
// PyTorch (+ PEFT) side, the same configurations and step:
//   infer-32x128                 frozen forward: sentences/s
//   lora-8x32, lora-32x128       one training step, LoRA r=8, alpha 16 on query and value
//   lora_bf16-8x32, lora_bf16-32x128  the LoRA step with the model in bf16
//                                (bf16 storage, fp32 accumulation, fp32 master weights)
//   finetune-8x32, finetune-32x128  one training step, every weight trainable
// A step = zero_grad, forward, mean pooling, Linear(384, 4) head, softmax
// cross-entropy against seeded labels (its value read back: one
// synchronisation, as loss.item() would), backward, AdamW (lr 1e-4, weight
// decay 0.01). Random token ids from a seeded generator (1000..30521), token
// types 0, full mask. fp32 storage except the bf16 configurations. Median, p10, p90 of --iters
// timed steps after --warmup. Output: one JSON object a line, then a table
// ('#' lines). Exit 77 without a GPU or without the model (scripts/fetch-model).
// The issue's target: lora-32x128 at least 1.5x faster than PyTorch eager + PEFT.
//
//   bert_gpu [--model DIR] [--iters 20] [--warmup 3] [--configs a,b]
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "bert_inputs.hpp"
#include "common.hpp"
#include "gpu/event_timing.hpp"
#include "patchwork/cuda.cuh"
#include "patchwork/search/derive.hpp"
#include "patchwork/transformer/hf_checkpoint.hpp"

namespace pw = patchwork;
namespace fs = std::filesystem;
using pw::Cuda;

namespace {

struct Row {
    std::string name;
    std::vector<double> ms;
    std::string note;
};

/// The checkpoint loaded on the host, then copied into the same model on the device.
template <class Host, class Device>
Device load_on_device(const fs::path& dir) {
    Host host = pw::hf::load_bert<Host>(dir);
    Device dev(host.config());
    pw::search::copy_parameters(host, dev);
    return dev;
}

template <class Host, class Device>
Row train(const fs::path& dir, const std::string& name, std::size_t b, std::size_t t, int iters, int warmup) {
    using T = typename Device::Scalar;  // float, or bf16 (fp32 master weights in the optimiser)
    Device model = load_on_device<Host, Device>(dir);
    pw::BasicLinear<T, Cuda> head(384, 4);
    auto params = pw::trainable_parameters(model);
    for (auto* p : pw::trainable_parameters(head)) params.push_back(p);
    pw::BasicAdamW<T, Cuda> opt(params, {.lr = 1e-4, .weight_decay = 0.01});
    const pw::TokenBatch x = bench::random_batch(b, t, 1234);
    pw::Rng rng(99);
    std::vector<int> labels(b);
    for (auto& l : labels) l = int(rng.next() % 4);
    pw::BasicPooler<T, Cuda> pool;
    float loss = 0;
    const auto ms = bench::gpu_timed(
        [&] {
            opt.zero_grad();
            const auto& e = pool.forward(model.forward(x), x);
            const auto ce = pw::cross_entropy(head.forward(e), std::span<const int>(labels));
            head.set_input_grad(true);
            model.backward(pool.backward(head.backward(ce.grad)));
            opt.step();
            loss = ce.value;
        },
        iters, warmup, "bert_gpu");
    const std::string kind = name.substr(0, name.find('-')), shape = name.substr(name.find('-') + 1);
    bench::emit("patchwork.bert_gpu.train." + kind + "." + shape, bench::quantile(ms, 0.5), "ms/step");
    return {name, ms,
            std::to_string(pw::trainable_count(model) + pw::trainable_count(head)) + " trainable, loss " +
                std::to_string(loss)};
}

Row infer(const fs::path& dir, const std::string& name, std::size_t b, std::size_t t, int iters, int warmup) {
    using Host = pw::BertModel<pw::BertEncoder<>>;
    using Device = pw::BertModel<pw::BertEncoder<pw::bert::Plain, float, Cuda>>;
    Device model = load_on_device<Host, Device>(dir);
    const pw::TokenBatch x = bench::random_batch(b, t, 1234);
    const auto ms = bench::gpu_timed([&] { (void)model.forward(x); }, iters, warmup, "bert_gpu");
    const double med = bench::quantile(ms, 0.5);
    bench::emit("patchwork.bert_gpu.infer." + name.substr(name.find('-') + 1), double(b) / (med * 1e-3), "sentences/s");
    return {name, ms, std::to_string(double(b) / (med * 1e-3)) + " sentences/s"};
}

Row run(const fs::path& dir, const std::string& name, int iters, int warmup) {
    using LoraSpec = pw::bert::LoRAQueryValue<8, 16>;
    using LoraHost = pw::BertModel<pw::BertEncoder<LoraSpec>>;
    using LoraDevice = pw::BertModel<pw::BertEncoder<LoraSpec, float, Cuda>>;
    using LoraBf16 = pw::BertModel<pw::BertEncoder<LoraSpec, pw::bf16, Cuda>>;
    using FullHost = pw::BertModel<pw::BertEncoder<>, pw::FineTune>;
    using FullDevice = pw::BertModel<pw::BertEncoder<pw::bert::Plain, float, Cuda>, pw::FineTune>;
    if (name == "infer-32x128") return infer(dir, name, 32, 128, iters, warmup);
    if (name == "lora-8x32") return train<LoraHost, LoraDevice>(dir, name, 8, 32, iters, warmup);
    if (name == "lora-32x128") return train<LoraHost, LoraDevice>(dir, name, 32, 128, iters, warmup);
    // bf16 storage, fp32 accumulation and master weights (the checkpoint rounded to bf16 on the copy).
    if (name == "lora_bf16-8x32") return train<LoraHost, LoraBf16>(dir, name, 8, 32, iters, warmup);
    if (name == "lora_bf16-32x128") return train<LoraHost, LoraBf16>(dir, name, 32, 128, iters, warmup);
    if (name == "finetune-8x32") return train<FullHost, FullDevice>(dir, name, 8, 32, iters, warmup);
    if (name == "finetune-32x128") return train<FullHost, FullDevice>(dir, name, 32, 128, iters, warmup);
    std::fprintf(stderr, "bert_gpu: unknown configuration %s\n", name.c_str());
    std::exit(2);
}

}  // namespace

int main(int argc, char** argv) try {
    fs::path dir = pw::hf::model_cache_dir();
    int iters = 20, warmup = 3;
    std::string configs =
        "infer-32x128,lora-8x32,lora-32x128,lora_bf16-8x32,lora_bf16-32x128,finetune-8x32,finetune-32x128";
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string a = argv[i];
        if (a == "--model") dir = argv[i + 1];
        else if (a == "--iters") iters = std::atoi(argv[i + 1]);
        else if (a == "--warmup") warmup = std::atoi(argv[i + 1]);
        else if (a == "--configs") configs = argv[i + 1];
        else {
            std::fprintf(stderr, "usage: bert_gpu [--model DIR] [--iters 20] [--warmup 3] [--configs a,b]\n");
            return 2;
        }
    }
    if (pw::cuda::device_count() == 0) {
        std::printf("# bert_gpu: skipped: no CUDA device is available\n");
        return 77;
    }
    if (!fs::exists(dir / "model.safetensors")) {
        std::printf("# bert_gpu: skipped: no model at %s (scripts/fetch-model)\n", dir.string().c_str());
        return 77;
    }
    cudaDeviceProp prop{};
    pw::cuda::check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties", "bert_gpu");
    std::vector<Row> rows;
    for (const auto& c : bench::split(configs)) rows.push_back(run(dir, c, iters, warmup));
    std::printf("# device %s, fp32 storage (bf16 with fp32 master weights in the lora_bf16 configurations)\n", prop.name);
    std::printf("# %-16s %10s %9s %9s  notes\n", "config", "median ms", "p10 ms", "p90 ms");
    for (const auto& r : rows)
        std::printf("# %-16s %10.3f %9.3f %9.3f  %s\n", r.name.c_str(), bench::quantile(r.ms, 0.5), bench::quantile(r.ms, 0.1),
                    bench::quantile(r.ms, 0.9), r.note.c_str());
    return 0;
} catch (const pw::Error& e) {
    std::fprintf(stderr, "bert_gpu: %s\n", e.what());
    return 1;
}
