#pragma once
// Per-channel scale and shift (the math of ScaleShiftModule, policies/scale_shift.hpp):
//   y_nc = gamma_tc h_nc + beta_tc          gamma, beta: [K, d]; t = task of row n (0 without task ids)
// Backward, with g = dL/dy:
//   dh_nc      = g_nc gamma_tc                       (y is linear in h with slope gamma)
//   dgamma_tc += sum_{n in t} g_nc h_nc               (slope of y in gamma is h)
//   dbeta_tc  += sum_{n in t} g_nc                    (slope of y in beta is 1)
// Forward and dh: one element-wise grid-stride pass (reads h or g once,
// writes once, gamma and beta stay in L1/L2). Parameter gradients: the
// ordered column reduction of reduce.cuh (32 columns x 1 task x a row split
// per block, split partials added in order: deterministic, no atomics).
// bf16: h, g, y, dh, gamma, beta in bf16, arithmetic and gradients in fp32.
// Rows whose task id is outside [0, K) are left unwritten.
#include <cstddef>
#include <string_view>

#include "patchwork/kernels/common.cuh"
#include "patchwork/kernels/plan.hpp"
#include "patchwork/kernels/reduce.cuh"

namespace patchwork::kernels {
namespace detail {

/// Grid-stride over the n * d elements; I is the index type: 32-bit unsigned
/// whenever n * d fits (a 32-bit division per element instead of a 64-bit one,
/// which the GPU emulates in tens of instructions), 64-bit otherwise.
template <class E, class I>
__global__ void scale_shift_kernel(const E* __restrict__ h, const int* __restrict__ task, int k_tasks, I n, I d,
                                   const E* __restrict__ gamma, const E* __restrict__ beta, E* __restrict__ y) {
    using A = accum_t<E>;
    const I total = n * d;
    for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < total; i += I(gridDim.x) * I(blockDim.x)) {
        const I row = i / d, c = i - row * d;
        const int t = task == nullptr ? 0 : task[row];
        if (t < 0 || t >= k_tasks) continue;
        const std::size_t p = std::size_t(t) * d + c;
        A v = A(load<E>(h[i]));
        if (gamma != nullptr) v *= A(load<E>(gamma[p]));
        if (beta != nullptr) v += A(load<E>(beta[p]));
        y[i] = store<E>(v);
    }
}

/// Launches scale_shift_kernel with 32-bit indices when n * d (and the grid-stride step) fit.
template <class E>
void launch_scale_shift(const E* h, const int* task, std::size_t n, std::size_t d, std::size_t k, const E* gamma,
                        const E* beta, E* y, std::string_view where) {
    const unsigned blocks = grid_1d(n * d, kThreads);
    if (n * d + std::size_t(blocks) * kThreads <= 0xffffffffu)
        kernels::launch(scale_shift_kernel<E, unsigned>, blocks, kThreads, 0, stream(), h, task, int(k), unsigned(n),
                        unsigned(d), gamma, beta, y);
    else
        kernels::launch(scale_shift_kernel<E, unsigned long long>, blocks, kThreads, 0, stream(), h, task, int(k),
                        (unsigned long long)n, (unsigned long long)d, gamma, beta, y);
    cuda::check_launch("scale_shift_kernel", where);
}

inline void check_scale_shift(std::size_t n, std::size_t d, std::size_t k, std::string_view where) {
    check::positive(where, "the width d", d);
    check::tasks(where, k);
    check::fits_int(where, "the width d", d);
    check::extent(where, "the rows", n, d);
    check::extent(where, "the stacked parameters", k, d);
}

template <class E>
void scale_shift_forward(const E* h, const int* task, std::size_t n, std::size_t d, std::size_t k, const E* gamma,
                         const E* beta, E* y, std::string_view where) {
    check_scale_shift(n, d, k, where);
    if (n == 0) return;
    check::pointer(where, "the input", h);
    check::pointer(where, "the output", y);
    check::pointer(where, "the scale gamma", gamma);
    check::pointer(where, "the shift beta", beta);
    launch_scale_shift<E>(h, task, n, d, k, gamma, beta, y, where);
}

template <class E>
void scale_shift_backward(const E* h, const E* g, const int* task, std::size_t n, std::size_t d, std::size_t k,
                          const E* gamma, E* dh, accum_t<E>* dgamma, accum_t<E>* dbeta, Workspace ws,
                          std::string_view where) {
    using A = accum_t<E>;
    check_scale_shift(n, d, k, where);
    if (n == 0) return;
    check::pointer(where, "the output gradient", g);
    if (dh != nullptr) {
        check::pointer(where, "the scale gamma", gamma);
        launch_scale_shift<E>(g, task, n, d, k, gamma, nullptr, dh, where);
    }
    if (dgamma == nullptr && dbeta == nullptr) return;
    if (dgamma != nullptr) check::pointer(where, "the input h (needed for the scale's gradient)", h);
    Scratch scratch(ws, scale_shift_backward_workspace_bytes(n, d, k, sizeof(A)), where);
    A* partial = scratch.take<A>(reduce_partial_elems(reduce_geometry(n, d, k), k, 2 * d));
    colsum<E, A>(g, dgamma != nullptr ? h : g, task, n, d, k, dgamma, dbeta, partial, where);
}

}  // namespace detail

/// y = gamma * h + beta per channel, rows h [n, d], gamma and beta [d].
template <class E>
void scale_shift_forward(const E* h, std::size_t n, std::size_t d, const E* gamma, const E* beta, E* y,
                         std::string_view where) {
    detail::scale_shift_forward<E>(h, nullptr, n, d, 1, gamma, beta, y, where);
}

/// dh = g * gamma (dh nullable); dgamma += colsum(g * h), dbeta += colsum(g) (each nullable).
template <class E>
void scale_shift_backward(const E* h, const E* g, std::size_t n, std::size_t d, const E* gamma, E* dh,
                          accum_t<E>* dgamma, accum_t<E>* dbeta, std::string_view where, Workspace ws = {}) {
    detail::scale_shift_backward<E>(h, g, nullptr, n, d, 1, gamma, dh, dgamma, dbeta, ws, where);
}

}  // namespace patchwork::kernels
