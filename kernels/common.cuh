#pragma once
// What every kernel header shares: launch geometry, the accumulation type of
// each storage type (bf16 is stored in 16 bits and accumulated in fp32), and
// conversions between them. Include only from nvcc-compiled translation units.
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "patchwork/cuda/context.hpp"
#include "patchwork/cuda/error.hpp"

namespace patchwork::kernels {

using bf16 = __nv_bfloat16;

/// Storage type -> the type arithmetic runs in: float for bf16 and float, double for double.
template <class E>
struct accum {
    using type = E;
};
template <>
struct accum<bf16> {
    using type = float;
};
template <class E>
using accum_t = typename accum<E>::type;

/// Load a storage element as its accumulation type, and store one back (rounding to nearest for bf16).
template <class E>
__host__ __device__ inline accum_t<E> load(E x) {
    if constexpr (std::is_same_v<E, bf16>) return __bfloat162float(x);
    else return x;
}
template <class E>
__host__ __device__ inline E store(accum_t<E> x) {
    if constexpr (std::is_same_v<E, bf16>) return __float2bfloat16_rn(x);
    else return x;
}

/// ceil(n / d) for launch geometry.
__host__ __device__ constexpr std::size_t ceil_div(std::size_t n, std::size_t d) { return (n + d - 1) / d; }

/// A 1-D grid covering n elements with `threads` per block, capped so that a
/// grid-stride loop covers the rest (never more than 65535 x 32 blocks).
constexpr unsigned grid_1d(std::size_t n, unsigned threads) {
    const std::size_t blocks = ceil_div(n, threads);
    constexpr std::size_t cap = std::size_t(65535) * 32;
    return unsigned(blocks == 0 ? 1 : (blocks < cap ? blocks : cap));
}

/// Sum of `v` over a warp (every lane gets the total).
template <class A>
__device__ inline A warp_sum(A v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
/// Max of `v` over a warp.
template <class A>
__device__ inline A warp_max(A v) {
    for (int off = 16; off > 0; off >>= 1) {
        const A o = __shfl_xor_sync(0xffffffffu, v, off);
        v = o > v ? o : v;
    }
    return v;
}

/// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024);
/// `scratch` holds 32 values of shared memory. Every thread gets the total.
template <class A>
__device__ inline A block_sum(A v, A* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : A(0);
    return warp_sum(v);
}
/// Max over a block (as block_sum).
template <class A>
__device__ inline A block_max(A v, A* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : scratch[0];
    return warp_max(v);
}

/// The current context's stream.
inline cudaStream_t stream() { return cuda::context().stream(); }

}  // namespace patchwork::kernels
