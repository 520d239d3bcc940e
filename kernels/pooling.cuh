#pragma once
// Definitions of the device pools declared in patchwork/ops/cuda_conv_ops.hpp:
// what BasicAvgPool2d, BasicMaxPool2d and BasicGlobalAvgPool run with
// Device = Cuda. The math (and its derivation) is in layers/pool.hpp. Every
// kernel takes one thread per output element, forward and backward: the
// backward ones gather, for an input pixel q, the outputs whose window reads q
// (kernels/conv.cuh, for_each_reader), so every element of dx is written once,
// without atomics.
//   avg:  y[o, c] = (1 / k^2) sum_{q in P(o)} x[q, c]
//         dx[q, c] = sum_{o reading q} dy[o, c] / k^2
//   max:  y[o, c] = x[a(o, c), c] (the first maximum in tap order), and the
//         winning tap t(o, c) is kept; dx[q, c] = sum of dy[o, c] over the
//         outputs o reading q through their winning tap
//   global: y[n, c] = mean_{h, w} x[n, h, w, c],  dx[n, h, w, c] = dy[n, c] / (H W)
// Include from nvcc-compiled translation units only.
#include <cstddef>
#include <string_view>

#include "patchwork/kernels/conv.cuh"

namespace patchwork::kernels::detail {

template <class T>
__global__ void avg_pool_forward_kernel(const T* __restrict__ x, cuda::WindowShape s, T* __restrict__ y) {
    const std::size_t c = s.in_channels;
    const T inv = T(1) / T(s.taps());
    PATCHWORK_GRID_STRIDE(i, s.out_pixels() * c) {
        const std::size_t j = i % c, p = i / c;
        const std::size_t ox = p % s.wo, oy = (p / s.wo) % s.ho, n = p / (s.wo * s.ho);
        T sum = T(0);
        for_each_tap_inside(s, oy, ox, [&](std::size_t, std::size_t, std::size_t iy, std::size_t ix) {
            sum += x[((n * s.h + iy) * s.w + ix) * c + j];
        });
        y[i] = sum * inv;
    }
}

template <class T>
__global__ void avg_pool_backward_kernel(const T* __restrict__ dy, cuda::WindowShape s, T* __restrict__ dx) {
    const std::size_t c = s.in_channels;
    const T inv = T(1) / T(s.taps());
    PATCHWORK_GRID_STRIDE(i, s.in_pixels() * c) {
        const std::size_t j = i % c, q = i / c;
        const std::size_t ix = q % s.w, iy = (q / s.w) % s.h, n = q / (s.w * s.h);
        T sum = T(0);
        for_each_reader(s, iy, ix, [&](std::size_t, std::size_t, std::size_t oy, std::size_t ox) {
            sum += dy[((n * s.ho + oy) * s.wo + ox) * c + j] * inv;
        });
        dx[i] = sum;
    }
}

/// Every window keeps a pixel (padding <= k / 2), whose first tap starts the maximum.
template <class T>
__global__ void max_pool_forward_kernel(const T* __restrict__ x, cuda::WindowShape s, T* __restrict__ y,
                                        T* __restrict__ arg_tap) {
    const std::size_t c = s.in_channels;
    PATCHWORK_GRID_STRIDE(i, s.out_pixels() * c) {
        const std::size_t j = i % c, p = i / c;
        const std::size_t ox = p % s.wo, oy = (p / s.wo) % s.ho, n = p / (s.wo * s.ho);
        T best = T(0), tap = T(-1);
        bool first = true;
        for_each_tap_inside(s, oy, ox, [&](std::size_t ky, std::size_t kx, std::size_t iy, std::size_t ix) {
            const T v = x[((n * s.h + iy) * s.w + ix) * c + j];
            if (first || v > best) {
                best = v;
                tap = T(ky * s.kernel + kx);
            }
            first = false;
        });
        y[i] = best;
        arg_tap[i] = tap;
    }
}

template <class T>
__global__ void max_pool_backward_kernel(const T* __restrict__ dy, const T* __restrict__ arg_tap,
                                         cuda::WindowShape s, T* __restrict__ dx) {
    const std::size_t c = s.in_channels;
    PATCHWORK_GRID_STRIDE(i, s.in_pixels() * c) {
        const std::size_t j = i % c, q = i / c;
        const std::size_t ix = q % s.w, iy = (q / s.w) % s.h, n = q / (s.w * s.h);
        T sum = T(0);
        for_each_reader(s, iy, ix, [&](std::size_t ky, std::size_t kx, std::size_t oy, std::size_t ox) {
            const std::size_t o = ((n * s.ho + oy) * s.wo + ox) * c + j;
            if (arg_tap[o] == T(ky * s.kernel + kx)) sum += dy[o];
        });
        dx[i] = sum;
    }
}

/// y[n, c] = (sum over the image's hw pixels, in order) / hw.
template <class T>
__global__ void global_avg_forward_kernel(const T* __restrict__ x, std::size_t n, std::size_t hw, std::size_t c,
                                          T* __restrict__ y) {
    PATCHWORK_GRID_STRIDE(i, n * c) {
        const std::size_t j = i % c, b = i / c;
        T sum = T(0);
        for (std::size_t p = 0; p < hw; ++p) sum += x[(b * hw + p) * c + j];
        y[i] = sum / T(hw);
    }
}

template <class T>
__global__ void global_avg_backward_kernel(const T* __restrict__ dy, std::size_t n, std::size_t hw, std::size_t c,
                                           T* __restrict__ dx) {
    PATCHWORK_GRID_STRIDE(i, n * hw * c) {
        const std::size_t j = i % c, b = i / (hw * c);
        dx[i] = dy[b * c + j] / T(hw);
    }
}

template <class T>
void check_pool_tensor(const Tensor<T, Cuda>& t, const Shape& want, std::string_view where, const char* what) {
    if (!(t.shape() == want))
        throw ShapeError(patchwork::detail::concat(where, ": ", what, ": expected ", want, ", got ", t.shape()));
}

}  // namespace patchwork::kernels::detail

namespace patchwork::cuda {

template <class T>
void avg_pool_forward(const Tensor<T, Cuda>& x, const WindowShape& s, Tensor<T, Cuda>& y, std::string_view where) {
    namespace kd = kernels::detail;
    kd::check_pool_tensor(x, Shape{s.batch, s.h, s.w, s.in_channels}, where, "avgpool input");
    y.resize(Shape{s.batch, s.ho, s.wo, s.in_channels});
    kernels::launch(kd::avg_pool_forward_kernel<T>, kernels::grid_1d(y.size(), 256), 256, 0, kernels::stream(),
                    x.data(), s, y.data());
    check_launch("avg_pool_forward_kernel", where);
}

template <class T>
void avg_pool_backward(const Tensor<T, Cuda>& dy, const WindowShape& s, Tensor<T, Cuda>& dx, std::string_view where) {
    namespace kd = kernels::detail;
    kd::check_pool_tensor(dy, Shape{s.batch, s.ho, s.wo, s.in_channels}, where, "avgpool output gradient");
    dx.resize(Shape{s.batch, s.h, s.w, s.in_channels});
    kernels::launch(kd::avg_pool_backward_kernel<T>, kernels::grid_1d(dx.size(), 256), 256, 0, kernels::stream(),
                    dy.data(), s, dx.data());
    check_launch("avg_pool_backward_kernel", where);
}

template <class T>
void max_pool_forward(const Tensor<T, Cuda>& x, const WindowShape& s, Tensor<T, Cuda>& y, Tensor<T, Cuda>& arg_tap,
                      std::string_view where) {
    namespace kd = kernels::detail;
    kd::check_pool_tensor(x, Shape{s.batch, s.h, s.w, s.in_channels}, where, "maxpool input");
    y.resize(Shape{s.batch, s.ho, s.wo, s.in_channels});
    arg_tap.resize(y.shape());
    kernels::launch(kd::max_pool_forward_kernel<T>, kernels::grid_1d(y.size(), 256), 256, 0, kernels::stream(),
                    x.data(), s, y.data(), arg_tap.data());
    check_launch("max_pool_forward_kernel", where);
}

template <class T>
void max_pool_backward(const Tensor<T, Cuda>& dy, const Tensor<T, Cuda>& arg_tap, const WindowShape& s,
                       Tensor<T, Cuda>& dx, std::string_view where) {
    namespace kd = kernels::detail;
    const Shape out{s.batch, s.ho, s.wo, s.in_channels};
    kd::check_pool_tensor(dy, out, where, "maxpool output gradient");
    kd::check_pool_tensor(arg_tap, out, where, "maxpool saved taps");
    dx.resize(Shape{s.batch, s.h, s.w, s.in_channels});
    kernels::launch(kd::max_pool_backward_kernel<T>, kernels::grid_1d(dx.size(), 256), 256, 0, kernels::stream(),
                    dy.data(), arg_tap.data(), s, dx.data());
    check_launch("max_pool_backward_kernel", where);
}

template <class T>
void global_avg_pool_forward(const Tensor<T, Cuda>& x, Tensor<T, Cuda>& y, std::string_view where) {
    namespace kd = kernels::detail;
    if (x.rank() != 4)
        throw ShapeError(patchwork::detail::concat(where, ": globalavgpool input: expected NHWC, got ", x.shape()));
    const std::size_t n = x.dim(0), hw = x.dim(1) * x.dim(2), c = x.dim(3);
    y.resize(Shape{n, c});
    kernels::launch(kd::global_avg_forward_kernel<T>, kernels::grid_1d(y.size(), 256), 256, 0, kernels::stream(),
                    x.data(), n, hw, c, y.data());
    check_launch("global_avg_forward_kernel", where);
}

template <class T>
void global_avg_pool_backward(const Tensor<T, Cuda>& dy, const Shape& in_shape, Tensor<T, Cuda>& dx,
                              std::string_view where) {
    namespace kd = kernels::detail;
    const std::size_t n = in_shape[0], hw = in_shape[1] * in_shape[2], c = in_shape[3];
    kd::check_pool_tensor(dy, Shape{n, c}, where, "globalavgpool output gradient");
    dx.resize(in_shape);
    kernels::launch(kd::global_avg_backward_kernel<T>, kernels::grid_1d(dx.size(), 256), 256, 0, kernels::stream(),
                    dy.data(), n, hw, c, dx.data());
    check_launch("global_avg_backward_kernel", where);
}

}  // namespace patchwork::cuda
