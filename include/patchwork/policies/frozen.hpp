#pragma once
// Frozen: no pre-trained parameter trains. Forward unchanged; backward still
// passes the input gradient through (so earlier trainable modules learn) but
// allocates no gradient buffer and skips every weight-gradient computation.
// Trainable parameters: 0 (plus whatever injection policies add).
#include "patchwork/policies/policy.hpp"

namespace patchwork {

struct Frozen {
    static constexpr PolicyKind policy_kind = PolicyKind::select;
    static constexpr const char* name() { return "Frozen"; }
    static constexpr bool selects(Role) noexcept { return false; }
    template <class M>
    struct requirement {
        static constexpr bool ok = true;
    };
};

}  // namespace patchwork
