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
// The column sums are plain loops over rows in order (for each row, over the
// channels), so a channel's statistics depend only on its rows' values and
// order: the same rows give the same bits whether they are a whole batch or
// one segment of a mixed batch.
//
// Mixed-task batches (core/mixed_batch.hpp). Every BatchNorm2d takes part
// in a mixed batch, whether its parameters are per task or not: the rows of
// task k (one contiguous segment S_k of M_k rows) are normalised as a batch of
// task k alone would be, with task k's gamma^k, beta^k and running statistics
// (those of the segment's task when the statistics are per task) and, in
// training mode, with statistics over S_k only, which also update the
// running statistics once per segment. Rows of different segments never
// interact, so everything above holds per segment with M replaced by M_k and
// the sums taken over S_k:
//   dL/dgamma^k_c = sum_{m in S_k} g_mc xh_mc,   dL/dbeta^k_c = sum_{m in S_k} g_mc
//   dL/dx_mc = gamma^k_c s^k_c (g_mc - dbeta^k_c / M_k - xh_mc dgamma^k_c / M_k)  (training)
//   dL/dx_mc = g_mc gamma^k_c s^k_c                                            (inference)
// where dbeta^k, dgamma^k are the segment's own column sums (a shared gamma,
// beta receives the sum of all segments' sums).
//
// gamma and beta carry Role::norm_scale and Role::norm_shift (NormPatch trains
// them); the running statistics are buffers, not parameters: no optimiser or
// policy sees them. set_training(model, on) switches every BatchNorm2d inside
// a model.
//
// Device = Cuda computes the same formulas in kernels (kernels/batchnorm.cuh:
// the per-channel sums as deterministic column sums), with the same
// parameters and running statistics; device modules take whole batches (no
// mixed-task segments).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <type_traits>

#include "patchwork/core/module.hpp"
#include "patchwork/core/mixed_batch.hpp"
#include "patchwork/ops/cuda_conv_ops.hpp"

namespace patchwork {

template <class T, class D = Cpu>
class BasicBatchNorm2d : public ModuleBase {
    static_assert(!std::is_same_v<T, bf16>,
                  "patchwork::BatchNorm2d: bf16 storage covers the transformer path (Linear, LayerNorm, the "
                  "activations, Dropout, Embedding, attention, the BERT modules and the Adapter, LoRA, ScaleShift, "
                  "BiasOnly, NormPatch, Frozen and FineTune policies, and MultiTask and Search over them); use float or "
                  "double here");

public:
    using Scalar = T;
    using Device = D;
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
    Parameter<T, D> scale;      ///< gamma, [C]
    Parameter<T, D> shift;      ///< beta, [C]
    Tensor<T, D> running_mean;  ///< [C], a buffer (not a parameter)
    Tensor<T, D> running_var;   ///< [C], a buffer (not a parameter)

    /// Per-channel affine form of inference mode: y = x * scale + bias.
    struct Folded {
        Tensor<T, D> scale;  ///< [C]
        Tensor<T, D> bias;   ///< [C]
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
        Folded f{Tensor<T, D>(Shape{channels_}), Tensor<T, D>(Shape{channels_})};
        if constexpr (std::is_same_v<D, Cuda>) {
            cuda::batch_norm_fold(scale.value, shift.value, running_mean, running_var, eps_, f.scale, f.bias, path_);
        } else {
            for (std::size_t c = 0; c < channels_; ++c) {
                const T s = scale.value[c] / std::sqrt(running_var[c] + T(eps_));
                f.scale[c] = s;
                f.bias[c] = shift.value[c] - s * running_mean[c];
            }
        }
        return f;
    }

    const Tensor<T, D>& forward(const Tensor<T, D>& x) {
        check_cols(x, channels_, path_, "batchnorm input (channels last)");
        if constexpr (std::is_same_v<D, Cuda>) {
            batch_stats_ = training_;
            if (training_)
                cuda::batch_norm_forward_train(x, scale.value, shift.value, eps_, momentum_, running_mean, running_var,
                                               mean_, var_, inv_std_, xhat_, y_, path_);
            else
                cuda::batch_norm_forward_eval(x, scale.value, shift.value, eps_, running_mean, running_var, mean_,
                                              inv_std_, xhat_, y_, path_);
            return y_;
        } else {
            return cpu_forward(x);
        }
    }

    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        check_same_shape(dy, xhat_.shape(), path_, "batchnorm output gradient");
        if constexpr (std::is_same_v<D, Cuda>) {
            if (input_grad_) dx_.resize(dy.shape());
            else dx_.clear();
            cuda::batch_norm_backward(dy, xhat_, inv_std_, scale.value, batch_stats_,
                                      scale.wants_grad() ? &scale.grad : nullptr,
                                      shift.wants_grad() ? &shift.grad : nullptr, input_grad_ ? &dx_ : nullptr,
                                      sum_g_, sum_gx_, path_);
            return dx_;
        } else {
            return cpu_backward(dy);
        }
    }

    /// True where a mixed-task batch's statistics are taken per task (per segment) in one pass:
    /// on the CPU. The device module takes whole batches (a multi-task model groups by task).
    static constexpr bool mixed_statistics = std::is_same_v<D, Cpu>;

    /// f(p) for each parameter this module can take per row in a mixed-task batch (see MixedBatch);
    /// the running statistics are taken per task too. Device modules take whole batches.
    template <class F>
    void visit_mixed(F&& f) {
        if constexpr (std::is_same_v<D, Cpu>) {
            f(scale);
            f(shift);
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
        const std::size_t C = channels_;
        const MixedBatch<T>* mb = mixed_ = active_mixed_batch<T>();
        batch_stats_ = training_;
        const std::size_t segments = mb == nullptr ? 1 : mb->segments().size();
        mean_.resize(Shape{segments, C});
        inv_std_.resize(Shape{segments, C});
        var_.resize(Shape{C});
        xhat_.resize(x.shape());
        y_.resize(x.shape());
        std::size_t si = 0;
        for_each_segment(mb, x, path_, "batchnorm input", [&](int task, std::size_t r0, std::size_t n) {
            T* __restrict mu = mean_.data() + si * C;
            T* __restrict is = inv_std_.data() + si * C;
            ++si;
            Tensor<T>& rmean = mb == nullptr ? running_mean : mb->statistic(running_mean, task);
            Tensor<T>& rvar = mb == nullptr ? running_var : mb->statistic(running_var, task);
            const T* __restrict xs = x.data() + r0 * C;
            if (batch_stats_) {
                T* __restrict var = var_.data();
                const T rows = T(n);
                std::fill(mu, mu + C, T(0));
                std::fill(var, var + C, T(0));
                for (std::size_t m = 0; m < n; ++m)
                    for (std::size_t c = 0; c < C; ++c) mu[c] += xs[m * C + c];
                for (std::size_t c = 0; c < C; ++c) mu[c] /= rows;
                for (std::size_t m = 0; m < n; ++m)
                    for (std::size_t c = 0; c < C; ++c) {
                        const T d = xs[m * C + c] - mu[c];
                        var[c] += d * d;
                    }
                const T mom = T(momentum_), unbias = n > 1 ? rows / (rows - T(1)) : T(1);
                for (std::size_t c = 0; c < C; ++c) {
                    var[c] /= rows;
                    is[c] = T(1) / std::sqrt(var[c] + T(eps_));
                    rmean[c] = (T(1) - mom) * rmean[c] + mom * mu[c];
                    rvar[c] = (T(1) - mom) * rvar[c] + mom * unbias * var[c];
                }
            } else {
                for (std::size_t c = 0; c < C; ++c) {
                    mu[c] = rmean[c];
                    is[c] = T(1) / std::sqrt(rvar[c] + T(eps_));
                }
            }
            const T* gamma = mixed_use(mb, scale, task).value.data();
            const T* beta = mixed_use(mb, shift, task).value.data();
            for_rows(n, C, [&](std::size_t i) {
                const std::size_t off = (r0 + i) * C;
                const T* __restrict xr = x.data() + off;
                T* __restrict xh = xhat_.data() + off;
                T* __restrict yr = y_.data() + off;
                for (std::size_t c = 0; c < C; ++c) {
                    xh[c] = (xr[c] - mu[c]) * is[c];
                    yr[c] = xh[c] * gamma[c] + beta[c];
                }
            });
        });
        return y_;
    }

    const Tensor<T>& cpu_backward(const Tensor<T>& dy) {
        // Per segment (each task's rows of a mixed batch, else all rows): the column sums of the segment give
        // dgamma, dbeta and, in training mode, dx = gamma s (g - dbeta / M_k - xh dgamma / M_k) (derivation at
        // the top of this file).
        const MixedBatch<T>* mb = mixed_batch_for_backward(mixed_, path_);
        const std::size_t C = channels_;
        sum_g_.resize(Shape{C});
        sum_gx_.resize(Shape{C});
        gs_.resize(Shape{C});
        if (input_grad_) dx_.resize(dy.shape());
        std::size_t si = 0;
        for_each_segment(mb, dy, path_, "batchnorm output gradient", [&](int task, std::size_t r0, std::size_t n) {
            const T* __restrict is = inv_std_.data() + si * C;
            ++si;
            Parameter<T>& gamma = mixed_use(mb, scale, task);
            Parameter<T>& beta = mixed_use(mb, shift, task);
            T* __restrict sg = sum_g_.data();
            T* __restrict sgx = sum_gx_.data();
            const bool need_sums = gamma.wants_grad() || beta.wants_grad() || (input_grad_ && batch_stats_);
            if (need_sums) {
                std::fill(sg, sg + C, T(0));
                std::fill(sgx, sgx + C, T(0));
                const T* __restrict g = dy.data() + r0 * C;
                const T* __restrict xh = xhat_.data() + r0 * C;
                for (std::size_t m = 0; m < n; ++m)
                    for (std::size_t c = 0; c < C; ++c) {
                        sg[c] += g[m * C + c];
                        sgx[c] += g[m * C + c] * xh[m * C + c];
                    }
                if (gamma.wants_grad()) gamma.grad.vector() += sum_gx_.vector();
                if (beta.wants_grad()) beta.grad.vector() += sum_g_.vector();
            }
            if (!input_grad_) return;
            T* __restrict gs = gs_.data();
            for (std::size_t c = 0; c < C; ++c) gs[c] = gamma.value[c] * is[c];
            const bool batch = batch_stats_;
            const T rows = T(n);
            if (batch)
                for (std::size_t c = 0; c < C; ++c) {
                    sg[c] /= rows;   // mean_m g_mc
                    sgx[c] /= rows;  // mean_m g_mc xh_mc
                }
            for_rows(n, C, [&](std::size_t i) {
                const std::size_t off = (r0 + i) * C;
                const T* __restrict g = dy.data() + off;
                const T* __restrict xh = xhat_.data() + off;
                T* __restrict d = dx_.data() + off;
                if (batch)
                    for (std::size_t c = 0; c < C; ++c) d[c] = ((g[c] - sg[c]) - xh[c] * sgx[c]) * gs[c];
                else
                    for (std::size_t c = 0; c < C; ++c) d[c] = g[c] * gs[c];
            });
        });
        return input_grad_ ? dx_ : empty_;
    }

    bool batch_stats_ = true;  ///< whether the last forward used batch statistics
    const MixedBatch<T>* mixed_ = nullptr;  ///< the mixed batch of the last forward, if it was one
    Tensor<T, D> mean_, inv_std_, var_, xhat_, y_, dx_, sum_g_, sum_gx_, gs_, empty_;
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
