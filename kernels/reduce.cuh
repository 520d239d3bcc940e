#pragma once
// Deterministic column reductions over rows, per task: the parameter
// gradients of every patch kernel are sums over the rows of a batch (dU =
// g^T a, dgamma = 1^T (g * h), ...), and in a mixed-task batch each sum runs
// over the rows of one task only.
//
// Geometry (plan.hpp, reduce_geometry): grid (column tiles of 32, K tasks,
// row splits). A block takes 32 columns (one per lane), one task and one range
// of rows; it compacts the rows of its task (ballots over 256 task ids at a
// time, so blocks of other tasks skip rows without loading them) and its
// 8 warps share the work. Partial sums are combined in a fixed order: across
// warps through shared memory, across splits by a second kernel that adds the
// split partials in split order and then adds the total into the gradient
// (+=). No floating-point atomics: for given sizes every run gives the same
// bits. With one split (K large, or few rows) the block adds into the
// gradient directly.
//
// Workspace: launchers take a Workspace (device memory of at least the bytes
// the *_workspace_bytes function of plan.hpp gives, 256-byte aligned); an
// empty one makes them use the current context's workspace (common.cuh,
// Scratch).
#include <cstddef>
#include <string_view>

#include "patchwork/kernels/common.cuh"
#include "patchwork/kernels/plan.hpp"

namespace patchwork::kernels {

namespace detail {

/// Compacts the rows in [begin, end) whose task is `k` (all rows when `task`
/// is null and k == 0) into `list` (shared, kThreads entries), kThreads rows
/// at a time; calls body(count) after each batch with the list filled.
/// Every thread of the block must call it.
template <class F>
__device__ inline void for_task_rows(const int* task, int k, long long begin, long long end, int* list,
                                     int* warp_counts, F&& body) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    for (long long base = begin; base < end; base += blockDim.x) {
        const long long n = base + tid;
        const bool match = n < end && (task == nullptr ? k == 0 : task[n] == k);
        const unsigned ballot = __ballot_sync(0xffffffffu, match);
        if (lane == 0) warp_counts[warp] = __popc(ballot);
        __syncthreads();
        int offset = 0, total = 0;
        for (int w = 0; w < warps; ++w) {
            const int c = warp_counts[w];
            offset += w < warp ? c : 0;
            total += c;
        }
        if (match) list[offset + __popc(ballot & ((1u << lane) - 1u))] = int(n - base);
        __syncthreads();
        if (total > 0) body(base, total);
        __syncthreads();  // list and warp_counts are rewritten by the next batch
    }
}

/// Outer-product reduction, per task:
///   grad[k] (+)= scale * sum_{n: task(n) = k} X[n, :]^T P[n, :]
/// stored [C, r] (CR, e.g. dU = g^T a) or [r, C] (RC, e.g. dD = dz^T h), plus
/// optionally xsum[k] += sum_n X[n, :] ([K, C]) and psum[k] += sum_n P[n, :] ([K, r]).
/// P may be null when only xsum is wanted (it is then never read).
/// With `partial` non-null the block writes (not adds) its sums to the split's
/// slot of partial = [splits][K][C r + C + r] instead.
///
/// Work split: with r > 8 each warp owns 8 rank entries (64 per pass) and
/// walks every row of the block; with r <= 8 (one group of rank entries) the
/// 8 warps split the rows instead (warp w takes the compacted rows w, w + 8,
/// ...) and their sums are added in warp order through shared memory, so
/// every warp has work and the order is still fixed.
template <class E, class A, bool CR>
__global__ void __launch_bounds__(kThreads)
    outer_reduce_kernel(const E* __restrict__ x, const A* __restrict__ p, const int* __restrict__ task, long long n,
                        int c, int r, int k_tasks, long long rows_per_split, A scale, A* __restrict__ grad,
                        A* __restrict__ xsum, A* __restrict__ psum, A* __restrict__ partial) {
    constexpr int JW = 8;  // rank entries per warp per pass (8 warps x 8 = 64 per pass)
    constexpr int kWarps = int(kThreads) / 32;
    __shared__ int list[kThreads];
    __shared__ int warp_counts[32];
    __shared__ A red[kWarps][2 * JW + 1][32];  // per-warp sums when the warps split the rows
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = kWarps;
    const int col = int(blockIdx.x) * int(kColTile) + lane;
    const int k = int(blockIdx.y);
    const long long begin = (long long)blockIdx.z * rows_per_split;
    const long long end = begin + rows_per_split < n ? begin + rows_per_split : n;
    const std::size_t per_task = std::size_t(c) * r + c + r;
    A* slot = partial == nullptr ? nullptr : partial + (std::size_t(blockIdx.z) * k_tasks + k) * per_task;
    const bool want_x = xsum != nullptr || slot != nullptr;
    const bool want_p = p != nullptr && (psum != nullptr || slot != nullptr) && blockIdx.x == 0;
    const bool spread = r <= JW || p == nullptr;  // one group of rank entries: the warps split the rows
    const int passes_r = p == nullptr ? 1 : r;

    for (int j0 = 0; j0 < passes_r; j0 += warps * JW) {
        A acc[JW], pacc[JW];
        for (int q = 0; q < JW; ++q) acc[q] = pacc[q] = A(0);
        A xacc = A(0);
        const bool first_pass = j0 == 0;
        const int jw = spread ? 0 : j0 + warp * JW;  // this warp's first rank entry
        for_task_rows(task, k, begin, end, list, warp_counts, [&](long long base, int count) {
            if (!spread && jw >= r && !(first_pass && warp == 0)) return;
            for (int i = spread ? warp : 0; i < count; i += spread ? warps : 1) {
                const long long row = base + list[i];
                const A xv = col < c ? A(load<E>(x[row * c + col])) : A(0);
                if (p != nullptr) {
                    const A* prow = p + row * r;
#pragma unroll
                    for (int q = 0; q < JW; ++q) {
                        if (jw + q < r) {
                            const A pv = prow[jw + q];
                            acc[q] += xv * pv;
                            pacc[q] += pv;
                        }
                    }
                }
                xacc += xv;
            }
        });
        if (spread) {  // add the warps' sums in warp order; warp 0 writes
            for (int q = 0; q < JW; ++q) {
                red[warp][q][lane] = acc[q];
                red[warp][JW + q][lane] = pacc[q];
            }
            red[warp][2 * JW][lane] = xacc;
            __syncthreads();
            if (warp != 0) return;
            for (int q = 0; q < JW; ++q) acc[q] = pacc[q] = A(0);
            xacc = A(0);
            for (int w = 0; w < warps; ++w) {
                for (int q = 0; q < JW; ++q) {
                    acc[q] += red[w][q][lane];
                    pacc[q] += red[w][JW + q][lane];
                }
                xacc += red[w][2 * JW][lane];
            }
        }
        for (int q = 0; q < JW && p != nullptr; ++q) {
            const int j = jw + q;
            if (j >= r) continue;
            if (col < c) {
                const std::size_t idx = CR ? std::size_t(col) * r + j : std::size_t(j) * c + col;
                if (slot != nullptr) slot[idx] = scale * acc[q];
                else if (grad != nullptr) grad[std::size_t(k) * c * r + idx] += scale * acc[q];
            }
            if (want_p && lane == 0) {
                if (slot != nullptr) slot[std::size_t(c) * r + c + j] = pacc[q];
                else psum[std::size_t(k) * r + j] += pacc[q];
            }
        }
        if (first_pass && warp == 0 && col < c && want_x) {
            if (slot != nullptr) slot[std::size_t(c) * r + col] = xacc;
            else xsum[std::size_t(k) * c + col] += xacc;
        }
    }
}

/// Second pass of a split reduction: dst[i] += sum_s partial[s][i] (i over K slots of per_task values,
/// element `offset + e` of each slot goes to dst[k * len + e]).
template <class A>
__global__ void finish_reduce_kernel(const A* __restrict__ partial, long long splits, long long k_tasks,
                                     long long per_task, long long offset, long long len, A* __restrict__ dst) {
    const long long total = k_tasks * len;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long k = i / len, e = i % len;
        A s = A(0);
        for (long long sp = 0; sp < splits; ++sp) s += partial[(sp * k_tasks + k) * per_task + offset + e];
        dst[i] += s;
    }
}

/// Launches the outer-product reduction (and its second pass when split).
/// Any of grad, xsum, psum may be null (then it is not computed).
template <class E, class A, bool CR>
void outer_reduce(const E* x, const A* p, const int* task, std::size_t n, std::size_t c, std::size_t r,
                  std::size_t k_tasks, A scale, A* grad, A* xsum, A* psum, A* partial_ws, std::string_view where) {
    if (n == 0 || (grad == nullptr && xsum == nullptr && psum == nullptr)) return;
    if (grad != nullptr || psum != nullptr) check::pointer(where, "the reduction's second factor", p);
    const ReduceGeometry g = reduce_geometry(n, c, k_tasks);
    const std::size_t per_task = c * r + c + r;
    A* partial = g.splits > 1 ? partial_ws : nullptr;
    const dim3 grid(unsigned(g.col_tiles), unsigned(k_tasks), unsigned(g.splits));
    kernels::launch(outer_reduce_kernel<E, A, CR>, grid, kThreads, 0, stream(), x, p, task, (long long)n, int(c), int(r), int(k_tasks), (long long)g.rows_per_split, scale,
        grad, xsum, psum, partial);
    cuda::check_launch("outer_reduce_kernel", where);
    if (partial == nullptr) return;
    const auto finish = [&](A* dst, std::size_t offset, std::size_t len) {
        if (dst == nullptr) return;
        kernels::launch(finish_reduce_kernel<A>, grid_1d(k_tasks * len, kThreads), kThreads, 0, stream(), partial, (long long)g.splits, (long long)k_tasks, (long long)per_task, (long long)offset,
            (long long)len, dst);
        cuda::check_launch("finish_reduce_kernel", where);
    };
    finish(grad, 0, c * r);
    finish(xsum, c * r, c);
    finish(psum, c * r + c, r);
}

/// Column sums of products, per task (the scale-shift parameter gradients):
///   sxy[k] (+)= sum_{n: task(n) = k} X[n, :] * Y[n, :],   sx[k] (+)= sum_n X[n, :]    ([K, C] each)
/// With `partial` ([splits][K][2 C]) non-null the block writes its split's sums there instead.
template <class E, class A>
__global__ void __launch_bounds__(kThreads)
    colsum_kernel(const E* __restrict__ x, const E* __restrict__ y, const int* __restrict__ task, long long n, int c,
                  int k_tasks, long long rows_per_split, A* __restrict__ sxy, A* __restrict__ sx,
                  A* __restrict__ partial) {
    __shared__ int list[kThreads];
    __shared__ int warp_counts[32];
    __shared__ A red[2][kThreads / 32][kColTile];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = kThreads / 32;
    const int col = int(blockIdx.x) * int(kColTile) + lane;
    const int k = int(blockIdx.y);
    const long long begin = (long long)blockIdx.z * rows_per_split;
    const long long end = begin + rows_per_split < n ? begin + rows_per_split : n;
    A axy = A(0), ax = A(0);
    for_task_rows(task, k, begin, end, list, warp_counts, [&](long long base, int count) {
        if (col >= c) return;
        for (int i = warp; i < count; i += warps) {
            const long long row = base + list[i];
            const A xv = load<E>(x[row * c + col]);
            ax += xv;
            if (sxy != nullptr || partial != nullptr) axy += xv * A(load<E>(y[row * c + col]));
        }
    });
    red[0][warp][lane] = axy;
    red[1][warp][lane] = ax;
    __syncthreads();
    if (warp == 0 && col < c) {
        A s0 = A(0), s1 = A(0);
        for (int w = 0; w < warps; ++w) {
            s0 += red[0][w][lane];
            s1 += red[1][w][lane];
        }
        if (partial != nullptr) {
            A* slot = partial + (std::size_t(blockIdx.z) * k_tasks + k) * 2 * std::size_t(c);
            slot[col] = s0;
            slot[c + col] = s1;
        } else {
            if (sxy != nullptr) sxy[std::size_t(k) * c + col] += s0;
            if (sx != nullptr) sx[std::size_t(k) * c + col] += s1;
        }
    }
}

template <class E, class A>
void colsum(const E* x, const E* y, const int* task, std::size_t n, std::size_t c, std::size_t k_tasks, A* sxy,
            A* sx, A* partial_ws, std::string_view where) {
    if (n == 0 || (sxy == nullptr && sx == nullptr)) return;
    const ReduceGeometry g = reduce_geometry(n, c, k_tasks);
    A* partial = g.splits > 1 ? partial_ws : nullptr;
    const dim3 grid(unsigned(g.col_tiles), unsigned(k_tasks), unsigned(g.splits));
    kernels::launch(colsum_kernel<E, A>, grid, kThreads, 0, stream(), x, y, task, (long long)n, int(c), int(k_tasks),
                                                         (long long)g.rows_per_split, sxy, sx, partial);
    cuda::check_launch("colsum_kernel", where);
    if (partial == nullptr) return;
    const auto finish = [&](A* dst, std::size_t offset) {
        if (dst == nullptr) return;
        kernels::launch(finish_reduce_kernel<A>, grid_1d(k_tasks * c, kThreads), kThreads, 0, stream(), partial, (long long)g.splits, (long long)k_tasks, (long long)(2 * c), (long long)offset, (long long)c,
            dst);
        cuda::check_launch("finish_reduce_kernel", where);
    };
    finish(sxy, 0);
    finish(sx, c);
}

}  // namespace detail
}  // namespace patchwork::kernels
