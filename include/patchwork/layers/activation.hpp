#pragma once
// Element-wise activations: y = f(x), dL/dx = dL/dy * f'(x).
// One module template over a small functor per function; each functor states
// its value and its backward `grad(g, x, y) = g * f'(x)` side by side. grad is
// written per function rather than as g * derivative so that each compiles to
// branch-free vector code (ReLU's is a select, not a multiply by a 0/1 branch).
//
// The module keeps its output and a pointer to its input: the input must stay
// alive and unchanged until the matching backward (the usual saved-tensor
// contract; inside a model the input is the previous module's output buffer).
//
// Device = Cuda applies the same functor's math in a kernel (kernels/ops.cuh
// holds a device version of each value/grad pair, checked against these).
#include <cmath>
#include <numbers>
#include <string>
#include <type_traits>

#include "patchwork/core/gelu.hpp"
#include "patchwork/core/module.hpp"
#include "patchwork/ops/cuda_ops.hpp"

namespace patchwork {

namespace activation {

/// ReLU: f(x) = max(0, x), f'(x) = [x > 0] (0 at the kink, as is customary).
struct Relu {
    static constexpr const char* name = "relu";
    template <class T>
    static T value(T x) noexcept { return x > T(0) ? x : T(0); }
    template <class T>
    static T grad(T g, T x, T /*y*/) noexcept { return x > T(0) ? g : T(0); }
};

/// GELU (exact, with the normal CDF): f(x) = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2,
/// f'(x) = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
struct Gelu {
    static constexpr const char* name = "gelu";
    template <class T>
    static T value(T x) noexcept { return gelu_value(x); }  // core/gelu.hpp, shared with the kernels
    template <class T>
    static T grad(T g, T x, T /*y*/) noexcept { return gelu_grad(g, x); }
};

/// Tanh: f(x) = tanh x, f'(x) = 1 - tanh(x)^2 = 1 - y^2 (uses the saved output).
struct Tanh {
    static constexpr const char* name = "tanh";
    template <class T>
    static T value(T x) noexcept { return std::tanh(x); }
    template <class T>
    static T grad(T g, T /*x*/, T y) noexcept { return g * (T(1) - y * y); }
};

}  // namespace activation

template <class T, class Fn, class D = Cpu>
class BasicActivation : public ModuleBase {
public:
    using Scalar = T;
    using Device = D;
    using Function = Fn;
    static constexpr const char* kind() { return Fn::name; }
    static constexpr unsigned roles = 0;
    static constexpr bool fixed_width = false;  ///< shape-preserving: width comes from the input

    [[nodiscard]] std::size_t out_features() const noexcept { return 0; }
    void reset_parameters(Rng&) noexcept {}
    template <class F>
    void visit(F&&) noexcept {}
    void set_path(const std::string& p) { path_ = p; }

    const Tensor<T, D>& forward(const Tensor<T, D>& x) {
        if (x.empty()) throw_shape_error(path_, "activation input", Shape{1}, x.shape());
        x_ = x;
        y_.resize(x.shape());
        if constexpr (std::is_same_v<D, Cuda>) {
            cuda::activation_forward<Fn>(x, y_, path_);
            return y_;
        } else {
            return cpu_forward(x);
        }
    }

    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        check_same_shape(dy, y_.shape(), path_, "activation output gradient");
        if (!input_grad_) {
            dx_.clear();
            return dx_;
        }
        dx_.resize(dy.shape());
        if constexpr (std::is_same_v<D, Cuda>) {
            cuda::activation_backward<Fn>(dy, x_.get(y_.shape(), path_, "activation input"), y_, dx_, path_);
            return dx_;
        } else {
            return cpu_backward(dy);
        }
    }

private:
    const Tensor<T>& cpu_forward(const Tensor<T>& x) {
        const T* __restrict in = x.data();
        T* __restrict out = y_.data();
        for_range(x.size(), [&](std::size_t b, std::size_t e) {
            for (std::size_t i = b; i < e; ++i) out[i] = Fn::value(in[i]);
        });
        return y_;
    }

    const Tensor<T>& cpu_backward(const Tensor<T>& dy) {
        const T* __restrict x = x_.get(y_.shape(), path_, "activation input").data();
        const T* __restrict y = y_.data();
        const T* __restrict g = dy.data();
        T* __restrict out = dx_.data();
        for_range(dy.size(), [&](std::size_t b, std::size_t e) {
            for (std::size_t i = b; i < e; ++i) out[i] = Fn::grad(g[i], x[i], y[i]);
        });
        return dx_;
    }

    Saved<T, D> x_;  ///< the last forward's input (not owned)
    Tensor<T, D> y_, dx_;
};

template <class T, class D = Cpu>
using BasicRelu = BasicActivation<T, activation::Relu, D>;
template <class T, class D = Cpu>
using BasicGelu = BasicActivation<T, activation::Gelu, D>;
template <class T, class D = Cpu>
using BasicTanh = BasicActivation<T, activation::Tanh, D>;

using Relu = BasicRelu<float>;
using Gelu = BasicGelu<float>;
using Tanh = BasicTanh<float>;

}  // namespace patchwork
