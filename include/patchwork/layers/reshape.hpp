#pragma once
// Reshaping layers, without parameters.
//
// Flatten: [N, ...] -> [N, prod(...)], and Unflatten(h, w, c): [N, h w c] ->
//   [N, h, w, c] (images stored as rows, e.g. Fashion-MNIST's [N, 784]); both
//   keep the row-major order, so the gradient is dL/dy under the input's shape:
//   dL/dx = reshape(dL/dy, shape of x).
//
// Flatten is shape-preserving in the sense of the Module concept
// (out_features() is 0: its width follows the input); Unflatten knows its
// output width c.
//
// Device = Cuda: the same copies, device to device (the row-major order is
// the same on both devices).
#include <algorithm>
#include <cstddef>
#include <string>

#include "patchwork/core/module.hpp"

namespace patchwork {

namespace detail {

/// Copies `from` into `to` under `shape` (same elements, same order).
template <class T>
void copy_as(const Tensor<T>& from, Tensor<T>& to, const Shape& shape) {
    to.resize(shape);
    std::copy(from.begin(), from.end(), to.begin());
}
template <class T>
void copy_as(const Tensor<T, Cuda>& from, Tensor<T, Cuda>& to, const Shape& shape) {
    to = from;  // a copy on the current stream
    to.reshape(shape);
}

}  // namespace detail

/// [N, d1, d2, ...] -> [N, d1 d2 ...].
template <class T, class D = Cpu>
class BasicFlatten : public detail::ParameterFreeModule {
public:
    using Scalar = T;
    using Device = D;
    static constexpr const char* kind() { return "flatten"; }

    const Tensor<T, D>& forward(const Tensor<T, D>& x) {
        if (x.rank() < 2 || x.empty()) throw_shape_error(path_, "flatten input", Shape{1, 1}, x.shape());
        in_shape_ = x.shape();
        detail::copy_as(x, y_, Shape{x.dim(0), x.size() / x.dim(0)});
        return y_;
    }

    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        check_same_shape(dy, y_.shape(), path_, "flatten output gradient");
        if (!input_grad_) return empty_;
        detail::copy_as(dy, dx_, in_shape_);
        return dx_;
    }

private:
    Shape in_shape_;
    Tensor<T, D> y_, dx_, empty_;
};

/// [N, h w c] -> [N, h, w, c]: rows holding images become NHWC tensors.
template <class T, class D = Cpu>
class BasicUnflatten : public ModuleBase {
public:
    using Scalar = T;
    using Device = D;
    static constexpr const char* kind() { return "unflatten"; }
    static constexpr unsigned roles = 0;
    static constexpr bool fixed_width = true;  ///< output width c

    BasicUnflatten(std::size_t height, std::size_t width, std::size_t channels)
        : h_(height), w_(width), c_(channels) {
        if (height == 0 || width == 0 || channels == 0)
            throw ConfigError(detail::concat("unflatten: sizes must be positive, got ", height, " x ", width, " x ",
                                             channels));
    }

    [[nodiscard]] std::size_t out_features() const noexcept { return c_; }
    void reset_parameters(Rng&) noexcept {}
    template <class F>
    void visit(F&&) noexcept {}
    void set_path(const std::string& p) { path_ = p; }

    const Tensor<T, D>& forward(const Tensor<T, D>& x) {
        const std::size_t d = h_ * w_ * c_;
        if (x.rank() != 2 || x.cols() != d || x.empty())
            throw_shape_error(path_, "unflatten input", Shape{x.rank() ? std::max<std::size_t>(x.dim(0), 1) : 1, d},
                              x.shape());
        detail::copy_as(x, y_, Shape{x.dim(0), h_, w_, c_});
        return y_;
    }

    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        check_same_shape(dy, y_.shape(), path_, "unflatten output gradient");
        if (!input_grad_) return empty_;
        detail::copy_as(dy, dx_, Shape{dy.dim(0), h_ * w_ * c_});
        return dx_;
    }

private:
    std::size_t h_, w_, c_;
    Tensor<T, D> y_, dx_, empty_;
};

using Flatten = BasicFlatten<float>;
using Unflatten = BasicUnflatten<float>;

}  // namespace patchwork
