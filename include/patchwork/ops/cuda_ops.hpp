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
#include <string_view>

#include "patchwork/core/tensor.hpp"

namespace patchwork::cuda {

/// C = alpha op(A) op(B) + beta C with op(X) = X or X^T (cuBLAS).
template <class T>
void gemm(bool transpose_a, bool transpose_b, T alpha, const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, T beta,
          Tensor<T, Cuda>& c, std::string_view where);

/// y[r, :] += b for every row r.
template <class T>
void add_row_vector(Tensor<T, Cuda>& y, const Tensor<T, Cuda>& b, std::string_view where);

/// out[c] += sum_r g[r, c] (column sums of the matrix view).
template <class T>
void add_column_sums(const Tensor<T, Cuda>& g, Tensor<T, Cuda>& out, std::string_view where);

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
                        std::string_view where);

/// LayerNorm backward: dgamma += colsum(g * xhat), dbeta += colsum(g) (each when
/// not null), dx = s (gh - mean(gh) - xhat mean(gh xhat)) with gh = g gamma (when not null).
template <class T>
void layer_norm_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& xhat, const Tensor<T, Cuda>& inv_std,
                         const Tensor<T, Cuda>& gamma, Tensor<T, Cuda>* dgamma, Tensor<T, Cuda>* dbeta,
                         Tensor<T, Cuda>* dx, std::string_view where);

/// One SGD update of w from g (see train/optimizer.hpp); `momentum` is the
/// buffer (empty when mu = 0), `first` says it has never been written.
template <class T>
void sgd_update(Tensor<T, Cuda>& w, const Tensor<T, Cuda>& g, Tensor<T, Cuda>& momentum, bool first, double lr,
                double mu, double weight_decay, bool nesterov, std::string_view where);

/// One Adam (decoupled = false) or AdamW (decoupled = true) update at step t >= 1.
template <class T>
void adam_update(Tensor<T, Cuda>& w, const Tensor<T, Cuda>& g, Tensor<T, Cuda>& m, Tensor<T, Cuda>& v,
                 std::size_t t, double lr, double beta1, double beta2, double eps, double weight_decay,
                 bool decoupled, std::string_view where);

}  // namespace patchwork::cuda
