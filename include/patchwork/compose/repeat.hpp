#pragma once
// Repeat<M>: N blocks of the same type chained at run time, y = b_N(...b_1(x)),
// for depth chosen at run time (a stack of identical transformer-style or
// residual MLP blocks). Backward as for Sequential. Children: "block0", ...
#include <concepts>
#include <cstddef>
#include <string>
#include <vector>

#include "patchwork/compose/chain.hpp"
#include "patchwork/core/module.hpp"

namespace patchwork {

template <class M>
class Repeat : public ModuleBase {
    static_assert(Module<M>, "patchwork::Repeat<M>: M must satisfy patchwork::Module");

public:
    using Scalar = typename M::Scalar;
    using Block = M;
    static constexpr const char* kind() { return "repeat"; }
    static constexpr unsigned roles = M::roles;
    static constexpr bool fixed_width = M::fixed_width;

    /// n exact copies of `prototype` (same weights; call reset_parameters for fresh draws).
    Repeat(std::size_t n, const M& prototype) : blocks_(n, prototype) {
        check_count();
        set_path("");
    }
    /// n blocks made by `make(i)`, each drawing its own initial weights.
    template <class Factory>
        requires std::invocable<Factory&, std::size_t> &&
                 std::same_as<std::remove_cvref_t<std::invoke_result_t<Factory&, std::size_t>>, M>
    Repeat(std::size_t n, Factory make) {
        blocks_.reserve(n);
        for (std::size_t i = 0; i < n; ++i) blocks_.push_back(make(i));
        check_count();
        set_path("");
    }

    [[nodiscard]] std::size_t size() const noexcept { return blocks_.size(); }
    [[nodiscard]] M& operator[](std::size_t i) noexcept { return blocks_[i]; }
    [[nodiscard]] const M& operator[](std::size_t i) const noexcept { return blocks_[i]; }
    [[nodiscard]] std::size_t out_features() const { return blocks_.back().out_features(); }

    const Tensor<Scalar>& forward(const Tensor<Scalar>& x) {
        const Tensor<Scalar>* cur = &x;
        for (auto& b : blocks_) cur = &b.forward(*cur);
        return *cur;
    }

    const Tensor<Scalar>& backward(const Tensor<Scalar>& dy) {
        return detail::chain_backward<Scalar>(
            blocks_.size(), input_grad_, dy, empty_, [&](std::size_t i) { return any_trainable(blocks_[i]); },
            [&](std::size_t i, bool on) { blocks_[i].set_input_grad(on); },
            [&](std::size_t i, const Tensor<Scalar>& g) -> const Tensor<Scalar>& { return blocks_[i].backward(g); },
            [&](std::size_t i, auto& f) { blocks_[i].visit(f); });
    }

    template <class F>
    void visit(F&& f) {
        for (auto& b : blocks_) b.visit(f);
    }
    /// f(block) for each block in order (see for_each_module).
    template <class F>
    void visit_children(F&& f) {
        for (auto& b : blocks_) f(b);
    }
    void reset_parameters(Rng& rng) {
        for (auto& b : blocks_) b.reset_parameters(rng);
    }
    void set_path(const std::string& p) {
        path_ = p;
        for (std::size_t i = 0; i < blocks_.size(); ++i) blocks_[i].set_path(child_path("block" + std::to_string(i)));
    }

private:
    void check_count() const {
        if (blocks_.empty()) throw ConfigError("repeat: the number of blocks must be positive");
    }
    std::vector<M> blocks_;
    Tensor<Scalar> empty_;
};

}  // namespace patchwork
