#pragma once
// Architecture-weight gates fused with the weighted sum of candidate outputs
// (the math of search::GateState, search/gates.hpp, and of Search's mixing,
// policies/search.hpp):
//   z_k = (alpha_k + G_k) / tau   (Gumbel-softmax, noise G given) or z_k = alpha_k (softmax)
//   p   = softmax(z)              (max-subtracted, computed in double)
//   w   = onehot(argmax p) (hard; the first maximum on ties) or p
//   out = sum_k w_k o_k           (candidates with w_k = 0 are not read)
// Backward, with g = dL/dout:
//   dL/do_k    = w_k g
//   dL/dw_k    = <g, o_k>                                 (every candidate, also w_k = 0)
//   dL/dalpha_i += (1/tau) p_i (dL/dw_i - sum_j p_j dL/dw_j)
// The last line is the softmax Jacobian dp_j/dz_i = p_j ([i = j] - p_i) applied
// to dL/dw, with dz/dalpha = 1/tau (1 for softmax). When hard, the backward
// uses p (straight-through), exactly as GateState::backward does.
//
// Geometry: every block recomputes the K gate values (K <= 16) from alpha, so
// the forward is one launch; mix_blocks(M) blocks grid-stride over the M
// elements. Backward: the same blocks write dL/do_k and per-block partial sums
// of <g, o_k> (a block-wide tree sum) to a workspace; one block then adds the
// partials in block order (one warp per candidate) and applies the Jacobian.
// The block count depends on M only, so results are bitwise reproducible.
// bf16: candidates, out, g and dL/do_k stored in bf16; alpha, noise, the gate
// values and dL/dalpha in fp32 (accum_t), all arithmetic in fp32 (double for
// the K-wide softmax).
#include <cmath>
#include <cstddef>
#include <string_view>

#include "patchwork/kernels/common.cuh"
#include "patchwork/kernels/plan.hpp"
#include "patchwork/kernels/reduce.cuh"

namespace patchwork::kernels {

/// How the gate values come from alpha: noise == nullptr means plain softmax
/// (tau ignored, as GateMode::softmax); otherwise Gumbel-softmax with the given
/// noise G ([K], accum_t) and temperature tau > 0.
template <class A>
struct MixGates {
    const A* noise = nullptr;
    double tau = 1.0;
    bool hard = false;
};

namespace detail {

template <class E>
struct CandidatePointers {
    const E* p[kMaxCandidates];
};
template <class E>
struct CandidateOutputs {
    E* p[kMaxCandidates];
};

/// Gate values into shared soft[] and used[] (thread 0 computes, all wait).
template <class A>
__device__ inline void compute_gates(const A* alpha, const A* noise, double inv_tau, bool hard, int k, A* soft,
                                     A* used) {
    if (threadIdx.x == 0) {
        double z[kMaxCandidates];
        double zmax = -INFINITY;
        for (int i = 0; i < k; ++i) {
            z[i] = (double(alpha[i]) + (noise != nullptr ? double(noise[i]) : 0.0)) * inv_tau;
            zmax = z[i] > zmax ? z[i] : zmax;
        }
        double sum = 0;
        for (int i = 0; i < k; ++i) sum += (z[i] = exp(z[i] - zmax));
        int best = 0;
        for (int i = 0; i < k; ++i) {
            soft[i] = A(z[i] / sum);
            if (soft[i] > soft[best]) best = i;
        }
        for (int i = 0; i < k; ++i) used[i] = hard ? A(i == best ? 1 : 0) : soft[i];
    }
    __syncthreads();
}

template <class E>
__global__ void __launch_bounds__(kThreads)
    mix_forward_kernel(const accum_t<E>* __restrict__ alpha, const accum_t<E>* __restrict__ noise, double inv_tau,
                       bool hard, int k, CandidatePointers<E> cand, long long m, E* __restrict__ out,
                       accum_t<E>* __restrict__ soft_out, accum_t<E>* __restrict__ used_out) {
    using A = accum_t<E>;
    __shared__ A soft[kMaxCandidates], used[kMaxCandidates];
    compute_gates(alpha, noise, inv_tau, hard, k, soft, used);
    if (blockIdx.x == 0 && threadIdx.x < unsigned(k)) {
        if (soft_out != nullptr) soft_out[threadIdx.x] = soft[threadIdx.x];
        if (used_out != nullptr) used_out[threadIdx.x] = used[threadIdx.x];
    }
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < m; i += (long long)gridDim.x * blockDim.x) {
        A acc = A(0);
#pragma unroll
        for (int j = 0; j < int(kMaxCandidates); ++j)
            if (j < k && used[j] != A(0)) acc += used[j] * A(load<E>(cand.p[j][i]));
        out[i] = store<E>(acc);
    }
}

template <class E>
__global__ void __launch_bounds__(kThreads)
    mix_backward_kernel(const E* __restrict__ g, int k, CandidatePointers<E> cand, const accum_t<E>* __restrict__ used,
                        long long m, CandidateOutputs<E> dcand, accum_t<E>* __restrict__ partial) {
    using A = accum_t<E>;
    __shared__ A scratch[32];
    __shared__ A w[kMaxCandidates];
    if (threadIdx.x < unsigned(k)) w[threadIdx.x] = used[threadIdx.x];
    __syncthreads();
    A dot[kMaxCandidates];
#pragma unroll
    for (int j = 0; j < int(kMaxCandidates); ++j) dot[j] = A(0);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < m; i += (long long)gridDim.x * blockDim.x) {
        const A gv = load<E>(g[i]);
#pragma unroll
        for (int j = 0; j < int(kMaxCandidates); ++j) {
            if (j >= k) break;
            dot[j] += gv * A(load<E>(cand.p[j][i]));
            if (dcand.p[j] != nullptr) dcand.p[j][i] = store<E>(w[j] * gv);
        }
    }
    if (partial == nullptr) return;
#pragma unroll
    for (int j = 0; j < int(kMaxCandidates); ++j) {
        if (j >= k) break;
        const A s = block_sum(dot[j], scratch);
        if (threadIdx.x == 0) partial[(long long)blockIdx.x * k + j] = s;
    }
}

/// One block of 32 * K threads: warp j adds candidate j's partials in block order.
template <class A>
__global__ void mix_alpha_grad_kernel(const A* __restrict__ partial, int blocks, int k, const A* __restrict__ soft,
                                      double inv_tau, A* __restrict__ alpha_grad) {
    __shared__ A dgate[kMaxCandidates];
    const int lane = threadIdx.x & 31, j = threadIdx.x >> 5;
    if (j < k) {
        A s = A(0);
        for (int b = lane; b < blocks; b += 32) s += partial[(long long)b * k + j];
        s = warp_sum(s);
        if (lane == 0) dgate[j] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        A dot = A(0);
        for (int i = 0; i < k; ++i) dot += soft[i] * dgate[i];
        for (int i = 0; i < k; ++i) alpha_grad[i] += A(inv_tau) * soft[i] * (dgate[i] - dot);
    }
}

inline void check_mix(std::size_t k, std::size_t m, std::string_view where) {
    check::positive(where, "the number of candidates K", k);
    if (k > kMaxCandidates)
        throw ConfigError(patchwork::detail::concat(where, ": at most ", kMaxCandidates,
                                                    " candidates can be mixed in one launch, got ", k));
    check::extent(where, "the candidate outputs", k, m);
}

template <class A>
double inverse_tau(const MixGates<A>& gates, std::string_view where) {
    if (gates.noise == nullptr) return 1.0;
    if (!(gates.tau > 0) || !std::isfinite(gates.tau))
        throw ConfigError(patchwork::detail::concat(where, ": the Gumbel-softmax temperature tau must be positive and "
                                                    "finite, got ", gates.tau));
    return 1.0 / gates.tau;
}

}  // namespace detail

/// out [m] = sum_k w_k candidates[k] [m], w from alpha [k] (see the top of this file).
/// soft and used ([k], nullable) receive p and w for the backward.
template <class E>
void mix_forward(const accum_t<E>* alpha, std::size_t k, const MixGates<accum_t<E>>& gates,
                 const E* const* candidates, std::size_t m, E* out, accum_t<E>* soft, accum_t<E>* used,
                 std::string_view where) {
    detail::check_mix(k, m, where);
    const double inv_tau = detail::inverse_tau(gates, where);
    check::pointer(where, "alpha", alpha);
    check::pointer(where, "the candidate pointer array", candidates);
    detail::CandidatePointers<E> cand{};
    for (std::size_t j = 0; j < k; ++j) {
        check::pointer(where, "a candidate output", candidates[j]);
        cand.p[j] = candidates[j];
    }
    if (m > 0) check::pointer(where, "the output", out);
    kernels::launch(detail::mix_forward_kernel<E>, unsigned(mix_blocks(m)), kThreads, 0, stream(), alpha, gates.noise, inv_tau, gates.hard, int(k), cand, (long long)m, out, soft, used);
    cuda::check_launch("mix_forward_kernel", where);
}

/// As mix_forward with the candidates stacked in one buffer [k, m].
template <class E>
void mix_forward_stacked(const accum_t<E>* alpha, std::size_t k, const MixGates<accum_t<E>>& gates,
                         const E* stacked, std::size_t m, E* out, accum_t<E>* soft, accum_t<E>* used,
                         std::string_view where) {
    detail::check_mix(k, m, where);
    check::pointer(where, "the stacked candidates", stacked);
    const E* ptrs[kMaxCandidates];
    for (std::size_t j = 0; j < k && j < kMaxCandidates; ++j) ptrs[j] = stacked + j * m;
    mix_forward<E>(alpha, k, gates, ptrs, m, out, soft, used, where);
}

/// Backward of the mixing: d_candidates[k] (each nullable, or the array null) = used_k g;
/// alpha_grad [k] += (1/tau) p_i (<g, o_i> - sum_j p_j <g, o_j>) (nullable). soft and used
/// are what mix_forward wrote; gates gives tau and whether noise was used.
template <class E>
void mix_backward(const E* g, std::size_t m, const E* const* candidates, std::size_t k, const accum_t<E>* soft,
                  const accum_t<E>* used, const MixGates<accum_t<E>>& gates, E* const* d_candidates,
                  accum_t<E>* alpha_grad, std::string_view where, Workspace ws = {}) {
    using A = accum_t<E>;
    detail::check_mix(k, m, where);
    const double inv_tau = detail::inverse_tau(gates, where);
    check::pointer(where, "the candidate pointer array", candidates);
    check::pointer(where, "the gate values used", used);
    if (alpha_grad != nullptr) check::pointer(where, "the soft gate values p", soft);
    detail::CandidatePointers<E> cand{};
    detail::CandidateOutputs<E> dcand{};
    for (std::size_t j = 0; j < k; ++j) {
        check::pointer(where, "a candidate output", candidates[j]);
        cand.p[j] = candidates[j];
        dcand.p[j] = d_candidates == nullptr ? nullptr : d_candidates[j];
    }
    if (m > 0) check::pointer(where, "the output gradient", g);
    const std::size_t blocks = mix_blocks(m);
    detail::Scratch scratch(ws, alpha_grad != nullptr ? mix_backward_workspace_bytes(m, k, sizeof(A)) : 0, where);
    A* partial = scratch.take<A>(alpha_grad != nullptr ? blocks * k : 0);
    kernels::launch(detail::mix_backward_kernel<E>, unsigned(blocks), kThreads, 0, stream(), g, int(k), cand, used, (long long)m,
                                                                               dcand, partial);
    cuda::check_launch("mix_backward_kernel", where);
    if (alpha_grad == nullptr) return;
    kernels::launch(detail::mix_alpha_grad_kernel<A>, 1, unsigned(32 * k), 0, stream(), partial, int(blocks), int(k), soft, inv_tau,
                                                                            alpha_grad);
    cuda::check_launch("mix_alpha_grad_kernel", where);
}

/// alpha_grad [k] += (1/tau) p_i (dgate_i - sum_j p_j dgate_j) for a given dL/dw
/// (dgate [k], on the device): a penalty on the gate values, added to the
/// gradient the mixing backward gives. One block, as mix_backward's last step.
template <class A>
void mix_gate_backward(const A* dgate, std::size_t k, const A* soft, const MixGates<A>& gates, A* alpha_grad,
                       std::string_view where) {
    detail::check_mix(k, 1, where);
    const double inv_tau = detail::inverse_tau(gates, where);
    check::pointer(where, "the gate gradient", dgate);
    check::pointer(where, "the soft gate values p", soft);
    check::pointer(where, "the alpha gradient", alpha_grad);
    kernels::launch(detail::mix_alpha_grad_kernel<A>, 1, unsigned(32 * k), 0, stream(), dgate, 1, int(k), soft,
                    inv_tau, alpha_grad);
    cuda::check_launch("mix_alpha_grad_kernel", where);
}

/// As mix_backward with candidates and their gradients stacked [k, m] (d_stacked nullable).
template <class E>
void mix_backward_stacked(const E* g, std::size_t m, const E* stacked, std::size_t k, const accum_t<E>* soft,
                          const accum_t<E>* used, const MixGates<accum_t<E>>& gates, E* d_stacked,
                          accum_t<E>* alpha_grad, std::string_view where, Workspace ws = {}) {
    detail::check_mix(k, m, where);
    check::pointer(where, "the stacked candidates", stacked);
    const E* ptrs[kMaxCandidates];
    E* dptrs[kMaxCandidates];
    for (std::size_t j = 0; j < k && j < kMaxCandidates; ++j) {
        ptrs[j] = stacked + j * m;
        dptrs[j] = d_stacked == nullptr ? nullptr : d_stacked + j * m;
    }
    mix_backward<E>(g, m, ptrs, k, soft, used, gates, dptrs, alpha_grad, where, ws);
}

}  // namespace patchwork::kernels
