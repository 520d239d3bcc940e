#pragma once
// BatchNorm2d over channels-last tensors: x [N, H, W, C] (any tensor whose last
// dimension is C; its matrix view is [M, C] with M = N H W). Per channel c:
//
// Training mode (statistics of the batch):
//   mu_c = mean_m x_mc,  var_c = mean_m (x_mc - mu_c)^2,  s_c = 1 / sqrt(var_c + eps)
//   xh_mc = (x_mc - mu_c) s_c,   y_mc = gamma_c xh_mc + beta_c
// and the running statistics move towards the batch's:
//   running_mean <- (1 - momentum) running_mean + momentum mu
//   running_var  <- (1 - momentum) running_var  + momentum var M / (M - 1)
// (the unbiased variance, as PyTorch keeps it).
// Inference mode (running statistics): the same with mu = running_mean,
// var = running_var, which makes the layer per-channel affine; fold() returns
// it as y = x * scale + bias with
//   scale = gamma / sqrt(var + eps),   bias = beta - gamma mu / sqrt(var + eps).
//
// Backward (g = dL/dy, sums over the M rows):
//   dL/dgamma_c = sum_m g_mc xh_mc,   dL/dbeta_c = sum_m g_mc
// Inference: mu and s are constants, so dL/dx_mc = g_mc gamma_c s_c.
// Training: as LayerNorm's derivation with rows and columns swapped. With
// gh = g gamma, dmu_c/dx_mc = 1/M and ds_c/dx_mc = -s_c^3 (x_mc - mu_c) / M
// (the mean term of var's derivative vanishes since sum_m (x_mc - mu_c) = 0):
//   dL/dx_mc = s_c (gh_mc - mean_m gh_mc - xh_mc mean_m gh_mc xh_mc)
//            = gamma_c s_c (g_mc - dbeta_c / M - xh_mc dgamma_c / M)
// so the two column sums of the parameter gradients also give dx.
//
// gamma and beta carry Role::norm_scale and Role::norm_shift (NormPatch trains
// them); the running statistics are buffers, not parameters: no optimiser or
// policy sees them. set_training(model, on) switches every BatchNorm2d inside
// a model.
#include <cmath>
#include <cstddef>
#include <string>

#include "patchwork/core/module.hpp"

namespace patchwork {

template <class T>
class BasicBatchNorm2d : public ModuleBase {
public:
    using Scalar = T;
    static constexpr const char* kind() { return "batchnorm"; }
    static constexpr unsigned roles = role_bit(Role::norm_scale) | role_bit(Role::norm_shift);
    static constexpr bool fixed_width = true;

    explicit BasicBatchNorm2d(std::size_t channels, double eps = 1e-5, double momentum = 0.1)
        : channels_(channels), eps_(eps), momentum_(momentum), scale("scale", Role::norm_scale, Shape{channels}),
          shift("shift", Role::norm_shift, Shape{channels}), running_mean(Shape{channels}),
          running_var(Shape{channels}) {
        if (channels == 0) throw ConfigError("batchnorm: channels must be positive");
        if (!(eps > 0)) throw ConfigError(detail::concat("batchnorm: eps must be positive, got ", eps));
        if (!(momentum >= 0 && momentum <= 1))
            throw ConfigError(detail::concat("batchnorm: momentum must lie in [0, 1], got ", momentum));
        reset_parameters(default_rng());
    }

private:
    std::size_t channels_;
    double eps_, momentum_;
    bool training_ = true;

public:
    Parameter<T> scale;      ///< gamma, [C]
    Parameter<T> shift;      ///< beta, [C]
    Tensor<T> running_mean;  ///< [C], a buffer (not a parameter)
    Tensor<T> running_var;   ///< [C], a buffer (not a parameter)

    /// Per-channel affine form of inference mode: y = x * scale + bias.
    struct Folded {
        Tensor<T> scale;  ///< [C]
        Tensor<T> bias;   ///< [C]
    };

    [[nodiscard]] std::size_t out_features() const noexcept { return channels_; }
    [[nodiscard]] double eps() const noexcept { return eps_; }
    [[nodiscard]] double momentum() const noexcept { return momentum_; }
    [[nodiscard]] bool training() const noexcept { return training_; }
    /// Training mode normalises with batch statistics and updates the running
    /// ones; inference mode normalises with the running statistics.
    void set_training(bool on) noexcept { training_ = on; }

    /// Resets gamma = 1, beta = 0, running mean 0 and running variance 1.
    void reset_parameters(Rng&) {
        scale.value.fill(T(1));
        shift.value.zero();
        running_mean.zero();
        running_var.fill(T(1));
    }

    /// Inference mode as one scale and bias per channel.
    [[nodiscard]] Folded fold() const {
        Folded f{Tensor<T>(Shape{channels_}), Tensor<T>(Shape{channels_})};
        for (std::size_t c = 0; c < channels_; ++c) {
            const T s = scale.value[c] / std::sqrt(running_var[c] + T(eps_));
            f.scale[c] = s;
            f.bias[c] = shift.value[c] - s * running_mean[c];
        }
        return f;
    }

    const Tensor<T>& forward(const Tensor<T>& x) {
        check_cols(x, channels_, path_, "batchnorm input (channels last)");
        const auto xm = x.matrix();
        const T rows = T(x.rows());
        batch_stats_ = training_;
        mean_.resize(Shape{channels_});
        inv_std_.resize(Shape{channels_});
        if (batch_stats_) {
            mean_.vector() = xm.colwise().mean().transpose();
            const auto var = ((xm.rowwise() - mean_.vector().transpose()).array().square().colwise().sum() / rows)
                                 .transpose()
                                 .eval();
            inv_std_.vector().array() = (var + T(eps_)).rsqrt();
            const T m = T(momentum_), unbias = rows > T(1) ? rows / (rows - T(1)) : T(1);
            running_mean.vector() = (T(1) - m) * running_mean.vector() + m * mean_.vector();
            running_var.vector().array() = (T(1) - m) * running_var.vector().array() + m * unbias * var;
        } else {
            mean_.vector() = running_mean.vector();
            inv_std_.vector().array() = (running_var.vector().array() + T(eps_)).rsqrt();
        }
        xhat_.resize(x.shape());
        y_.resize(x.shape());
        const auto mu = mean_.vector().transpose().array();
        const auto s = inv_std_.vector().transpose().array();
        xhat_.matrix().array() = (xm.array().rowwise() - mu).rowwise() * s;
        y_.matrix().array() = (xhat_.matrix().array().rowwise() * scale.value.vector().transpose().array()).rowwise() +
                              shift.value.vector().transpose().array();
        return y_;
    }

    const Tensor<T>& backward(const Tensor<T>& dy) {
        check_same_shape(dy, xhat_.shape(), path_, "batchnorm output gradient");
        const auto g = dy.matrix();
        const bool need_sums = scale.wants_grad() || shift.wants_grad() || (input_grad_ && batch_stats_);
        if (need_sums) {
            sum_g_.resize(Shape{channels_});
            sum_gx_.resize(Shape{channels_});
            sum_g_.vector() = g.colwise().sum().transpose();
            sum_gx_.vector() = (g.array() * xhat_.matrix().array()).colwise().sum().matrix().transpose();
            if (scale.wants_grad()) scale.grad.vector() += sum_gx_.vector();
            if (shift.wants_grad()) shift.grad.vector() += sum_g_.vector();
        }
        if (!input_grad_) return empty_;
        dx_.resize(dy.shape());
        const auto gs = (scale.value.vector().array() * inv_std_.vector().array()).transpose().eval();
        if (batch_stats_) {
            const T rows = T(dy.rows());
            const auto mean_g = (sum_g_.vector().transpose().array() / rows).eval();
            const auto mean_gx = (sum_gx_.vector().transpose().array() / rows).eval();
            dx_.matrix().array() =
                ((g.array().rowwise() - mean_g) - (xhat_.matrix().array().rowwise() * mean_gx)).rowwise() * gs;
        } else {
            dx_.matrix().array() = g.array().rowwise() * gs;
        }
        return dx_;
    }

    template <class F>
    void visit(F&& f) {
        f(scale);
        f(shift);
    }

    void set_path(const std::string& p) {
        path_ = p;
        scale.set_prefix(p);
        shift.set_prefix(p);
    }

private:
    bool batch_stats_ = true;  ///< whether the last forward used batch statistics
    Tensor<T> mean_, inv_std_, xhat_, y_, dx_, sum_g_, sum_gx_, empty_;
};

using BatchNorm2d = BasicBatchNorm2d<float>;

/// Switch every module inside `model` that has a training mode (BatchNorm2d)
/// to training (`on`) or inference.
template <class M>
void set_training(M& model, bool on) {
    for_each_module(model, [on](auto& m) {
        if constexpr (requires { m.set_training(on); }) m.set_training(on);
    });
}

}  // namespace patchwork
