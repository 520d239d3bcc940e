#pragma once
// Definitions of the device BatchNorm2d operations declared in
// patchwork/ops/cuda_conv_ops.hpp: what BasicBatchNorm2d<T, Cuda> runs. The
// math (and its derivation) is in layers/batch_norm.hpp; per channel c over
// the M rows of x [M, C]:
//   training:  mu = (sum_m x) / M,  var = (sum_m (x - mu)^2) / M,  s = 1 / sqrt(var + eps),
//              running_mean <- (1 - momentum) running_mean + momentum mu,
//              running_var  <- (1 - momentum) running_var + momentum var M / (M - 1)
//   inference: mu = running_mean, s = 1 / sqrt(running_var + eps)
//   xh = (x - mu) s,  y = gamma xh + beta
//   backward:  dgamma += sum_m g xh,  dbeta += sum_m g,
//              dx = ((g - mean_m g) - xh mean_m(g xh)) gamma s   (training)
//              dx = g gamma s                                    (inference)
// Every per-channel sum is the deterministic column sum of kernels/ops.cuh
// (fixed row chunks added in chunk order, no atomics); the per-channel
// scalars are one thread per channel, the element-wise steps one thread per
// element. Include from nvcc-compiled translation units only.
#include <cmath>
#include <cstddef>
#include <initializer_list>
#include <string_view>

#include "patchwork/cuda/device_tensor.hpp"
#include "patchwork/kernels/common.cuh"
#include "patchwork/kernels/ops.cuh"
#include "patchwork/ops/cuda_conv_ops.hpp"

namespace patchwork::kernels::detail {

/// (x[r, c] - mean[c])^2: the terms of the variance.
template <class T>
struct centered_square {
    const T* x;
    const T* mean;
    std::size_t cols;
    __device__ T operator()(std::size_t r, std::size_t c) const {
        const T d = x[r * cols + c] - mean[c];
        return d * d;
    }
};

/// mean[c] = sum[c] / rows (in place).
template <class T>
__global__ void bn_mean_kernel(T* __restrict__ mean, std::size_t c, T rows) {
    const std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
    if (j < c) mean[j] /= rows;
}

/// var[c] = sum / rows, inv_std[c] = 1 / sqrt(var + eps), and the running statistics' update.
template <class T>
__global__ void bn_batch_statistics_kernel(const T* __restrict__ mean, T* __restrict__ var, T* __restrict__ inv_std,
                                           T* __restrict__ running_mean, T* __restrict__ running_var, std::size_t c,
                                           T rows, T eps, T momentum, T unbias) {
    const std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
    if (j >= c) return;
    const T v = var[j] / rows;
    var[j] = v;
    inv_std[j] = T(1) / sqrt(v + eps);
    running_mean[j] = (T(1) - momentum) * running_mean[j] + momentum * mean[j];
    running_var[j] = (T(1) - momentum) * running_var[j] + momentum * unbias * v;
}

/// mean = running_mean, inv_std = 1 / sqrt(running_var + eps).
template <class T>
__global__ void bn_running_statistics_kernel(const T* __restrict__ running_mean, const T* __restrict__ running_var,
                                             std::size_t c, T eps, T* __restrict__ mean, T* __restrict__ inv_std) {
    const std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
    if (j >= c) return;
    mean[j] = running_mean[j];
    inv_std[j] = T(1) / sqrt(running_var[j] + eps);
}

/// xh = (x - mu) s, y = xh gamma + beta.
template <class T>
__global__ void bn_normalize_kernel(const T* __restrict__ x, const T* __restrict__ mean, const T* __restrict__ inv_std,
                                    const T* __restrict__ gamma, const T* __restrict__ beta, std::size_t n,
                                    std::size_t c, T* __restrict__ xhat, T* __restrict__ y) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        const std::size_t j = i % c;
        const T h = (x[i] - mean[j]) * inv_std[j];
        xhat[i] = h;
        y[i] = h * gamma[j] + beta[j];
    }
}

/// dx = ((g - sum_g / M) - xh sum_gx / M) gamma s (batch statistics), or g gamma s.
template <class T>
__global__ void bn_input_grad_kernel(const T* __restrict__ g, const T* __restrict__ xhat,
                                     const T* __restrict__ sum_g, const T* __restrict__ sum_gx,
                                     const T* __restrict__ gamma, const T* __restrict__ inv_std, std::size_t n,
                                     std::size_t c, T rows, bool batch, T* __restrict__ dx) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        const std::size_t j = i % c;
        const T gs = gamma[j] * inv_std[j];
        dx[i] = batch ? ((g[i] - sum_g[j] / rows) - xhat[i] * (sum_gx[j] / rows)) * gs : g[i] * gs;
    }
}

/// scale = gamma / sqrt(var + eps), bias = beta - scale mean.
template <class T>
__global__ void bn_fold_kernel(const T* __restrict__ gamma, const T* __restrict__ beta,
                               const T* __restrict__ running_mean, const T* __restrict__ running_var, std::size_t c,
                               T eps, T* __restrict__ scale, T* __restrict__ bias) {
    const std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
    if (j >= c) return;
    const T s = gamma[j] / sqrt(running_var[j] + eps);
    scale[j] = s;
    bias[j] = beta[j] - s * running_mean[j];
}

template <class T>
void check_channel_vector(const Tensor<T, Cuda>& t, std::size_t c, std::string_view where, const char* what) {
    if (!(t.shape() == Shape{c}))
        throw ShapeError(patchwork::detail::concat(where, ": batchnorm ", what, ": expected ", Shape{c}, ", got ",
                                                   t.shape()));
}

template <class T>
void check_channel_vectors(std::initializer_list<const Tensor<T, Cuda>*> ts, std::size_t c, std::string_view where) {
    for (const Tensor<T, Cuda>* t : ts) check_channel_vector(*t, c, where, "parameter or running statistic");
}

/// One thread per channel.
inline unsigned channel_blocks(std::size_t c) { return unsigned(ceil_div(c == 0 ? 1 : c, 256)); }

template <class T>
void bn_normalize(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& gamma, const Tensor<T, Cuda>& beta,
                  const Tensor<T, Cuda>& mean, const Tensor<T, Cuda>& inv_std, Tensor<T, Cuda>& xhat,
                  Tensor<T, Cuda>& y, std::string_view where) {
    xhat.resize(x.shape());
    y.resize(x.shape());
    kernels::launch(bn_normalize_kernel<T>, grid_1d(x.size(), 256), 256, 0, stream(), x.data(), mean.data(),
                    inv_std.data(), gamma.data(), beta.data(), x.size(), x.cols(), xhat.data(), y.data());
    cuda::check_launch("bn_normalize_kernel", where);
}

}  // namespace patchwork::kernels::detail

namespace patchwork::cuda {

template <class T>
void batch_norm_forward_train(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& gamma, const Tensor<T, Cuda>& beta,
                              double eps, double momentum, Tensor<T, Cuda>& running_mean,
                              Tensor<T, Cuda>& running_var, Tensor<T, Cuda>& mean, Tensor<T, Cuda>& var,
                              Tensor<T, Cuda>& inv_std, Tensor<T, Cuda>& xhat, Tensor<T, Cuda>& y,
                              std::string_view where) {
    namespace kd = kernels::detail;
    const std::size_t m = x.rows(), c = x.cols();
    kd::check_channel_vectors<T>({&gamma, &beta, &running_mean, &running_var}, c, where);
    mean.resize(Shape{c});
    var.resize(Shape{c});
    inv_std.resize(Shape{c});
    mean.zero();
    var.zero();
    const T rows = T(m);
    kd::add_column_sums(kd::load_element<T>{x.data(), c}, m, c, mean.data(), where);
    kernels::launch(kd::bn_mean_kernel<T>, kd::channel_blocks(c), 256, 0, kernels::stream(), mean.data(), c, rows);
    check_launch("bn_mean_kernel", where);
    kd::add_column_sums(kd::centered_square<T>{x.data(), mean.data(), c}, m, c, var.data(), where);
    const T unbias = m > 1 ? rows / (rows - T(1)) : T(1);
    kernels::launch(kd::bn_batch_statistics_kernel<T>, kd::channel_blocks(c), 256, 0, kernels::stream(), mean.data(),
                    var.data(), inv_std.data(), running_mean.data(), running_var.data(), c, rows, T(eps),
                    T(momentum), unbias);
    check_launch("bn_batch_statistics_kernel", where);
    kd::bn_normalize(x, gamma, beta, mean, inv_std, xhat, y, where);
}

template <class T>
void batch_norm_forward_eval(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& gamma, const Tensor<T, Cuda>& beta,
                             double eps, const Tensor<T, Cuda>& running_mean, const Tensor<T, Cuda>& running_var,
                             Tensor<T, Cuda>& mean, Tensor<T, Cuda>& inv_std, Tensor<T, Cuda>& xhat,
                             Tensor<T, Cuda>& y, std::string_view where) {
    namespace kd = kernels::detail;
    const std::size_t c = x.cols();
    kd::check_channel_vectors<T>({&gamma, &beta, &running_mean, &running_var}, c, where);
    mean.resize(Shape{c});
    inv_std.resize(Shape{c});
    kernels::launch(kd::bn_running_statistics_kernel<T>, kd::channel_blocks(c), 256, 0, kernels::stream(),
                    running_mean.data(), running_var.data(), c, T(eps), mean.data(), inv_std.data());
    check_launch("bn_running_statistics_kernel", where);
    kd::bn_normalize(x, gamma, beta, mean, inv_std, xhat, y, where);
}

template <class T>
void batch_norm_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& xhat, const Tensor<T, Cuda>& inv_std,
                         const Tensor<T, Cuda>& gamma, bool batch_stats, Tensor<T, Cuda>* dgamma,
                         Tensor<T, Cuda>* dbeta, Tensor<T, Cuda>* dx, Tensor<T, Cuda>& sum_g,
                         Tensor<T, Cuda>& sum_gx, std::string_view where) {
    namespace kd = kernels::detail;
    const std::size_t m = g.rows(), c = g.cols();
    if (!(xhat.shape() == g.shape()))
        throw ShapeError(patchwork::detail::concat(where, ": batchnorm output gradient ", g.shape(),
                                                   " does not match the saved input ", xhat.shape()));
    kd::check_channel_vector(inv_std, c, where, "saved inverse standard deviation");
    const bool need_sums = dgamma != nullptr || dbeta != nullptr || (dx != nullptr && batch_stats);
    if (need_sums) {
        sum_g.resize(Shape{c});
        sum_gx.resize(Shape{c});
        sum_g.zero();
        sum_gx.zero();
        kd::add_column_sums(kd::load_element<T>{g.data(), c}, m, c, sum_g.data(), where);
        kd::add_column_sums(kd::load_product<T>{g.data(), xhat.data(), c}, m, c, sum_gx.data(), where);
        if (dgamma != nullptr) axpy(T(1), sum_gx, *dgamma, where);
        if (dbeta != nullptr) axpy(T(1), sum_g, *dbeta, where);
    }
    if (dx == nullptr) return;
    dx->resize(g.shape());
    kernels::launch(kd::bn_input_grad_kernel<T>, kernels::grid_1d(g.size(), 256), 256, 0, kernels::stream(),
                    g.data(), xhat.data(), need_sums ? sum_g.data() : nullptr,
                    need_sums ? sum_gx.data() : nullptr, gamma.data(), inv_std.data(), g.size(), c, T(m),
                    batch_stats, dx->data());
    check_launch("bn_input_grad_kernel", where);
}

template <class T>
void batch_norm_fold(const Tensor<T, Cuda>& gamma, const Tensor<T, Cuda>& beta, const Tensor<T, Cuda>& running_mean,
                     const Tensor<T, Cuda>& running_var, double eps, Tensor<T, Cuda>& scale, Tensor<T, Cuda>& bias,
                     std::string_view where) {
    namespace kd = kernels::detail;
    const std::size_t c = gamma.size();
    kd::check_channel_vectors<T>({&beta, &running_mean, &running_var}, c, where);
    scale.resize(Shape{c});
    bias.resize(Shape{c});
    kernels::launch(kd::bn_fold_kernel<T>, kd::channel_blocks(c), 256, 0, kernels::stream(), gamma.data(),
                    beta.data(), running_mean.data(), running_var.data(), c, T(eps), scale.data(), bias.data());
    check_launch("bn_fold_kernel", where);
}

}  // namespace patchwork::cuda
