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
#include <utility>
#include <vector>

#include "patchwork/core/parallel.hpp"
#include "patchwork/core/parameter.hpp"
#include "patchwork/core/random.hpp"
#include "patchwork/core/tensor.hpp"

namespace patchwork {

/// A visitor used only to state the Module concept.
template <class T>
struct ParameterVisitorArchetype {
    void operator()(Parameter<T>&) const {}
};

template <class M>
concept Module = requires(M& m, const M& cm, const Tensor<typename M::Scalar>& t, const std::string& s) {
    typename M::Scalar;
    { m.forward(t) } -> std::convertible_to<const Tensor<typename M::Scalar>&>;
    { m.backward(t) } -> std::convertible_to<const Tensor<typename M::Scalar>&>;
    m.visit(ParameterVisitorArchetype<typename M::Scalar>{});
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
    std::vector<Parameter<typename M::Scalar>*> out;
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
