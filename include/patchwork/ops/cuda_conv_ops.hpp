#pragma once
// The device operations behind the image layers with Device = Cuda:
// Conv2d and DepthwiseConv2d, BatchNorm2d, AvgPool2d, MaxPool2d and
// GlobalAvgPool, over channels-last (NHWC) tensors. Declarations only, as in
// patchwork/ops/cuda_ops.hpp (whose conventions hold here too: the current
// context's stream, `where` named in every error). The definitions are in
// kernels/conv.cuh, kernels/pooling.cuh and kernels/batchnorm.cuh, which
// nvcc-compiled translation units include (patchwork/cuda.cuh includes them).
// The math of every operation, and its derivation, is in the layer it serves
// (layers/conv2d.hpp, batch_norm.hpp, pool.hpp); the kernels' headers say how
// each sum is split over threads.
#include <cstddef>
#include <string_view>

#include "patchwork/core/tensor.hpp"

namespace patchwork::cuda {

/// The sizes of a square window sliding over an NHWC input
/// [batch, h, w, in_channels] -> [batch, ho, wo, out_channels], in groups
/// (a convolution) or over each channel alone (a pool: out_channels =
/// in_channels, groups = in_channels).
struct WindowShape {
    std::size_t batch = 0, h = 0, w = 0, in_channels = 0;
    std::size_t ho = 0, wo = 0, out_channels = 0;
    std::size_t kernel = 1, stride = 1, padding = 0, groups = 1;

    // constexpr: kernels call them too (nvcc's relaxed constexpr).
    [[nodiscard]] constexpr std::size_t taps() const noexcept { return kernel * kernel; }
    [[nodiscard]] constexpr std::size_t out_pixels() const noexcept { return batch * ho * wo; }
    [[nodiscard]] constexpr std::size_t in_pixels() const noexcept { return batch * h * w; }
};

/// Elements of the patch matrix (im2col) one step of a dense convolution may
/// hold: the images are taken in chunks whose patch rows fit (at least one image each).
inline constexpr std::size_t conv_patch_elements = std::size_t(1) << 24;

// ---- Conv2d (dense or grouped): im2col + cuBLAS GEMM ----

/// y = conv(x, weight) + bias (bias may be null). `cols` is scratch for the
/// patch matrix; `patch_elements` caps it (tests make it small to run several chunks).
template <class T>
void conv2d_forward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& weight, const Tensor<T, Cuda>* bias,
                    const WindowShape& s, Tensor<T, Cuda>& y, Tensor<T, Cuda>& cols, std::string_view where,
                    std::size_t patch_elements = conv_patch_elements);

/// dweight += dY^T X_col, dbias += 1^T dY, dx = col2im(dY W) (each when not null; dx is resized).
template <class T>
void conv2d_backward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& dy, const Tensor<T, Cuda>& weight,
                     const WindowShape& s, Tensor<T, Cuda>* dweight, Tensor<T, Cuda>* dbias, Tensor<T, Cuda>* dx,
                     Tensor<T, Cuda>& cols, Tensor<T, Cuda>& dcols, std::string_view where,
                     std::size_t patch_elements = conv_patch_elements);

// ---- depthwise Conv2d (groups = in_channels): direct window sums ----

/// y[p, co] = bias[co] + sum_t x[q(p, t), co / m] W[co, t] (bias may be null).
template <class T>
void depthwise_conv2d_forward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& weight, const Tensor<T, Cuda>* bias,
                              const WindowShape& s, Tensor<T, Cuda>& y, std::string_view where);

/// dweight += sum_p dY[p, co] x[q(p, t), co / m], dbias += 1^T dY, dx (each when not null; dx is resized).
template <class T>
void depthwise_conv2d_backward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& dy, const Tensor<T, Cuda>& weight,
                               const WindowShape& s, Tensor<T, Cuda>* dweight, Tensor<T, Cuda>* dbias,
                               Tensor<T, Cuda>* dx, std::string_view where);

// ---- BatchNorm2d over the rows of [M, C] ----

/// Training mode: batch mean and inverse standard deviation per channel into
/// mean, inv_std [C] (var [C] is scratch), the running statistics moved
/// towards them, then xhat and y.
template <class T>
void batch_norm_forward_train(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& gamma, const Tensor<T, Cuda>& beta,
                              double eps, double momentum, Tensor<T, Cuda>& running_mean,
                              Tensor<T, Cuda>& running_var, Tensor<T, Cuda>& mean, Tensor<T, Cuda>& var,
                              Tensor<T, Cuda>& inv_std, Tensor<T, Cuda>& xhat, Tensor<T, Cuda>& y,
                              std::string_view where);

/// Inference mode: the running statistics normalise (mean, inv_std receive them).
template <class T>
void batch_norm_forward_eval(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& gamma, const Tensor<T, Cuda>& beta,
                             double eps, const Tensor<T, Cuda>& running_mean, const Tensor<T, Cuda>& running_var,
                             Tensor<T, Cuda>& mean, Tensor<T, Cuda>& inv_std, Tensor<T, Cuda>& xhat,
                             Tensor<T, Cuda>& y, std::string_view where);

/// dgamma += colsum(g xhat), dbeta += colsum(g) (when not null) and dx (when not
/// null): the training or the inference formula (`batch_stats`). sum_g and
/// sum_gx [C] are scratch.
template <class T>
void batch_norm_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& xhat, const Tensor<T, Cuda>& inv_std,
                         const Tensor<T, Cuda>& gamma, bool batch_stats, Tensor<T, Cuda>* dgamma,
                         Tensor<T, Cuda>* dbeta, Tensor<T, Cuda>* dx, Tensor<T, Cuda>& sum_g,
                         Tensor<T, Cuda>& sum_gx, std::string_view where);

/// Inference mode as y = x * scale + bias: scale = gamma / sqrt(var + eps), bias = beta - scale mean.
template <class T>
void batch_norm_fold(const Tensor<T, Cuda>& gamma, const Tensor<T, Cuda>& beta, const Tensor<T, Cuda>& running_mean,
                     const Tensor<T, Cuda>& running_var, double eps, Tensor<T, Cuda>& scale, Tensor<T, Cuda>& bias,
                     std::string_view where);

// ---- pooling (in_channels = out_channels = groups) ----

template <class T>
void avg_pool_forward(const Tensor<T, Cuda>& x, const WindowShape& s, Tensor<T, Cuda>& y, std::string_view where);
template <class T>
void avg_pool_backward(const Tensor<T, Cuda>& dy, const WindowShape& s, Tensor<T, Cuda>& dx, std::string_view where);

/// y and, per output element, the tap (ky k + kx) that won, stored as T (exact: fewer than 2^24 taps).
template <class T>
void max_pool_forward(const Tensor<T, Cuda>& x, const WindowShape& s, Tensor<T, Cuda>& y, Tensor<T, Cuda>& arg_tap,
                      std::string_view where);
template <class T>
void max_pool_backward(const Tensor<T, Cuda>& dy, const Tensor<T, Cuda>& arg_tap, const WindowShape& s,
                       Tensor<T, Cuda>& dx, std::string_view where);

/// [N, H, W, C] -> [N, C] means, and back.
template <class T>
void global_avg_pool_forward(const Tensor<T, Cuda>& x, Tensor<T, Cuda>& y, std::string_view where);
template <class T>
void global_avg_pool_backward(const Tensor<T, Cuda>& dy, const Shape& in_shape, Tensor<T, Cuda>& dx,
                              std::string_view where);

}  // namespace patchwork::cuda
