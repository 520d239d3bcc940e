#pragma once
// What every kernel header shares: launch geometry, the accumulation type of
// each storage type (bf16 is stored in 16 bits and accumulated in fp32), and
// conversions between them. Include only from nvcc-compiled translation units.
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "patchwork/core/tensor.hpp"
#include "patchwork/cuda/context.hpp"
#include "patchwork/cuda/cuda_error.hpp"

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

/// The element type a kernel sees for a tensor scalar: __nv_bfloat16 for the
/// host's patchwork::bf16 (the same 16 bits), the scalar itself otherwise.
template <class T>
struct device_type {
    using type = T;
};
template <>
struct device_type<patchwork::bf16> {
    using type = bf16;
};
template <class T>
using device_t = typename device_type<T>::type;
static_assert(sizeof(patchwork::bf16) == sizeof(bf16) && alignof(patchwork::bf16) == alignof(bf16));

/// A tensor's data pointer as the kernels' element type.
template <class T>
__host__ __device__ inline device_t<T>* dev(T* p) {
    return reinterpret_cast<device_t<T>*>(p);
}
template <class T>
__host__ __device__ inline const device_t<T>* dev(const T* p) {
    return reinterpret_cast<const device_t<T>*>(p);
}

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

/// Caller-provided device scratch memory (empty: the current context's workspace is used).
struct Workspace {
    void* ptr = nullptr;
    std::size_t bytes = 0;
};

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

namespace detail {

/// The one workspace mechanism of the kernels: the scratch memory a launcher
/// uses, cut into 256-byte aligned regions. It is the caller's Workspace when
/// one is given (ConfigError naming `where` when it is smaller than `bytes`
/// or not 256-byte aligned), else the current context's workspace
/// (cuda::Context::workspace: one per context, so two streams never share it).
class Scratch {
public:
    Scratch(Workspace ws, std::size_t bytes, std::string_view where) {
        if (bytes == 0) return;
        if (ws.ptr != nullptr || ws.bytes != 0) {
            if (ws.ptr == nullptr || ws.bytes < bytes)
                throw ConfigError(patchwork::detail::concat(where, ": the caller's workspace has ", ws.bytes,
                                                            " bytes", ws.ptr == nullptr ? " and a null pointer" : "",
                                                            "; this launch needs ", bytes));
            if (reinterpret_cast<std::uintptr_t>(ws.ptr) % 256 != 0)
                throw ConfigError(patchwork::detail::concat(where, ": the caller's workspace is not 256-byte aligned"));
            base_ = static_cast<char*>(ws.ptr);
        } else {
            base_ = static_cast<char*>(cuda::context().workspace(bytes, where));
        }
        bytes_ = bytes;
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;

    /// The next region of n elements of T (256-byte aligned), or null for n == 0.
    template <class T>
    T* take(std::size_t n) {
        if (n == 0) return nullptr;
        const std::size_t region = (n * sizeof(T) + 255) / 256 * 256;
        if (used_ + region > bytes_)
            throw Error(patchwork::detail::concat("kernels::Scratch: region of ", region, " bytes past the ", bytes_,
                                                  " planned (a workspace size function is out of date)"));
        T* p = reinterpret_cast<T*>(base_ + used_);
        used_ += region;
        return p;
    }

private:
    char* base_ = nullptr;
    std::size_t bytes_ = 0, used_ = 0;
};

}  // namespace detail

/// Every kernel of the library is launched through here: on a GPU it is
/// kernel<<<grid, block, shared_bytes, s>>>(args...); in the project's CPU
/// execution of its CUDA code (tests/cpu_cuda, PATCHWORK_CPU_CUDA) the
/// arguments are converted to the kernel's parameters once and every thread
/// of every block runs the kernel on them. A bad configuration is reported by
/// the next cudaGetLastError (cuda::check_launch), as on a GPU.
template <class... P, class... Args>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shared_bytes, cudaStream_t s, Args&&... args) {
    static_assert(sizeof...(P) == sizeof...(Args), "kernels::launch: wrong number of kernel arguments");
#ifdef PATCHWORK_CPU_CUDA
    const std::tuple<std::decay_t<P>...> params(std::forward<Args>(args)...);
    cpu_cuda::launch(grid, block, shared_bytes, s, [&] { std::apply(kernel, params); });
#else
    kernel<<<grid, block, shared_bytes, s>>>(std::forward<Args>(args)...);
#endif
}

}  // namespace patchwork::kernels
