#pragma once
// InjectionModule<Derived, Inner>: what every injection wrapper shares
// (Adapter, ScaleShift, LoRA and those to come). A wrapper holds the module
// it wraps, adds parameters of its own, and is itself a module:
//
//   - `inner()`, `visit_children(f)` (the wrapped module, for for_each_module);
//   - `visit(f)`: the wrapped module's parameters, then the wrapper's own,
//     which Derived lists with `visit_own(f)`;
//   - `set_path(p)`: the wrapped module keeps the path p, the wrapper's own
//     parameters are named "<p>.<Derived::own_name>.<name>";
//   - `visit_mixed(f)`: the own parameters, for wrappers that apply them per
//     row of a mixed-task batch (`Derived::mixed_rows`);
//   - `checked_width(d, policy)`: the wrapped module's output width, which a
//     per-channel patch needs, as a clear error when it is unknown (0);
//   - initial values are drawn on the host and copied to the device
//     (init::on_host), so CPU and device models agree for a seed.
//
// Derived constructs the wrapped module through the base, then its own
// parameters (which may use the width). CRTP, no virtual functions.
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>

#include "patchwork/core/error.hpp"
#include "patchwork/core/module.hpp"

namespace patchwork {

template <class Derived, class Inner>
class InjectionModule : public ModuleBase {
public:
    using Scalar = typename Inner::Scalar;
    using Device = device_of_t<Inner>;
    static constexpr const char* kind() { return Inner::kind(); }
    static constexpr unsigned roles = Inner::roles;
    static constexpr bool fixed_width = true;

    /// The wrapped module.
    [[nodiscard]] Inner& inner() noexcept { return inner_; }
    [[nodiscard]] const Inner& inner() const noexcept { return inner_; }

    /// f(wrapped module) (see for_each_module).
    template <class F>
    void visit_children(F&& f) {
        f(inner_);
    }

    /// The wrapped module's parameters, then the wrapper's own.
    template <class F>
    void visit(F&& f) {
        inner_.visit(f);
        derived().visit_own(f);
    }

    /// f(p) for each parameter the wrapper can take per row in a mixed-task
    /// batch (see MixedBatch): its own parameters, for wrappers that declare
    /// `static constexpr bool mixed_rows = true` (and apply them segment by
    /// segment on the CPU, per row in one fused launch on the device).
    template <class F, class D = Derived>  // D: clang 14 looks up Derived's members too early otherwise
        requires requires { D::mixed_rows; }
    void visit_mixed(F&& f) {
        derived().visit_own(f);
    }

    /// The wrapped module keeps the path; the wrapper's parameters read "<path>.<own_name>.<name>".
    void set_path(const std::string& p) {
        path_ = p;
        inner_.set_path(p);
        const std::string own = child_path(Derived::own_name);
        derived().visit_own([&](auto& q) { q.set_prefix(own); });
    }

protected:
    template <class... Args>
    explicit InjectionModule(std::in_place_t, Args&&... args) : inner_(std::forward<Args>(args)...) {}

    /// d, the wrapped module's output width; a ConfigError naming the policy when it is 0 (unknown).
    static std::size_t checked_width(std::size_t d, const std::string& policy) {
        if (d == 0)
            throw ConfigError(detail::concat(Derived::own_name, ": the wrapped ", Inner::kind(),
                                             " reports an output width of 0; ", policy,
                                             " needs a module whose output width is known"));
        return d;
    }

    /// Whether backward must run the wrapped module's backward: its input
    /// gradient is wanted, or something in it trains.
    [[nodiscard]] bool through_inner() { return input_grad_ || any_trainable(inner_); }

    Inner inner_;

private:
    Derived& derived() noexcept { return static_cast<Derived&>(*this); }
};

}  // namespace patchwork
