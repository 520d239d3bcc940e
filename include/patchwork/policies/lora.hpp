#pragma once
// LoRA<r, alpha>: a low-rank update of a Linear layer (Hu et al., 2021).
// With W: [out, in] and b frozen (unless a selection policy says otherwise):
//   y = x W^T + b + s (x A^T) B^T,   A: [r, in], B: [out, r], s = alpha / r
// i.e. the effective weight is W + s B A, a rank-r change. A is
// Kaiming-uniform and B zero, so a fresh LoRA layer is the identity
// (y = x W^T + b exactly). s can be changed at run time (set_scale).
//
// Backward. With g = dL/dy [N, out] and u = x A^T [N, r] (kept by forward):
//   dL/dB = s g^T u                  ->  dB += s g^T (x A^T)     [out, r]
//   dL/du = s g B                                                [N, r]
//   dL/dA = (dL/du)^T x              ->  dA += s (g B)^T x       [r, in]
//   dL/dx = g W + s (g B) A          (the Linear's own dX plus the low-rank path)
// W and b gradients, when they train, come from the Linear's own backward.
//
// merge() folds the update into the weight, W <- W + s B A, after which
// forward is a plain Linear (no extra cost at inference); unmerge() undoes it,
// W <- W - s B A. Training needs the unmerged form: backward while merged
// throws. Trainable parameters added: r (in + out).
//
// Mixed-task batches (core/mixed_batch.hpp). When A or B is per task,
// the rows of task k (a contiguous segment S_k) use A^k, B^k: with x_k, g_k,
// u_k = x_k A^k^T the rows of S_k,
//   y_k = x_k W^T + b + s u_k B^k^T
// and since rows never interact the sums over rows above split by segment:
//   dB^k += s g_k^T u_k,   dA^k += s (g_k B^k)^T x_k,
//   dL/dx_k = g_k W + s (g_k B^k) A^k
// (the Linear's own part, g W and the gradients of W and b, runs once over
// all rows). A merged update cannot be per row: a merged module does not
// take part (visit_mixed lists nothing), so a multi-task model falls back to
// one pass per task, and a mixed forward through a merged module whose
// factors are per task throws.
#include <concepts>
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>

#include "patchwork/core/module.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/core/mixed_batch.hpp"
#include "patchwork/ops/gemm.hpp"
#include "patchwork/policies/injection.hpp"
#include "patchwork/policies/policy.hpp"

namespace patchwork {

template <class Inner, std::size_t Rank, std::size_t Alpha = Rank>
class LoRAModule;

namespace detail {
template <class M>
inline constexpr bool lora_applies = false;
template <class T, class D>
inline constexpr bool lora_applies<BasicLinear<T, D>> = true;

/// A block that names its own LoRA targets: Inner::with_lora<r, a> is the
/// block with LoRA on them (BertLayer: query and value).
template <class M, std::size_t Rank, std::size_t Alpha>
concept NamesLoRATargets = requires { typename M::template with_lora<Rank, Alpha>; };

/// What LoRA<r, a> builds around M: LoRAModule for a Linear, the block's own
/// variant for a block that names its targets.
template <class M, std::size_t Rank, std::size_t Alpha>
struct lora_module {
    using type = LoRAModule<M, Rank, Alpha>;
};
template <class M, std::size_t Rank, std::size_t Alpha>
    requires(!lora_applies<M> && NamesLoRATargets<M, Rank, Alpha>)
struct lora_module<M, Rank, Alpha> {
    using type = typename M::template with_lora<Rank, Alpha>;
};

// The low-rank path on the CPU, over any rows of a batch (Eigen matrix blocks),
// shared by LoRAModule and the search's LoRA branch (search/branches.hpp).
// Derivation at the top of this file.

/// u = x A^T, then y += s u B^T (y holds the base output).
template <class T, class X, class U, class Y>
void lora_forward_rows(const X& x, const Tensor<T>& a, const Tensor<T>& b, T s, U&& u, Y&& y) {
    ops::gemm_nt(x, a.matrix(), u, T(1), T(0));
    ops::gemm_nt(u, b.matrix(), y, s, T(1));
}

/// dB += s g^T u and, when A trains or `need_gb`, gb = g B and dA += s gb^T x.
/// Returns whether gb was computed.
template <class T, class G, class U, class X, class GB>
bool lora_factor_grads_rows(const G& g, const U& u, const X& x, Parameter<T>& a, Parameter<T>& b, T s, GB&& gb,
                            bool need_gb) {
    if (b.wants_grad()) ops::gemm_tn(g, u, b.grad.matrix(), s, T(1));
    if (!(a.wants_grad() || need_gb)) return false;
    ops::gemm_nn(g, b.value.matrix(), gb, T(1), T(0));
    if (a.wants_grad()) ops::gemm_tn(gb, x, a.grad.matrix(), s, T(1));
    return true;
}

/// dx = beta dx + s gb A: the low-rank path's part of the input gradient.
template <class T, class GB, class DX>
void lora_input_grad_rows(const GB& gb, const Tensor<T>& a, T s, DX&& dx, T beta) {
    ops::gemm_nn(gb, a.matrix(), dx, s, beta);
}
}  // namespace detail

/// A Linear layer with a trainable rank-Rank update scaled by Alpha / Rank.
template <class Inner, std::size_t Rank, std::size_t Alpha>
class LoRAModule : public InjectionModule<LoRAModule<Inner, Rank, Alpha>, Inner> {
    using Base = InjectionModule<LoRAModule, Inner>;
    static_assert(detail::lora_applies<Inner>,
                  "patchwork::LoRA<r> applies only to a Linear layer (or a block that names its LoRA targets, as "
                  "BertLayer does); to use LoRA in another block, tune each of its Linear layers: "
                  "Sequential<Tune<Linear, LoRA<8>>, Relu, ...>");
    static_assert(Rank > 0, "patchwork::LoRA<r>: the rank r must be positive");

public:
    using Scalar = typename Inner::Scalar;
    using Device = device_of_t<Inner>;
    static constexpr const char* own_name = "lora";  ///< the factors read "<path>.lora.a" and "<path>.lora.b"
    static constexpr std::size_t rank = Rank;
    static constexpr std::size_t alpha = Alpha;

    /// Build the Linear from its constructor arguments (in, out[, bias]) or from a Linear.
    template <class... Args>
        requires std::constructible_from<Inner, Args...> &&
                 (sizeof...(Args) != 1 || (!std::same_as<std::remove_cvref_t<Args>, LoRAModule> && ...))
    explicit LoRAModule(Args&&... args)
        : Base(std::in_place, std::forward<Args>(args)...), a("a", Role::lora, Shape{Rank, inner_.in_features()}),
          b("b", Role::lora, Shape{inner_.out_features(), Rank}) {
        reset_lora(default_rng());
        this->set_path("");
    }

private:
    using Base::inner_;
    using Base::input_grad_;
    using Base::path_;
    Scalar scale_ = Scalar(double(Alpha) / double(Rank));
    bool merged_ = false;

public:
    Parameter<Scalar, Device> a;  ///< A, [r, in]
    Parameter<Scalar, Device> b;  ///< B, [out, r], zero at the start

    [[nodiscard]] std::size_t in_features() const noexcept { return inner_.in_features(); }
    [[nodiscard]] std::size_t out_features() const noexcept { return inner_.out_features(); }

    /// s in y = x W^T + b + s (x A^T) B^T; alpha / r unless set.
    [[nodiscard]] Scalar scale() const noexcept { return scale_; }
    void set_scale(Scalar s) {
        if (merged_)
            throw Error(detail::concat(detail::display_path(path_),
                                       ": cannot change the LoRA scale while the update is merged; call unmerge() "
                                       "first"));
        scale_ = s;
    }

    /// True between merge() and unmerge(): W holds W + s B A.
    [[nodiscard]] bool merged() const noexcept { return merged_; }
    /// W <- W + s B A; forward then skips the low-rank path. No-op when already merged.
    void merge() {
        if (merged_) return;
        add_update(scale_);
        merged_ = true;
        y_.resize(Shape{});  // the cached forward no longer matches
    }
    /// W <- W - s B A, restoring the pre-trained weight (up to rounding). No-op when not merged.
    void unmerge() {
        if (!merged_) return;
        add_update(Scalar(-scale_));
        merged_ = false;
        y_.resize(Shape{});
    }

    /// Re-draws the Linear, then restarts the update at zero (and unmerged).
    void reset_parameters(Rng& rng) {
        inner_.reset_parameters(rng);
        merged_ = false;
        y_.resize(Shape{});
        reset_lora(rng);
    }

    const Tensor<Scalar, Device>& forward(const Tensor<Scalar, Device>& x) {
        if constexpr (std::is_same_v<Device, Cuda>) {
            // The fused low-rank kernel (kernels/multitask.cuh, one task): y = base + s (x A^T) B^T.
            const MixedBatch<Scalar, Device>* mb = mixed_ = mixed_batch_for<Scalar, Device>(a, b);
            if (merged_ && mb != nullptr) throw_merged_mixed();
            const Tensor<Scalar, Device>& base = inner_.forward(x);
            if (merged_) return base;
            if (mb == nullptr)
                cuda::lora_forward(inner_.last_input(), base, a.value, b.value, double(scale_), y_, u_, path_);
            else  // one launch over all rows of a mixed-task batch, each with its task's A, B
                cuda::lora_forward(inner_.last_input(), base, mb->stacked(a), mb->stacked(b), double(scale_), y_, u_,
                                   path_, mb->task_rows(inner_.last_input(), path_, "lora input"));
            return y_;
        } else {
            return cpu_forward(x);
        }
    }

    const Tensor<Scalar, Device>& backward(const Tensor<Scalar, Device>& dy) {
        if (merged_)
            throw Error(detail::concat(detail::display_path(path_),
                                       ": LoRA backward while the update is merged into the weight; call unmerge() "
                                       "before training"));
        check_same_shape(dy, y_.shape(), path_, "lora output gradient");
        if constexpr (std::is_same_v<Device, Cuda>) {
            const MixedBatch<Scalar, Device>* mb = mixed_batch_for_backward(mixed_, path_);
            inner_.set_input_grad(input_grad_);
            const Tensor<Scalar, Device>& base_dx = inner_.backward(dy);
            if (mb == nullptr)
                cuda::lora_backward(inner_.last_input(), dy, input_grad_ ? base_dx : empty_, a.value, b.value,
                                    double(scale_), u_, input_grad_ ? &dx_ : nullptr,
                                    a.wants_grad() ? &a.grad : nullptr, b.wants_grad() ? &b.grad : nullptr, path_);
            else  // per-row tasks: the gradients go to the stacked per-task gradients (the model adds them up)
                cuda::lora_backward(inner_.last_input(), dy, input_grad_ ? base_dx : empty_, mb->stacked(a),
                                    mb->stacked(b), double(scale_), u_, input_grad_ ? &dx_ : nullptr,
                                    mb->stacked_grad(a), mb->stacked_grad(b), path_,
                                    mb->task_rows(dy, path_, "lora output gradient"));
            return input_grad_ ? dx_ : empty_;
        } else {
            return cpu_backward(dy);
        }
    }

    /// f(p) for each parameter this module can take per row in a mixed-task batch (see MixedBatch);
    /// none while merged.
    template <class F>
    void visit_mixed(F&& f) {
        if (merged_) return;
        f(a);
        f(b);
    }

private:
    [[noreturn]] void throw_merged_mixed() const {
        throw Error(detail::concat(detail::display_path(path_),
                                   ": a mixed-task batch needs the per-task LoRA factors unmerged; call unmerge() "
                                   "first"));
    }

    /// W += c B A.
    void add_update(Scalar c) {
        if constexpr (std::is_same_v<Device, Cuda>)
            cuda::gemm(false, false, c, b.value, a.value, Scalar(1), inner_.weight.value, path_);
        else
            ops::gemm_nn(b.value.matrix(), a.value.matrix(), inner_.weight.value.matrix(), c, Scalar(1));
    }

    const Tensor<Scalar>& cpu_forward(const Tensor<Scalar>& x) {
        using T = Scalar;
        const MixedBatch<T>* mb = mixed_ = mixed_batch_for<T>(a, b);
        if (merged_ && mb != nullptr) throw_merged_mixed();
        const Tensor<T>& base = inner_.forward(x);
        if (merged_) return base;
        const Tensor<T>& in = inner_.last_input();
        u_.resize(in.shape().with_back(Rank));
        y_ = base;
        for_each_segment(mb, in, path_, "lora input", [&](int task, std::size_t r0, std::size_t n) {
            const Eigen::Index first = Eigen::Index(r0), rows = Eigen::Index(n);
            detail::lora_forward_rows(in.matrix().middleRows(first, rows), mixed_use(mb, a, task).value,
                                      mixed_use(mb, b, task).value, scale_, u_.matrix().middleRows(first, rows),
                                      y_.matrix().middleRows(first, rows));
        });
        return y_;
    }

    const Tensor<Scalar>& cpu_backward(const Tensor<Scalar>& dy) {
        using T = Scalar;
        // Per segment of a mixed batch, with that segment's task's A, B (derivation at the top of this file);
        // one segment of all rows otherwise.
        const MixedBatch<T>* mb = mixed_batch_for_backward(mixed_, path_);
        gb_.resize(u_.shape());
        for_each_segment(mb, dy, path_, "lora output gradient", [&](int task, std::size_t r0, std::size_t n) {
            const Eigen::Index first = Eigen::Index(r0), rows = Eigen::Index(n);
            Parameter<T>& ap = mixed_use(mb, a, task);
            Parameter<T>& bp = mixed_use(mb, b, task);
            detail::lora_factor_grads_rows(dy.matrix().middleRows(first, rows), u_.matrix().middleRows(first, rows),
                                           inner_.last_input().matrix().middleRows(first, rows), ap, bp, scale_,
                                           gb_.matrix().middleRows(first, rows), input_grad_);
        });
        inner_.set_input_grad(input_grad_);
        const Tensor<T>& base_dx = inner_.backward(dy);
        if (!input_grad_) return empty_;
        dx_ = base_dx;
        for_each_segment(mb, dx_, path_, "lora input gradient", [&](int task, std::size_t r0, std::size_t n) {
            const Eigen::Index first = Eigen::Index(r0), rows = Eigen::Index(n);
            detail::lora_input_grad_rows(gb_.matrix().middleRows(first, rows), mixed_use(mb, a, task).value, scale_,
                                         dx_.matrix().middleRows(first, rows), T(1));  // + s (g B) A
        });
        return dx_;
    }

public:
    /// The factors (see InjectionModule::visit).
    template <class F>
    void visit_own(F&& f) {
        f(a);
        f(b);
    }

private:
    void reset_lora(Rng& rng) {
        // Kaiming-uniform with gain 1 for A (as for the Linear's own weight); B zero, so s B A = 0.
        init::on_host(a.value, [&](Tensor<Scalar>& w) { init::kaiming_uniform(w, rng, inner_.in_features(), 1.0); });
        b.value.zero();
    }

    const MixedBatch<Scalar, Device>* mixed_ = nullptr;  ///< the mixed batch of the last forward, if it was one
    Tensor<compute_t<Scalar>, Device> u_;  ///< the saved projection x A^T (fp32 for bf16)
    Tensor<Scalar, Device> y_, gb_, dx_, empty_;
};

/// Injection policy: a rank-Rank update of a Linear, scaled by Alpha / Rank.
template <std::size_t Rank, std::size_t Alpha = Rank>
struct LoRA {
    static constexpr PolicyKind policy_kind = PolicyKind::inject;
    static constexpr const char* name() { return "LoRA"; }
    static constexpr bool on_device = true;  ///< its module also runs with Device = Cuda (fused kernels)
    static constexpr std::size_t rank = Rank;
    static constexpr std::size_t alpha = Alpha;
    /// LoRAModule around a Linear; for a block that names its LoRA targets
    /// (Inner::with_lora, e.g. BertLayer: query and value), that block with LoRA on them.
    template <class Inner>
    using module = typename detail::lora_module<Inner, Rank, Alpha>::type;
};

}  // namespace patchwork
