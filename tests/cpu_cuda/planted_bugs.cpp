// Proof that the CPU execution of the CUDA code can fail: deliberately broken
// copies of the kernels' building blocks, each next to its correct copy.
//
//   - a wrong shuffle lane in warp_sum (common.cuh): the comparison catches it;
//   - an off-by-one shared-memory index in the column-sum kernel's combine
//     step (ops.cuh, column_partial_kernel): the comparison catches it;
//   - a removed barrier in block_sum (common.cuh): the result may still come
//     out right, but it is a data race between the threads of a block, which
//     ThreadSanitizer reports. `cpu_cuda_planted_bugs --race` runs only that
//     kernel (and `--no-race` its correct copy); tests/cpu_cuda/expect_race.py
//     runs both in the ThreadSanitizer build and asserts a race report for the
//     broken copy and none for the correct one.
#define DOCTEST_CONFIG_IMPLEMENT
#include <cstdio>
#include <cstring>
#include <vector>

#include <doctest/doctest.h>

#include "patchwork/cuda/device_tensor.hpp"
#include "patchwork/kernels/common.cuh"

namespace pk = patchwork::kernels;

namespace planted {

// ---- warp_sum, and a copy that reads the wrong lane ----

template <bool Broken>
__device__ float warp_sum(float v) {
    // Broken: the last step reads lane ^ 2 instead of lane ^ 1 (odd lanes never reach even ones).
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, Broken && off == 1 ? 2 : off);
    return v;
}
template <bool Broken>
__global__ void warp_sums_kernel(const float* x, float* out) {
    const float s = warp_sum<Broken>(x[blockIdx.x * blockDim.x + threadIdx.x]);
    if ((threadIdx.x & 31) == 0) out[(blockIdx.x * blockDim.x + threadIdx.x) / 32] = s;
}

// ---- column_partial_kernel's combine step, and a copy with an off-by-one index ----

template <bool Broken>
__global__ void column_chunk_kernel(const float* x, std::size_t rows, std::size_t cols, float* out) {
    __shared__ float part[8][33];
    const std::size_t c = blockIdx.x * 32 + threadIdx.x;
    float s = 0;
    if (c < cols)
        for (std::size_t r = threadIdx.y; r < rows; r += 8) s += x[r * cols + c];
    part[threadIdx.y][threadIdx.x + (Broken ? 1 : 0)] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = part[0][threadIdx.x];
        for (int k = 1; k < 8; ++k) t += part[k][threadIdx.x];
        out[c] = t;
    }
}

// ---- block_sum, and a copy without the barrier between writing and reading the warp sums ----

template <bool Broken>
__device__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = pk::warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    if (!Broken) __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return pk::warp_sum(v);
}
template <bool Broken>
__global__ void block_sums_kernel(const float* x, float* out) {
    __shared__ float scratch[32];
    const float s = block_sum<Broken>(x[blockIdx.x * blockDim.x + threadIdx.x], scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

std::vector<float> iota_values(std::size_t n) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = float(int(i * 7 % 23) - 11);  // small integers: exact sums
    return v;
}

template <bool Broken>
std::vector<float> warp_sums(const std::vector<float>& x) {
    patchwork::cuda::Buffer<float> dx(x.size()), out(x.size() / 32);
    dx.upload(x);
    pk::launch(warp_sums_kernel<Broken>, unsigned(x.size() / 64), 64, 0, pk::stream(), dx.data(), out.data());
    patchwork::cuda::check_launch("warp_sums_kernel", "planted");
    return out.download(x.size() / 32);
}

template <bool Broken>
std::vector<float> column_sums(const std::vector<float>& x, std::size_t rows, std::size_t cols) {
    patchwork::cuda::Buffer<float> dx(x.size()), out(cols);
    dx.upload(x);
    pk::launch(column_chunk_kernel<Broken>, unsigned((cols + 31) / 32), dim3(32, 8), 0, pk::stream(), dx.data(), rows,
               cols, out.data());
    patchwork::cuda::check_launch("column_chunk_kernel", "planted");
    return out.download(cols);
}

template <bool Broken>
std::vector<float> block_sums(const std::vector<float>& x, unsigned threads) {
    const std::size_t blocks = x.size() / threads;
    patchwork::cuda::Buffer<float> dx(x.size()), out(blocks);
    dx.upload(x);
    pk::launch(block_sums_kernel<Broken>, unsigned(blocks), threads, 0, pk::stream(), dx.data(), out.data());
    patchwork::cuda::check_launch("block_sums_kernel", "planted");
    return out.download(blocks);
}

}  // namespace planted

TEST_CASE("a wrong shuffle lane in warp_sum is caught by the comparison") {
    const auto x = planted::iota_values(256);
    std::vector<float> want(8, 0.0f);
    for (std::size_t i = 0; i < x.size(); ++i) want[i / 32] += x[i];
    CHECK(planted::warp_sums<false>(x) == want);
    CHECK(planted::warp_sums<true>(x) != want);
}

TEST_CASE("an off-by-one shared-memory index in the column sums is caught by the comparison") {
    const std::size_t rows = 50, cols = 40;
    const auto x = planted::iota_values(rows * cols);
    std::vector<float> want(cols, 0.0f);
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = 0; c < cols; ++c) want[c] += x[r * cols + c];
    CHECK(planted::column_sums<false>(x, rows, cols) == want);
    CHECK(planted::column_sums<true>(x, rows, cols) != want);
}

TEST_CASE("block_sum with its barriers gives the block totals") {
    const auto x = planted::iota_values(4 * 256);
    std::vector<float> want(4, 0.0f);
    for (std::size_t i = 0; i < x.size(); ++i) want[i / 256] += x[i];
    CHECK(planted::block_sums<false>(x, 256) == want);
}

int main(int argc, char** argv) {
    // --race / --no-race: run only block_sum without / with its barrier (for expect_race.py).
    for (int i = 1; i < argc; ++i) {
        const bool race = std::strcmp(argv[i], "--race") == 0, no_race = std::strcmp(argv[i], "--no-race") == 0;
        if (!race && !no_race) continue;
        const auto x = planted::iota_values(2 * 256);
        const auto got = race ? planted::block_sums<true>(x, 256) : planted::block_sums<false>(x, 256);
        std::printf("block sums: %g %g\n", double(got[0]), double(got[1]));
        return 0;
    }
    doctest::Context ctx;
    ctx.applyCommandLine(argc, argv);
    return ctx.run();
}
