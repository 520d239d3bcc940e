#pragma once
// A hook for gradient communication: observers told, during backward, when a
// parameter's gradient for this pass is complete.
//
// Chains (compose/chain.hpp: Sequential, Repeat, Cascade, the BERT encoder)
// run their children last to first; when child i's backward returns, every
// parameter it visits has its gradient for this backward pass (a parameter
// belongs to one module). If any observer is registered on the calling
// thread, the chain reports each such parameter by address. Data-parallel
// training (dist/data_parallel.hpp) uses this to start reducing a bucket of
// gradients while the earlier layers are still running backward. With no
// observer registered the cost is one empty-vector test per child.
//
// A report is a promise only about the chain's own children: a parameter may
// be reported more than once (nested chains report it at every level), and a
// module outside any chain (a multi-task head, a bank) is never reported. An
// observer therefore treats reports as hints and checks at the end of the step
// that nothing it sent early has changed since.
#include <algorithm>
#include <vector>

namespace patchwork::detail {

/// Receives the addresses of parameters whose gradient is complete for the current backward pass.
class GradientReadyObserver {
public:
    virtual void gradient_ready(const void* parameter) = 0;

protected:
    GradientReadyObserver() = default;
    GradientReadyObserver(const GradientReadyObserver&) = default;
    GradientReadyObserver& operator=(const GradientReadyObserver&) = default;
    ~GradientReadyObserver() = default;
};

/// The observers registered on this thread.
inline std::vector<GradientReadyObserver*>& gradient_ready_observers() noexcept {
    thread_local std::vector<GradientReadyObserver*> observers;
    return observers;
}

inline void add_gradient_ready_observer(GradientReadyObserver* o) { gradient_ready_observers().push_back(o); }
inline void remove_gradient_ready_observer(GradientReadyObserver* o) noexcept {
    auto& v = gradient_ready_observers();
    v.erase(std::remove(v.begin(), v.end(), o), v.end());
}

/// Report every parameter `visit_params(f)` visits to the registered observers (none: no work).
template <class VisitParams>
void report_gradients_ready(VisitParams&& visit_params) {
    auto& observers = gradient_ready_observers();
    if (observers.empty()) return;
    visit_params([&](auto& p) {
        for (auto* o : observers) o->gradient_ready(static_cast<const void*>(&p));
    });
}

}  // namespace patchwork::detail

namespace patchwork {

/// Tell gradient communication that `module`'s gradients for the current
/// backward pass are complete. Chains do this for their children; a
/// hand-written composite (say, an encoder, a pooling step and a head called
/// in turn) calls it after each part's backward, so data-parallel training
/// can send those gradients while the rest of backward runs. Nothing happens
/// when nobody listens.
template <class M>
void gradients_ready(M& module) {
    detail::report_gradients_ready([&](auto&& f) { module.visit(f); });
}

}  // namespace patchwork
