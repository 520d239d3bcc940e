#pragma once
// Conv2d with Device = Cuda: the layer of layers/conv2d.hpp on the device,
// with the same options (kernel, stride, padding, groups, bias) and the same
// parameters (weight [C_out, k, k, C_in / G] with Role::weight, or
// Role::depthwise for depthwise filters, and bias [C_out]), so values copy
// between a CPU and a device module. BasicDepthwiseConv2d<T, Cuda> (in
// layers/conv2d.hpp) builds on it.
//
// The math and its derivation (forward, dX, dW, db over NHWC tensors) are at
// the top of layers/conv2d.hpp; kernels/conv.cuh derives how the device splits
// each sum over threads (col2im as a gather, the depthwise sums):
//   dense and grouped: Y = X_col W^T + 1 b^T (im2col kernel + cuBLAS GEMM per
//     group, over chunks of whole images), dW += dY^T X_col, db += 1^T dY,
//     dx = col2im(dY W);
//   depthwise (groups = in_channels, or a DepthwiseConv2d): direct window
//     sums, one thread per output element (y) or input element (dx), and dW as
//     deterministic column sums (no atomics: the same bits on every run).
// Device modules take whole batches: no per-task parameters of a mixed-task
// batch (visit_mixed visits nothing), no oneDNN.
#include <cstddef>
#include <string>

#include "patchwork/core/module.hpp"
#include "patchwork/layers/conv2d.hpp"
#include "patchwork/ops/cuda_conv_ops.hpp"

namespace patchwork {

namespace detail {

/// The device launchers' view of a window sliding over an input.
inline cuda::WindowShape window_shape(const SpatialGeometry& geo, std::size_t in_channels, std::size_t out_channels,
                                      std::size_t groups) {
    cuda::WindowShape s;
    s.batch = geo.batch;
    s.h = geo.h;
    s.w = geo.w;
    s.in_channels = in_channels;
    s.ho = geo.ho;
    s.wo = geo.wo;
    s.out_channels = out_channels;
    s.kernel = geo.window.kernel;
    s.stride = geo.window.stride;
    s.padding = geo.window.padding;
    s.groups = groups;
    return s;
}

}  // namespace detail

template <class T>
class BasicConv2d<T, Cuda> : public ModuleBase {
    static_assert(!std::is_same_v<T, bf16>,
                  "patchwork::Conv2d: bf16 storage covers the transformer path (Linear, LayerNorm, the "
                  "activations, Dropout, Embedding, attention, the BERT modules and the Adapter, LoRA, ScaleShift, "
                  "BiasOnly, NormPatch, Frozen and FineTune policies, and MultiTask and Search over them); use float or "
                  "double here");

public:
    using Scalar = T;
    using Device = Cuda;
    static constexpr const char* kind() { return "conv"; }
    static constexpr unsigned roles = role_bit(Role::weight) | role_bit(Role::depthwise) | role_bit(Role::bias);
    static constexpr bool fixed_width = true;  ///< out_features() = out_channels

    BasicConv2d(std::size_t in_channels, std::size_t out_channels, std::size_t kernel, Conv2dOptions options = {})
        : BasicConv2d(in_channels, out_channels, kernel, options, options.groups == in_channels && in_channels > 1) {}

protected:
    /// `depthwise_filters`: one filter per input channel (requires groups = in_channels).
    BasicConv2d(std::size_t in_channels, std::size_t out_channels, std::size_t kernel, Conv2dOptions options,
                bool depthwise_filters)
        : in_(in_channels), out_(out_channels),
          options_(detail::validated_conv_options(in_channels, out_channels, kernel, options)),
          window_{kernel, options.stride, options.padding}, depthwise_(depthwise_filters),
          weight("weight", depthwise_filters ? Role::depthwise : Role::weight,
                 Shape{out_channels, kernel, kernel, in_channels / options.groups}),
          bias("bias", Role::bias, Shape{options.bias ? out_channels : 0}) {
        if (!options_.bias) bias.set_trainable(false);
        reset_parameters(default_rng());
    }

private:
    std::size_t in_, out_;
    Conv2dOptions options_;
    detail::SlidingWindow window_;
    bool depthwise_;

public:
    Parameter<T, Cuda> weight;  ///< [C_out, k, k, C_in / groups]
    Parameter<T, Cuda> bias;    ///< [C_out], or empty when built without bias

    [[nodiscard]] std::size_t in_channels() const noexcept { return in_; }
    [[nodiscard]] std::size_t out_channels() const noexcept { return out_; }
    [[nodiscard]] std::size_t out_features() const noexcept { return out_; }
    [[nodiscard]] std::size_t kernel_size() const noexcept { return window_.kernel; }
    [[nodiscard]] std::size_t stride() const noexcept { return window_.stride; }
    [[nodiscard]] std::size_t padding() const noexcept { return window_.padding; }
    [[nodiscard]] std::size_t groups() const noexcept { return options_.groups; }
    [[nodiscard]] bool has_bias() const noexcept { return options_.bias; }
    /// As on the CPU: every filter sees one input channel.
    [[nodiscard]] bool depthwise() const noexcept { return depthwise_; }
    [[nodiscard]] const char* backend() const noexcept { return "cuda"; }
    /// oneDNN is a CPU backend: nothing to switch on the device.
    void set_onednn(bool) noexcept {}

    void reset_parameters(Rng& rng) {
        // The CPU layer's initialisation, drawn on the host: CPU and device layers agree for a seed.
        const std::size_t fan_in = window_.kernel * window_.kernel * (in_ / options_.groups);
        init::on_host(weight.value, [&](Tensor<T>& w) { init::kaiming_uniform(w, rng, fan_in, 1.0); });
        if (options_.bias) bias.value.zero();
    }

    const Tensor<T, Cuda>& forward(const Tensor<T, Cuda>& x) {
        detail::check_nhwc(x, in_, window_, path_, "conv input (NHWC)");
        x_ = x;
        shape_ = detail::window_shape(detail::SpatialGeometry(x.shape(), window_), in_, out_, options_.groups);
        const Tensor<T, Cuda>* b = options_.bias ? &bias.value : nullptr;
        if (depthwise_) cuda::depthwise_conv2d_forward(x, weight.value, b, shape_, y_, path_);
        else cuda::conv2d_forward(x, weight.value, b, shape_, y_, cols_, path_);
        return y_;
    }

    const Tensor<T, Cuda>& backward(const Tensor<T, Cuda>& dy) {
        check_same_shape(dy, y_.shape(), path_, "conv output gradient");
        const Tensor<T, Cuda>& x =
            x_.get(Shape{shape_.batch, shape_.h, shape_.w, shape_.in_channels}, path_, "conv input");
        Tensor<T, Cuda>* dw = weight.wants_grad() ? &weight.grad : nullptr;
        Tensor<T, Cuda>* db = options_.bias && bias.wants_grad() ? &bias.grad : nullptr;
        Tensor<T, Cuda>* dx = input_grad_ ? &dx_ : nullptr;
        if (!input_grad_) dx_.clear();
        if (depthwise_) cuda::depthwise_conv2d_backward(x, dy, weight.value, shape_, dw, db, dx, path_);
        else cuda::conv2d_backward(x, dy, weight.value, shape_, dw, db, dx, cols_, dcols_, path_);
        return dx_;
    }

    template <class F>
    void visit(F&& f) {
        f(weight);
        if (options_.bias) f(bias);
    }
    /// Device modules take no per-task parameters in a mixed-task batch.
    template <class F>
    void visit_mixed(F&&) noexcept {}

    void set_path(const std::string& p) {
        path_ = p;
        weight.set_prefix(p);
        bias.set_prefix(p);
    }

private:
    Saved<T, Cuda> x_;  ///< the last forward's input (not owned)
    cuda::WindowShape shape_;
    Tensor<T, Cuda> y_, dx_, cols_, dcols_;  ///< cols_, dcols_: the patch matrices of a dense convolution
};

}  // namespace patchwork
