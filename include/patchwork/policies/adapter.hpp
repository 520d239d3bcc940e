#pragma once
// Adapter<r>: a bottleneck adapter (Houlsby et al., 2019) placed after a
// module M whose output width d is known. With h = M(x), rows of width d:
//   z = h D^T + b_d          D: [r, d], b_d: [r]     (down-projection)
//   a = act(z)               act = ReLU or GELU
//   y = h + a U^T + b_u      U: [d, r], b_u: [d]     (up-projection, residual)
// D is Kaiming-uniform; U and b_u start at zero, so a fresh adapter is the
// identity (y = M(x) exactly) and training starts from the pre-trained model.
//
// Backward. With g = dL/dy of shape [N, d] and * the element-wise product:
//   dL/dU   = g^T a                ->  dU   += g^T a          [d, r]
//   dL/db_u = 1^T g                ->  db_u += 1^T g          [d]
//   dL/da   = g U                                             [N, r]
//   dL/dz   = (g U) * act'(z)      =:  dz                     [N, r]
//   dL/dD   = dz^T h               ->  dD   += dz^T h         [r, d]
//   dL/db_d = 1^T dz               ->  db_d += 1^T dz         [r]
//   dL/dh   = g + dz D             (the residual passes g through)  [N, d]
//   dL/dx   = M.backward(dL/dh)
// M's backward runs only when M holds a trainable parameter or the input
// gradient is wanted, and M computes its own input gradient only in the
// latter case. Trainable parameters added: 2 d r + r + d.
//
// Mixed-task batches (core/mixed_batch.hpp). When any of D, b_d, U, b_u
// is per task, the rows of task k (a contiguous segment S_k) use task k's
// D^k, b_d^k, U^k, b_u^k; rows never interact, so with g_k, h_k, a_k, dz_k the
// rows of segment S_k, every sum over rows above splits by segment:
//   dU^k += g_k^T a_k,   db_u^k += 1^T g_k,   dz_k = (g_k U^k) * act'(z_k),
//   dD^k += dz_k^T h_k,  db_d^k += 1^T dz_k,  dL/dh_k = g_k + dz_k D^k
// (a parameter that is not per task is the same object for every segment,
// so its gradient sums over all rows, as before).
#include <concepts>
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>

#include "patchwork/core/module.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/core/mixed_batch.hpp"
#include "patchwork/ops/cuda_ops.hpp"
#include "patchwork/ops/gemm.hpp"
#include "patchwork/policies/injection.hpp"
#include "patchwork/policies/policy.hpp"

namespace patchwork {

/// The non-linearity between an adapter's two projections.
enum class AdapterActivation { relu, gelu };

namespace detail {
template <AdapterActivation A>
using adapter_function_t = std::conditional_t<A == AdapterActivation::relu, activation::Relu, activation::Gelu>;
}  // namespace detail

/// Module M followed by a residual bottleneck adapter of width Bottleneck.
template <class Inner, std::size_t Bottleneck, AdapterActivation Act = AdapterActivation::relu>
class AdapterModule : public InjectionModule<AdapterModule<Inner, Bottleneck, Act>, Inner> {
    using Base = InjectionModule<AdapterModule, Inner>;
    static_assert(Module<Inner>, "patchwork::Adapter<r>: the wrapped type must satisfy patchwork::Module");
    static_assert(Inner::fixed_width,
                  "patchwork::Adapter<r> needs a module whose output width is known (a Linear, a LayerNorm, or a "
                  "block containing one); an activation alone has none");
    static_assert(Bottleneck > 0, "patchwork::Adapter<r>: the bottleneck width r must be positive");

public:
    using Scalar = typename Inner::Scalar;
    using Device = device_of_t<Inner>;
    using Function = detail::adapter_function_t<Act>;
    static constexpr const char* own_name = "adapter";  ///< parameters read "<path>.adapter.down.weight", ...
    static constexpr bool mixed_rows = true;             ///< applies per-task parameters per row (visit_mixed)
    static constexpr std::size_t bottleneck = Bottleneck;
    static constexpr AdapterActivation activation_kind = Act;

    /// Build the wrapped module from its constructor arguments (or from a module).
    template <class... Args>
        requires std::constructible_from<Inner, Args...> &&
                 (sizeof...(Args) != 1 || (!std::same_as<std::remove_cvref_t<Args>, AdapterModule> && ...))
    explicit AdapterModule(Args&&... args)
        : Base(std::in_place, std::forward<Args>(args)...),
          width_(Base::checked_width(inner_.out_features(), detail::concat("Adapter<", Bottleneck, ">"))),
          down_weight("down.weight", Role::adapter, Shape{Bottleneck, width_}),
          down_bias("down.bias", Role::adapter, Shape{Bottleneck}),
          up_weight("up.weight", Role::adapter, Shape{width_, Bottleneck}),
          up_bias("up.bias", Role::adapter, Shape{width_}) {
        reset_adapter(default_rng());
        this->set_path("");
    }

private:
    using Base::inner_;
    using Base::input_grad_;
    using Base::path_;
    std::size_t width_;

public:
    Parameter<Scalar, Device> down_weight;  ///< D, [r, d]
    Parameter<Scalar, Device> down_bias;    ///< b_d, [r]
    Parameter<Scalar, Device> up_weight;    ///< U, [d, r], zero at the start
    Parameter<Scalar, Device> up_bias;      ///< b_u, [d], zero at the start

    [[nodiscard]] std::size_t out_features() const noexcept { return width_; }

    /// Re-draws the wrapped module, then restarts the adapter as the identity.
    void reset_parameters(Rng& rng) {
        inner_.reset_parameters(rng);
        reset_adapter(rng);
    }

    const Tensor<Scalar, Device>& forward(const Tensor<Scalar, Device>& x) {
        const Tensor<Scalar, Device>& h = inner_.forward(x);
        check_cols(h, width_, path_, "adapter input (the wrapped module's output)");
        h_ = h;  // the wrapped module's output buffer: valid until its next forward
        if constexpr (std::is_same_v<Device, Cuda>) {
            // The fused kernel (kernels/adapter.cuh): the same math, one launch, z kept for backward.
            // In a mixed-task batch: one launch over all rows, each with its task's D, b_d, U, b_u.
            const MixedBatch<Scalar, Device>* mb = mixed_ =
                mixed_batch_for<Scalar, Device>(down_weight, down_bias, up_weight, up_bias);
            if (mb == nullptr)
                cuda::adapter_forward(h, down_weight.value, down_bias.value, up_weight.value, up_bias.value,
                                      Act == AdapterActivation::gelu, y_, z_, path_);
            else
                cuda::adapter_forward(h, mb->stacked(down_weight), mb->stacked(down_bias), mb->stacked(up_weight),
                                      mb->stacked(up_bias), Act == AdapterActivation::gelu, y_, z_, path_,
                                      mb->task_rows(h, path_, "adapter input"));
            return y_;
        } else {
            return cpu_forward(h);
        }
    }

    const Tensor<Scalar, Device>& backward(const Tensor<Scalar, Device>& dy) {
        check_same_shape(dy, y_.shape(), path_, "adapter output gradient");
        if constexpr (std::is_same_v<Device, Cuda>) {
            const bool through_inner = this->through_inner();
            const auto& h = h_.get(y_.shape(), path_, "wrapped module's output");
            const MixedBatch<Scalar, Device>* mb = mixed_batch_for_backward(mixed_, path_);
            if (mb == nullptr) {
                auto grad_of = [](auto& p) { return p.wants_grad() ? &p.grad : nullptr; };
                cuda::adapter_backward(h, dy, down_weight.value, up_weight.value, Act == AdapterActivation::gelu, z_,
                                       through_inner ? &dh_ : nullptr, grad_of(down_weight), grad_of(down_bias),
                                       grad_of(up_weight), grad_of(up_bias), path_);
            } else {  // per-row tasks: the gradients go to the stacked per-task gradients (the model adds them up)
                cuda::adapter_backward(h, dy, mb->stacked(down_weight), mb->stacked(up_weight),
                                       Act == AdapterActivation::gelu, z_, through_inner ? &dh_ : nullptr,
                                       mb->stacked_grad(down_weight), mb->stacked_grad(down_bias),
                                       mb->stacked_grad(up_weight), mb->stacked_grad(up_bias), path_,
                                       mb->task_rows(dy, path_, "adapter output gradient"));
            }
            if (!through_inner) return empty_;
            return wrapped_backward(inner_, dh_, input_grad_, empty_);
        } else {
            return cpu_backward(dy);
        }
    }

private:
    const Tensor<Scalar>& cpu_forward(const Tensor<Scalar>& h) {
        using T = Scalar;
        z_.resize(h.shape().with_back(Bottleneck));
        a_.resize(z_.shape());
        y_ = h;
        const MixedBatch<T>* mb = mixed_ = mixed_batch_for<T>(down_weight, down_bias, up_weight, up_bias);
        for_each_segment(mb, h, path_, "adapter input", [&](int task, std::size_t r0, std::size_t n) {
            const Eigen::Index first = Eigen::Index(r0), rows = Eigen::Index(n);
            auto z = z_.matrix().middleRows(first, rows);
            ops::gemm_nt(h.matrix().middleRows(first, rows), mixed_use(mb, down_weight, task).value.matrix(), z,
                         T(1), T(0));
            z.rowwise() += mixed_use(mb, down_bias, task).value.vector().transpose();
            const std::size_t r = Bottleneck;
            for (std::size_t i = r0 * r, end = (r0 + n) * r; i < end; ++i) a_[i] = Function::value(z_[i]);
            auto y = y_.matrix().middleRows(first, rows);
            ops::gemm_nt(a_.matrix().middleRows(first, rows), mixed_use(mb, up_weight, task).value.matrix(), y, T(1),
                         T(1));
            y.rowwise() += mixed_use(mb, up_bias, task).value.vector().transpose();
        });
        return y_;
    }

    const Tensor<Scalar>& cpu_backward(const Tensor<Scalar>& dy) {
        using T = Scalar;
        // Per segment of a mixed batch, with that segment's task's D, b_d, U, b_u (derivation at the top of
        // this file); one segment of all rows otherwise.
        const MixedBatch<T>* mb = mixed_batch_for_backward(mixed_, path_);
        const bool through_inner = this->through_inner();
        if (through_inner) dh_ = dy;
        for_each_segment(mb, dy, path_, "adapter output gradient", [&](int task, std::size_t r0, std::size_t n) {
            const Eigen::Index first = Eigen::Index(r0), rows = Eigen::Index(n);
            Parameter<T>& dw = mixed_use(mb, down_weight, task);
            Parameter<T>& db = mixed_use(mb, down_bias, task);
            Parameter<T>& uw = mixed_use(mb, up_weight, task);
            Parameter<T>& ub = mixed_use(mb, up_bias, task);
            const auto g = dy.matrix().middleRows(first, rows);
            if (uw.wants_grad()) ops::gemm_tn(g, a_.matrix().middleRows(first, rows), uw.grad.matrix(), T(1), T(1));
            if (ub.wants_grad()) ub.grad.vector() += g.colwise().sum().transpose();
            if (!(through_inner || dw.wants_grad() || db.wants_grad())) return;
            dz_.resize(z_.shape());
            auto dz = dz_.matrix().middleRows(first, rows);
            ops::gemm_nn(g, uw.value.matrix(), dz, T(1), T(0));  // g U
            const std::size_t r = Bottleneck;
            for (std::size_t i = r0 * r, end = (r0 + n) * r; i < end; ++i)
                dz_[i] = Function::grad(dz_[i], z_[i], a_[i]);
            if (dw.wants_grad())
                ops::gemm_tn(dz,
                             h_.get(y_.shape(), path_, "wrapped module's output").matrix().middleRows(first, rows),
                             dw.grad.matrix(), T(1), T(1));
            if (db.wants_grad()) db.grad.vector() += dz.colwise().sum().transpose();
            if (through_inner)
                ops::gemm_nn(dz, dw.value.matrix(), dh_.matrix().middleRows(first, rows), T(1), T(1));  // g + dz D
        });
        if (!through_inner) return empty_;
        return wrapped_backward(inner_, dh_, input_grad_, empty_);
    }

public:
    /// The adapter's own parameters (see InjectionModule::visit).
    template <class F>
    void visit_own(F&& f) {
        f(down_weight);
        f(down_bias);
        f(up_weight);
        f(up_bias);
    }

private:
    void reset_adapter(Rng& rng) {
        // Kaiming-uniform with the ReLU gain for D; U and b_u zero, so y = h.
        init::on_host(down_weight.value, [&](Tensor<Scalar>& w) { init::kaiming_uniform(w, rng, width_); });
        down_bias.value.zero();
        up_weight.value.zero();
        up_bias.value.zero();
    }

    Saved<Scalar, Device> h_;  ///< the wrapped module's last output (owned by it)
    const MixedBatch<Scalar, Device>* mixed_ = nullptr;  ///< the mixed batch of the last forward, if it was one
    Tensor<compute_t<Scalar>, Device> z_;  ///< the saved bottleneck pre-activation (fp32 for bf16)
    Tensor<Scalar, Device> a_, y_, dz_, dh_, empty_;
};

/// Injection policy: a residual bottleneck adapter of width Bottleneck after the module.
template <std::size_t Bottleneck, AdapterActivation Act = AdapterActivation::relu>
struct Adapter {
    static constexpr PolicyKind policy_kind = PolicyKind::inject;
    static constexpr const char* name() { return "Adapter"; }
    static constexpr bool on_device = true;  ///< its module also runs with Device = Cuda (fused kernels)
    static constexpr std::size_t bottleneck = Bottleneck;
    static constexpr AdapterActivation activation_kind = Act;
    template <class Inner>
    using module = AdapterModule<Inner, Bottleneck, Act>;
};

}  // namespace patchwork
