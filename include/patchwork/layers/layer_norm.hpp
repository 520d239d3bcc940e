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
//
// Mixed-task batches (core/mixed_batch.hpp): gamma and beta may be per
// task (NormPatch banks). The statistics are per row anyway, so rows of
// segment s (task k) use gamma_k, beta_k in the formulas above, and
// dL/dgamma_k, dL/dbeta_k sum over the rows of s only.
#include <cmath>
#include <string>
#include <type_traits>

#include "patchwork/core/module.hpp"
#include "patchwork/core/mixed_batch.hpp"
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
            // In a mixed-task batch (per-task scale and shift): one launch, each row with its task's.
            const MixedBatch<T, D>* mb = mixed_ = mixed_batch_for<T, D>(scale, shift);
            if (mb == nullptr)
                cuda::layer_norm_forward(x, scale.value, shift.value, eps_, xhat_, inv_std_, y_, path_);
            else
                cuda::layer_norm_forward(x, mb->stacked(scale), mb->stacked(shift), eps_, xhat_, inv_std_, y_, path_,
                                         mb->task_rows(x, path_, "layernorm input"));
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
            const MixedBatch<T, D>* mb = mixed_batch_for_backward(mixed_, path_);
            if (mb == nullptr)
                cuda::layer_norm_backward(dy, xhat_, inv_std_, scale.value,
                                          scale.wants_grad() ? &scale.grad : nullptr,
                                          shift.wants_grad() ? &shift.grad : nullptr, input_grad_ ? &dx_ : nullptr,
                                          path_);
            else  // per-row tasks: the gradients go to the stacked per-task gradients (the model adds them up)
                cuda::layer_norm_backward(dy, xhat_, inv_std_, mb->stacked(scale), mb->stacked_grad(scale),
                                          mb->stacked_grad(shift), input_grad_ ? &dx_ : nullptr, path_,
                                          mb->task_rows(dy, path_, "layernorm output gradient"));
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
    /// f(p) for each parameter this layer can take per row in a mixed-task batch.
    template <class F>
    void visit_mixed(F&& f) {
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
        const std::size_t d = features_;
        mixed_ = mixed_batch_for<T>(scale, shift);
        for_each_segment(mixed_, x, path_, "layernorm input", [&](int task, std::size_t r0, std::size_t n) {
            const RowMap gamma(mixed_use(mixed_, scale, task).value.data(), Eigen::Index(d));
            const RowMap beta(mixed_use(mixed_, shift, task).value.data(), Eigen::Index(d));
            // Per row: Eigen's vectorised (pairwise) reductions, rows split across threads.
            for_rows(n, d, [&](std::size_t i) {
                const std::size_t r = r0 + i;
                const RowMap xr(x.data() + r * d, Eigen::Index(d));
                const T mean = xr.mean();
                const T var = (xr - mean).square().mean();
                const T s = T(1) / std::sqrt(var + T(eps_));
                inv_std_[r] = s;
                OutMap xh(xhat_.data() + r * d, Eigen::Index(d));
                xh = (xr - mean) * s;
                OutMap(y_.data() + r * d, Eigen::Index(d)) = gamma * xh + beta;
            });
        });
        return y_;
    }

    const Tensor<T>& cpu_backward(const Tensor<T>& dy) {
        const std::size_t d = features_;
        const MixedBatch<T>* mb = mixed_batch_for_backward(mixed_, path_);
        if (input_grad_) dx_.resize(dy.shape());
        else dx_.clear();
        for_each_segment(mb, dy, path_, "layernorm output gradient", [&](int task, std::size_t r0, std::size_t n) {
            Parameter<T>& sp = mixed_use(mb, scale, task);
            Parameter<T>& tp = mixed_use(mb, shift, task);
            const auto g = dy.matrix().middleRows(Eigen::Index(r0), Eigen::Index(n));
            if (sp.wants_grad()) {
                const auto xh = xhat_.matrix().middleRows(Eigen::Index(r0), Eigen::Index(n));
                sp.grad.vector() += (g.array() * xh.array()).colwise().sum().matrix().transpose();
            }
            if (tp.wants_grad()) tp.grad.vector() += g.colwise().sum().transpose();
            if (!input_grad_) return;
            const RowMap gamma(sp.value.data(), Eigen::Index(d));
            for_rows(n, d, [&](std::size_t i) {
                const std::size_t r = r0 + i;
                const RowMap gr(dy.data() + r * d, Eigen::Index(d)), xh(xhat_.data() + r * d, Eigen::Index(d));
                const auto gh = gr * gamma;
                const T mean_gh = gh.mean();
                const T mean_ghxh = (gh * xh).mean();
                OutMap(dx_.data() + r * d, Eigen::Index(d)) = inv_std_[r] * (gh - mean_gh - xh * mean_ghxh);
            });
        });
        return dx_;
    }

    using RowMap = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
    using OutMap = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
    Tensor<T, D> xhat_, y_, dx_, inv_std_;
    const MixedBatch<T, D>* mixed_ = nullptr;  ///< the mixed batch of the last forward, if it was one
};

using LayerNorm = BasicLayerNorm<float>;

}  // namespace patchwork
