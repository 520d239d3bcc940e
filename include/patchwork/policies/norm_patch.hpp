#pragma once
// NormPatch: the scale-and-bias patch of "K for the price of 1". Only the
// per-channel gains and shifts of normalisation layers train:
//   y = gamma * xhat + beta,  gamma and beta trainable, everything else frozen.
// Trainable parameters: 2 * channels per norm layer (well under 1% of a model).
#include "patchwork/core/module.hpp"
#include "patchwork/policies/policy.hpp"

namespace patchwork {

struct NormPatch {
    static constexpr PolicyKind policy_kind = PolicyKind::select;
    static constexpr const char* name() { return "NormPatch"; }
    static constexpr bool selects(Role r) noexcept { return r == Role::norm_scale || r == Role::norm_shift; }
    template <class M>
    struct requirement {
        static constexpr bool ok = (M::roles & (role_bit(Role::norm_scale) | role_bit(Role::norm_shift))) != 0;
        static_assert(ok,
                      "patchwork::NormPatch needs a module with a normalisation layer (LayerNorm, BatchNorm) whose "
                      "scale and shift it can tune. This module has none; use ScaleShift to add a per-channel "
                      "affine patch instead.");
    };
};

}  // namespace patchwork
