#pragma once
// The device operations the CUDA backend provides to the module templates.
//
// Modules are templates over a Device (Cpu or Cuda). On the CPU they compute
// with Eigen; with Device = Cuda the same templates call these functions
// instead. Only declarations live here (no CUDA header is needed to read
// them); the definitions are in kernels/ops.cuh, which an nvcc-compiled
// translation unit includes (#include <patchwork/cuda.cuh> includes
// everything). Using a Cuda module elsewhere fails at link time.
//
// Every function runs on the current context's stream (cuda::context()) and
// names `where` (the module path) in the CudaError it throws on failure.
// Matrices are the tensors' row-major matrix views: rows = product of the
// leading dimensions, cols = the last dimension.
#include <span>
#include <string_view>
#include <vector>

#include "patchwork/core/task_rows.hpp"
#include "patchwork/core/tensor.hpp"

namespace patchwork::cuda {

/// C = alpha op(A) op(B) + beta C with op(X) = X or X^T (cuBLAS). C holds T, or
/// fp32 for bf16 operands (a parameter gradient: products and sums in fp32, no rounding to bf16).
template <class T, class C>
void gemm(bool transpose_a, bool transpose_b, T alpha, const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, T beta,
          Tensor<C, Cuda>& c, std::string_view where);

/// y[r, :] += b for every row r (with mixed rows: b [K, cols], row r adds b[task[r]]).
template <class T>
void add_row_vector(Tensor<T, Cuda>& y, const Tensor<T, Cuda>& b, std::string_view where, TaskRows rows = {});

/// out[c] += sum_r g[r, c] (column sums of the matrix view; with mixed rows:
/// out [K, cols], out[t, c] += sum over the rows r of task t).
template <class T>
void add_column_sums(const Tensor<T, Cuda>& g, Tensor<compute_t<T>, Cuda>& out, std::string_view where,
                     TaskRows rows = {});

/// y = Fn::value(x) element-wise (Fn: activation::Relu, Gelu or Tanh).
template <class Fn, class T>
void activation_forward(const Tensor<T, Cuda>& x, Tensor<T, Cuda>& y, std::string_view where);

/// dx = Fn::grad(g, x, y) element-wise.
template <class Fn, class T>
void activation_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& y,
                         Tensor<T, Cuda>& dx, std::string_view where);

/// LayerNorm forward over rows (see layers/layer_norm.hpp for the math):
/// writes xhat, inv_std [rows] and y.
template <class T>
void layer_norm_forward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& gamma, const Tensor<T, Cuda>& beta,
                        double eps, Tensor<T, Cuda>& xhat, Tensor<T, Cuda>& inv_std, Tensor<T, Cuda>& y,
                        std::string_view where, TaskRows rows = {});

/// LayerNorm backward: dgamma += colsum(g * xhat), dbeta += colsum(g) (each when
/// not null), dx = s (gh - mean(gh) - xhat mean(gh xhat)) with gh = g gamma (when not null).
/// With mixed rows gamma, beta and their gradients are [K, d], row r uses task[r]'s.
template <class T>
void layer_norm_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& xhat, const Tensor<T, Cuda>& inv_std,
                         const Tensor<T, Cuda>& gamma, Tensor<compute_t<T>, Cuda>* dgamma,
                         Tensor<compute_t<T>, Cuda>* dbeta, Tensor<T, Cuda>* dx, std::string_view where,
                         TaskRows rows = {});

/// One SGD update of w from g (see train/optimizer.hpp); `momentum` is the
/// buffer (empty when mu = 0), `first` says it has never been written. The
/// state is in compute_t<T> (fp32 for bf16); `master` (bf16 parameters only,
/// else null) is the fp32 master copy of w that the update reads and writes,
/// storing its rounding into w.
template <class T>
void sgd_update(Tensor<T, Cuda>& w, const Tensor<compute_t<T>, Cuda>& g, Tensor<compute_t<T>, Cuda>& momentum,
                Tensor<compute_t<T>, Cuda>* master, bool first, double lr, double mu, double weight_decay,
                bool nesterov, std::string_view where);

/// One Adam (decoupled = false) or AdamW (decoupled = true) update at step t >= 1
/// (state and master as for sgd_update).
template <class T>
void adam_update(Tensor<T, Cuda>& w, const Tensor<compute_t<T>, Cuda>& g, Tensor<compute_t<T>, Cuda>& m,
                 Tensor<compute_t<T>, Cuda>& v, Tensor<compute_t<T>, Cuda>* master, std::size_t t, double lr,
                 double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                 std::string_view where);

/// dst = src element by element between storage types (float, double, bf16;
/// to bf16 rounds to nearest even). dst is resized.
template <class To, class From>
void convert(const Tensor<From, Cuda>& src, Tensor<To, Cuda>& dst, std::string_view where);

/// y += a x (equal shapes).
template <class T>
void axpy(T a, const Tensor<T, Cuda>& x, Tensor<T, Cuda>& y, std::string_view where);

/// x *= a.
template <class T>
void scale(Tensor<T, Cuda>& x, T a, std::string_view where);

/// sum_i x_i^2 of each tensor, accumulated in double in a fixed order (bitwise
/// reproducible): each is reduced on the stream into a device slot, and the
/// slots come back to the host in one copy (the only wait).
template <class T>
[[nodiscard]] std::vector<double> squared_norms(std::span<const Tensor<T, Cuda>* const> xs, std::string_view where);

/// dst[i] = a src[i] for i < n (device pointers; data-parallel gradient buckets).
template <class T>
void scaled_copy(T a, const T* src, T* dst, std::size_t n, std::string_view where);

/// out[i] = sum over r = 0, 1, ..., ranks - 1 (in that order) of slices[r n + i] (device pointers).
template <class T>
void sum_slices(const T* slices, std::size_t ranks, std::size_t n, T* out, std::string_view where);

/// Where a copy of raw elements goes (copy_elements).
enum class CopyKind { host_to_device, device_to_host, device_to_device };

/// n elements from src to dst on the current stream; a copy to the host waits for it.
template <class T>
void copy_elements(T* dst, const T* src, std::size_t n, CopyKind kind, std::string_view where);

// ---- multi-task batches (definitions in kernels/ops.cuh) ----

/// n elements from host memory to the device, queued on the current stream
/// without waiting: the source is pageable host memory, which the driver
/// stages when the call is made, so it may be reused as soon as this returns.
template <class T>
void upload_elements(T* dst, const T* src, std::size_t n, std::string_view where);

/// dst row i = src row idx[i] for i < rows (rows of `row` elements; idx: device int32 [rows]).
template <class T>
void gather_rows(const T* src, const int* idx, std::size_t rows, std::size_t row, T* dst, std::string_view where);

/// dst row idx[i] = src row i for i < rows (idx: device int32 [rows], no index twice).
template <class T>
void scatter_rows(const T* src, const int* idx, std::size_t rows, std::size_t row, T* dst, std::string_view where);

// SliceMove and slice_moves (stacking per-task parameters) and TaskRows are
// declared in core/task_rows.hpp (the mixed batch queues them).

// ---- patches (the fused kernels of kernels/adapter.cuh, scale_shift.cuh, multitask.cuh;
//      definitions in kernels/module_ops.cuh) ----
// Each takes the rows of a mixed-task batch as its last argument: with
// rows.mixed(), row r uses task rows.task[r]'s parameters, stacked [tasks, ...]
// (scale [K, d], adapter down [K, r, d], LoRA A [K, r, in], ...), and the
// parameter gradients are stacked likewise. The task ids are trusted (the
// multi-task model checks them on the host): no launch here waits for the stream.

/// Bottleneck adapter forward over rows h [N, d]: y = h + act(h D^T + b_d) U^T + b_u; z [N, r] keeps h D^T + b_d.
template <class T>
void adapter_forward(const Tensor<T, Cuda>& h, const Tensor<T, Cuda>& down_w, const Tensor<T, Cuda>& down_b,
                     const Tensor<T, Cuda>& up_w, const Tensor<T, Cuda>& up_b, bool gelu, Tensor<T, Cuda>& y,
                     Tensor<compute_t<T>, Cuda>& z, std::string_view where, TaskRows rows = {});

/// Adapter backward: dh = g + ((g U) * act'(z)) D (when dh is not null) and the
/// parameter gradients (each accumulated when not null).
template <class T>
void adapter_backward(const Tensor<T, Cuda>& h, const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& down_w,
                      const Tensor<T, Cuda>& up_w, bool gelu, const Tensor<compute_t<T>, Cuda>& z, Tensor<T, Cuda>* dh,
                      Tensor<compute_t<T>, Cuda>* d_down_w, Tensor<compute_t<T>, Cuda>* d_down_b,
                      Tensor<compute_t<T>, Cuda>* d_up_w, Tensor<compute_t<T>, Cuda>* d_up_b, std::string_view where,
                      TaskRows rows = {});

/// Per-channel y = scale * h + shift over rows h [N, d].
template <class T>
void scale_shift_forward(const Tensor<T, Cuda>& h, const Tensor<T, Cuda>& scale, const Tensor<T, Cuda>& shift,
                         Tensor<T, Cuda>& y, std::string_view where, TaskRows rows = {});

/// dh = g * scale (when not null); dscale += colsum(g * h), dshift += colsum(g) (when not null).
template <class T>
void scale_shift_backward(const Tensor<T, Cuda>& h, const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& scale,
                          Tensor<T, Cuda>* dh, Tensor<compute_t<T>, Cuda>* dscale,
                          Tensor<compute_t<T>, Cuda>* dshift, std::string_view where, TaskRows rows = {});

/// LoRA: y = base + s (x A^T) B^T over rows x [N, in]; u [N, r] keeps x A^T.
template <class T>
void lora_forward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& base, const Tensor<T, Cuda>& a,
                  const Tensor<T, Cuda>& b, double s, Tensor<T, Cuda>& y, Tensor<compute_t<T>, Cuda>& u, std::string_view where,
                  TaskRows rows = {});

/// LoRA backward: dx = base_dx + s (g B) A (when dx is not null; base_dx may be
/// empty for 0); dB += s g^T u and dA += s (g B)^T x (when not null).
template <class T>
void lora_backward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& base_dx,
                   const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, double s, const Tensor<compute_t<T>, Cuda>& u,
                   Tensor<T, Cuda>* dx, Tensor<compute_t<T>, Cuda>* da, Tensor<compute_t<T>, Cuda>* db,
                   std::string_view where, TaskRows rows = {});

// ---- architecture search (the gate and mixing kernels of kernels/mix.cuh;
//      definitions in kernels/module_ops.cuh) ----

/// The gates of a searched module and its mixed output: z = (alpha + noise) / tau
/// (noise null: z = alpha), p = softmax(z), w = onehot(argmax p) when hard, else p;
/// y = sum_k w_k candidates[k] (K = alpha.size() candidates of equal shape);
/// soft and used [K] receive p and w. The gate tensors (alpha, noise, soft,
/// used, and below dgate and alpha_grad) hold compute_t<T>: fp32 for bf16
/// candidate outputs.
template <class T>
void search_mix_forward(const Tensor<compute_t<T>, Cuda>& alpha, const Tensor<compute_t<T>, Cuda>* noise, double tau,
                        bool hard, const Tensor<T, Cuda>* const* candidates, Tensor<T, Cuda>& y,
                        Tensor<compute_t<T>, Cuda>& soft, Tensor<compute_t<T>, Cuda>& used, std::string_view where);

/// Its backward: d_candidates[k] = used_k g (each resized; the array or an entry
/// may be null); alpha_grad += (1/tau) p (dgate - <p, dgate>) with dgate_k = <g,
/// candidates[k]> (when not null; tau is 1 when noise is null).
template <class T>
void search_mix_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>* const* candidates,
                         const Tensor<compute_t<T>, Cuda>& soft, const Tensor<compute_t<T>, Cuda>& used,
                         const Tensor<compute_t<T>, Cuda>* noise, double tau, Tensor<T, Cuda>* const* d_candidates,
                         Tensor<compute_t<T>, Cuda>* alpha_grad, std::string_view where);

/// alpha_grad += (1/tau) p (dgate - <p, dgate>) for a given dL/dw [K] (a penalty
/// on the gates); tau applies when the forward used noise (`noisy`).
template <class T>
void search_gate_backward(const Tensor<T, Cuda>& dgate, const Tensor<T, Cuda>& soft, double tau, bool noisy,
                          Tensor<T, Cuda>& alpha_grad, std::string_view where);

}  // namespace patchwork::cuda
