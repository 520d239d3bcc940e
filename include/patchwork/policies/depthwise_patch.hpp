#pragma once
// DepthwisePatch: the depthwise patch of "K for the price of 1". Only the
// depthwise convolution filters train (Role::depthwise, one k x k filter per
// channel), everything else is frozen:
//   y[p, c] = b[c] + sum_t x[q(p,t), c] W[c, t],  W trainable,
//   dL/dW[c, t] = sum_p dL/dy[p, c] x[q(p,t), c]  (see layers/conv2d.hpp).
// Trainable parameters: k^2 * channels per depthwise layer (times its channel
// multiplier), a few percent of a MobileNet-style model.
#include "patchwork/core/module.hpp"
#include "patchwork/policies/policy.hpp"

namespace patchwork {

struct DepthwisePatch {
    static constexpr PolicyKind policy_kind = PolicyKind::select;
    static constexpr const char* name() { return "DepthwisePatch"; }
    static constexpr bool selects(Role r) noexcept { return r == Role::depthwise; }
    template <class M>
    struct requirement {
        static constexpr bool ok = (M::roles & role_bit(Role::depthwise)) != 0;
        static_assert(ok,
                      "patchwork::DepthwisePatch needs a module with a depthwise convolution (DepthwiseConv2d, or "
                      "a Conv2d with groups = in_channels) whose filters it can re-learn. This module has none; use "
                      "NormPatch, BiasOnly or ScaleShift instead.");
    };
};

}  // namespace patchwork
