#pragma once
// The Module concept and what every module shares.
//
// A module owns its parameters and its output buffers. `forward(x)` returns a
// reference to a buffer the module owns (valid until its next forward) and
// keeps what its backward needs; `backward(dy)` accumulates into the
// gradients of trainable parameters and returns dL/dx (empty when the input
// gradient was switched off with `set_input_grad(false)`: the first layer of
// a model never needs it, and skipping it saves a GEMM).
//
// Modules are plain value types composed at compile time (Sequential, Tune,
// Cascade); there are no virtual calls on the hot path.
#include <concepts>
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "patchwork/core/parallel.hpp"
#include "patchwork/core/parameter.hpp"
#include "patchwork/core/random.hpp"
#include "patchwork/core/tensor.hpp"

namespace patchwork {

/// A visitor used only to state the Module concept.
template <class T, class D = Cpu>
struct ParameterVisitorArchetype {
    void operator()(Parameter<T, D>&) const {}
};

namespace detail {
template <class M>
struct device_of {
    using type = Cpu;
};
template <class M>
    requires requires { typename M::Device; }
struct device_of<M> {
    using type = typename M::Device;
};
}  // namespace detail

/// The device a module runs on: its `Device` member type, Cpu when it has none.
template <class M>
using device_of_t = typename detail::device_of<M>::type;

/// The tensor type a module takes and returns.
template <class M>
using tensor_of_t = Tensor<typename M::Scalar, device_of_t<M>>;

template <class M>
concept Module = requires(M& m, const M& cm, const tensor_of_t<M>& t, const std::string& s) {
    typename M::Scalar;
    { m.forward(t) } -> std::convertible_to<const tensor_of_t<M>&>;
    { m.backward(t) } -> std::convertible_to<const tensor_of_t<M>&>;
    m.visit(ParameterVisitorArchetype<typename M::Scalar, device_of_t<M>>{});
    m.set_path(s);
    { cm.path() } -> std::convertible_to<const std::string&>;
    { cm.out_features() } -> std::convertible_to<std::size_t>;
    { M::kind() } -> std::convertible_to<const char*>;
    m.set_input_grad(true);
    m.reset_parameters(std::declval<Rng&>());
};

/// Bit set of the pre-trained parameter roles a module type contains; policies
/// check it at compile time (NormPatch needs a norm layer, BiasOnly a bias).
[[nodiscard]] constexpr unsigned role_bit(Role r) noexcept { return 1u << static_cast<unsigned>(r); }

/// State every module carries: its dotted path and whether its input
/// gradient is wanted. Modules derive from it (no virtual functions).
class ModuleBase {
public:
    [[nodiscard]] const std::string& path() const noexcept { return path_; }
    void set_input_grad(bool on) noexcept { input_grad_ = on; }
    [[nodiscard]] bool input_grad() const noexcept { return input_grad_; }

protected:
    /// Join a child name onto this module's path.
    [[nodiscard]] std::string child_path(const std::string& child) const {
        return path_.empty() ? child : path_ + "." + child;
    }
    std::string path_;
    bool input_grad_ = true;
};

namespace detail {

/// What parameter-free layers (pooling, reshaping) share: no parameters, no
/// width of their own.
class ParameterFreeModule : public ModuleBase {
public:
    static constexpr unsigned roles = 0;
    static constexpr bool fixed_width = false;
    [[nodiscard]] std::size_t out_features() const noexcept { return 0; }
    void reset_parameters(Rng&) noexcept {}
    template <class F>
    void visit(F&&) noexcept {}
    void set_path(const std::string& p) { path_ = p; }
};

}  // namespace detail

/// A non-owning reference to a tensor a module saved in forward for its
/// backward (its input, or a wrapped module's output). Copying or moving the
/// module does not carry it over: the copy has seen no forward yet, and a
/// backward before one reports that instead of reading another module's buffer.
template <class T, class D = Cpu>
class Saved {
public:
    Saved() = default;
    Saved(const Saved&) noexcept {}
    Saved& operator=(const Saved&) noexcept {
        ptr_ = nullptr;
        return *this;
    }
    Saved& operator=(const Tensor<T, D>& t) noexcept {
        ptr_ = &t;
        return *this;
    }
    [[nodiscard]] explicit operator bool() const noexcept { return ptr_ != nullptr; }
    /// The saved tensor, checked: it exists and still has the shape forward saw.
    [[nodiscard]] const Tensor<T, D>& get(const Shape& expected, const std::string& path, const char* what) const {
        if (ptr_ == nullptr || !(ptr_->shape() == expected))
            throw Error(detail::concat(detail::display_path(path), ": backward needs the ", what,
                                       " of the last forward, which ",
                                       ptr_ == nullptr ? std::string("this module has not seen")
                                                       : detail::concat("has changed shape to ", ptr_->shape(),
                                                                        " from ", expected),
                                       " (keep a module's input alive and unchanged until its backward)"));
        return *ptr_;
    }
    [[nodiscard]] const Tensor<T, D>& operator*() const noexcept { return *ptr_; }
    [[nodiscard]] const Tensor<T, D>* operator->() const noexcept { return ptr_; }

private:
    const Tensor<T, D>* ptr_ = nullptr;
};

/// Calls f(module) on `m` and on every module inside it, depth first, parents
/// before children. Composites and wrappers expose their direct children with
/// `visit_children(f)`; leaves have none. When f returns bool, false stops the
/// descent below that module.
template <class M, class F>
void for_each_module(M& m, F&& f) {
    bool descend = true;
    if constexpr (std::is_same_v<decltype(f(m)), bool>) descend = f(m);
    else f(m);
    if constexpr (requires { m.visit_children([](auto&) {}); }) {
        if (descend) m.visit_children([&](auto& child) { for_each_module(child, f); });
    }
}

/// Forget every policy decision inside `m` (Parameter::policy_decided), then
/// let each policy module inside it that decides parameters (a Tune with a
/// selection policy, a searched module, an over-parameterised Linear, a
/// BertModel: those with a `remark_decided()` member) mark its own again.
/// A policy module calls it on what it wraps when it is built: a module copied
/// out of a Tune<M, FineTune> and wrapped in a Tune<M, Frozen> is frozen,
/// while the decisions of policies still inside it stand.
template <class M>
void renew_decisions(M& m) {
    m.visit([](auto& p) { p.clear_policy_decided(); });
    for_each_module(m, [](auto& sub) {
        if constexpr (requires { sub.remark_decided(); }) sub.remark_decided();
    });
}

/// Parameters full fine-tuning of `m` would train: every pre-trained (not
/// injected) parameter, once. A module that holds copies of its pre-trained
/// weights (a searched module's FineTune candidate) says how many are its own
/// with a `pretrained_parameters()` member; leaves count their parameters.
template <class M>
[[nodiscard]] std::size_t pretrained_parameters(M& m) {
    std::size_t n = 0;
    for_each_module(m, [&](auto& x) -> bool {
        if constexpr (requires { x.pretrained_parameters(); }) {
            n += x.pretrained_parameters();
            return false;
        } else if constexpr (!requires { x.visit_children([](auto&) {}); }) {
            x.visit([&](auto& p) { n += is_injected(p.role()) ? 0 : p.size(); });
            return false;
        } else {
            return true;
        }
    });
    return n;
}

/// The last step of a wrapper's backward: hand `dh` (dL/d of the wrapped
/// module's output) to the wrapped module, asking it for its input gradient
/// only when the wrapper's is wanted, and return dL/dx, or `empty` when not wanted.
template <class M, class Tn>
const Tn& wrapped_backward(M& inner, const Tn& dh, bool input_grad, const Tn& empty) {
    inner.set_input_grad(input_grad);
    const Tn& dx = inner.backward(dh);
    return input_grad ? dx : empty;
}

/// True when any parameter reachable from `m` is trainable.
template <class M>
[[nodiscard]] bool any_trainable(M& m) {
    bool any = false;
    m.visit([&](auto& p) { any = any || p.trainable(); });
    return any;
}

/// Total number of scalars in the module's parameters.
template <class M>
[[nodiscard]] std::size_t parameter_count(M& m) {
    std::size_t n = 0;
    m.visit([&](auto& p) { n += p.size(); });
    return n;
}

/// Number of trainable scalars.
template <class M>
[[nodiscard]] std::size_t trainable_count(M& m) {
    std::size_t n = 0;
    m.visit([&](auto& p) { n += p.trainable() ? p.size() : 0; });
    return n;
}

/// Pointers to every trainable parameter, in visiting order (for optimisers).
template <class M>
[[nodiscard]] auto trainable_parameters(M& m) {
    std::vector<Parameter<typename M::Scalar, device_of_t<M>>*> out;
    m.visit([&](auto& p) {
        if (p.trainable()) out.push_back(&p);
    });
    return out;
}

/// Re-draw every parameter of `m` from a generator seeded with `seed`.
template <class M>
void initialize(M& m, std::uint64_t seed) {
    Rng rng(seed);
    m.reset_parameters(rng);
}

/// Zero every trainable gradient.
template <class M>
void zero_grad(M& m) {
    m.visit([](auto& p) { p.zero_grad(); });
}

}  // namespace patchwork
