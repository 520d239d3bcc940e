#pragma once
// The fused low-rank patch kernels behind the adapter, LoRA and their
// mixed-task forms. One forward computes, for rows x of width c_in and an
// optional residual res of width c_out,
//   z = x W1_t^T + b1_t       W1: [K, r, c_in], b1: [K, r]       (t = task of the row; 0 without task ids)
//   a = act(z)                none (LoRA), ReLU or GELU (adapters)
//   y = res + s a W2_t^T + b2_t   W2: [K, c_out, r], b2: [K, c_out]
// an adapter is x = res = h, s = 1; LoRA is x = the Linear's input,
// res = its output, no biases, act = none, s = alpha / r.
//
// Backward, with g = dL/dy ([N, c_out]) and * the element-wise product:
//   dL/da   = s g W2_t                                   [N, r]
//   dz      = dL/dz = (s g W2_t) * act'(z)                [N, r]
//   dL/dx   = dres_in + dz W1_t     (dres_in = g for an adapter, whose residual is its input;
//                                    the Linear's own dL/dx for LoRA)
//   dW2_t  += s sum_{n in t} g_n^T a_n     [c_out, r]     (y depends on W2 through s a W2^T)
//   db2_t  += sum_{n in t} g_n             [c_out]
//   dW1_t  += sum_{n in t} dz_n^T x_n      [r, c_in]      (z depends on W1 through x W1^T)
//   db1_t  += sum_{n in t} dz_n            [r]
// (the chain rule through z = x W1^T + b1, a = act(z) and y = res + s a W2^T + b2;
// act'(z) = [z > 0] for ReLU, Phi(z) + z phi(z) for GELU, 1 for none).
//
// Launch geometry: one block of 256 threads per tile of 32 rows. Phase 1
// stages 32-column chunks of the tile's rows and of W1 in shared memory and
// computes z for the tile (each thread a column of rank entries for 32/(256/R)
// rows, R the compiled bucket 8/16/32/64); phase 2 gives each thread output
// columns, holds W2's row for that column in registers and writes y for the
// tile's rows. A tile reads its rows of x from DRAM once (phase 2 rereads the
// residual, the same rows when res = x, from L2) and writes y once. A rank
// above 64 runs in ceil(r/64) passes of 64, each pass adding its part into a
// sum in the accumulation type ([N, c_out] of the context's workspace; fp32
// for bf16, so nothing is rounded between passes) and the last pass writing
// y. A block reads its tile's rows of x in every pass before it writes them,
// and only in the last, so y may be x (an in-place adapter) at any rank. The
// backward's dx is summed over the passes the same way.
//
// Mixed tasks: a tile whose rows belong to several tasks runs the two phases
// once per distinct task among its rows (each row is computed with its own
// task's parameters only), so batches whose rows are grouped by task cost
// the same as single-task batches, and fully interleaved batches cost up to
// one pass per distinct task in a tile. Rows whose task id is outside [0, K)
// are left unwritten.
//
// bf16: x, res, parameters and y are stored in bf16, everything is computed in
// fp32; z (saved for the backward), a and dz workspaces and the parameter
// gradients are fp32 (accum_t). Determinism: no atomics; parameter gradients
// come from reduce.cuh's ordered reductions, so results are bitwise
// reproducible for given sizes.
#include <cmath>
#include <cstddef>
#include <string_view>

#include "patchwork/core/gelu.hpp"
#include "patchwork/kernels/common.cuh"
#include "patchwork/kernels/plan.hpp"
#include "patchwork/kernels/reduce.cuh"

namespace patchwork::kernels {
namespace detail {

template <Act F, class A>
__device__ inline A act_value(A z) {
    if constexpr (F == Act::relu) return z > A(0) ? z : A(0);
    else if constexpr (F == Act::gelu) return gelu_value(z);  // core/gelu.hpp
    else return z;
}
/// g * act'(z).
template <Act F, class A>
__device__ inline A act_grad(A g, A z) {
    if constexpr (F == Act::relu) return z > A(0) ? g : A(0);
    else if constexpr (F == Act::gelu) return gelu_grad(g, z);
    else return g;
}

/// Blocks per SM the low-rank kernels ask ptxas to fit (the second argument of
/// __launch_bounds__), per storage type E and rank bucket RP: a register
/// budget of 65536 / (256 blocks) that holds each instantiation without
/// spilling (-Xptxas -v on sm_90, docs/kernels.md). Left to itself, ptxas
/// picked budgets that spilled a few bytes (fp32 RP = 16, double RP = 32).
template <class E, int RP>
inline constexpr int lowrank_min_blocks =
    sizeof(accum_t<E>) > 4 ? (RP >= 32 ? 1 : RP == 16 ? 2 : 3)            // double
    : sizeof(E) == 2       ? (RP == 8 ? 4 : RP == 16 ? 2 : RP == 32 ? 3 : 1)  // bf16 storage
                           : (RP == 8 ? 4 : RP == 64 ? 2 : 3);               // float

/// Shared memory of the low-rank kernels.
template <class A, int RP>
struct LowrankShared {
    A x[kTileRows][kChunk + 1];
    A w[RP][kChunk + 1];
    A a[kTileRows][RP];
    int task[kTileRows];
    int k;
};

/// acc[q] = sum_c src[row0 + m_q, c] w(j0 + j, c) over c < width, for this
/// thread's rank entry j = tid % RP and rows m_q = tid / RP + q (256 / RP).
/// w(j, c) = w[j * width + c] (row-major [r, width]) or, with W_CR, w[c * r + j] ([width, r]).
template <class E, class A, int RP, bool W_CR>
__device__ inline void project_tile(const E* __restrict__ src, int width, long long row0, long long n,
                                    const E* __restrict__ w, int r, int j0, LowrankShared<A, RP>& sh, A* acc) {
    constexpr int NG = int(kThreads) / RP, MPT = int(kTileRows) / NG, KC = int(kChunk);
    const int tid = threadIdx.x, j = tid % RP, gi = tid / RP;
#pragma unroll
    for (int q = 0; q < MPT; ++q) acc[q] = A(0);
    for (int k0 = 0; k0 < width; k0 += KC) {
        __syncthreads();
        for (int e = tid; e < int(kTileRows) * KC; e += kThreads) {
            const int m = e / KC, kk = e % KC;
            const long long row = row0 + m;
            sh.x[m][kk] = (row < n && k0 + kk < width) ? A(load<E>(src[row * width + k0 + kk])) : A(0);
        }
        for (int e = tid; e < RP * KC; e += kThreads) {
            int jj, kk;
            if constexpr (W_CR) {
                kk = e / RP;
                jj = e % RP;
            } else {
                jj = e / KC;
                kk = e % KC;
            }
            const bool in = j0 + jj < r && k0 + kk < width;
            const long long idx = W_CR ? (long long)(k0 + kk) * r + j0 + jj : (long long)(j0 + jj) * width + k0 + kk;
            sh.w[jj][kk] = in ? A(load<E>(w[idx])) : A(0);
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < KC; ++kk) {
            const A wv = sh.w[j][kk];
#pragma unroll
            for (int q = 0; q < MPT; ++q) acc[q] += sh.x[gi + q * NG][kk] * wv;
        }
    }
}

/// Loads the tile's task ids (-1: no row, or a task id outside [0, K)).
template <class A, int RP>
__device__ inline void load_tile_tasks(const int* task, int k_tasks, long long row0, long long n,
                                       LowrankShared<A, RP>& sh) {
    const int tid = threadIdx.x;
    if (tid < int(kTileRows)) {
        const long long row = row0 + tid;
        int t = -1;
        if (row < n) {
            t = task == nullptr ? 0 : task[row];
            if (t < 0 || t >= k_tasks) t = -1;
        }
        sh.task[tid] = t;
    }
}
/// The next task among the tile's unprocessed rows (-1 when none is left).
template <class A, int RP>
__device__ inline int next_tile_task(LowrankShared<A, RP>& sh) {
    __syncthreads();
    if (threadIdx.x == 0) {
        int k = -1;
        for (int m = 0; m < int(kTileRows); ++m)
            if (sh.task[m] >= 0) {
                k = sh.task[m];
                break;
            }
        sh.k = k;
    }
    __syncthreads();
    return sh.k;
}
template <class A, int RP>
__device__ inline void finish_tile_task(LowrankShared<A, RP>& sh, int k) {
    __syncthreads();
    if (threadIdx.x < kTileRows && sh.task[threadIdx.x] == k) sh.task[threadIdx.x] = -1;
}

template <class E, Act F, int RP>
__global__ void __launch_bounds__(kThreads, (lowrank_min_blocks<E, RP>))
    lowrank_forward_kernel(const E* __restrict__ x, const E* res, const int* __restrict__ task,
                           int k_tasks, long long n, int c_in, int c_out, int r, const E* __restrict__ w1,
                           const E* __restrict__ b1, const E* __restrict__ w2, const E* __restrict__ b2,
                           accum_t<E> scale, E* y, accum_t<E>* __restrict__ save,
                           accum_t<E>* __restrict__ pass_sum) {  // res and x may alias y
    using A = accum_t<E>;
    constexpr int NG = int(kThreads) / RP, MPT = int(kTileRows) / NG;
    __shared__ LowrankShared<A, RP> sh;
    const int tid = threadIdx.x, j = tid % RP, gi = tid / RP;
    const long long row0 = (long long)blockIdx.x * kTileRows;
    load_tile_tasks(task, k_tasks, row0, n, sh);
    for (;;) {
        const int k = next_tile_task(sh);
        if (k < 0) break;
        const E* w1k = w1 + (long long)k * r * c_in;
        const E* b1k = b1 == nullptr ? nullptr : b1 + (long long)k * r;
        const E* w2k = w2 + (long long)k * c_out * r;
        const E* b2k = b2 == nullptr ? nullptr : b2 + (long long)k * c_out;
        for (int j0 = 0; j0 < r; j0 += RP) {
            A acc[MPT];
            project_tile<E, A, RP, false>(x, c_in, row0, n, w1k, r, j0, sh, acc);
#pragma unroll
            for (int q = 0; q < MPT; ++q) {
                const int m = gi + q * NG, jj = j0 + j;
                A av = A(0);
                if (sh.task[m] == k && jj < r) {
                    const A z = acc[q] + (b1k != nullptr ? A(load<E>(b1k[jj])) : A(0));
                    if (save != nullptr) save[(row0 + m) * r + jj] = z;
                    av = act_value<F>(z);
                }
                sh.a[m][j] = av;
            }
            __syncthreads();
            const bool first = j0 == 0, last = j0 + RP >= r;
            for (int c = tid; c < c_out; c += kThreads) {
                A wv[RP];
                const E* wp = w2k + (long long)c * r + j0;
#pragma unroll
                for (int jj = 0; jj < RP; ++jj) wv[jj] = j0 + jj < r ? A(load<E>(wp[jj])) : A(0);
                const A bias = (first && b2k != nullptr) ? A(load<E>(b2k[c])) : A(0);
                long long at = row0 * c_out + c;  // walks the tile's rows (one address live, not one per row)
                for (int m = 0; m < int(kTileRows); ++m, at += c_out) {
                    if (sh.task[m] != k) continue;
                    A v = A(0);
#pragma unroll
                    for (int jj = 0; jj < RP; ++jj) v += sh.a[m][jj] * wv[jj];
                    const A base = first ? (res != nullptr ? A(load<E>(res[at])) : A(0)) + bias : pass_sum[at];
                    if (last) y[at] = store<E>(base + scale * v);
                    else pass_sum[at] = base + scale * v;
                }
            }
        }
        finish_tile_task(sh, k);
    }
}

template <class E, Act F, int RP>
__global__ void __launch_bounds__(kThreads, (lowrank_min_blocks<E, RP>))
    lowrank_backward_kernel(const E* __restrict__ g, const E* dres, const int* __restrict__ task,
                            int k_tasks, long long n, int c_in, int c_out, int r, const E* __restrict__ w1,
                            const E* __restrict__ w2, accum_t<E> scale, const accum_t<E>* __restrict__ save,
                            E* dx, accum_t<E>* __restrict__ a_out, accum_t<E>* __restrict__ dz_out,
                            accum_t<E>* __restrict__ pass_sum) {
    using A = accum_t<E>;
    constexpr int NG = int(kThreads) / RP, MPT = int(kTileRows) / NG;
    __shared__ LowrankShared<A, RP> sh;
    const int tid = threadIdx.x, j = tid % RP, gi = tid / RP;
    const long long row0 = (long long)blockIdx.x * kTileRows;
    load_tile_tasks(task, k_tasks, row0, n, sh);
    for (;;) {
        const int k = next_tile_task(sh);
        if (k < 0) break;
        const E* w1k = w1 + (long long)k * r * c_in;
        const E* w2k = w2 + (long long)k * c_out * r;
        for (int j0 = 0; j0 < r; j0 += RP) {
            A acc[MPT];
            project_tile<E, A, RP, true>(g, c_out, row0, n, w2k, r, j0, sh, acc);  // g W2
#pragma unroll
            for (int q = 0; q < MPT; ++q) {
                const int m = gi + q * NG, jj = j0 + j;
                A dz = A(0);
                if (sh.task[m] == k && jj < r) {
                    const long long at = (row0 + m) * r + jj;
                    const A z = save[at];
                    dz = act_grad<F>(scale * acc[q], z);
                    if (a_out != nullptr) a_out[at] = act_value<F>(z);
                    if (dz_out != nullptr) dz_out[at] = dz;
                }
                sh.a[m][j] = dz;
            }
            __syncthreads();
            if (dx == nullptr) continue;
            const bool first = j0 == 0, last = j0 + RP >= r;
            for (int c = tid; c < c_in; c += kThreads) {
                A wv[RP];
                // W1's column c, rows j0.. (stride c_in): one walking pointer instead of RP
                // live addresses (at RP = 64 those spilled: 255 registers before).
                const E* wp = w1k + (long long)j0 * c_in + c;
#pragma unroll
                for (int jj = 0; jj < RP; ++jj, wp += c_in) wv[jj] = j0 + jj < r ? A(load<E>(*wp)) : A(0);
                long long at = row0 * c_in + c;
                for (int m = 0; m < int(kTileRows); ++m, at += c_in) {
                    if (sh.task[m] != k) continue;
                    A v = A(0);
#pragma unroll
                    for (int jj = 0; jj < RP; ++jj) v += sh.a[m][jj] * wv[jj];
                    const A base = first ? (dres != nullptr ? A(load<E>(dres[at])) : A(0)) : pass_sum[at];
                    if (last) dx[at] = store<E>(base + v);
                    else pass_sum[at] = base + v;
                }
            }
        }
        finish_tile_task(sh, k);
    }
}

/// Sizes of one low-rank launch (validated by check_lowrank).
struct LowrankDims {
    std::size_t n = 0, c_in = 0, c_out = 0, r = 0, k = 1;
};

inline void check_lowrank(const LowrankDims& d, std::string_view where) {
    check::positive(where, "the rank / bottleneck r", d.r);
    check::positive(where, "the input width", d.c_in);
    check::positive(where, "the output width", d.c_out);
    check::tasks(where, d.k);
    check::fits_int(where, "the input width", d.c_in);
    check::fits_int(where, "the output width", d.c_out);
    check::fits_int(where, "the rank", d.r);
    check::extent(where, "the input rows", d.n, d.c_in);
    check::extent(where, "the output rows", d.n, d.c_out);
    check::extent(where, "the stacked parameters", d.k * d.r, d.c_in > d.c_out ? d.c_in : d.c_out);
    if (ceil_div(d.n, kTileRows) > 0x7fffffffu)
        throw ShapeError(patchwork::detail::concat(where, ": ", d.n, " rows need more blocks than a grid holds"));
}

template <class E, Act F, int RP>
void launch_lowrank_forward(const E* x, const E* res, const int* task, const LowrankDims& d, const E* w1,
                            const E* b1, const E* w2, const E* b2, accum_t<E> scale, E* y, accum_t<E>* save,
                            accum_t<E>* pass_sum, std::string_view where) {
    kernels::launch(lowrank_forward_kernel<E, F, RP>, unsigned(ceil_div(d.n, kTileRows)), kThreads, 0, stream(), x,
                    res, task, int(d.k), (long long)d.n, int(d.c_in), int(d.c_out), int(d.r), w1, b1, w2, b2, scale,
                    y, save, pass_sum);
    cuda::check_launch("lowrank_forward_kernel", where);
}

template <class E, Act F>
void dispatch_lowrank_forward(const E* x, const E* res, const int* task, const LowrankDims& d, const E* w1,
                              const E* b1, const E* w2, const E* b2, accum_t<E> scale, E* y, accum_t<E>* save,
                              accum_t<E>* ps, std::string_view where) {
    switch (lowrank_bucket(d.r)) {
        case 8: return launch_lowrank_forward<E, F, 8>(x, res, task, d, w1, b1, w2, b2, scale, y, save, ps, where);
        case 16: return launch_lowrank_forward<E, F, 16>(x, res, task, d, w1, b1, w2, b2, scale, y, save, ps, where);
        case 32: return launch_lowrank_forward<E, F, 32>(x, res, task, d, w1, b1, w2, b2, scale, y, save, ps, where);
        default: return launch_lowrank_forward<E, F, 64>(x, res, task, d, w1, b1, w2, b2, scale, y, save, ps, where);
    }
}

/// y = res + s act(x W1_t^T + b1_t) W2_t^T + b2_t (see the top of this file); save (nullable) receives z.
template <class E>
void lowrank_forward(Act act, const E* x, const E* res, const int* task, const LowrankDims& d, const E* w1,
                     const E* b1, const E* w2, const E* b2, accum_t<E> scale, E* y, accum_t<E>* save,
                     std::string_view where) {
    check_lowrank(d, where);
    if (d.n == 0) return;
    check::pointer(where, "the input", x);
    check::pointer(where, "the first projection weight", w1);
    check::pointer(where, "the second projection weight", w2);
    check::pointer(where, "the output", y);
    // Ranks above 64: the passes add into an accum_t sum (fp32 for bf16), and
    // only the last pass writes y, so y may be x or res (in place).
    Scratch scratch({}, lowrank_passes(d.r) > 1 ? lowrank_forward_workspace_bytes(d.n, d.c_out, d.r, sizeof(accum_t<E>)) : 0,
                    where);
    accum_t<E>* ps = scratch.take<accum_t<E>>(lowrank_passes(d.r) > 1 ? d.n * d.c_out : 0);
    switch (act) {
        case Act::none: return dispatch_lowrank_forward<E, Act::none>(x, res, task, d, w1, b1, w2, b2, scale, y, save, ps, where);
        case Act::relu: return dispatch_lowrank_forward<E, Act::relu>(x, res, task, d, w1, b1, w2, b2, scale, y, save, ps, where);
        case Act::gelu: return dispatch_lowrank_forward<E, Act::gelu>(x, res, task, d, w1, b1, w2, b2, scale, y, save, ps, where);
    }
}

template <class E, Act F, int RP>
void launch_lowrank_backward(const E* g, const E* dres, const int* task, const LowrankDims& d, const E* w1,
                             const E* w2, accum_t<E> scale, const accum_t<E>* save, E* dx, accum_t<E>* a_out,
                             accum_t<E>* dz_out, accum_t<E>* ps, std::string_view where) {
    kernels::launch(lowrank_backward_kernel<E, F, RP>, unsigned(ceil_div(d.n, kTileRows)), kThreads, 0, stream(), g,
                    dres, task, int(d.k), (long long)d.n, int(d.c_in), int(d.c_out), int(d.r), w1, w2, scale, save,
                    dx, a_out, dz_out, ps);
    cuda::check_launch("lowrank_backward_kernel", where);
}

template <class E, Act F>
void dispatch_lowrank_backward(const E* g, const E* dres, const int* task, const LowrankDims& d, const E* w1,
                               const E* w2, accum_t<E> scale, const accum_t<E>* save, E* dx, accum_t<E>* a_out,
                               accum_t<E>* dz_out, accum_t<E>* ps, std::string_view where) {
    switch (lowrank_bucket(d.r)) {
        case 8: return launch_lowrank_backward<E, F, 8>(g, dres, task, d, w1, w2, scale, save, dx, a_out, dz_out, ps, where);
        case 16: return launch_lowrank_backward<E, F, 16>(g, dres, task, d, w1, w2, scale, save, dx, a_out, dz_out, ps, where);
        case 32: return launch_lowrank_backward<E, F, 32>(g, dres, task, d, w1, w2, scale, save, dx, a_out, dz_out, ps, where);
        default: return launch_lowrank_backward<E, F, 64>(g, dres, task, d, w1, w2, scale, save, dx, a_out, dz_out, ps, where);
    }
}

/// Parameter-gradient outputs of a low-rank backward (each nullable; added into, +=).
template <class A>
struct LowrankGrads {
    A* w1 = nullptr;  ///< [K, r, c_in]
    A* b1 = nullptr;  ///< [K, r]
    A* w2 = nullptr;  ///< [K, c_out, r]
    A* b2 = nullptr;  ///< [K, c_out]
};

/// The backward of lowrank_forward (see the top of this file). x: the forward's
/// input; save: its z; g: dL/dy; dres: added to dx (nullable); dx: nullable.
template <class E>
void lowrank_backward(Act act, const E* x, const E* g, const E* dres, const int* task, const LowrankDims& d,
                      const E* w1, const E* w2, accum_t<E> scale, const accum_t<E>* save, E* dx,
                      const LowrankGrads<accum_t<E>>& grads, Workspace ws, std::string_view where) {
    using A = accum_t<E>;
    check_lowrank(d, where);
    if (d.n == 0) return;
    check::pointer(where, "the output gradient", g);
    check::pointer(where, "the saved pre-activation z", save);
    check::pointer(where, "the first projection weight", w1);
    check::pointer(where, "the second projection weight", w2);
    const bool want_up = grads.w2 != nullptr || grads.b2 != nullptr;
    const bool want_down = grads.w1 != nullptr || grads.b1 != nullptr;
    if (want_down) check::pointer(where, "the input (needed for the first projection's gradients)", x);
    if (dx == nullptr && !want_up && !want_down) return;
    Scratch scratch(ws, lowrank_backward_workspace_bytes(d.n, d.c_in, d.c_out, d.r, d.k, sizeof(A)), where);
    A* a_buf = scratch.take<A>(d.n * d.r);
    A* dz_buf = scratch.take<A>(d.n * d.r);
    A* up_partial = scratch.take<A>(reduce_partial_elems(reduce_geometry(d.n, d.c_out, d.k), d.k,
                                                         d.c_out * d.r + d.c_out + d.r));
    A* down_partial = scratch.take<A>(reduce_partial_elems(reduce_geometry(d.n, d.c_in, d.k), d.k,
                                                           d.c_in * d.r + d.c_in + d.r));
    A* dx_sum = scratch.take<A>(dx != nullptr && lowrank_passes(d.r) > 1 ? d.n * d.c_in : 0);
    A* a_out = grads.w2 != nullptr ? a_buf : nullptr;  // a is needed for dW2 only (db2 = 1^T g needs no a)
    A* dz_out = want_down ? dz_buf : nullptr;
    if (dx != nullptr || a_out != nullptr || dz_out != nullptr) {
        switch (act) {
            case Act::none: dispatch_lowrank_backward<E, Act::none>(g, dres, task, d, w1, w2, scale, save, dx, a_out, dz_out, dx_sum, where); break;
            case Act::relu: dispatch_lowrank_backward<E, Act::relu>(g, dres, task, d, w1, w2, scale, save, dx, a_out, dz_out, dx_sum, where); break;
            case Act::gelu: dispatch_lowrank_backward<E, Act::gelu>(g, dres, task, d, w1, w2, scale, save, dx, a_out, dz_out, dx_sum, where); break;
        }
    }
    if (want_up)  // dW2 += s g^T a, db2 += 1^T g (a not read when dW2 is not wanted)
        outer_reduce<E, A, true>(g, a_out, task, d.n, d.c_out, d.r, d.k, scale, grads.w2, grads.b2, nullptr,
                                 up_partial, where);
    if (want_down)  // dW1 += dz^T x, db1 += 1^T dz
        outer_reduce<E, A, false>(x, dz_buf, task, d.n, d.c_in, d.r, d.k, A(1), grads.w1, nullptr, grads.b1,
                                  down_partial, where);
}

}  // namespace detail
}  // namespace patchwork::kernels
