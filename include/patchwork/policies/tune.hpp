#pragma once
// Tune<M, Policies...>: module M adapted by the listed policies.
//
//   Tune<Linear, LoRA<8>>                    low-rank update, base frozen
//   Tune<Block, NormPatch, Adapter<32>>      norms train, adapter after the block
//   Tune<Model, FineTune>                    everything trains
//
// Injection policies wrap M in the order listed (the first is innermost).
// Selection policies decide which pre-trained parameters train. The most
// specific decision wins: a Tune that lists a selection policy decides the
// pre-trained parameters no inner Tune has decided; a Tune that lists none
// leaves them to an enclosing Tune, and they are frozen if no enclosing Tune
// lists a selection policy either:
//
//   Tune<Block, BiasOnly>  around  Tune<Linear, LoRA<8>>          the Linear's bias trains (with A, B)
//   Tune<Block, BiasOnly>  around  Tune<Linear, Frozen, LoRA<8>>  the Linear's bias stays frozen Tune adds no path level:
// parameter names read as the module's own ("linear0.weight",
// "linear0.lora.a"). Forward and backward are those of the wrapped module.
#include <concepts>
#include <string>
#include <type_traits>
#include <utility>

#include "patchwork/core/module.hpp"
#include "patchwork/policies/policy.hpp"

namespace patchwork {

namespace detail {

template <class M, class... Ps>
struct wrap;
template <class M>
struct wrap<M> {
    using type = M;
};
template <class M, class P>
struct wrap_one {
    using type = M;  // selection policies do not change the type
};
template <class M, InjectionPolicy P>
struct wrap_one<M, P> {
    using type = typename P::template module<M>;
};
template <class M, class P, class... Ps>
struct wrap<M, P, Ps...> {
    using type = typename wrap<typename wrap_one<M, P>::type, Ps...>::type;
};

template <class M, class P>
constexpr bool policy_ok() {
    if constexpr (SelectionPolicy<P>) return P::template requirement<M>::ok;
    else return true;
}

/// Policies whose modules also run with Device = Cuda: every selection policy,
/// and the injection policies that declare `on_device` (Adapter, ScaleShift, LoRA, Search).
template <class P>
constexpr bool runs_on_device = [] {
    if constexpr (InjectionPolicy<P>) {
        if constexpr (requires { P::on_device; }) return bool(P::on_device);
        else return false;
    } else {
        return true;
    }
}();

template <class P>
constexpr bool selects(Role r) {
    if constexpr (SelectionPolicy<P>) return P::selects(r);
    else return false;
}

}  // namespace detail

template <class M, class... Policies>
class Tune : public ModuleBase {
    static_assert(Module<M>, "patchwork::Tune<M, ...>: M must satisfy patchwork::Module");
    static_assert((Policy<Policies> && ...),
                  "patchwork::Tune<M, Policies...>: every policy must be a patchwork policy (Frozen, FineTune, "
                  "BiasOnly, NormPatch, Adapter<r>, LoRA<r>, ScaleShift, ...)");
    static_assert((detail::policy_ok<M, Policies>() && ...), "patchwork::Tune: a policy does not apply to this module");
    static_assert(std::is_same_v<device_of_t<M>, Cpu> || (detail::runs_on_device<Policies> && ...),
                  "patchwork::Tune: on Device = Cuda the policies are Frozen, FineTune, BiasOnly, NormPatch, "
                  "DepthwisePatch, Adapter<r>, ScaleShift, LoRA<r> and Search<...> (over-parameterisation runs on "
                  "the CPU)");

public:
    using Base = M;
    using Inner = typename detail::wrap<M, Policies...>::type;
    using Scalar = typename M::Scalar;
    using Device = device_of_t<M>;
    static constexpr const char* kind() { return M::kind(); }
    static constexpr unsigned roles = M::roles;
    static constexpr bool fixed_width = Inner::fixed_width;

    /// Build the module from M's constructor arguments (or from an M).
    template <class... Args>
        requires std::constructible_from<Inner, Args...> &&
                 (sizeof...(Args) != 1 || (!std::same_as<std::remove_cvref_t<Args>, Tune> && ...))
    explicit Tune(Args&&... args) : inner_(std::forward<Args>(args)...) {
        renew_decisions(inner_);  // marks copied from elsewhere do not count here
        apply_selection();
        set_path("");
    }

    /// The wrapped module chain (e.g. the adapter module around M).
    [[nodiscard]] Inner& inner() noexcept { return inner_; }
    [[nodiscard]] const Inner& inner() const noexcept { return inner_; }
    /// The pre-trained module underneath every policy.
    [[nodiscard]] decltype(auto) base() noexcept { return base_module(inner_); }

    [[nodiscard]] std::size_t out_features() const { return inner_.out_features(); }
    const Tensor<Scalar, Device>& forward(const Tensor<Scalar, Device>& x) { return inner_.forward(x); }
    const Tensor<Scalar, Device>& backward(const Tensor<Scalar, Device>& dy) {
        inner_.set_input_grad(input_grad_);
        return inner_.backward(dy);
    }
    /// f(wrapped module) (see for_each_module).
    template <class F>
    void visit_children(F&& f) {
        f(inner_);
    }
    template <class F>
    void visit(F&& f) {
        inner_.visit(f);
    }
    /// Marks again the parameters this Tune decided: with a selection policy,
    /// every pre-trained parameter inside it (see renew_decisions).
    void remark_decided() {
        if constexpr (has_selection)
            inner_.visit([](Parameter<Scalar, Device>& p) {
                if (!is_injected(p.role())) p.mark_policy_decided();
            });
    }
    /// Re-draws the injected parameters as well (adapters restart as the identity).
    void reset_parameters(Rng& rng) { inner_.reset_parameters(rng); }
    void set_path(const std::string& p) {
        path_ = p;
        inner_.set_path(p);
    }

private:
    /// A Tune that lists a selection policy decides every pre-trained
    /// parameter not decided by an inner Tune. One that lists only injection
    /// policies freezes them but leaves the decision open, so that an
    /// enclosing Tune's selection policy still applies (BiasOnly around
    /// Tune<Linear, LoRA<8>> trains that Linear's bias too).
    void apply_selection() {
        inner_.visit([](Parameter<Scalar, Device>& p) {
            if (is_injected(p.role()) || p.policy_decided()) return;
            p.set_trainable((detail::selects<Policies>(p.role()) || ...));
            if constexpr (has_selection) p.mark_policy_decided();
        });
    }

    static constexpr bool has_selection = (SelectionPolicy<Policies> || ...);

    Inner inner_;
};

}  // namespace patchwork
