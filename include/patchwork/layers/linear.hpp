#pragma once
// Linear: y = x W^T + b, with W of shape [out, in] and b of shape [out].
//
// Backward. With L a scalar loss and dY = dL/dy of shape [N, out]:
//   y_nj = sum_i x_ni W_ji + b_j
//   dL/dx_ni = sum_j dY_nj W_ji        ->  dX = dY W          [N, in]
//   dL/dW_ji = sum_n dY_nj x_ni        ->  dW += dY^T X       [out, in]
//   dL/db_j  = sum_n dY_nj             ->  db += 1^T dY       [out]
// A frozen weight skips the dW GEMM; a switched-off input gradient skips dX.
// Leading dimensions of x are flattened into N (x may be [B, T, in]).
//
// The layer keeps a pointer to its input rather than a copy: x must stay alive
// and unchanged until the matching backward (inside a model it is the previous
// module's output buffer, which only that module's next forward rewrites).
//
// Device = Cuda runs the same three products with cuBLAS (cuda::gemm) and the
// bias terms with kernels (cuda::add_row_vector, cuda::add_column_sums).
//
// Mixed-task batches (core/mixed_batch.hpp): the bias may be per task
// (BiasOnly banks). Rows of segment s (task k) then use b_k: y_n = x_n W^T + b_k
// for n in s, so dL/db_k = sum_{n in s} dY_n and dX, dW are unchanged (the
// weight is shared: one GEMM over all rows).
#include <cstddef>
#include <string>
#include <type_traits>

#include "patchwork/core/module.hpp"
#include "patchwork/core/mixed_batch.hpp"
#include "patchwork/ops/cuda_ops.hpp"
#include "patchwork/ops/gemm.hpp"

namespace patchwork {

template <class T, class D = Cpu>
class BasicLinear : public ModuleBase {
public:
    using Scalar = T;
    using Device = D;
    static constexpr const char* kind() { return "linear"; }
    static constexpr unsigned roles = role_bit(Role::weight) | role_bit(Role::bias);
    static constexpr bool fixed_width = true;  ///< output width is known (out_features)

    BasicLinear(std::size_t in_features, std::size_t out_features, bool with_bias = true)
        : in_(in_features), out_(out_features), has_bias_(with_bias),
          weight("weight", Role::weight, Shape{out_features, in_features}),
          bias("bias", Role::bias, Shape{with_bias ? out_features : 0}) {
        if (in_features == 0 || out_features == 0)
            throw ConfigError(detail::concat("linear: features must be positive, got in=", in_features,
                                             " out=", out_features));
        if (!with_bias) bias.set_trainable(false);
        reset_parameters(default_rng());
    }

private:
    std::size_t in_, out_;
    bool has_bias_;

public:
    Parameter<T, D> weight;  ///< [out, in]
    Parameter<T, D> bias;    ///< [out], or empty when built without bias

    [[nodiscard]] bool has_bias() const noexcept { return has_bias_; }
    [[nodiscard]] std::size_t in_features() const noexcept { return in_; }
    [[nodiscard]] std::size_t out_features() const noexcept { return out_; }

    void reset_parameters(Rng& rng) {
        // Kaiming-uniform with gain 1 (variance 1/fan_in), as is usual for linear layers.
        init::on_host(weight.value, [&](Tensor<T>& w) { init::kaiming_uniform(w, rng, in_, 1.0); });
        if (has_bias_) bias.value.zero();
    }

    const Tensor<T, D>& forward(const Tensor<T, D>& x) {
        check_cols(x, in_, path_, "linear input");
        x_ = x;
        y_.resize(x.shape().with_back(out_));
        if constexpr (std::is_same_v<D, Cuda>) {
            cuda::gemm(false, true, T(1), x, weight.value, T(0), y_, path_);
            // A per-task bias in a mixed-task batch: one launch, each row adding its task's.
            const MixedBatch<T, D>* mb = mixed_ = has_bias_ ? mixed_batch_for<T, D>(bias) : nullptr;
            if (mb != nullptr)
                cuda::add_row_vector(y_, mb->stacked(bias), path_, mb->task_rows(y_, path_, "linear output"));
            else if (has_bias_)
                cuda::add_row_vector(y_, bias.value, path_);
        } else {
            auto y = y_.matrix();
            ops::gemm_nt(x.matrix(), weight.value.matrix(), y, T(1), T(0));
            mixed_ = has_bias_ ? mixed_batch_for<T>(bias) : nullptr;
            if (has_bias_)
                for_each_segment(mixed_, y_, path_, "linear output", [&](int task, std::size_t r0, std::size_t n) {
                    y.middleRows(Eigen::Index(r0), Eigen::Index(n)).rowwise() +=
                        mixed_use(mixed_, bias, task).value.vector().transpose();
                });
        }
        return y_;
    }

    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        check_same_shape(dy, y_.shape(), path_, "linear output gradient");
        const Tensor<T, D>& x = last_input();
        if constexpr (std::is_same_v<D, Cuda>) {
            if (weight.wants_grad()) cuda::gemm(true, false, T(1), dy, x, T(1), weight.grad, path_);
            const MixedBatch<T, D>* mb = mixed_batch_for_backward(mixed_, path_);
            if (mb != nullptr) {
                if (Tensor<compute_t<T>, D>* db = mb->stacked_grad(bias))
                    cuda::add_column_sums(dy, *db, path_, mb->task_rows(dy, path_, "linear output gradient"));
            } else if (has_bias_ && bias.wants_grad()) {
                cuda::add_column_sums(dy, bias.grad, path_);
            }
        } else {
            const auto g = dy.matrix();
            if (weight.wants_grad()) ops::gemm_tn(g, x.matrix(), weight.grad.matrix(), T(1), T(1));
            const MixedBatch<T>* mb = mixed_batch_for_backward(mixed_, path_);
            if (has_bias_)
                for_each_segment(mb, dy, path_, "linear output gradient", [&](int task, std::size_t r0, std::size_t n) {
                    Parameter<T>& b = mixed_use(mb, bias, task);
                    if (b.wants_grad())
                        b.grad.vector() += g.middleRows(Eigen::Index(r0), Eigen::Index(n)).colwise().sum().transpose();
                });
        }
        if (!input_grad_) {
            dx_.clear();
            return dx_;
        }
        dx_.resize(x.shape());
        if constexpr (std::is_same_v<D, Cuda>) {
            cuda::gemm(false, false, T(1), dy, weight.value, T(0), dx_, path_);
        } else {
            auto dx = dx_.matrix();
            ops::gemm_nn(dy.matrix(), weight.value.matrix(), dx, T(1), T(0));
        }
        return dx_;
    }

    /// The input seen by the last forward (policies such as LoRA reuse it).
    [[nodiscard]] const Tensor<T, D>& last_input() const {
        return x_.get(y_.shape().with_back(in_), path_, "linear input");
    }

    template <class F>
    void visit(F&& f) {
        f(weight);
        if (has_bias_) f(bias);
    }
    /// f(p) for each parameter this layer can take per row in a mixed-task batch: the bias.
    template <class F>
    void visit_mixed(F&& f) {
        if (has_bias_) f(bias);
    }

    void set_path(const std::string& p) {
        path_ = p;
        weight.set_prefix(p);
        bias.set_prefix(p);
    }

private:
    Saved<T, D> x_;  ///< the last forward's input (not owned)
    Tensor<T, D> y_, dx_;
    const MixedBatch<T, D>* mixed_ = nullptr;  ///< the mixed batch of the last forward, if it was one
};

using Linear = BasicLinear<float>;

}  // namespace patchwork
