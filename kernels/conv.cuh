#pragma once
// Definitions of the device convolutions declared in patchwork/ops/cuda_conv_ops.hpp:
// what BasicConv2d<T, Cuda> and BasicDepthwiseConv2d<T, Cuda> run. The math is
// the CPU layer's (layers/conv2d.hpp, NHWC, weight [C_out, k, k, C_in / G]);
// here is how it is split over threads. Include from nvcc-compiled
// translation units only.
//
// Dense and grouped convolutions: im2col + cuBLAS, over chunks of whole images
// (a chunk's patch matrix X_col [P_c, G K], K = k k C_g, columns ordered
// (group, ky, kx, j) like a weight row, stays below cuda::conv_patch_elements):
//   Y_c[:, group g]  = X_col[:, block g] W_g^T (+ the bias, the GEMM's starting value)
//   dW_g            += dY_c[:, group g]^T X_col[:, block g]      (chunks in order)
//   dX_col[:, block g] = dY_c[:, group g] W_g,  dx_c = col2im(dX_col)
//   db              += 1^T dY                                    (deterministic column sums)
// A 1x1 convolution with stride 1 and no padding uses x as X_col and dx as dX_col.
//
// col2im as a gather. im2col copies x[n, iy, ix, g C_g + j] into row
// p = (n, oy, ox), column (g, ky, kx, j) of X_col whenever iy = oy s - pad + ky
// and ix = ox s - pad + kx. Since X_col = im2col(x) is linear, dL/dx is the sum
// of dL/dX_col over every entry x was copied to:
//   dx[n, iy, ix, g C_g + j] = sum_{ky, kx} dX_col[(n, oy, ox), (g, ky, kx, j)]
// over the taps with oy = (iy + pad - ky) / s and ox = (ix + pad - kx) / s
// whole numbers inside the output. One thread per dx element forms that sum
// (in tap order): each element is written once, no atomics, the same bits on
// every run.
//
// Depthwise convolutions (C_out = m C_in, filters W [C_out, k k]), direct:
//   y[p, co]  = b[co] + sum_t x[q(p, t), co / m] W[co, t]         one thread per y element
//   dx[q, ci] = sum_{r < m} sum_{(p, t): q(p, t) = q} dY[p, ci m + r] W[ci m + r, t]
//                                                                one thread per dx element (gather as above)
//   dW[co, t] += sum_p dY[p, co] x[q(p, t), co / m]               a deterministic column sum over
//                                                                the P rows of the [P, C_out k k] products
//   db        += 1^T dY
// (from y's formula: dy/dx and dy/dW are the other factor of each product; taps
// in the padding read zero and contribute nothing).
#include <cstddef>
#include <string_view>

#include "patchwork/cuda/device_tensor.hpp"
#include "patchwork/kernels/common.cuh"
#include "patchwork/kernels/ops.cuh"
#include "patchwork/ops/cuda_conv_ops.hpp"

namespace patchwork::kernels::detail {

/// f(ky, kx, iy, ix) for every tap of output pixel (oy, ox) that lands inside
/// the h x w image (taps in the padding read zero and are skipped), in tap order.
template <class F>
__device__ inline void for_each_tap_inside(const cuda::WindowShape& s, std::size_t oy, std::size_t ox, F&& f) {
    for (std::size_t ky = 0; ky < s.kernel; ++ky) {
        const std::size_t iy_pad = oy * s.stride + ky;  // iy + padding
        if (iy_pad < s.padding || iy_pad - s.padding >= s.h) continue;
        for (std::size_t kx = 0; kx < s.kernel; ++kx) {
            const std::size_t ix_pad = ox * s.stride + kx;
            if (ix_pad < s.padding || ix_pad - s.padding >= s.w) continue;
            f(ky, kx, iy_pad - s.padding, ix_pad - s.padding);
        }
    }
}

/// f(ky, kx, oy, ox) for every output pixel (oy, ox) whose tap (ky, kx) reads
/// input pixel (iy, ix): oy s - pad + ky = iy, i.e. oy = (iy + pad - ky) / s a
/// whole number below ho (likewise ox), in tap order. The gather of every backward.
template <class F>
__device__ inline void for_each_reader(const cuda::WindowShape& s, std::size_t iy, std::size_t ix, F&& f) {
    for (std::size_t ky = 0; ky < s.kernel; ++ky) {
        const std::size_t ty = iy + s.padding;
        if (ty < ky || (ty - ky) % s.stride != 0) continue;
        const std::size_t oy = (ty - ky) / s.stride;
        if (oy >= s.ho) continue;
        for (std::size_t kx = 0; kx < s.kernel; ++kx) {
            const std::size_t tx = ix + s.padding;
            if (tx < kx || (tx - kx) % s.stride != 0) continue;
            const std::size_t ox = (tx - kx) / s.stride;
            if (ox >= s.wo) continue;
            f(ky, kx, oy, ox);
        }
    }
}

#define PATCHWORK_GRID_STRIDE(i, n)                                                                    \
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < (n);                  \
         i += std::size_t(gridDim.x) * blockDim.x)

/// X_col rows of `images` images starting at x: element (p, (g, ky, kx, j)) =
/// x[n, oy s - pad + ky, ox s - pad + kx, g C_g + j], zero in the padding.
template <class T>
__global__ void im2col_kernel(const T* __restrict__ x, cuda::WindowShape s, std::size_t images,
                              T* __restrict__ cols) {
    const std::size_t cg = s.in_channels / s.groups, kg = s.taps() * cg, width = s.groups * kg;
    const std::size_t n_all = images * s.ho * s.wo * width;
    PATCHWORK_GRID_STRIDE(i, n_all) {
        const std::size_t p = i / width, col = i % width;
        const std::size_t g = col / kg, r = col % kg, t = r / cg, j = r % cg;
        const std::size_t ky = t / s.kernel, kx = t % s.kernel;
        const std::size_t ox = p % s.wo, oy = (p / s.wo) % s.ho, n = p / (s.wo * s.ho);
        const std::size_t iy_pad = oy * s.stride + ky, ix_pad = ox * s.stride + kx;
        T v = T(0);
        if (iy_pad >= s.padding && iy_pad - s.padding < s.h && ix_pad >= s.padding && ix_pad - s.padding < s.w)
            v = x[((n * s.h + iy_pad - s.padding) * s.w + ix_pad - s.padding) * s.in_channels + g * cg + j];
        cols[i] = v;
    }
}

/// dx of `images` images from their dX_col rows (the gather derived at the top of this file).
template <class T>
__global__ void col2im_kernel(const T* __restrict__ dcols, cuda::WindowShape s, std::size_t images,
                              T* __restrict__ dx) {
    const std::size_t cg = s.in_channels / s.groups, kg = s.taps() * cg, width = s.groups * kg;
    const std::size_t n_all = images * s.h * s.w * s.in_channels;
    PATCHWORK_GRID_STRIDE(i, n_all) {
        const std::size_t ci = i % s.in_channels, q = i / s.in_channels;
        const std::size_t ix = q % s.w, iy = (q / s.w) % s.h, n = q / (s.w * s.h);
        const std::size_t g = ci / cg, j = ci % cg;
        T sum = T(0);
        for_each_reader(s, iy, ix, [&](std::size_t ky, std::size_t kx, std::size_t oy, std::size_t ox) {
            const std::size_t p = (n * s.ho + oy) * s.wo + ox;
            sum += dcols[p * width + g * kg + (ky * s.kernel + kx) * cg + j];
        });
        dx[i] = sum;
    }
}

/// y[i] = b[i % cols]: every row starts at the bias.
template <class T>
__global__ void broadcast_rows_kernel(T* __restrict__ y, const T* __restrict__ b, std::size_t n, std::size_t cols) {
    PATCHWORK_GRID_STRIDE(i, n) y[i] = b[i % cols];
}

/// y[p, co] = b[co] + sum over the taps inside of x[q(p, t), co / m] W[co, t].
template <class T>
__global__ void depthwise_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                         cuda::WindowShape s, T* __restrict__ y) {
    const std::size_t c_out = s.out_channels, m = c_out / s.in_channels, taps = s.taps();
    PATCHWORK_GRID_STRIDE(i, s.out_pixels() * c_out) {
        const std::size_t co = i % c_out, p = i / c_out, ci = co / m;
        const std::size_t ox = p % s.wo, oy = (p / s.wo) % s.ho, n = p / (s.wo * s.ho);
        T sum = b != nullptr ? b[co] : T(0);
        for_each_tap_inside(s, oy, ox, [&](std::size_t ky, std::size_t kx, std::size_t iy, std::size_t ix) {
            sum += x[((n * s.h + iy) * s.w + ix) * s.in_channels + ci] * w[co * taps + ky * s.kernel + kx];
        });
        y[i] = sum;
    }
}

/// dx[q, ci] = sum over the channel's m outputs and the (p, t) reading q of dY[p, co] W[co, t].
template <class T>
__global__ void depthwise_input_grad_kernel(const T* __restrict__ dy, const T* __restrict__ w, cuda::WindowShape s,
                                            T* __restrict__ dx) {
    const std::size_t c_in = s.in_channels, c_out = s.out_channels, m = c_out / c_in, taps = s.taps();
    PATCHWORK_GRID_STRIDE(i, s.in_pixels() * c_in) {
        const std::size_t ci = i % c_in, q = i / c_in;
        const std::size_t ix = q % s.w, iy = (q / s.w) % s.h, n = q / (s.w * s.h);
        T sum = T(0);
        for (std::size_t r = 0; r < m; ++r) {
            const std::size_t co = ci * m + r;
            for_each_reader(s, iy, ix, [&](std::size_t ky, std::size_t kx, std::size_t oy, std::size_t ox) {
                sum += dy[((n * s.ho + oy) * s.wo + ox) * c_out + co] * w[co * taps + ky * s.kernel + kx];
            });
        }
        dx[i] = sum;
    }
}

/// Element (p, co k k + t) of the depthwise filter-gradient products:
/// dY[p, co] x[q(p, t), co / m], zero for a tap in the padding. Its column
/// sums over the P output pixels are dW in the weight's own layout.
template <class T>
struct depthwise_filter_products {
    const T* x;
    const T* dy;
    cuda::WindowShape s;
    __device__ T operator()(std::size_t p, std::size_t c) const {
        const std::size_t taps = s.taps(), co = c / taps, t = c % taps, m = s.out_channels / s.in_channels;
        const std::size_t ky = t / s.kernel, kx = t % s.kernel;
        const std::size_t ox = p % s.wo, oy = (p / s.wo) % s.ho, n = p / (s.wo * s.ho);
        const std::size_t iy_pad = oy * s.stride + ky, ix_pad = ox * s.stride + kx;
        if (iy_pad < s.padding || iy_pad - s.padding >= s.h || ix_pad < s.padding || ix_pad - s.padding >= s.w)
            return T(0);
        const std::size_t q = (n * s.h + iy_pad - s.padding) * s.w + ix_pad - s.padding;
        return dy[p * s.out_channels + co] * x[q * s.in_channels + co / m];
    }
};

/// Row-major C [m, n] = alpha op(A) op(B) + beta C with leading dimensions (so
/// that a group's column block is a matrix too): column-major cuBLAS computes
/// C^T = op(B)^T op(A)^T, as in cuda/gemm_plan.hpp.
template <class T>
void row_major_gemm(bool ta, bool tb, std::size_t m, std::size_t n, std::size_t k, T alpha, const T* a,
                    std::size_t lda, const T* b, std::size_t ldb, T beta, T* c, std::size_t ldc,
                    std::string_view where) {
    if (m == 0 || n == 0) return;
    const int mi = checked_int(m, "conv gemm size", where), ni = checked_int(n, "conv gemm size", where);
    const int ki = checked_int(k, "conv gemm inner dimension", where);
    const int la = checked_int(lda, "conv gemm leading dimension", where);
    const int lb = checked_int(ldb, "conv gemm leading dimension", where);
    const int lc = checked_int(ldc, "conv gemm leading dimension", where);
    const cublasOperation_t op_b = tb ? CUBLAS_OP_T : CUBLAS_OP_N, op_a = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasHandle_t h = cuda::context().blas();
    if constexpr (std::is_same_v<T, float>)
        cuda::check(cublasSgemm(h, op_b, op_a, ni, mi, ki, &alpha, b, lb, a, la, &beta, c, lc), "cublasSgemm", where);
    else
        cuda::check(cublasDgemm(h, op_b, op_a, ni, mi, ki, &alpha, b, lb, a, la, &beta, c, lc), "cublasDgemm", where);
}

/// Images per chunk of a dense convolution: as many as keep the patch matrix within `patch_elements`.
inline std::size_t conv_chunk_images(const cuda::WindowShape& s, std::size_t patch_elements) {
    const std::size_t per_image = s.ho * s.wo * s.taps() * s.in_channels;
    const std::size_t fit = per_image == 0 ? s.batch : patch_elements / per_image;
    return fit == 0 ? 1 : (fit < s.batch ? fit : s.batch);
}

/// A 1x1 window with stride 1 and no padding: X_col is x itself.
inline bool conv_pointwise(const cuda::WindowShape& s) { return s.kernel == 1 && s.stride == 1 && s.padding == 0; }

template <class T>
void check_conv_tensors(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& weight, const cuda::WindowShape& s,
                        std::string_view where) {
    const Shape in{s.batch, s.h, s.w, s.in_channels};
    const Shape filters{s.out_channels, s.kernel, s.kernel, s.in_channels / s.groups};
    if (!(x.shape() == in))
        throw ShapeError(patchwork::detail::concat(where, ": conv input: expected ", in, ", got ", x.shape()));
    if (!(weight.shape() == filters))
        throw ShapeError(patchwork::detail::concat(where, ": conv weight: expected ", filters, ", got ",
                                                   weight.shape()));
}

template <class T>
void check_conv_gradient(const Tensor<T, Cuda>& dy, const cuda::WindowShape& s, std::string_view where) {
    const Shape out{s.batch, s.ho, s.wo, s.out_channels};
    if (!(dy.shape() == out))
        throw ShapeError(patchwork::detail::concat(where, ": conv output gradient: expected ", out, ", got ",
                                                   dy.shape()));
}

}  // namespace patchwork::kernels::detail

namespace patchwork::cuda {

template <class T>
void conv2d_forward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& weight, const Tensor<T, Cuda>* bias,
                    const WindowShape& s, Tensor<T, Cuda>& y, Tensor<T, Cuda>& cols, std::string_view where,
                    std::size_t patch_elements) {
    namespace kd = kernels::detail;
    kd::check_conv_tensors(x, weight, s, where);
    y.resize(Shape{s.batch, s.ho, s.wo, s.out_channels});
    const std::size_t g_count = s.groups, cg = s.in_channels / g_count, kg = s.taps() * cg, width = g_count * kg;
    const std::size_t cog = s.out_channels / g_count, per_out = s.ho * s.wo, per_in = s.h * s.w * s.in_channels;
    if (bias != nullptr) {
        kernels::launch(kd::broadcast_rows_kernel<T>, kernels::grid_1d(y.size(), 256), 256, 0, kernels::stream(),
                        y.data(), bias->data(), y.size(), s.out_channels);
        check_launch("broadcast_rows_kernel", where);
    }
    const T beta = bias != nullptr ? T(1) : T(0);
    const bool pointwise = kd::conv_pointwise(s);
    const std::size_t chunk = pointwise ? s.batch : kd::conv_chunk_images(s, patch_elements);
    if (!pointwise) cols.resize(Shape{chunk * per_out, width});
    for (std::size_t b0 = 0; b0 < s.batch; b0 += chunk) {
        const std::size_t nb = chunk < s.batch - b0 ? chunk : s.batch - b0, rows = nb * per_out;
        const T* a = x.data() + b0 * per_in;
        if (!pointwise) {
            kernels::launch(kd::im2col_kernel<T>, kernels::grid_1d(rows * width, 256), 256, 0, kernels::stream(), a,
                            s, nb, cols.data());
            check_launch("im2col_kernel", where);
            a = cols.data();
        }
        for (std::size_t g = 0; g < g_count; ++g)
            kd::row_major_gemm(false, true, rows, cog, kg, T(1), a + g * kg, width, weight.data() + g * cog * kg, kg,
                               beta, y.data() + b0 * per_out * s.out_channels + g * cog, s.out_channels, where);
    }
}

template <class T>
void conv2d_backward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& dy, const Tensor<T, Cuda>& weight,
                     const WindowShape& s, Tensor<T, Cuda>* dweight, Tensor<T, Cuda>* dbias, Tensor<T, Cuda>* dx,
                     Tensor<T, Cuda>& cols, Tensor<T, Cuda>& dcols, std::string_view where,
                     std::size_t patch_elements) {
    namespace kd = kernels::detail;
    kd::check_conv_tensors(x, weight, s, where);
    kd::check_conv_gradient(dy, s, where);
    const std::size_t g_count = s.groups, cg = s.in_channels / g_count, kg = s.taps() * cg, width = g_count * kg;
    const std::size_t cog = s.out_channels / g_count, per_out = s.ho * s.wo, per_in = s.h * s.w * s.in_channels;
    if (dbias != nullptr)
        kd::add_column_sums(kd::load_element<T>{dy.data(), s.out_channels}, s.out_pixels(), s.out_channels,
                            dbias->data(), where);
    if (dweight == nullptr && dx == nullptr) return;
    if (dx != nullptr) dx->resize(x.shape());
    const bool pointwise = kd::conv_pointwise(s);
    const std::size_t chunk = pointwise ? s.batch : kd::conv_chunk_images(s, patch_elements);
    if (!pointwise && dweight != nullptr) cols.resize(Shape{chunk * per_out, width});
    if (!pointwise && dx != nullptr) dcols.resize(Shape{chunk * per_out, width});
    for (std::size_t b0 = 0; b0 < s.batch; b0 += chunk) {
        const std::size_t nb = chunk < s.batch - b0 ? chunk : s.batch - b0, rows = nb * per_out;
        const T* g_rows = dy.data() + b0 * per_out * s.out_channels;
        if (dweight != nullptr) {
            const T* a = x.data() + b0 * per_in;
            if (!pointwise) {
                kernels::launch(kd::im2col_kernel<T>, kernels::grid_1d(rows * width, 256), 256, 0, kernels::stream(),
                                a, s, nb, cols.data());
                check_launch("im2col_kernel", where);
                a = cols.data();
            }
            for (std::size_t g = 0; g < g_count; ++g)
                kd::row_major_gemm(true, false, cog, kg, rows, T(1), g_rows + g * cog, s.out_channels, a + g * kg,
                                   width, T(1), dweight->data() + g * cog * kg, kg, where);
        }
        if (dx == nullptr) continue;
        T* d = pointwise ? dx->data() + b0 * per_in : dcols.data();
        for (std::size_t g = 0; g < g_count; ++g)
            kd::row_major_gemm(false, false, rows, kg, cog, T(1), g_rows + g * cog, s.out_channels,
                               weight.data() + g * cog * kg, kg, T(0), d + g * kg, width, where);
        if (!pointwise) {
            kernels::launch(kd::col2im_kernel<T>, kernels::grid_1d(nb * per_in, 256), 256, 0, kernels::stream(),
                            dcols.data(), s, nb, dx->data() + b0 * per_in);
            check_launch("col2im_kernel", where);
        }
    }
}

template <class T>
void depthwise_conv2d_forward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& weight, const Tensor<T, Cuda>* bias,
                              const WindowShape& s, Tensor<T, Cuda>& y, std::string_view where) {
    namespace kd = kernels::detail;
    kd::check_conv_tensors(x, weight, s, where);
    y.resize(Shape{s.batch, s.ho, s.wo, s.out_channels});
    kernels::launch(kd::depthwise_forward_kernel<T>, kernels::grid_1d(y.size(), 256), 256, 0, kernels::stream(),
                    x.data(), weight.data(), bias != nullptr ? bias->data() : nullptr, s, y.data());
    check_launch("depthwise_forward_kernel", where);
}

template <class T>
void depthwise_conv2d_backward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& dy, const Tensor<T, Cuda>& weight,
                               const WindowShape& s, Tensor<T, Cuda>* dweight, Tensor<T, Cuda>* dbias,
                               Tensor<T, Cuda>* dx, std::string_view where) {
    namespace kd = kernels::detail;
    kd::check_conv_tensors(x, weight, s, where);
    kd::check_conv_gradient(dy, s, where);
    if (dbias != nullptr)
        kd::add_column_sums(kd::load_element<T>{dy.data(), s.out_channels}, s.out_pixels(), s.out_channels,
                            dbias->data(), where);
    if (dweight != nullptr)
        kd::add_column_sums(kd::depthwise_filter_products<T>{x.data(), dy.data(), s}, s.out_pixels(),
                            s.out_channels * s.taps(), dweight->data(), where);
    if (dx == nullptr) return;
    dx->resize(x.shape());
    kernels::launch(kd::depthwise_input_grad_kernel<T>, kernels::grid_1d(dx->size(), 256), 256, 0, kernels::stream(),
                    dy.data(), weight.data(), s, dx->data());
    check_launch("depthwise_input_grad_kernel", where);
}

}  // namespace patchwork::cuda
