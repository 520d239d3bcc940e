#pragma once
// LayerNorm over the last dimension D, per row n:
//   mu = mean_i x_i,  var = mean_i (x_i - mu)^2,  s = 1 / sqrt(var + eps)
//   xh_i = (x_i - mu) s,   y_i = gamma_i xh_i + beta_i
//
// Backward (g = dL/dy, gh_i = g_i gamma_i):
//   dL/dgamma_i = sum_n g_ni xh_ni,   dL/dbeta_i = sum_n g_ni
//   dL/dxh_i = gh_i; through xh = (x - mu) s, with dmu/dx_j = 1/D and
//   ds/dx_j = -s^3 (x_j - mu) / D (the mean term of var's derivative vanishes
//   because sum_i (x_i - mu) = 0):
//   dL/dx_j = s gh_j - s/D sum_i gh_i - s xh_j / D sum_i gh_i xh_i
//           = s (gh_j - mean(gh) - xh_j mean(gh * xh)).
//
// Device = Cuda computes the same formulas in kernels, one block per row
// (cuda::layer_norm_forward / layer_norm_backward).
#include <cmath>
#include <string>
#include <type_traits>

#include "patchwork/core/module.hpp"
#include "patchwork/ops/cuda_ops.hpp"

namespace patchwork {

template <class T, class D = Cpu>
class BasicLayerNorm : public ModuleBase {
public:
    using Scalar = T;
    using Device = D;
    static constexpr const char* kind() { return "layernorm"; }
    static constexpr unsigned roles = role_bit(Role::norm_scale) | role_bit(Role::norm_shift);
    static constexpr bool fixed_width = true;

    explicit BasicLayerNorm(std::size_t features, double eps = 1e-5)
        : features_(features), eps_(eps), scale("scale", Role::norm_scale, Shape{features}),
          shift("shift", Role::norm_shift, Shape{features}) {
        if (features == 0) throw ConfigError("layernorm: features must be positive");
        if (!(eps > 0)) throw ConfigError(detail::concat("layernorm: eps must be positive, got ", eps));
        reset_parameters(default_rng());
    }

private:
    std::size_t features_;
    double eps_;

public:
    Parameter<T, D> scale;  ///< gamma, [D]
    Parameter<T, D> shift;  ///< beta, [D]

    [[nodiscard]] std::size_t out_features() const noexcept { return features_; }
    [[nodiscard]] double eps() const noexcept { return eps_; }

    void reset_parameters(Rng&) {
        scale.value.fill(T(1));
        shift.value.zero();
    }

    const Tensor<T, D>& forward(const Tensor<T, D>& x) {
        check_cols(x, features_, path_, "layernorm input");
        xhat_.resize(x.shape());
        y_.resize(x.shape());
        inv_std_.resize(Shape{x.rows()});
        if constexpr (std::is_same_v<D, Cuda>) {
            cuda::layer_norm_forward(x, scale.value, shift.value, eps_, xhat_, inv_std_, y_, path_);
            return y_;
        } else {
            return cpu_forward(x);
        }
    }

    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        check_same_shape(dy, xhat_.shape(), path_, "layernorm output gradient");
        if constexpr (std::is_same_v<D, Cuda>) {
            if (input_grad_) dx_.resize(dy.shape());
            else dx_.clear();
            cuda::layer_norm_backward(dy, xhat_, inv_std_, scale.value, scale.wants_grad() ? &scale.grad : nullptr,
                                      shift.wants_grad() ? &shift.grad : nullptr, input_grad_ ? &dx_ : nullptr,
                                      path_);
            return dx_;
        } else {
            return cpu_backward(dy);
        }
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
    const Tensor<T>& cpu_forward(const Tensor<T>& x) {
        const std::size_t n = x.rows(), d = features_;
        const RowMap gamma(scale.value.data(), Eigen::Index(d)), beta(shift.value.data(), Eigen::Index(d));
        // Per row: Eigen's vectorised (pairwise) reductions, rows split across threads.
        for_rows(n, d, [&](std::size_t r) {
            const RowMap xr(x.data() + r * d, Eigen::Index(d));
            const T mean = xr.mean();
            const T var = (xr - mean).square().mean();
            const T s = T(1) / std::sqrt(var + T(eps_));
            inv_std_[r] = s;
            OutMap xh(xhat_.data() + r * d, Eigen::Index(d));
            xh = (xr - mean) * s;
            OutMap(y_.data() + r * d, Eigen::Index(d)) = gamma * xh + beta;
        });
        return y_;
    }

    const Tensor<T>& cpu_backward(const Tensor<T>& dy) {
        const std::size_t n = dy.rows(), d = features_;
        if (scale.wants_grad()) {
            auto gs = scale.grad.vector();
            gs += (dy.matrix().array() * xhat_.matrix().array()).colwise().sum().matrix().transpose();
        }
        if (shift.wants_grad()) shift.grad.vector() += dy.matrix().colwise().sum().transpose();
        if (!input_grad_) {
            dx_.clear();
            return dx_;
        }
        dx_.resize(dy.shape());
        const RowMap gamma(scale.value.data(), Eigen::Index(d));
        for_rows(n, d, [&](std::size_t r) {
            const RowMap g(dy.data() + r * d, Eigen::Index(d)), xh(xhat_.data() + r * d, Eigen::Index(d));
            const auto gh = g * gamma;
            const T mean_gh = gh.mean();
            const T mean_ghxh = (gh * xh).mean();
            OutMap(dx_.data() + r * d, Eigen::Index(d)) = inv_std_[r] * (gh - mean_gh - xh * mean_ghxh);
        });
        return dx_;
    }

    using RowMap = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
    using OutMap = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
    Tensor<T, D> xhat_, y_, dx_, inv_std_;
};

using LayerNorm = BasicLayerNorm<float>;

}  // namespace patchwork
