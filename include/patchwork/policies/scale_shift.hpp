#pragma once
// ScaleShift: a per-channel affine patch on a module's output (the
// scale-and-bias patch of "K for the price of 1", for modules without a norm
// layer of their own). With h = M(x), rows of width d:
//   y_nc = h_nc s_c + t_c,     s, t: [d],  s = 1 and t = 0 at the start
// so a fresh patch is the identity (y = M(x) exactly).
//
// Backward. With g = dL/dy:
//   dL/ds_c = sum_n g_nc h_nc    ->  ds += 1^T (g * h)      [d]
//   dL/dt_c = sum_n g_nc         ->  dt += 1^T g            [d]
//   dL/dh_nc = g_nc s_c                                     [N, d]
//   dL/dx = M.backward(dL/dh)
// M's backward runs only when M holds a trainable parameter or the input
// gradient is wanted. Trainable parameters added: 2 d.
//
// Mixed-task batches (core/mixed_batch.hpp). When s or t is per task,
// the rows of task k (one contiguous segment S_k of rows) use that task's
// s^k, t^k: y_nc = h_nc s^k_c + t^k_c for n in S_k. Each row depends on one
// task's parameters only, so the sums above split by segment:
//   dL/ds^k_c = sum_{n in S_k} g_nc h_nc,   dL/dt^k_c = sum_{n in S_k} g_nc,
//   dL/dh_nc  = g_nc s^k_c                  (n in S_k)
// i.e. each segment's column sums go to its own task's gradients (to the
// shared s, t when they are not per task, which then sum over all rows).
#include <concepts>
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>

#include "patchwork/core/module.hpp"
#include "patchwork/ops/cuda_ops.hpp"
#include "patchwork/core/mixed_batch.hpp"
#include "patchwork/policies/injection.hpp"
#include "patchwork/policies/policy.hpp"

namespace patchwork {

/// Module M followed by a trainable per-channel scale and shift.
template <class Inner>
class ScaleShiftModule : public InjectionModule<ScaleShiftModule<Inner>, Inner> {
    using Base = InjectionModule<ScaleShiftModule, Inner>;
    static_assert(Module<Inner>, "patchwork::ScaleShift: the wrapped type must satisfy patchwork::Module");
    static_assert(Inner::fixed_width,
                  "patchwork::ScaleShift needs a module whose output width is known (a Linear, a LayerNorm, or a "
                  "block containing one); an activation alone has none");

public:
    using Scalar = typename Inner::Scalar;
    using Device = device_of_t<Inner>;
    static constexpr const char* own_name = "scale_shift";  ///< parameters read "<path>.scale_shift.scale", ".shift"
    static constexpr bool mixed_rows = true;                 ///< applies per-task parameters per row (visit_mixed)

    /// Build the wrapped module from its constructor arguments (or from a module).
    template <class... Args>
        requires std::constructible_from<Inner, Args...> &&
                 (sizeof...(Args) != 1 || (!std::same_as<std::remove_cvref_t<Args>, ScaleShiftModule> && ...))
    explicit ScaleShiftModule(Args&&... args)
        : Base(std::in_place, std::forward<Args>(args)...),
          width_(Base::checked_width(inner_.out_features(), "ScaleShift")),
          scale("scale", Role::scale_shift, Shape{width_}), shift("shift", Role::scale_shift, Shape{width_}) {
        reset_patch();
        this->set_path("");
    }

private:
    using Base::inner_;
    using Base::input_grad_;
    using Base::path_;
    std::size_t width_;

public:
    Parameter<Scalar, Device> scale;  ///< s, [d], one at the start
    Parameter<Scalar, Device> shift;  ///< t, [d], zero at the start

    [[nodiscard]] std::size_t out_features() const noexcept { return width_; }

    /// Re-draws the wrapped module, then restarts the patch as the identity.
    void reset_parameters(Rng& rng) {
        inner_.reset_parameters(rng);
        reset_patch();
    }

    const Tensor<Scalar, Device>& forward(const Tensor<Scalar, Device>& x) {
        const Tensor<Scalar, Device>& h = inner_.forward(x);
        check_cols(h, width_, path_, "scale_shift input (the wrapped module's output)");
        h_ = h;  // the wrapped module's output buffer: valid until its next forward
        if constexpr (std::is_same_v<Device, Cuda>) {
            // kernels/scale_shift.cuh; in a mixed-task batch one launch over all rows, each with its task's s, t.
            const MixedBatch<Scalar, Device>* mb = mixed_ = mixed_batch_for<Scalar, Device>(scale, shift);
            if (mb == nullptr)
                cuda::scale_shift_forward(h, scale.value, shift.value, y_, path_);
            else
                cuda::scale_shift_forward(h, mb->stacked(scale), mb->stacked(shift), y_, path_,
                                          mb->task_rows(h, path_, "scale_shift input"));
            return y_;
        } else {
            return cpu_forward(h);
        }
    }

    const Tensor<Scalar, Device>& backward(const Tensor<Scalar, Device>& dy) {
        check_same_shape(dy, y_.shape(), path_, "scale_shift output gradient");
        if constexpr (std::is_same_v<Device, Cuda>) {
            const bool through_inner = this->through_inner();
            const auto& h = h_.get(y_.shape(), path_, "wrapped module's output");
            const MixedBatch<Scalar, Device>* mb = mixed_batch_for_backward(mixed_, path_);
            if (mb == nullptr)
                cuda::scale_shift_backward(h, dy, scale.value, through_inner ? &dh_ : nullptr,
                                           scale.wants_grad() ? &scale.grad : nullptr,
                                           shift.wants_grad() ? &shift.grad : nullptr, path_);
            else  // per-row tasks: the gradients go to the stacked per-task gradients (the model adds them up)
                cuda::scale_shift_backward(h, dy, mb->stacked(scale), through_inner ? &dh_ : nullptr,
                                           mb->stacked_grad(scale), mb->stacked_grad(shift), path_,
                                           mb->task_rows(dy, path_, "scale_shift output gradient"));
            if (!through_inner) return empty_;
            return wrapped_backward(inner_, dh_, input_grad_, empty_);
        } else {
            return cpu_backward(dy);
        }
    }

private:
    const Tensor<Scalar>& cpu_forward(const Tensor<Scalar>& h) {
        using T = Scalar;
        y_.resize(h.shape());
        const std::size_t d = width_;
        const MixedBatch<T>* mb = mixed_ = mixed_batch_for<T>(scale, shift);
        for_each_segment(mb, h, path_, "scale_shift input", [&](int task, std::size_t r0, std::size_t n) {
            const T* s = mixed_use(mb, scale, task).value.data();
            const T* t = mixed_use(mb, shift, task).value.data();
            for_rows(n, d, [&](std::size_t i) {
                const std::size_t r = r0 + i;
                const T* __restrict hr = h.data() + r * d;
                T* __restrict yr = y_.data() + r * d;
                for (std::size_t c = 0; c < d; ++c) yr[c] = hr[c] * s[c] + t[c];
            });
        });
        return y_;
    }

    const Tensor<Scalar>& cpu_backward(const Tensor<Scalar>& dy) {
        using T = Scalar;
        // Per segment of a mixed batch, with that segment's task's s, t (derivation at the top of this file).
        const MixedBatch<T>* mb = mixed_batch_for_backward(mixed_, path_);
        const bool through_inner = this->through_inner();
        if (through_inner) dh_.resize(dy.shape());
        const std::size_t d = width_;
        for_each_segment(mb, dy, path_, "scale_shift output gradient", [&](int task, std::size_t r0, std::size_t n) {
            Parameter<T>& sp = mixed_use(mb, scale, task);
            Parameter<T>& tp = mixed_use(mb, shift, task);
            const auto g = dy.matrix().middleRows(Eigen::Index(r0), Eigen::Index(n));
            if (sp.wants_grad())
                sp.grad.vector() += (g.array() * h_.get(y_.shape(), path_, "wrapped module's output")
                                                     .matrix()
                                                     .middleRows(Eigen::Index(r0), Eigen::Index(n))
                                                     .array())
                                        .colwise()
                                        .sum()
                                        .matrix()
                                        .transpose();
            if (tp.wants_grad()) tp.grad.vector() += g.colwise().sum().transpose();
            if (!through_inner) return;
            const T* s = sp.value.data();
            for_rows(n, d, [&](std::size_t i) {
                const std::size_t r = r0 + i;
                const T* __restrict gr = dy.data() + r * d;
                T* __restrict out = dh_.data() + r * d;
                for (std::size_t c = 0; c < d; ++c) out[c] = gr[c] * s[c];
            });
        });
        if (!through_inner) return empty_;
        return wrapped_backward(inner_, dh_, input_grad_, empty_);
    }

public:
    /// The patch's own parameters (see InjectionModule::visit).
    template <class F>
    void visit_own(F&& f) {
        f(scale);
        f(shift);
    }

private:
    void reset_patch() {
        scale.value.fill(Scalar(1));
        shift.value.zero();
    }

    Saved<Scalar, Device> h_;  ///< the wrapped module's last output (owned by it)
    const MixedBatch<Scalar, Device>* mixed_ = nullptr;  ///< the mixed batch of the last forward, if it was one
    Tensor<Scalar, Device> y_, dh_, empty_;
};

/// Injection policy: a trainable per-channel scale and shift after the module.
struct ScaleShift {
    static constexpr PolicyKind policy_kind = PolicyKind::inject;
    static constexpr const char* name() { return "ScaleShift"; }
    static constexpr bool on_device = true;  ///< its module also runs with Device = Cuda (fused kernels)
    template <class Inner>
    using module = ScaleShiftModule<Inner>;
};

}  // namespace patchwork
