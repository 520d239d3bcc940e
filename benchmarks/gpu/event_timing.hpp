#pragma once
// Timing of device work for the GPU benchmarks: CUDA events recorded on the
// current context's stream around each call, after untimed warm-up calls.
#include <vector>

#include "patchwork/cuda/context.hpp"
#include "patchwork/cuda/cuda_error.hpp"

namespace bench {

/// Milliseconds of each of `iters` calls of f, after `warmup` untimed ones.
template <class F>
std::vector<double> gpu_timed(F&& f, int iters, int warmup, const char* who) {
    for (int i = 0; i < warmup; ++i) f();
    patchwork::cuda::synchronize(who);
    cudaEvent_t a, b;
    patchwork::cuda::check(cudaEventCreate(&a), "cudaEventCreate", who);
    patchwork::cuda::check(cudaEventCreate(&b), "cudaEventCreate", who);
    const cudaStream_t s = patchwork::cuda::context().stream();
    std::vector<double> ms;
    for (int i = 0; i < iters; ++i) {
        patchwork::cuda::check(cudaEventRecord(a, s), "cudaEventRecord", who);
        f();
        patchwork::cuda::check(cudaEventRecord(b, s), "cudaEventRecord", who);
        patchwork::cuda::check(cudaEventSynchronize(b), "cudaEventSynchronize", who);
        float t = 0;
        patchwork::cuda::check(cudaEventElapsedTime(&t, a, b), "cudaEventElapsedTime", who);
        ms.push_back(t);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return ms;
}

}  // namespace bench
