#pragma once
// Mixed-task patch application: every row n of a batch uses the patch of its
// own task t_n (task ids: an int32 device array [N], values in [0, K)), with
// the per-task parameters stacked along a leading K axis, in one launch per
// direction (gather kernels in the manner of S-LoRA / Punica):
//   scale-shift:  y_n = gamma_t * h_n + beta_t                 gamma, beta: [K, d]
//   adapter:      y_n = h_n + act(h_n D_t^T + bd_t) U_t^T + bu_t
//                 D: [K, r, d], bd: [K, r], U: [K, d, r], bu: [K, d]
//   LoRA:         y_n = base_n + s (x_n A_t^T) B_t^T            A: [K, r, in], B: [K, out, r], s = alpha / r
// Backward: dh (or dx) per row with the row's task's parameters, and each
// parameter gradient accumulated (+=) into the slot of its task only:
//   dgamma_t += sum_{n: t_n = t} g_n * h_n,  dbeta_t += sum_{n: t_n = t} g_n
//   adapter / LoRA: the low-rank backward of lowrank.cuh restricted to the rows of t.
// The math per row is that of the single-task kernels (scale_shift.cuh,
// adapter.cuh, lowrank.cuh carry the derivations); LoRA's dx adds
// s (g B_t) A_t onto the Linear's own input gradient base_dx (nullable: 0).
//
// Cost: the row-tiled kernels process each 32-row tile once per distinct task
// among its rows (batches grouped by task: one pass per tile, as single-task).
// The gradient reductions give each (column tile, task) its own blocks, which
// skip other tasks' rows by ballots over task ids: deterministic, no atomics.
// Task ids are checked before anything is launched: an id outside [0, K)
// throws ConfigError naming the module path, the row and the id (a small
// kernel finds the first such row; its result is copied back, so each
// multi-task launcher waits for the stream once). The kernels themselves
// skip such rows, should one be changed on the device afterwards.
#include <cstddef>
#include <string_view>

#include "patchwork/kernels/adapter.cuh"
#include "patchwork/kernels/lowrank.cuh"
#include "patchwork/kernels/scale_shift.cuh"

namespace patchwork::kernels {

namespace detail {

/// first_bad = the smallest row whose task id is outside [0, k) (unchanged when none).
template <class I>
__global__ void find_bad_task_kernel(const int* __restrict__ task, I n, int k, I* __restrict__ first_bad) {
    for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
        const int t = task[i];
        if (t < 0 || t >= k) atomicMin(first_bad, i);
    }
}

/// ConfigError naming `where`, the row and the id when a task id of rows [0, n) is outside [0, k).
inline void check_task_ids(const int* task, std::size_t n, std::size_t k, std::string_view where) {
    if (n == 0) return;
    check::pointer(where, "the task ids", task);
    Scratch scratch({}, 256, where);
    auto* first_bad = scratch.take<unsigned long long>(1);
    cuda::check(cudaMemsetAsync(first_bad, 0xFF, sizeof(unsigned long long), stream()), "cudaMemsetAsync", where);
    kernels::launch(find_bad_task_kernel<unsigned long long>, grid_1d(n, kThreads), kThreads, 0, stream(), task, (unsigned long long)n,
                    int(k), first_bad);
    cuda::check_launch("find_bad_task_kernel", where);
    unsigned long long row = 0;
    cuda::check(cudaMemcpyAsync(&row, first_bad, sizeof row, cudaMemcpyDeviceToHost, stream()), "cudaMemcpyAsync",
                where);
    cuda::check(cudaStreamSynchronize(stream()), "cudaStreamSynchronize", where);
    if (row == ~0ull) return;
    int id = 0;
    cuda::check(cudaMemcpyAsync(&id, task + row, sizeof id, cudaMemcpyDeviceToHost, stream()), "cudaMemcpyAsync",
                where);
    cuda::check(cudaStreamSynchronize(stream()), "cudaStreamSynchronize", where);
    throw ConfigError(patchwork::detail::concat(where, ": task id ", id, " of row ", row, " is outside [0, ", k,
                                                ") (", k, " tasks)"));
}

}  // namespace detail

/// y [n, d] = gamma[t_n] * h + beta[t_n].
template <class E>
void multitask_scale_shift_forward(const E* h, const int* task, std::size_t n, std::size_t d, std::size_t k,
                                   const E* gamma, const E* beta, E* y, std::string_view where) {
    detail::check_task_ids(task, n, k, where);
    detail::scale_shift_forward<E>(h, task, n, d, k, gamma, beta, y, where);
}

/// dh = g * gamma[t_n] (nullable); dgamma [K, d] += per-task colsum(g * h); dbeta [K, d] += per-task colsum(g).
template <class E>
void multitask_scale_shift_backward(const E* h, const E* g, const int* task, std::size_t n, std::size_t d,
                                    std::size_t k, const E* gamma, E* dh, accum_t<E>* dgamma, accum_t<E>* dbeta,
                                    std::string_view where, Workspace ws = {}) {
    detail::check_task_ids(task, n, k, where);
    detail::scale_shift_backward<E>(h, g, task, n, d, k, gamma, dh, dgamma, dbeta, ws, where);
}

/// Adapter forward with per-row tasks; save [n, r] (nullable) receives z.
template <class E>
void multitask_adapter_forward(const E* h, const int* task, std::size_t n, std::size_t d, std::size_t r,
                               std::size_t k, const E* down_w, const E* down_b, const E* up_w, const E* up_b, Act act,
                               E* y, accum_t<E>* save, std::string_view where) {
    if (act == Act::none) throw ConfigError(patchwork::detail::concat(where, ": an adapter needs ReLU or GELU"));
    detail::check_task_ids(task, n, k, where);
    check::pointer(where, "the adapter input h", h);
    detail::lowrank_forward<E>(act, h, h, task, {n, d, d, r, k}, down_w, down_b, up_w, up_b, accum_t<E>(1), y, save,
                               where);
}

/// Adapter backward with per-row tasks; gradients [K, ...] accumulated into each row's task slot.
template <class E>
void multitask_adapter_backward(const E* h, const E* g, const int* task, std::size_t n, std::size_t d, std::size_t r,
                                std::size_t k, const E* down_w, const E* up_w, Act act, const accum_t<E>* save, E* dh,
                                const AdapterGrads<accum_t<E>>& grads, std::string_view where, Workspace ws = {}) {
    if (act == Act::none) throw ConfigError(patchwork::detail::concat(where, ": an adapter needs ReLU or GELU"));
    detail::check_task_ids(task, n, k, where);
    detail::lowrank_backward<E>(act, h, g, g, task, {n, d, d, r, k}, down_w, up_w, accum_t<E>(1), save, dh,
                                {grads.down_w, grads.down_b, grads.up_w, grads.up_b}, ws, where);
}

inline std::size_t multitask_adapter_backward_workspace_bytes(std::size_t n, std::size_t d, std::size_t r,
                                                              std::size_t k, std::size_t accum_bytes) {
    return lowrank_backward_workspace_bytes(n, d, d, r, k, accum_bytes);
}

/// y [n, out] = base + s (x A_t^T) B_t^T; x [n, in]; u [n, r] (nullable without backward) receives x A_t^T.
/// base may equal y (in-place update of the base output).
template <class E>
void multitask_lora_forward(const E* x, const E* base, const int* task, std::size_t n, std::size_t in,
                            std::size_t out, std::size_t r, std::size_t k, const E* a, const E* b, accum_t<E> scale,
                            E* y, accum_t<E>* u, std::string_view where) {
    check::pointer(where, "the base output", base);
    if (task != nullptr) detail::check_task_ids(task, n, k, where);
    detail::lowrank_forward<E>(Act::none, x, base, task, {n, in, out, r, k}, a, nullptr, b, nullptr, scale, y, u,
                               where);
}

/// Gradients of LoRA's factors (nullable, accumulated +=).
template <class A>
struct LoraGrads {
    A* a = nullptr;  ///< dA [K, r, in]
    A* b = nullptr;  ///< dB [K, out, r]
};

/// dx [n, in] (nullable) = base_dx + s (g B_t) A_t (base_dx nullable: 0); dB_t += s g^T u; dA_t += s (g B_t)^T x.
template <class E>
void multitask_lora_backward(const E* x, const E* g, const E* base_dx, const int* task, std::size_t n,
                             std::size_t in, std::size_t out, std::size_t r, std::size_t k, const E* a, const E* b,
                             accum_t<E> scale, const accum_t<E>* u, E* dx, const LoraGrads<accum_t<E>>& grads,
                             std::string_view where, Workspace ws = {}) {
    if (task != nullptr) detail::check_task_ids(task, n, k, where);
    detail::lowrank_backward<E>(Act::none, x, g, base_dx, task, {n, in, out, r, k}, a, b, scale, u, dx,
                                {grads.a, nullptr, grads.b, nullptr}, ws, where);
}

inline std::size_t multitask_lora_backward_workspace_bytes(std::size_t n, std::size_t in, std::size_t out,
                                                           std::size_t r, std::size_t k, std::size_t accum_bytes) {
    return lowrank_backward_workspace_bytes(n, in, out, r, k, accum_bytes);
}

}  // namespace patchwork::kernels
