#pragma once
// The branches of a searched module (search/search_module.hpp): how each candidate
// policy is realised, given the frozen base output h = base(x) that the
// module computes once.
//
//   Frozen                      o = h                         FrozenBranch
//   Adapter<r>, ScaleShift      o = P(h): the injection       HeadBranch
//                               policy around an Identity
//   LoRA<r, a> on a Linear      o = h + s (x A^T) B^T         LoraBranch (the LoRA math of policies/lora.hpp)
//   FineTune, BiasOnly,         o = copy(x): a trainable      CopyBranch
//   NormPatch (selection)       copy of the base
//   LoRA<r, a> on a block that  o = copy(x): the block with   CopyBranch (Tune<Inner, LoRA<r, a>> built
//   names its LoRA targets      LoRA on them, base frozen     from the base, e.g. BertLayer: query, value)
//
// Each branch's backward takes G_k = g_k dL/dy and adds its part to dL/dh (the
// shared base's output gradient) or to dL/dx directly. Every branch runs on
// the base's device (Cpu or Cuda); on the device the LoRA branch is the fused
// low-rank kernel of the LoRA policy (cuda::lora_forward / lora_backward).
#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "patchwork/core/module.hpp"
#include "patchwork/layers/identity.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/ops/cuda_ops.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/frozen.hpp"
#include "patchwork/policies/lora.hpp"
#include "patchwork/policies/policy.hpp"
#include "patchwork/policies/tune.hpp"

namespace patchwork {

namespace detail {

/// acc += g (equal shapes), on either device.
template <class T, class D>
void add_to(Tensor<T, D>& acc, const Tensor<T, D>& g, const std::string& where) {
    if constexpr (std::is_same_v<D, Cuda>) {
        cuda::axpy(T(1), g, acc, where);
    } else {
        check_same_shape(g, acc.shape(), where, "gradient to accumulate");
        acc.matrix() += g.matrix();
    }
}

template <class P>
inline constexpr bool is_lora_policy = false;
template <std::size_t R, std::size_t A>
inline constexpr bool is_lora_policy<LoRA<R, A>> = true;

template <class P>
inline constexpr bool is_adapter_policy = false;
template <std::size_t R, AdapterActivation Act>
inline constexpr bool is_adapter_policy<Adapter<R, Act>> = true;

/// "Adapter<32>", "LoRA<8, 16>", "FineTune": the policy as it is spelled in C++.
template <class P>
std::string policy_label() {
    if constexpr (is_lora_policy<P>) return concat("LoRA<", P::rank, ", ", P::alpha, ">");
    else if constexpr (is_adapter_policy<P>) {
        if constexpr (P::activation_kind == AdapterActivation::gelu)
            return concat("Adapter<", P::bottleneck, ", AdapterActivation::gelu>");
        else return concat("Adapter<", P::bottleneck, ">");
    } else return P::name();
}

/// How a candidate is realised inside a searched module.
enum class BranchKind { shared, head, lora, copy };

template <class Inner, class P>
constexpr BranchKind branch_kind() {
    if constexpr (std::is_same_v<P, Frozen>) return BranchKind::shared;
    else if constexpr (SelectionPolicy<P>) return BranchKind::copy;
    else if constexpr (is_lora_policy<P>) return lora_applies<Inner> ? BranchKind::lora : BranchKind::copy;
    else return BranchKind::head;
}

/// Whether candidate P can be realised on Inner (LoRA: a Linear, or a block
/// that names its LoRA targets).
template <class Inner, class P>
constexpr bool candidate_applies() {
    if constexpr (is_lora_policy<P>) return lora_applies<Inner> || NamesLoRATargets<Inner, P::rank, P::alpha>;
    else return true;
}

/// The candidate Frozen: the shared base output itself.
template <class Inner, class P>
class FrozenBranch {
public:
    using T = typename Inner::Scalar;
    using D = device_of_t<Inner>;
    explicit FrozenBranch(const Inner&) {}
    const Tensor<T, D>& forward(const Tensor<T, D>&, const Tensor<T, D>& h) { return h; }
    /// dL/dh += g (into dh); nothing for x.
    void backward(const Tensor<T, D>& g, Tensor<T, D>& dh, bool& dh_used, Tensor<T, D>&, bool&, bool need_dh) {
        if (need_dh) accumulate(dh, dh_used, g);
    }
    template <class F>
    void visit(F&&) {}
    void set_path(const std::string&, bool) {}
    void reset(const Inner&, Rng&) {}
    void release() {}
    static constexpr std::size_t added_parameters(const Inner&) { return 0; }

    static void accumulate(Tensor<T, D>& acc, bool& used, const Tensor<T, D>& g) {
        if (!used) {
            acc = g;
            used = true;
        } else {
            add_to(acc, g, "search branch gradient");
        }
    }
};

/// An injection candidate (Adapter, ScaleShift, ...) applied to the shared base output h.
template <class Inner, class P>
class HeadBranch {
public:
    using T = typename Inner::Scalar;
    using D = device_of_t<Inner>;
    using Head = typename P::template module<BasicIdentity<T, D>>;

    explicit HeadBranch(const Inner& base) : head_(BasicIdentity<T, D>(base.out_features())) {}
    const Tensor<T, D>& forward(const Tensor<T, D>&, const Tensor<T, D>& h) { return head_.forward(h); }
    void backward(const Tensor<T, D>& g, Tensor<T, D>& dh, bool& dh_used, Tensor<T, D>&, bool&, bool need_dh) {
        head_.set_input_grad(need_dh);
        const Tensor<T, D>& d = head_.backward(g);
        if (need_dh) FrozenBranch<Inner, P>::accumulate(dh, dh_used, d);
    }
    template <class F>
    void visit(F&& f) {
        head_.visit(f);
    }
    void set_path(const std::string& p, bool) { head_.set_path(p); }
    void reset(const Inner&, Rng& rng) { head_.reset_parameters(rng); }
    void release() {
        head_.visit([](auto& p) {
            p.set_trainable(false);
            p.value.release();
        });
    }
    [[nodiscard]] Head& head() noexcept { return head_; }

private:
    Head head_;
};

/// LoRA on a Linear base: o = h + s (x A^T) B^T, with A Kaiming-uniform and B zero (as LoRAModule).
template <class Inner, class P>
class LoraBranch {
public:
    using T = typename Inner::Scalar;
    using D = device_of_t<Inner>;
    explicit LoraBranch(const Inner& base)
        : a("a", Role::lora, Shape{P::rank, base.in_features()}), b("b", Role::lora, Shape{base.out_features(), P::rank}) {
        reset(base, default_rng());
    }
    const Tensor<T, D>& forward(const Tensor<T, D>& x, const Tensor<T, D>& h) {
        // The same low-rank path as LoRAModule (policies/lora.hpp), over all rows.
        x_ = x;
        if constexpr (std::is_same_v<D, Cuda>) {
            cuda::lora_forward(x, h, a.value, b.value, double(scale_), y_, u_, path_);
        } else {
            u_.resize(x.shape().with_back(P::rank));
            y_ = h;
            lora_forward_rows(x.matrix(), a.value, b.value, scale_, u_.matrix(), y_.matrix());
        }
        return y_;
    }
    // dB += s g^T u; dA += s (g B)^T x; dL/dh += g; dL/dx += s (g B) A.
    void backward(const Tensor<T, D>& g, Tensor<T, D>& dh, bool& dh_used, Tensor<T, D>& dx, bool& dx_used,
                  bool need_dx) {
        const Tensor<T, D>& x = x_.get(g.shape().with_back(a.value.shape()[1]), path_, "LoRA branch input");
        if constexpr (std::is_same_v<D, Cuda>) {
            // Straight into dx when it holds nothing yet, else into a buffer added to it.
            Tensor<T, D>* out = need_dx ? (dx_used ? &gb_ : &dx) : nullptr;
            cuda::lora_backward(x, g, empty_, a.value, b.value, double(scale_), u_, out,
                                a.wants_grad() ? &a.grad : nullptr, b.wants_grad() ? &b.grad : nullptr, path_);
            if (!need_dx) return;
            FrozenBranch<Inner, P>::accumulate(dh, dh_used, g);
            if (dx_used) add_to(dx, gb_, path_);
            dx_used = true;
        } else {
            gb_.resize(g.shape().with_back(P::rank));
            lora_factor_grads_rows(g.matrix(), u_.matrix(), x.matrix(), a, b, scale_, gb_.matrix(), need_dx);
            if (!need_dx) return;
            FrozenBranch<Inner, P>::accumulate(dh, dh_used, g);
            if (!dx_used) dx.resize(x.shape());
            lora_input_grad_rows(gb_.matrix(), a.value, scale_, dx.matrix(), dx_used ? T(1) : T(0));
            dx_used = true;
        }
    }
    template <class F>
    void visit(F&& f) {
        f(a);
        f(b);
    }
    void set_path(const std::string& p, bool) {
        const std::string own = p.empty() ? "lora" : p + ".lora";
        path_ = own;
        a.set_prefix(own);
        b.set_prefix(own);
    }
    void reset(const Inner& base, Rng& rng) {
        init::on_host(a.value, [&](Tensor<T>& v) { init::kaiming_uniform(v, rng, base.in_features()); });
        b.value.zero();
    }
    void release() {
        for (auto* p : {&a, &b}) {
            p->set_trainable(false);
            p->value.release();
        }
    }

    Parameter<T, D> a, b;

private:
    T scale_ = T(double(P::alpha) / double(P::rank));
    std::string path_ = "lora";
    Saved<T, D> x_;
    Tensor<compute_t<T>, D> u_;  ///< x A^T, kept in fp32 for bf16 (as LoRAModule)
    Tensor<T, D> y_, gb_, empty_;
};

/// A selection candidate (FineTune, BiasOnly, NormPatch): its own copy of the
/// base, initialised from the pre-trained weights; the policy picks what trains.
/// Also LoRA on a block that names its LoRA targets: the block rebuilt with
/// LoRA on them from the base, its pre-trained weights frozen.
template <class Inner, class P>
class CopyBranch {
public:
    using T = typename Inner::Scalar;
    using D = device_of_t<Inner>;
    explicit CopyBranch(const Inner& base) : copy_(base) {}
    const Tensor<T, D>& forward(const Tensor<T, D>& x, const Tensor<T, D>&) { return copy_.forward(x); }
    void backward(const Tensor<T, D>& g, Tensor<T, D>&, bool&, Tensor<T, D>& dx, bool& dx_used, bool need_dx) {
        copy_.set_input_grad(need_dx);
        const Tensor<T, D>& d = copy_.backward(g);
        if (need_dx) FrozenBranch<Inner, P>::accumulate(dx, dx_used, d);
    }
    template <class F>
    void visit(F&& f) {
        copy_.visit(f);
    }
    void set_path(const std::string& p, bool) { copy_.set_path(p); }
    /// Re-copies the pre-trained weights (keeping which parameters train); what
    /// the candidate injects (LoRA factors) is drawn afresh.
    void reset(const Inner& base, Rng& rng) {
        if constexpr (injects) copy_.reset_parameters(rng);
        sync(base);
    }
    /// Copies the base's values into the copy's pre-trained parameters (those no
    /// policy injected; both visit them in the same order).
    void sync(const Inner& base) {
        std::vector<const Tensor<T, D>*> src;
        const_cast<Inner&>(base).visit([&](auto& p) { src.push_back(&p.value); });
        std::size_t i = 0;
        copy_.visit([&](auto& p) {
            if (!is_injected(p.role())) p.value = *src[i++];
        });
    }
    void release() {
        copy_.visit([](auto& p) {
            p.set_trainable(false);
            p.value.release();
        });
    }
    [[nodiscard]] Tune<Inner, P>& module() noexcept { return copy_; }

private:
    static constexpr bool injects = InjectionPolicy<P>;
    Tune<Inner, P> copy_;
};

template <class Inner, class P>
struct branch_for {
    static constexpr BranchKind kind = branch_kind<Inner, P>();
    using type = std::conditional_t<
        kind == BranchKind::shared, FrozenBranch<Inner, P>,
        std::conditional_t<kind == BranchKind::copy, CopyBranch<Inner, P>,
                           std::conditional_t<kind == BranchKind::lora, LoraBranch<Inner, P>, HeadBranch<Inner, P>>>>;
};

}  // namespace detail

}  // namespace patchwork
