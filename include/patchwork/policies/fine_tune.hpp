#pragma once
// FineTune: every pre-trained parameter of the module trains.
// Trainable parameters: all of the module's (100% of full fine-tuning).
#include "patchwork/policies/policy.hpp"

namespace patchwork {

struct FineTune {
    static constexpr PolicyKind policy_kind = PolicyKind::select;
    static constexpr const char* name() { return "FineTune"; }
    static constexpr bool selects(Role r) noexcept { return !is_injected(r); }
    template <class M>
    struct requirement {
        static constexpr bool ok = true;
    };
};

}  // namespace patchwork
