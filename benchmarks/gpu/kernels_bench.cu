// Kernel benchmarks: CUDA events, warm-up, median of repeated timings. For
// each kernel: the bytes that must move (inputs read once, outputs written
// once), the achieved bandwidth, and its ratio to a device-to-device copy of
// the same size measured in the same run. Prints a table and CSV lines
// (prefix "csv,") that benchmarks/gpu/torch_kernels.py prints for PyTorch too.
#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "patchwork/cuda/device_tensor.hpp"
#include "patchwork/kernels/adapter.cuh"
#include "patchwork/kernels/mix.cuh"
#include "patchwork/kernels/multitask.cuh"
#include "patchwork/kernels/scale_shift.cuh"

namespace pw = patchwork;
namespace pk = patchwork::kernels;

namespace {

constexpr int kWarmup = 5, kReps = 30;

double median_ms(const std::function<void()>& f) {
    cudaEvent_t a, b;
    pw::cuda::check(cudaEventCreate(&a), "cudaEventCreate", "bench");
    pw::cuda::check(cudaEventCreate(&b), "cudaEventCreate", "bench");
    for (int i = 0; i < kWarmup; ++i) f();
    std::vector<double> t;
    for (int i = 0; i < kReps; ++i) {
        pw::cuda::check(cudaEventRecord(a, pk::stream()), "cudaEventRecord", "bench");
        f();
        pw::cuda::check(cudaEventRecord(b, pk::stream()), "cudaEventRecord", "bench");
        pw::cuda::check(cudaEventSynchronize(b), "cudaEventSynchronize", "bench");
        float ms = 0;
        pw::cuda::check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime", "bench");
        t.push_back(ms);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

/// Median time of a D2D copy of `bytes` (read + write = 2 bytes moved per byte).
double copy_gbps(std::size_t bytes) {
    pw::cuda::Buffer<char> src(bytes), dst(bytes);
    src.memset(1, bytes);
    const double ms = median_ms([&] {
        pw::cuda::check(cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, pk::stream()),
                        "cudaMemcpyAsync", "bench");
    });
    return 2.0 * double(bytes) / (ms * 1e6);
}

void report(const std::string& name, const std::string& shape, double ms, double bytes) {
    const double gbps = bytes / (ms * 1e6);
    const double copy = copy_gbps(std::size_t(bytes / 2));
    std::printf("%-34s %-26s %10.4f ms %9.1f GB/s %9.1f GB/s %6.1f%%\n", name.c_str(), shape.c_str(), ms, gbps, copy,
                100.0 * gbps / copy);
    std::printf("csv,patchwork,%s,%s,%.6f,%.3f,%.3f\n", name.c_str(), shape.c_str(), ms, gbps, copy);
}

template <class E>
void fill(pw::cuda::Buffer<E>& b, std::size_t n) {
    b.reserve(n);
    b.memset(0, n);
}

template <class E>
void adapter_bench(const char* type, std::size_t n, std::size_t d, std::size_t r) {
    using A = pk::accum_t<E>;
    pw::cuda::Buffer<E> h, y, g, dh, dw, db, uw, ub;
    pw::cuda::Buffer<A> z, gdw, gdb, guw, gub;
    fill(h, n * d); fill(y, n * d); fill(g, n * d); fill(dh, n * d);
    fill(dw, r * d); fill(db, r); fill(uw, d * r); fill(ub, d);
    fill(z, n * r); fill(gdw, r * d); fill(gdb, r); fill(guw, d * r); fill(gub, d);
    const std::size_t wsb = pk::adapter_backward_workspace_bytes(n, d, r, sizeof(A));
    pw::cuda::Buffer<char> ws(wsb);
    const std::string shape = std::to_string(n) + "x" + std::to_string(d) + " r" + std::to_string(r) + " " + type;
    const auto fwd = [&] {
        pk::adapter_forward<E>(h.data(), n, d, r, dw.data(), db.data(), uw.data(), ub.data(), pk::Act::gelu, y.data(),
                               z.data(), "bench.adapter");
    };
    const double e = double(sizeof(E)), a = double(sizeof(A));
    report("adapter_forward", shape, median_ms(fwd), 2.0 * n * d * e + n * r * a);
    const auto both = [&] {
        fwd();
        pk::adapter_backward<E>(h.data(), g.data(), n, d, r, dw.data(), uw.data(), pk::Act::gelu, z.data(), dh.data(),
                                {gdw.data(), gdb.data(), guw.data(), gub.data()}, "bench.adapter",
                                {ws.data(), wsb});
    };
    // forward: h in, y out, z out; backward: h, g, z in, dh out.
    report("adapter_forward_backward", shape, median_ms(both), 5.0 * n * d * e + 2.0 * n * r * a);
}

template <class E>
void mix_bench(const char* type, std::size_t m, std::size_t k) {
    using A = pk::accum_t<E>;
    pw::cuda::Buffer<E> cands, out;
    pw::cuda::Buffer<A> alpha, soft, used;
    fill(cands, k * m); fill(out, m); fill(alpha, k); fill(soft, k); fill(used, k);
    const std::string shape = std::to_string(k) + "x" + std::to_string(m) + " " + type;
    report("softmax_mix_forward", shape, median_ms([&] {
               pk::mix_forward_stacked<E>(alpha.data(), k, {}, cands.data(), m, out.data(), soft.data(), used.data(),
                                          "bench.mix");
           }),
           double(k + 1) * m * sizeof(E));
}

template <class E>
void multitask_bench(const char* type, std::size_t n, std::size_t d, std::size_t r, std::size_t k) {
    using A = pk::accum_t<E>;
    pw::cuda::Buffer<E> h, y, dw, db, uw, ub;
    pw::cuda::Buffer<A> z;
    pw::cuda::Buffer<int> task(n);
    std::vector<int> ids(n);
    for (std::size_t i = 0; i < n; ++i) ids[i] = int(i * k / n);  // rows grouped by task
    task.upload(ids);
    fill(h, n * d); fill(y, n * d); fill(dw, k * r * d); fill(db, k * r); fill(uw, k * d * r); fill(ub, k * d);
    fill(z, n * r);
    const std::string shape = std::to_string(n) + "x" + std::to_string(d) + " r" + std::to_string(r) + " K" +
                              std::to_string(k) + " " + type;
    const double bytes = 2.0 * n * d * sizeof(E) + double(n) * r * sizeof(A);
    report("multitask_adapter_forward", shape, median_ms([&] {
               pk::multitask_adapter_forward<E>(h.data(), task.data(), n, d, r, k, dw.data(), db.data(), uw.data(),
                                                ub.data(), pk::Act::gelu, y.data(), z.data(), "bench.multitask");
           }),
           bytes);
}

}  // namespace

int main() {
    if (pw::cuda::device_count() == 0) {
        std::printf("kernels_bench: no CUDA device is available\n");
        return 77;
    }
    std::printf("%-34s %-26s %13s %14s %14s %7s\n", "kernel", "shape", "median", "achieved", "D2D copy", "ratio");
    for (std::size_t r : {16u, 64u}) {
        adapter_bench<float>("fp32", 16384, 768, r);
        adapter_bench<pk::bf16>("bf16", 16384, 768, r);
    }
    mix_bench<float>("fp32", std::size_t(1) << 23, 4);
    mix_bench<pk::bf16>("bf16", std::size_t(1) << 23, 4);
    multitask_bench<float>("fp32", 16384, 768, 16, 1);
    multitask_bench<float>("fp32", 16384, 768, 16, 32);
    return 0;
}
