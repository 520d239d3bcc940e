// Data-parallel training over MPI, checked against one process.
// Run by tests/dist/run_mpi.py under `mpirun -np P` (P = 2 and 3 in the suite):
//
//   dist_check parity      fit with DataParallel on sharded batches equals fit on
//                          the whole batches (fp32: 1e-6 relative; double: 1e-12),
//                          exact_order in double is bit-identical to one process
//                          adding the shard gradients in rank order, overlap starts
//                          buckets during backward, a second backward in one step is
//                          caught and resent, the ranks end bit-identical
//   dist_check search      search::run (weights and architecture) on sharded batches
//                          equals search::run on the whole batches
//   dist_check multitask   fit_multitask (shared body, per-task LayerNorm banks and heads)
//                          likewise
//   dist_check mismatch    a model or trainable set that differs on one rank is an
//                          error on every rank naming the parameter
//   dist_check checkpoint  on_root writes on rank 0 only; its failure reaches all ranks
//   dist_check throw|die|timeout   fault modes: the job must end, not hang
//   dist_check nccl        a device model (the CPU execution of the CUDA code) trained
//                          with DataParallel over the NCCL communicator (the stand-in
//                          NCCL over MPI of tests/cpu_cuda) and over MPI (buckets staged
//                          through host memory) equals one CPU process on the whole
//                          batches (double: 1e-12); with exact_order both device runs are
//                          bit-identical; synchronize_model, overlap, byte counts
//
// Each mode prints "dist_check <mode>: ok" on rank 0 and exits 0 when its checks
// pass; a failed check prints what differs and exits 1 on every rank.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "patchwork/cuda.cuh"  // the CPU execution of the CUDA code (tests/cpu_cuda on the include path)
#include "patchwork/dist/data_parallel.hpp"
#include "patchwork/dist/mpi.hpp"
#include "patchwork/dist/nccl.hpp"
#include "patchwork/patchwork.hpp"

namespace pw = patchwork;
namespace dist = patchwork::dist;
namespace search = patchwork::search;

namespace {

int failures = 0;
void expect(bool ok, const std::string& what) {
    if (!ok) {
        ++failures;
        std::cerr << "FAILED: " << what << '\n';
    }
}

template <class F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const dist::DistError& e) {
        return e.what();
    }
    return {};
}

template <class T>
using Net = pw::Sequential<pw::Tune<pw::BasicLinear<T>, pw::LoRA<2, 4>>, pw::BasicRelu<T>,
                           pw::Tune<pw::BasicLinear<T>, pw::Adapter<3>>, pw::BasicRelu<T>,
                           pw::Tune<pw::BasicLinear<T>, pw::FineTune>>;

template <class T, class D>
using DeviceNet = pw::Sequential<pw::Tune<pw::BasicLinear<T, D>, pw::LoRA<2, 4>>, pw::BasicRelu<T, D>,
                                 pw::Tune<pw::BasicLinear<T, D>, pw::Adapter<3>>, pw::BasicRelu<T, D>,
                                 pw::Tune<pw::BasicLinear<T, D>, pw::FineTune>>;

template <class T>
Net<T> make_net(std::size_t in, std::size_t hidden, std::uint64_t seed) {
    pw::manual_seed(seed);
    Net<T> net{pw::Tune<pw::BasicLinear<T>, pw::LoRA<2, 4>>(in, hidden), pw::BasicRelu<T>{},
               pw::Tune<pw::BasicLinear<T>, pw::Adapter<3>>(hidden, hidden), pw::BasicRelu<T>{},
               pw::Tune<pw::BasicLinear<T>, pw::FineTune>(hidden, 3)};
    // LoRA's B starts at zero; give it values so its gradient path is exercised from step 1.
    pw::Rng rng(seed + 1);
    net.visit([&](auto& p) {
        if (p.role() == pw::Role::lora) pw::init::normal(p.value, rng, 0, 0.1);
    });
    return net;
}

/// `batches` global batches of `rows` rows: a 3-class problem, the same on every rank.
template <class T>
pw::VectorSource<T> make_data(std::size_t batches, std::size_t rows, std::size_t in, std::uint64_t seed) {
    pw::Rng rng(seed);
    pw::VectorSource<T> src;
    for (std::size_t b = 0; b < batches; ++b) {
        pw::Batch<T> batch{pw::Tensor<T>(pw::Shape{rows, in}), {}};
        pw::init::normal(batch.x, rng, 0, 1);
        for (std::size_t r = 0; r < rows; ++r) {
            const T* x = batch.x.data() + r * in;
            batch.labels.push_back(x[0] > x[1] ? 0 : (x[2] > 0 ? 1 : 2));
        }
        src.push_back(std::move(batch));
    }
    return src;
}

template <class M>
std::vector<std::vector<double>> values_of(M& model) {
    std::vector<std::vector<double>> out;
    model.visit([&](auto& p) {
        if constexpr (std::is_same_v<pw::device_of_t<M>, pw::Cuda>) {
            const auto host = pw::to_host(p.value);
            out.emplace_back(host.begin(), host.end());
        } else {
            out.emplace_back(p.value.begin(), p.value.end());
        }
    });
    return out;
}

/// Largest |a - b| / max|a| over the tensors.
double max_relative(const std::vector<std::vector<double>>& a, const std::vector<std::vector<double>>& b) {
    double worst = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        double scale = 0, diff = 0;
        for (std::size_t k = 0; k < a[i].size(); ++k) {
            scale = std::max(scale, std::abs(a[i][k]));
            diff = std::max(diff, std::abs(a[i][k] - b[i][k]));
        }
        worst = std::max(worst, diff / std::max(scale, 1e-30));
    }
    return worst;
}

const pw::TrainOptions quiet{.epochs = 3, .clip_norm = 1.0, .verbose = false};

/// fit with DataParallel on shards against fit on the whole batches.
template <class T>
void parity_fit(dist::Communicator& comm, double tolerance, dist::DataParallelOptions dp_options, const char* label) {
    auto net = make_net<T>(6, 8, 100 + std::uint64_t(comm.rank()));  // different on every rank before the sync
    dist::synchronize_model(comm, net);
    auto reference = net;  // the same values, trained alone on whole batches
    auto data = make_data<T>(5, 10, 6, 7);

    pw::BasicAdamW<T> ref_opt{pw::trainable_parameters(reference), {.lr = 1e-2}};
    pw::fit(reference, ref_opt, data, quiet);

    pw::BasicAdamW<T> inner{pw::trainable_parameters(net), {.lr = 1e-2}};
    dist::DataParallel opt(comm, inner, dp_options);
    dist::ShardedSource shard(comm, data);
    pw::fit(net, opt, shard, quiet);

    const double rel = max_relative(values_of(reference), values_of(net));
    if (comm.rank() == 0)
        std::cout << label << ": max relative difference to one process " << rel << ", " << opt.last_reduction().buckets
                  << " buckets (" << opt.last_reduction().early << " started during backward), "
                  << opt.bytes_per_step() << " bytes per step\n";
    expect(rel <= tolerance, std::string(label) + ": relative difference " + std::to_string(rel) + " > " +
                                 std::to_string(tolerance));
    expect(opt.last_reduction().steps == 15, std::string(label) + ": 15 reductions expected");
    expect(opt.bytes_per_step() == pw::trainable_count(net) * sizeof(T),
           std::string(label) + ": bytes per step " + std::to_string(opt.bytes_per_step()) + " != trainable bytes");
    if (dp_options.overlap && dp_options.bucket_bytes < 256)
        expect(opt.last_reduction().early > 0, std::string(label) + ": no bucket started during backward");
    if (!dp_options.overlap) expect(opt.last_reduction().early == 0, std::string(label) + ": early start without overlap");
    dist::check_in_sync(comm, net);  // throws, naming the tensor, if the ranks drifted apart
}

/// exact_order in double: bit-identical to one process adding the weighted shard gradients in rank order.
void parity_exact(dist::Communicator& comm) {
    using T = double;
    auto net = make_net<T>(6, 8, 300);
    dist::synchronize_model(comm, net);
    auto reference = net;
    auto data = make_data<T>(4, 11, 6, 9);  // 11 rows: uneven shards
    const int P = comm.size();

    pw::BasicAdamW<T> inner{pw::trainable_parameters(net), {.lr = 1e-2}};
    dist::DataParallel opt(comm, inner, {.bucket_bytes = 200, .exact_order = true});
    dist::ShardedSource shard(comm, data);
    pw::fit(net, opt, shard, quiet);

    // The reference: for every step, each shard's gradient scaled by its share, summed in rank order.
    auto params = pw::trainable_parameters(reference);
    pw::BasicAdamW<T> ref_opt{params, {.lr = 1e-2}};
    const pw::InputGradientOff<decltype(reference)> off(reference);
    for (std::size_t epoch = 0; epoch < quiet.epochs; ++epoch)
        for (std::size_t i = 0; i < data.batches(); ++i) {
            const auto& g = data.batch(i);
            const std::size_t n = dist::batch_rows(g);
            std::vector<std::vector<T>> sum(params.size());
            for (int r = 0; r < P; ++r) {
                const std::size_t b = std::size_t(r) * n / std::size_t(P), e = std::size_t(r + 1) * n / std::size_t(P);
                const auto part = dist::slice_rows(g, b, e);
                pw::zero_grad(reference);
                const auto loss = pw::cross_entropy(reference.forward(part.x), part.labels);
                reference.backward(loss.grad);
                const T w = T(double(e - b) / double(n));
                for (std::size_t k = 0; k < params.size(); ++k) {
                    auto& s = sum[k];
                    s.resize(params[k]->grad.size());
                    for (std::size_t j = 0; j < s.size(); ++j) {
                        const T v = w * params[k]->grad.data()[j];
                        s[j] = r == 0 ? v : s[j] + v;
                    }
                }
            }
            for (std::size_t k = 0; k < params.size(); ++k)
                std::copy(sum[k].begin(), sum[k].end(), params[k]->grad.data());
            pw::clip_grad_norm(params, quiet.clip_norm);
            ref_opt.step();
        }
    const auto a = values_of(reference), b = values_of(net);
    bool identical = a.size() == b.size();
    for (std::size_t i = 0; identical && i < a.size(); ++i) identical = a[i] == b[i];
    expect(identical, "exact_order (double): not bit-identical to the rank-order sum (max relative " +
                          std::to_string(max_relative(a, b)) + ")");
    dist::check_in_sync(comm, net);
}

/// A step whose body runs backward twice: the buckets sent during the first
/// backward are stale; the end-of-step check must resend them.
void resend_check(dist::Communicator& comm) {
    using T = double;
    auto net = make_net<T>(6, 8, 500);
    dist::synchronize_model(comm, net);
    auto twin = net;
    auto data = make_data<T>(3, 8, 6, 11);
    dist::ShardedSource shard_a(comm, data);
    pw::BasicSGD<T> inner_a{pw::trainable_parameters(net), {.lr = 0.05}};
    pw::BasicSGD<T> inner_b{pw::trainable_parameters(twin), {.lr = 0.05}};
    dist::DataParallel overlapped(comm, inner_a, {.bucket_bytes = 64, .overlap = true});
    dist::DataParallel plain(comm, inner_b, {.bucket_bytes = 64, .overlap = false});
    std::size_t resent = 0;
    for (std::size_t i = 0; i < data.batches(); ++i) {
        const auto& b = shard_a.batch(i);
        const auto twice = [&](auto& model) {
            double total = 0;
            for (int k = 0; k < 2; ++k) {
                const auto loss = pw::cross_entropy(model.forward(b.x), b.labels);
                model.backward(loss.grad);
                total += loss.value;
            }
            return total;
        };
        pw::optimizer_step(net, overlapped, [&] { return twice(net); });
        resent += overlapped.last_reduction().resent;
        pw::optimizer_step(twin, plain, [&] { return twice(twin); });
    }
    if (comm.rank() == 0) std::cout << "two backward passes per step: " << resent << " buckets resent\n";
    expect(resent > 0, "resend: two backward passes in one step were not caught");
    const auto a = values_of(net), c = values_of(twin);
    expect(max_relative(c, a) <= 1e-14,
           "resend: overlapped and plain reductions differ by " + std::to_string(max_relative(c, a)));
}

/// BatchNorm running statistics travel with the parameters.
void buffers_check(dist::Communicator& comm) {
    pw::BatchNorm2d bn(4);
    for (std::size_t c = 0; c < 4; ++c) {
        bn.running_mean[c] = float(comm.rank() * 10 + int(c));
        bn.running_var[c] = float(1 + comm.rank());
    }
    dist::synchronize_model(comm, bn);
    for (std::size_t c = 0; c < 4; ++c)
        expect(bn.running_mean[c] == float(c) && bn.running_var[c] == 1.0f, "buffers: running statistics not rank 0's");
}

/// BatchNorm under data parallelism: each rank normalises with its shard's statistics; with
/// sync_buffers the running statistics stay identical across ranks, and after one step the
/// running mean is the global batch's (the first Linear is the same everywhere); without
/// it the ranks drift apart.
void batchnorm_check(dist::Communicator& comm) {
    using BnNet = pw::Sequential<pw::BasicLinear<double>, pw::BasicBatchNorm2d<double>, pw::BasicRelu<double>,
                                 pw::BasicLinear<double>>;
    const auto make = [] {
        pw::manual_seed(70);
        return BnNet{pw::BasicLinear<double>(6, 8), pw::BasicBatchNorm2d<double>(8), pw::BasicRelu<double>{},
                     pw::BasicLinear<double>(8, 3)};
    };
    auto data = make_data<double>(3, 10, 6, 41);
    for (const bool sync : {true, false}) {
        for (const std::size_t epochs : {std::size_t(1), std::size_t(3)}) {
            auto net = make();
            dist::synchronize_model(comm, net);
            pw::BasicSGD<double> inner(pw::trainable_parameters(net), {.lr = 0.1});
            dist::DataParallel opt(comm, inner);
            if (sync) opt.sync_buffers(net);
            pw::VectorSource<double> first;
            first.push_back(data.batch(0));
            dist::ShardedSource shard(comm, first);
            dist::ShardedSource shard_all(comm, data);
            if (epochs == 1) pw::fit(net, opt, shard, {.epochs = 1, .verbose = false});
            else pw::fit(net, opt, shard_all, {.epochs = epochs, .verbose = false});
            const auto err = error_of([&] { dist::check_in_sync(comm, net); });
            if (sync) {
                expect(err.empty(), "batchnorm: with sync_buffers the ranks differ: " + err);
            } else if (epochs > 1) {
                expect(err.find("running_") != std::string::npos,
                       "batchnorm: without sync_buffers the running statistics should differ, got: " + err);
            }
            if (sync && epochs == 1) {  // one step: the running mean of the global batch
                auto ref = make();
                pw::BasicSGD<double> ref_opt(pw::trainable_parameters(ref), {.lr = 0.1});
                pw::fit(ref, ref_opt, first, {.epochs = 1, .verbose = false});
                const auto& a = ref.template get<1>().running_mean;
                const auto& b = net.template get<1>().running_mean;
                double diff = 0;
                for (std::size_t c = 0; c < a.size(); ++c) diff = std::max(diff, std::abs(a[c] - b[c]));
                expect(diff <= 1e-14, "batchnorm: the running mean after one step differs from one process by " +
                                          std::to_string(diff));
            }
        }
    }
}

int mode_parity(dist::Communicator& comm) {
    parity_fit<float>(comm, 1e-6, {}, "fp32, default options");
    parity_fit<float>(comm, 1e-6, {.bucket_bytes = 128, .overlap = true}, "fp32, small buckets, overlap");
    parity_fit<double>(comm, 1e-12, {.bucket_bytes = 128, .overlap = false}, "double, no overlap");
    parity_exact(comm);
    resend_check(comm);
    buffers_check(comm);
    batchnorm_check(comm);
    return 0;
}

// -- nccl ----------------------------------------------------------------------------

/// The CPU Net's values in the same-structured device net.
template <class T>
DeviceNet<T, pw::Cuda> to_device_net(Net<T>& cpu) {
    pw::manual_seed(1);
    DeviceNet<T, pw::Cuda> dev{pw::Tune<pw::BasicLinear<T, pw::Cuda>, pw::LoRA<2, 4>>(6, 8), pw::BasicRelu<T, pw::Cuda>{},
                               pw::Tune<pw::BasicLinear<T, pw::Cuda>, pw::Adapter<3>>(8, 8), pw::BasicRelu<T, pw::Cuda>{},
                               pw::Tune<pw::BasicLinear<T, pw::Cuda>, pw::FineTune>(8, 3)};
    search::copy_parameters(cpu, dev);
    return dev;
}

/// A device model trained with DataParallel over `comm` on shards; its values after 3 epochs.
template <class T>
std::vector<std::vector<double>> device_run(dist::Communicator& comm, Net<T>& start, pw::VectorSource<T>& data,
                                            dist::DataParallelOptions options, const std::string& label) {
    auto dev = to_device_net(start);
    pw::BasicAdamW<T, pw::Cuda> inner{pw::trainable_parameters(dev), {.lr = 1e-2}};
    dist::DataParallel opt(comm, inner, options);
    dist::ShardedSource shard(comm, data);
    pw::fit(dev, opt, shard, quiet);
    expect(opt.last_reduction().steps == 3 * data.batches(), label + ": one reduction per step expected");
    expect(opt.bytes_per_step() == pw::trainable_count(dev) * sizeof(T), label + ": bytes per step != trainable bytes");
    if (options.overlap && options.bucket_bytes < 256)
        expect(opt.last_reduction().early > 0, label + ": no bucket started during backward");
    dist::check_in_sync(comm, dev);
    return values_of(dev);
}

int mode_nccl(dist::MpiCommunicator& mpi) {
    using T = double;
    dist::NcclCommunicator nccl(mpi);
    expect(nccl.device_collectives() && !mpi.device_collectives(), "device_collectives(): nccl yes, mpi no");
    expect(nccl.rank() == mpi.rank() && nccl.size() == mpi.size(), "nccl: the same ranks as MPI");
    // A host-memory communicator refuses device collectives with a clear error.
    const std::string refused = error_of([&] {
        double x = 0;
        mpi.start_device_allreduce_sum(&x, 1, dist::DataType::f64);
    });
    expect(refused.find("the mpi communicator has no all-reduce on device memory") != std::string::npos,
           "mpi: device all-reduce refused with a clear message, got: " + refused);

    // synchronize_model of a device model over NCCL: rank 0's values everywhere.
    auto differing = make_net<T>(6, 8, 500 + std::uint64_t(mpi.rank()));
    auto dev = to_device_net(differing);
    dist::synchronize_model(nccl, dev);
    auto expected = make_net<T>(6, 8, 500);
    expect(max_relative(values_of(expected), values_of(dev)) == 0, "nccl: synchronize_model gives rank 0's values");

    // Training: one CPU process on whole batches against device models on shards.
    auto start = make_net<T>(6, 8, 600);
    auto data = make_data<T>(4, 11, 6, 13);  // 11 rows: uneven shards
    auto reference = start;
    pw::BasicAdamW<T> ref_opt{pw::trainable_parameters(reference), {.lr = 1e-2}};
    pw::fit(reference, ref_opt, data, quiet);
    const auto ref = values_of(reference);
    struct Run {
        const char* label;
        dist::Communicator* comm;
        dist::DataParallelOptions options;
    };
    const std::vector<Run> runs{{"nccl", &nccl, {}},
                                {"nccl, small buckets, overlap", &nccl, {.bucket_bytes = 128, .overlap = true}},
                                {"mpi (staged)", &mpi, {.bucket_bytes = 128}},
                                {"nccl, exact order", &nccl, {.bucket_bytes = 200, .exact_order = true}},
                                {"mpi (staged), exact order", &mpi, {.bucket_bytes = 200, .exact_order = true}}};
    std::vector<std::vector<std::vector<double>>> results;
    for (const auto& r : runs) {
        results.push_back(device_run(*r.comm, start, data, r.options, r.label));
        const double rel = max_relative(ref, results.back());
        if (mpi.rank() == 0)
            std::cout << "device model, " << r.label << ": max relative difference to one CPU process " << rel << '\n';
        expect(rel <= 1e-12, std::string(r.label) + ": relative difference " + std::to_string(rel) + " > 1e-12");
    }
    expect(results[3] == results[4], "exact order: the NCCL and the staged MPI runs are not bit-identical");
    expect(nccl.stats().device_collectives > 0 && mpi.stats().device_collectives == 0,
           "the device runs over nccl used device collectives, those over mpi none");

    // The device collectives themselves: sum, gather and broadcast of device buffers; a host pointer is refused.
    pw::Tensor<T> mine(pw::Shape{3});
    for (std::size_t i = 0; i < 3; ++i) mine[i] = T(mpi.rank() + 1) * T(i + 1);
    pw::Tensor<T, pw::Cuda> buf(mine);
    nccl.wait(nccl.start_device_allreduce_sum(buf.data(), 3, dist::DataType::f64), "test all-reduce");
    const pw::Tensor<T> sum = pw::to_host(buf);
    const double ranks = mpi.size(), tri = ranks * (ranks + 1) / 2;
    expect(sum[0] == tri && sum[2] == 3 * tri, "nccl: device all-reduce sums over the ranks");
    pw::Tensor<T, pw::Cuda> all(pw::Shape{3 * std::size_t(mpi.size())}, T(0));
    nccl.wait(nccl.start_device_allgather(pw::Tensor<T, pw::Cuda>(mine).data(), all.data(), 3 * sizeof(T)),
              "test all-gather");
    const pw::Tensor<T> gathered = pw::to_host(all);
    expect(gathered[3 * std::size_t(mpi.size() - 1)] == T(mpi.size()), "nccl: device all-gather in rank order");
    pw::Tensor<T, pw::Cuda> root_value(pw::Shape{1}, T(mpi.rank() == 1 ? 42 : 0));
    nccl.wait(nccl.start_device_broadcast(root_value.data(), sizeof(T), 1), "test broadcast");
    expect(pw::to_host(root_value)[0] == T(42), "nccl: device broadcast from rank 1");
    const std::string host_pointer = error_of([&] {
        double x = 0;
        nccl.start_device_allreduce_sum(&x, 1, dist::DataType::f64);
    });
    expect(host_pointer.find("ncclAllReduce failed") != std::string::npos,
           "nccl: a host pointer is an error naming the call, got: " + host_pointer);
    return 0;
}

// -- search --------------------------------------------------------------------------

using Linear64 = pw::BasicLinear<double>;
using Searched = pw::Sequential<pw::Tune<Linear64, pw::Search<pw::Frozen, pw::Adapter<2>, pw::LoRA<2, 4>, pw::FineTune>>,
                                pw::BasicRelu<double>, pw::Tune<Linear64, pw::FineTune>>;

int mode_search(dist::Communicator& comm) {
    pw::manual_seed(40 + std::uint64_t(comm.rank()));
    Searched model{pw::Tune<Linear64, pw::Search<pw::Frozen, pw::Adapter<2>, pw::LoRA<2, 4>, pw::FineTune>>(6, 8),
                   pw::BasicRelu<double>{}, pw::Tune<Linear64, pw::FineTune>(8, 3)};
    dist::synchronize_model(comm, model);
    auto reference = model;
    auto train = make_data<double>(4, 9, 6, 21);
    auto val = make_data<double>(2, 7, 6, 22);
    const auto step = [](auto& m, const pw::Batch<double>& b) {
        const auto ce = pw::cross_entropy(m.forward(b.x), b.labels);
        m.backward(ce.grad);
        return double(ce.value);
    };
    search::SearchOptions so;
    so.epochs = 3;
    so.penalty.lambda = 0.2;

    pw::BasicAdam<double> ref_opt(search::weight_parameters(reference), {.lr = 1e-2});
    search::run(reference, ref_opt, train, val, step, so);

    pw::BasicAdam<double> inner(search::weight_parameters(model), {.lr = 1e-2});
    dist::DataParallel opt(comm, inner, {.bucket_bytes = 256, .overlap = true});
    dist::ShardedSource shard_train(comm, train);
    dist::ShardedSource shard_val(comm, val);
    search::run(model, opt, shard_train, shard_val, step, so);

    const double rel = max_relative(values_of(reference), values_of(model));
    if (comm.rank() == 0) std::cout << "search: max relative difference to one process " << rel << '\n';
    expect(rel <= 1e-12, "search: weights and alphas differ from one process by " + std::to_string(rel));
    dist::check_in_sync(comm, model);
    return 0;
}

// -- multi-task --------------------------------------------------------------------

using MlpBody = pw::Sequential<Linear64, pw::BasicLayerNorm<double>, pw::BasicRelu<double>, Linear64>;
using MlpShared = pw::Tune<MlpBody, pw::FineTune>;  // the body trains; LayerNorms per task (banks)

using MultiMlp = pw::MultiTask<MlpShared, Linear64>;

MultiMlp make_multitask() {
    constexpr unsigned norm_roles = pw::role_bit(pw::Role::norm_scale) | pw::role_bit(pw::Role::norm_shift);
    std::vector<Linear64> heads;
    for (int k = 0; k < 2; ++k) heads.emplace_back(8, 3);
    return MultiMlp(
        MlpShared(MlpBody(Linear64(6, 8), pw::BasicLayerNorm<double>(8), pw::BasicRelu<double>{}, Linear64(8, 8))),
        std::move(heads), pw::PerTaskRoles{norm_roles});
}

int mode_multitask(dist::Communicator& comm) {
    auto model = make_multitask();
    // Every value, banks included, different on every rank before the sync.
    pw::Rng rng(60 + std::uint64_t(comm.rank()));
    model.visit([&](pw::Parameter<double>& p) { pw::init::normal(p.value, rng, 0.0, 0.5); });
    dist::synchronize_model(comm, model);
    auto reference = make_multitask();  // MultiTask is not copyable: copy the values
    std::vector<pw::Parameter<double>*> from;
    model.visit([&](pw::Parameter<double>& p) { from.push_back(&p); });
    std::size_t at = 0;
    reference.visit([&](pw::Parameter<double>& p) { p.value = from[at++]->value; });
    std::vector<pw::VectorSource<double>> data{make_data<double>(4, 9, 6, 31), make_data<double>(3, 8, 6, 32)};
    const pw::MultiTaskTrainOptions mo{.epochs = 3, .sampling = pw::TaskSampling::proportional, .seed = 5,
                                       .verbose = false};

    pw::BasicAdamW<double> ref_opt{pw::trainable_parameters(reference), {.lr = 1e-2}};
    pw::fit_multitask(reference, ref_opt, data, mo);

    pw::BasicAdamW<double> inner{pw::trainable_parameters(model), {.lr = 1e-2}};
    dist::DataParallel opt(comm, inner, {.bucket_bytes = 256, .overlap = true});
    std::vector<dist::ShardedSource<pw::VectorSource<double>>> shards;
    for (auto& d : data) shards.emplace_back(comm, d);
    pw::fit_multitask(model, opt, shards, mo);

    const double rel = max_relative(values_of(reference), values_of(model));
    if (comm.rank() == 0) std::cout << "multi-task: max relative difference to one process " << rel << '\n';
    expect(rel <= 1e-12, "multi-task: parameters differ from one process by " + std::to_string(rel));
    dist::check_in_sync(comm, model);
    return 0;
}

// -- mismatches, checkpoints, faults -------------------------------------------------------

int mode_mismatch(dist::Communicator& comm) {
    const bool odd = comm.rank() == comm.size() - 1;
    {  // the last rank's hidden layer is wider
        auto net = make_net<float>(6, odd ? 9 : 8, 1);
        const auto msg = error_of([&] { dist::synchronize_model(comm, net); });
        expect(msg.find("'linear0.weight'") != std::string::npos && msg.find("rank " + std::to_string(comm.size() - 1)) != std::string::npos,
               "mismatch: the error should name linear0.weight and the last rank, got: " + msg);
        if (comm.rank() == 0) std::cout << "model mismatch: " << msg << '\n';
    }
    {  // same model, but the last rank froze the head's bias
        auto net = make_net<float>(6, 8, 1);
        dist::synchronize_model(comm, net);
        auto params = pw::trainable_parameters(net);
        if (odd)
            net.visit([&](auto& p) {
                if (p.name() == "linear4.bias") p.set_trainable(false);
            });
        pw::AdamW inner{params, {.lr = 1e-3}};
        const auto msg = error_of([&] { dist::DataParallel opt(comm, inner); });
        expect(msg.find("'linear4.bias'") != std::string::npos && msg.find("frozen") != std::string::npos,
               "mismatch: the trainable-set error should name linear4.bias, got: " + msg);
        if (comm.rank() == 0) std::cout << "trainable mismatch: " << msg << '\n';
    }
    return 0;
}

int mode_checkpoint(dist::Communicator& comm, const std::filesystem::path& dir) {
    auto net = make_net<float>(6, 8, 3);
    dist::synchronize_model(comm, net);
    const auto file = dir / "net.safetensors";
    if (comm.rank() == 0) std::filesystem::remove(file);
    comm.barrier();
    dist::on_root(comm, [&] { pw::save_parameters(net, file); });
    // Every rank sees the finished file after on_root, and only it (no temporary left behind).
    expect(std::filesystem::exists(file), "checkpoint: the file is missing after on_root");
    std::size_t entries = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir)) entries += e.path().filename() == "net.safetensors" ? 0 : 1;
    expect(entries == 0, "checkpoint: a temporary file was left in the directory");
    auto copy = make_net<float>(6, 8, 77);
    pw::load_parameters(copy, file);
    expect(max_relative(values_of(net), values_of(copy)) == 0, "checkpoint: the saved values differ");
    comm.barrier();
    // A failure on rank 0 reaches every rank.
    const auto bad = dir / "no-such-dir" / "net.safetensors";
    const auto msg = error_of([&] { dist::on_root(comm, [&] { pw::save_parameters(net, bad); }); });
    expect(msg.find("no-such-dir") != std::string::npos, "checkpoint: the failure should name the path, got: " + msg);
    return 0;
}

int mode_fault(dist::Communicator& comm, const std::string& mode) {
    auto net = make_net<float>(6, 8, 5);
    dist::synchronize_model(comm, net);
    auto data = make_data<float>(50, 8, 6, 5);
    pw::AdamW inner{pw::trainable_parameters(net), {.lr = 1e-3}};
    dist::DataParallel opt(comm, inner);
    dist::ShardedSource shard(comm, data);
    if (mode == "timeout") {
        comm.set_timeout(1.0);
        if (comm.rank() == 1) std::this_thread::sleep_for(std::chrono::seconds(4));
        comm.barrier("the barrier before training");
        return 0;
    }
    std::size_t steps = 0;
    const auto loss = [&](const pw::Tensor<float>& y, const pw::Batch<float>& b) {
        if (comm.rank() == 1 && ++steps == 3) {
            if (mode == "die") std::_Exit(7);
            throw pw::Error("a failure planted at step 3");
        }
        return pw::cross_entropy(y, std::span<const int>(b.labels));
    };
    pw::fit(net, opt, shard, loss, {.epochs = 100, .verbose = false});
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    dist::MpiEnvironment env(argc, argv);
    dist::MpiCommunicator comm;
    const std::string mode = argc > 1 ? argv[1] : "";
    const int rc = dist::run_guarded(comm, [&] {
        if (mode == "parity") return mode_parity(comm);
        if (mode == "search") return mode_search(comm);
        if (mode == "multitask") return mode_multitask(comm);
        if (mode == "mismatch") return mode_mismatch(comm);
        if (mode == "checkpoint") {
            if (argc < 3) throw pw::ConfigError("dist_check checkpoint DIR");
            return mode_checkpoint(comm, argv[2]);
        }
        if (mode == "throw" || mode == "die" || mode == "timeout") return mode_fault(comm, mode);
        if (mode == "nccl") return mode_nccl(comm);
        throw pw::ConfigError(
            "usage: dist_check parity|search|multitask|mismatch|checkpoint DIR|throw|die|timeout|nccl");
    });
    // Every rank reports; the job fails if any check failed anywhere.
    double bad = failures;
    comm.allreduce_sum(&bad, 1, "the final all-reduce of failures");
    if (comm.rank() == 0) std::cout << "dist_check " << mode << " on " << comm.size() << " ranks: "
                                    << (bad == 0 ? "ok" : "FAILED") << '\n';
    return rc != 0 ? rc : (bad == 0 ? 0 : 1);
}
