#pragma once
// Cascade<Stages...>: pre-trained models chained end to end and trained as one
// system (speech enhancement -> recognition -> understanding, say).
//
// Forward: y_0 = s_0(x), y_i = s_i(y_{i-1}); every y_i stays reachable through
// output<I>(). A stage may carry its own loss beside the final one (the
// cascaded multi-task loss L = L_final + sum_i w_i L_i(y_i)): hand its gradient
// to add_stage_grad<I>(dL_i/dy_i, w_i) before backward. Backward then runs
//   g_last = dL/dy_last,  g_i = J_{i+1}^T g_{i+1} + w_i dL_i/dy_i,
// through every stage, skipping the frozen prefix exactly as Sequential does.
// Stages are named "stage0", "stage1", ...
#include <array>
#include <cstddef>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "patchwork/compose/chain.hpp"
#include "patchwork/core/module.hpp"

namespace patchwork {

template <class... Stages>
class Cascade : public ModuleBase {
    static_assert(sizeof...(Stages) > 0, "patchwork::Cascade needs at least one stage");

public:
    using Scalar = typename std::tuple_element_t<0, std::tuple<Stages...>>::Scalar;
    static_assert((std::is_same_v<typename Stages::Scalar, Scalar> && ...),
                  "patchwork::Cascade: every stage must use the same scalar type");
    static_assert((Module<Stages> && ...), "patchwork::Cascade: every stage must satisfy patchwork::Module");

    static constexpr const char* kind() { return "cascade"; }
    static constexpr unsigned roles = (Stages::roles | ...);
    static constexpr bool fixed_width = (Stages::fixed_width || ...);
    static constexpr std::size_t size() { return sizeof...(Stages); }

    explicit Cascade(Stages... stages) : stages_(std::move(stages)...) { set_path(""); }
    // Copies and moves keep the stages but not the pointers to the source's outputs.
    Cascade(const Cascade& o) : ModuleBase(o), stages_(o.stages_) {}
    Cascade(Cascade&& o) noexcept : ModuleBase(std::move(o)), stages_(std::move(o.stages_)) {}
    Cascade& operator=(const Cascade& o) {
        ModuleBase::operator=(o);
        stages_ = o.stages_;
        outputs_ = {};
        has_pending_ = {};
        return *this;
    }
    Cascade& operator=(Cascade&& o) noexcept {
        ModuleBase::operator=(std::move(o));
        stages_ = std::move(o.stages_);
        outputs_ = {};
        has_pending_ = {};
        return *this;
    }

    template <std::size_t I>
    [[nodiscard]] auto& stage() noexcept { return std::get<I>(stages_); }

    /// Stage I's output from the last forward.
    template <std::size_t I>
    [[nodiscard]] const Tensor<Scalar>& output() const {
        static_assert(I < sizeof...(Stages), "patchwork::Cascade::output<I>: no such stage");
        if (!outputs_[I]) throw Error(detail::concat(detail::display_path(path_), ": output<", I, ">() before forward"));
        return *outputs_[I];
    }

    /// Add weight * grad to the gradient reaching stage I's output in the next
    /// backward (a stage's own loss). Accumulates over calls; cleared by backward.
    template <std::size_t I>
    void add_stage_grad(const Tensor<Scalar>& grad, Scalar weight = Scalar(1)) {
        static_assert(I < sizeof...(Stages), "patchwork::Cascade::add_stage_grad<I>: no such stage");
        if (!outputs_[I]) throw Error(detail::concat(detail::display_path(path_), ": add_stage_grad<", I, "> before forward"));
        check_same_shape(grad, outputs_[I]->shape(), child_path("stage" + std::to_string(I)), "stage loss gradient");
        auto& pending = pending_[I];
        if (!has_pending_[I]) {
            pending.resize(grad.shape());
            pending.vector() = weight * grad.vector();
            has_pending_[I] = true;
        } else {
            pending.vector() += weight * grad.vector();
        }
    }

    [[nodiscard]] std::size_t out_features() const { return std::get<sizeof...(Stages) - 1>(stages_).out_features(); }

    const Tensor<Scalar>& forward(const Tensor<Scalar>& x) {
        const Tensor<Scalar>* cur = &x;
        for_each_stage([&](auto& s, std::size_t i) {
            cur = &s.forward(*cur);
            outputs_[i] = cur;
        });
        has_pending_.fill(false);
        return *cur;
    }

    const Tensor<Scalar>& backward(const Tensor<Scalar>& dy) {
        // The earliest stage that receives any gradient: its own loss counts as
        // a reason to run backward from there even if nothing after it trains.
        const auto& dx = detail::chain_backward<Scalar>(
            size(), input_grad_, dy, empty_,
            [&](std::size_t i) {
                bool t = false;
                with_stage(i, [&](auto& s) { t = any_trainable(s); });
                return t;
            },
            [&](std::size_t i, bool on) { with_stage(i, [&](auto& s) { s.set_input_grad(on); }); },
            [&](std::size_t i, const Tensor<Scalar>& g) -> const Tensor<Scalar>& {
                const Tensor<Scalar>* in = &g;
                if (has_pending_[i]) {
                    // The final stage receives dy; any other stage the gradient from the next.
                    combined_.resize(g.shape());
                    combined_.vector() = g.vector() + pending_[i].vector();
                    in = &combined_;
                }
                const Tensor<Scalar>* out = nullptr;
                with_stage(i, [&](auto& s) { out = &s.backward(*in); });
                return *out;
            },
            [&](std::size_t i, auto& f) { with_stage(i, [&](auto& s) { s.visit(f); }); });
        has_pending_.fill(false);
        return dx;
    }

    template <class F>
    void visit(F&& f) {
        std::apply([&](auto&... s) { (s.visit(f), ...); }, stages_);
    }
    /// f(stage) for each stage in order (see for_each_module).
    template <class F>
    void visit_children(F&& f) {
        std::apply([&](auto&... s) { (f(s), ...); }, stages_);
    }
    void reset_parameters(Rng& rng) {
        std::apply([&](auto&... s) { (s.reset_parameters(rng), ...); }, stages_);
    }
    void set_path(const std::string& p) {
        path_ = p;
        for_each_stage([&](auto& s, std::size_t i) { s.set_path(child_path("stage" + std::to_string(i))); });
    }

    template <class F>
    void for_each_stage(F&& f) {
        [&]<std::size_t... I>(std::index_sequence<I...>) { (f(std::get<I>(stages_), I), ...); }
        (std::index_sequence_for<Stages...>{});
    }

private:
    template <class F>
    void with_stage(std::size_t i, F&& f) {
        for_each_stage([&](auto& s, std::size_t j) {
            if (j == i) f(s);
        });
    }

    std::tuple<Stages...> stages_;
    std::array<const Tensor<Scalar>*, sizeof...(Stages)> outputs_{};
    std::array<Tensor<Scalar>, sizeof...(Stages)> pending_{};
    std::array<bool, sizeof...(Stages)> has_pending_{};
    Tensor<Scalar> combined_, empty_;
};

}  // namespace patchwork
