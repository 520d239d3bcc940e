#pragma once
// Sequential<Ms...>: a compile-time chain of modules, y = m_k(...m_1(x)).
// Backward applies the chain rule in reverse: dL/dx = J_1^T (... J_k^T dL/dy),
// through detail::chain_backward, which skips the frozen prefix.
// Children are named after their kind and position: "linear0", "relu1", ...
#include <cstddef>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "patchwork/compose/chain.hpp"
#include "patchwork/core/module.hpp"

namespace patchwork {

template <class... Ms>
class Sequential : public ModuleBase {
    static_assert(sizeof...(Ms) > 0, "patchwork::Sequential needs at least one module");

public:
    using Scalar = typename std::tuple_element_t<0, std::tuple<Ms...>>::Scalar;
    static_assert((std::is_same_v<typename Ms::Scalar, Scalar> && ...),
                  "patchwork::Sequential: every module must use the same scalar type (all float or all double)");
    using Device = device_of_t<std::tuple_element_t<0, std::tuple<Ms...>>>;
    static_assert((std::is_same_v<device_of_t<Ms>, Device> && ...),
                  "patchwork::Sequential: every module must run on the same device (all Cpu or all Cuda)");
    using TensorType = Tensor<Scalar, Device>;
    static_assert((Module<Ms> && ...), "patchwork::Sequential: every element must satisfy patchwork::Module");

    static constexpr const char* kind() { return "block"; }
    static constexpr unsigned roles = (Ms::roles | ...);
    static constexpr bool fixed_width = (Ms::fixed_width || ...);
    static constexpr std::size_t size() { return sizeof...(Ms); }

    /// Default-construct every child (only for children that allow it).
    Sequential() requires(std::is_default_constructible_v<Ms> && ...) { set_path(""); }
    /// Take the children by value, in order.
    explicit Sequential(Ms... ms) : children_(std::move(ms)...) { set_path(""); }

    template <std::size_t I>
    [[nodiscard]] auto& get() noexcept { return std::get<I>(children_); }
    template <std::size_t I>
    [[nodiscard]] const auto& get() const noexcept { return std::get<I>(children_); }

    [[nodiscard]] std::size_t out_features() const {
        std::size_t w = 0;
        std::apply([&](const auto&... c) { ((w = c.out_features() ? c.out_features() : w), ...); }, children_);
        return w;
    }

    const TensorType& forward(const TensorType& x) {
        const TensorType* cur = &x;
        std::apply([&](auto&... c) { ((cur = &c.forward(*cur)), ...); }, children_);
        return *cur;
    }

    const TensorType& backward(const TensorType& dy) {
        return detail::chain_backward<Scalar>(
            size(), input_grad_, dy, empty_,
            [&](std::size_t i) {
                bool t = false;
                with_child(i, [&](auto& c) { t = any_trainable(c); });
                return t;
            },
            [&](std::size_t i, bool on) { with_child(i, [&](auto& c) { c.set_input_grad(on); }); },
            [&](std::size_t i, const TensorType& g) -> const TensorType& {
                const TensorType* out = nullptr;
                with_child(i, [&](auto& c) { out = &c.backward(g); });
                return *out;
            },
            [&](std::size_t i, auto& f) { with_child(i, [&](auto& c) { c.visit(f); }); });
    }

    template <class F>
    void visit(F&& f) {
        std::apply([&](auto&... c) { (c.visit(f), ...); }, children_);
    }
    /// f(child) for each child in order (see for_each_module).
    template <class F>
    void visit_children(F&& f) {
        std::apply([&](auto&... c) { (f(c), ...); }, children_);
    }

    /// Call f(child, index) on each child in order.
    template <class F>
    void for_each_child(F&& f) {
        [&]<std::size_t... I>(std::index_sequence<I...>) { (f(std::get<I>(children_), I), ...); }
        (std::index_sequence_for<Ms...>{});
    }

    void reset_parameters(Rng& rng) {
        std::apply([&](auto&... c) { (c.reset_parameters(rng), ...); }, children_);
    }

    void set_path(const std::string& p) {
        path_ = p;
        for_each_child([&](auto& c, std::size_t i) {
            c.set_path(child_path(std::string(std::remove_cvref_t<decltype(c)>::kind()) + std::to_string(i)));
        });
    }

private:
    template <class F>
    void with_child(std::size_t i, F&& f) {
        for_each_child([&](auto& c, std::size_t j) {
            if (j == i) f(c);
        });
    }

    std::tuple<Ms...> children_;
    TensorType empty_;
};

}  // namespace patchwork
