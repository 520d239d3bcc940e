#pragma once
// What a policy is. Two kinds exist:
//
// * Selection policies (Frozen, FineTune, BiasOnly, NormPatch, ...) decide which of
//   a module's pre-trained parameters train. They provide
//     static constexpr PolicyKind policy_kind = PolicyKind::select;
//     static constexpr bool selects(Role);
//     template <class M> struct requirement { static constexpr bool ok; };
//   where `requirement` static_asserts, with a readable message, that the
//   policy makes sense for M.
//
// * Injection policies (Adapter<r>, LoRA<r>, ScaleShift, ...) add new trainable
//   parameters by wrapping the module in another module:
//     static constexpr PolicyKind policy_kind = PolicyKind::inject;
//     template <class Inner> using module = ...;   // the wrapping module
//   The wrapping module static_asserts its own requirements.
//
// Tune<M, Policies...> (tune.hpp) folds the injection policies into the module
// type, in the order listed, and applies the selection policies to the
// pre-trained parameters. Parameters already decided by an inner Tune (one
// that lists a selection policy) are left alone: the most specific policy
// wins. A Tune that lists only injection policies decides nothing.
//
// The policies: selection Frozen, FineTune, BiasOnly, NormPatch,
// DepthwisePatch; injection Adapter<r, act>, LoRA<r, alpha>, ScaleShift,
// OverParam<Factors...> (Linear only, policies/over_param.hpp) and
// Search<Candidates...> (architecture search, search/search_module.hpp).
#include <type_traits>

#include "patchwork/core/parameter.hpp"

namespace patchwork {

enum class PolicyKind { select, inject };

template <class P>
concept SelectionPolicy = P::policy_kind == PolicyKind::select;
template <class P>
concept InjectionPolicy = P::policy_kind == PolicyKind::inject;
template <class P>
concept Policy = SelectionPolicy<P> || InjectionPolicy<P>;

/// The module underneath any wrapping (LoRA around a Linear, Adapter around a block, Tune around either).
template <class M>
decltype(auto) base_module(M& m) {
    if constexpr (requires { m.inner(); }) return base_module(m.inner());
    else return (m);
}

}  // namespace patchwork
