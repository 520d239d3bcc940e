#pragma once
// BiasOnly (BitFit): only the additive biases train, b <- b - lr dL/db.
// Trainable parameters: sum over Linear layers of out_features (about 0.1% of
// an MLP). The weight-gradient GEMMs are skipped; only the column sums of
// dL/dy are formed.
#include "patchwork/core/module.hpp"
#include "patchwork/policies/policy.hpp"

namespace patchwork {

struct BiasOnly {
    static constexpr PolicyKind policy_kind = PolicyKind::select;
    static constexpr const char* name() { return "BiasOnly"; }
    static constexpr bool selects(Role r) noexcept { return r == Role::bias; }
    template <class M>
    struct requirement {
        static constexpr bool ok = (M::roles & role_bit(Role::bias)) != 0;
        static_assert(ok,
                      "patchwork::BiasOnly (BitFit) needs a module with bias parameters: a Linear, or a block "
                      "containing one. This module has none to tune.");
    };
};

}  // namespace patchwork
