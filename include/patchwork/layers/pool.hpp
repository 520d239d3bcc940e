#pragma once
// Pooling over channels-last tensors [N, H, W, C]. None of them has
// parameters.
//
// AvgPool2d and MaxPool2d slide a square window (kernel k, stride s, padding p,
// output size as for Conv2d) over each channel separately. With P(o) the taps
// of output pixel o that land inside the image:
//   avg:  y[o,c] = (1 / k^2) sum_{q in P(o)} x[q,c]
//         (padding counts as zeros: the divisor is always k^2)
//         dL/dx[q,c] = sum_{o: q in P(o)} dL/dy[o,c] / k^2
//   max:  y[o,c] = x[a(o,c), c],  a(o,c) = argmax_{q in P(o)} x[q,c] (the first on ties)
//         dL/dx[q,c] = sum_{o: a(o,c) = q} dL/dy[o,c]
//         (padding never wins: the window must keep a pixel, p <= k / 2)
// GlobalAvgPool: [N, H, W, C] -> [N, C], y[n,c] = mean_{h,w} x[n,h,w,c],
//   dL/dx[n,h,w,c] = dL/dy[n,c] / (H W).
//
// Pools are shape-preserving in the sense of the Module concept
// (out_features() is 0: their width follows the input). Flatten and
// Unflatten are in layers/reshape.hpp.
//
// Device = Cuda computes the same formulas in kernels (kernels/pooling.cuh),
// one thread per output element; the backward passes gather, per input
// element, the outputs whose window reads it (no atomics). MaxPool2d keeps the
// winning tap of each output element on the device rather than its input index.
#include <algorithm>
#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "patchwork/core/module.hpp"
#include "patchwork/layers/conv2d.hpp"

namespace patchwork {

namespace detail {

inline SlidingWindow checked_pool_window(const char* who, std::size_t kernel, std::size_t stride, std::size_t padding) {
    if (kernel == 0 || stride == 0)
        throw ConfigError(concat(who, ": kernel and stride must be positive, got kernel=", kernel, " stride=", stride));
    if (2 * padding > kernel)
        throw ConfigError(concat(who, ": padding=", padding, " must be at most half the kernel (", kernel, ")"));
    return SlidingWindow{kernel, stride, padding};
}

/// Channels of an NHWC input (any), for the shape check.
template <class T, class D>
std::size_t nhwc_channels(const Tensor<T, D>& x) noexcept {
    return x.rank() == 4 && x.dim(3) > 0 ? x.dim(3) : 1;
}

}  // namespace detail

template <class T, class D = Cpu>
class BasicAvgPool2d : public detail::ParameterFreeModule {
    static_assert(!std::is_same_v<T, bf16>, "patchwork::AvgPool2d: the pooling modules take float or double (bf16 storage "
                                            "covers the transformer path)");

public:
    using Scalar = T;
    using Device = D;
    static constexpr const char* kind() { return "avgpool"; }

    /// Stride equal to the kernel, no padding.
    explicit BasicAvgPool2d(std::size_t kernel) : BasicAvgPool2d(kernel, kernel) {}
    BasicAvgPool2d(std::size_t kernel, std::size_t stride, std::size_t padding = 0)
        : window_(detail::checked_pool_window("avgpool", kernel, stride, padding)) {}

    const Tensor<T, D>& forward(const Tensor<T, D>& x) {
        detail::check_nhwc(x, detail::nhwc_channels(x), window_, path_, "avgpool input (NHWC)");
        geo_ = detail::SpatialGeometry(x.shape(), window_);
        if constexpr (std::is_same_v<D, Cuda>) {
            cuda::avg_pool_forward(x, detail::window_shape(geo_, x.dim(3), x.dim(3), x.dim(3)), y_, path_);
            return y_;
        } else {
            return cpu_forward(x);
        }
    }

    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        check_same_shape(dy, y_.shape(), path_, "avgpool output gradient");
        if (!input_grad_) return empty_;
        if constexpr (std::is_same_v<D, Cuda>) {
            const std::size_t c = y_.dim(3);
            cuda::avg_pool_backward(dy, detail::window_shape(geo_, c, c, c), dx_, path_);
            return dx_;
        } else {
            return cpu_backward(dy);
        }
    }

private:
    const Tensor<T>& cpu_forward(const Tensor<T>& x) {
        const std::size_t c = x.dim(3);
        const T inv = T(1) / T(geo_.taps());
        y_.resize(Shape{geo_.batch, geo_.ho, geo_.wo, c});
        for_rows(geo_.out_pixels(), geo_.taps() * c, [&](std::size_t p) {
            T* __restrict y = y_.data() + p * c;
            std::fill(y, y + c, T(0));
            geo_.for_each_tap(p, [&](std::size_t, std::size_t q) {
                const T* __restrict xr = x.data() + q * c;
                for (std::size_t j = 0; j < c; ++j) y[j] += xr[j];
            });
            for (std::size_t j = 0; j < c; ++j) y[j] *= inv;
        });
        return y_;
    }

    const Tensor<T>& cpu_backward(const Tensor<T>& dy) {
        const std::size_t c = y_.dim(3), per_image = geo_.ho * geo_.wo;
        const T inv = T(1) / T(geo_.taps());
        dx_.resize(Shape{geo_.batch, geo_.h, geo_.w, c});
        dx_.zero();
        // One image per task: windows overlap only within an image.
        for_rows(geo_.batch, per_image * geo_.taps() * c, [&](std::size_t b) {
            for (std::size_t p = b * per_image; p < (b + 1) * per_image; ++p) {
                const T* __restrict g = dy.data() + p * c;
                geo_.for_each_tap(p, [&](std::size_t, std::size_t q) {
                    T* __restrict dx = dx_.data() + q * c;
                    for (std::size_t j = 0; j < c; ++j) dx[j] += g[j] * inv;
                });
            }
        });
        return dx_;
    }

    detail::SlidingWindow window_;
    detail::SpatialGeometry geo_;
    Tensor<T, D> y_, dx_, empty_;
};

template <class T, class D = Cpu>
class BasicMaxPool2d : public detail::ParameterFreeModule {
    static_assert(!std::is_same_v<T, bf16>, "patchwork::MaxPool2d: the pooling modules take float or double (bf16 storage "
                                            "covers the transformer path)");

public:
    using Scalar = T;
    using Device = D;
    static constexpr const char* kind() { return "maxpool"; }

    /// Stride equal to the kernel, no padding.
    explicit BasicMaxPool2d(std::size_t kernel) : BasicMaxPool2d(kernel, kernel) {}
    BasicMaxPool2d(std::size_t kernel, std::size_t stride, std::size_t padding = 0)
        : window_(detail::checked_pool_window("maxpool", kernel, stride, padding)) {}

    const Tensor<T, D>& forward(const Tensor<T, D>& x) {
        detail::check_nhwc(x, detail::nhwc_channels(x), window_, path_, "maxpool input (NHWC)");
        geo_ = detail::SpatialGeometry(x.shape(), window_);
        if constexpr (std::is_same_v<D, Cuda>) {
            cuda::max_pool_forward(x, detail::window_shape(geo_, x.dim(3), x.dim(3), x.dim(3)), y_, arg_tap_, path_);
            return y_;
        } else {
            return cpu_forward(x);
        }
    }

    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        check_same_shape(dy, y_.shape(), path_, "maxpool output gradient");
        if (!input_grad_) return empty_;
        if constexpr (std::is_same_v<D, Cuda>) {
            const std::size_t c = y_.dim(3);
            cuda::max_pool_backward(dy, arg_tap_, detail::window_shape(geo_, c, c, c), dx_, path_);
            return dx_;
        } else {
            return cpu_backward(dy);
        }
    }

private:
    const Tensor<T>& cpu_forward(const Tensor<T>& x) {
        const std::size_t c = x.dim(3);
        y_.resize(Shape{geo_.batch, geo_.ho, geo_.wo, c});
        argmax_.resize(y_.size());
        for_rows(geo_.out_pixels(), geo_.taps() * c, [&](std::size_t p) {
            T* __restrict y = y_.data() + p * c;
            std::size_t* __restrict arg = argmax_.data() + p * c;
            bool first = true;  // every window holds a pixel (padding <= k / 2): it starts the maximum
            geo_.for_each_tap(p, [&](std::size_t, std::size_t q) {
                const T* __restrict xr = x.data() + q * c;
                for (std::size_t j = 0; j < c; ++j)
                    if (first || xr[j] > y[j]) {
                        y[j] = xr[j];
                        arg[j] = q * c + j;
                    }
                first = false;
            });
        });
        return y_;
    }

    const Tensor<T>& cpu_backward(const Tensor<T>& dy) {
        const std::size_t c = y_.dim(3), per_image = geo_.ho * geo_.wo * c;
        dx_.resize(Shape{geo_.batch, geo_.h, geo_.w, c});
        dx_.zero();
        // Every winner of image b lies in image b, so images are independent.
        for_rows(geo_.batch, per_image, [&](std::size_t b) {
            for (std::size_t i = b * per_image; i < (b + 1) * per_image; ++i) dx_[argmax_[i]] += dy[i];
        });
        return dx_;
    }

    detail::SlidingWindow window_;
    detail::SpatialGeometry geo_;
    std::vector<std::size_t> argmax_;  ///< per output element, the input element it took (Cpu)
    Tensor<T, D> arg_tap_;             ///< per output element, the tap that won (Cuda)
    Tensor<T, D> y_, dx_, empty_;
};

template <class T, class D = Cpu>
class BasicGlobalAvgPool : public detail::ParameterFreeModule {
    static_assert(!std::is_same_v<T, bf16>, "patchwork::GlobalAvgPool: the pooling modules take float or double (bf16 storage "
                                            "covers the transformer path)");

public:
    using Scalar = T;
    using Device = D;
    static constexpr const char* kind() { return "globalavgpool"; }

    const Tensor<T, D>& forward(const Tensor<T, D>& x) {
        detail::check_nhwc(x, detail::nhwc_channels(x), detail::SlidingWindow{}, path_, "globalavgpool input (NHWC)");
        in_shape_ = x.shape();
        if constexpr (std::is_same_v<D, Cuda>) {
            cuda::global_avg_pool_forward(x, y_, path_);
            return y_;
        } else {
            return cpu_forward(x);
        }
    }

    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        check_same_shape(dy, y_.shape(), path_, "globalavgpool output gradient");
        if (!input_grad_) return empty_;
        if constexpr (std::is_same_v<D, Cuda>) {
            cuda::global_avg_pool_backward(dy, in_shape_, dx_, path_);
            return dx_;
        } else {
            return cpu_backward(dy);
        }
    }

private:
    const Tensor<T>& cpu_forward(const Tensor<T>& x) {
        const std::size_t n = x.dim(0), hw = x.dim(1) * x.dim(2);
        y_.resize(Shape{n, x.dim(3)});
        const auto xm = x.matrix();  // [N H W, C]
        auto y = y_.matrix();
        for (std::size_t b = 0; b < n; ++b)
            y.row(Eigen::Index(b)) = xm.middleRows(Eigen::Index(b * hw), Eigen::Index(hw)).colwise().mean();
        return y_;
    }

    const Tensor<T>& cpu_backward(const Tensor<T>& dy) {
        const std::size_t n = in_shape_[0], hw = in_shape_[1] * in_shape_[2];
        dx_.resize(in_shape_);
        auto dx = dx_.matrix();
        const auto g = dy.matrix();
        for (std::size_t b = 0; b < n; ++b)
            dx.middleRows(Eigen::Index(b * hw), Eigen::Index(hw)).rowwise() = g.row(Eigen::Index(b)) / T(hw);
        return dx_;
    }

    Shape in_shape_;
    Tensor<T, D> y_, dx_, empty_;
};

using AvgPool2d = BasicAvgPool2d<float>;
using MaxPool2d = BasicMaxPool2d<float>;
using GlobalAvgPool = BasicGlobalAvgPool<float>;

}  // namespace patchwork
