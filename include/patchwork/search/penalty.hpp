#pragma once
// The searched modules of a model (for_each_searched, set_gates, seed, the
// architecture and weight parameters) and the parameter penalty.
//
// Penalty. With g_mk the gate of candidate k in searched module m (the gates
// of the last forward), P_mk the trainable parameters candidate k adds and
// P_full the parameters full fine-tuning of the whole model trains:
//   R = lambda * sum_m sum_k g_mk * P_mk / P_full,   dR/dg_mk = lambda * P_mk / P_full
// and dR/dalpha follows through the gate Jacobian (gates.hpp). Frozen adds no
// parameter; the search is charged `frozen_cost(step) * P_m` for it instead
// (P_m: the module's own pre-trained parameters), a constant or a schedule,
// because a free candidate is where a parameter-penalised search collapses to.
#include <algorithm>
#include <cctype>
#include <iostream>
#include <typeinfo>
#include <cmath>
#include <cstddef>
#include <fstream>
#include <functional>
#include <iomanip>
#include <limits>
#include <ostream>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "patchwork/core/module.hpp"
#include "patchwork/policies/frozen.hpp"
#include "patchwork/search/gates.hpp"
#include "patchwork/search/search_module.hpp"

namespace patchwork::search {

template <class M>
inline constexpr bool is_search_module = std::is_base_of_v<SearchModuleTag, std::remove_cvref_t<M>>;

/// f(searched module) for every searched module of `model`, in visiting order.
template <class M, class F>
void for_each_searched(M& model, F&& f) {
    for_each_module(model, [&](auto& m) {
        if constexpr (is_search_module<decltype(m)>) f(m);
    });
}

/// The role set of the alpha step (see GradientRoles).
inline constexpr unsigned architecture_only = 1u << static_cast<unsigned>(Role::architecture);

/// Number of searched modules.
template <class M>
[[nodiscard]] std::size_t count_searched(M& model) {
    std::size_t n = 0;
    for_each_searched(model, [&](auto&) { ++n; });
    return n;
}

/// Sets the gate configuration of every searched module.
template <class M>
void set_gates(M& model, const GateConfig& cfg) {
    cfg.validate();
    for_each_searched(model, [&](auto& m) { m.set_gates(cfg); });
}

/// Seeds every searched module's Gumbel noise: module i gets seed + i (via a
/// mixing constant), so a search is reproducible from one number.
template <class M>
void seed(M& model, std::uint64_t s) {
    std::uint64_t i = 0;
    for_each_searched(model, [&](auto& m) { m.seed(s * 0x9E3779B97F4A7C15ull + ++i); });
}

/// The trainable architecture weights (Role::architecture).
template <class M>
[[nodiscard]] auto architecture_parameters(M& model) {
    std::vector<Parameter<typename M::Scalar, device_of_t<M>>*> out;
    model.visit([&](auto& p) {
        if (p.trainable() && p.role() == Role::architecture) out.push_back(&p);
    });
    return out;
}

/// Every other trainable parameter (the weights of the search's weight step).
template <class M>
[[nodiscard]] auto weight_parameters(M& model) {
    std::vector<Parameter<typename M::Scalar, device_of_t<M>>*> out;
    model.visit([&](auto& p) {
        if (p.trainable() && p.role() != Role::architecture) out.push_back(&p);
    });
    return out;
}

/// Parameters full fine-tuning of the model would train (P_full): every
/// pre-trained parameter once; a searched module counts its base, not its
/// candidates' copies (see pretrained_parameters in core/module.hpp).
template <class M>
[[nodiscard]] std::size_t full_parameters(M& model) {
    return pretrained_parameters(model);
}

/// The cost charged to Frozen, as a fraction of the module's own pre-trained
/// parameters, over search steps: `start` at step 0, moving linearly to `end`
/// at step `steps`, then staying there (steps = 0: the constant `end`).
struct FrozenCost {
    double start = 0.0;
    double end = 0.0;
    std::size_t steps = 0;

    [[nodiscard]] static FrozenCost constant(double c) { return {c, c, 0}; }
    [[nodiscard]] static FrozenCost linear(double from, double to, std::size_t steps) { return {from, to, steps}; }

    [[nodiscard]] double operator()(std::size_t step) const noexcept {
        if (steps == 0 || step >= steps) return end;
        return start + (end - start) * double(step) / double(steps);
    }
    void validate() const {
        if (!(start >= 0) || !(end >= 0) || !std::isfinite(start) || !std::isfinite(end))
            throw ConfigError(detail::concat("search: the frozen cost must be >= 0 and finite, got ", start, " -> ",
                                             end));
    }
};

/// The parameter penalty's settings.
struct Penalty {
    double lambda = 0.0;        ///< weight of the penalty (>= 0)
    FrozenCost frozen_cost{};   ///< what choosing Frozen costs (see FrozenCost)
    std::size_t full = 0;       ///< P_full; 0 means full_parameters(model)

    void validate() const {
        if (!(lambda >= 0) || !std::isfinite(lambda))
            throw ConfigError(detail::concat("search: the penalty weight lambda must be >= 0 and finite, got ",
                                             lambda));
        frozen_cost.validate();
    }
};

/// Value of the penalty at the gates of the last forward; adds its gradient to
/// every alpha. Call after the forward (and before or after the backward).
template <class M>
double penalty(M& model, const Penalty& pen, std::size_t step) {
    pen.validate();
    if (pen.lambda == 0) return 0.0;
    const double full = double(pen.full ? pen.full : full_parameters(model));
    if (full <= 0) throw ConfigError("search: the model has no pre-trained parameters to compare the penalty with");
    const double frozen = pen.frozen_cost(step);
    double value = 0;
    for_each_searched(model, [&](auto& m) {
        using Mod = std::remove_cvref_t<decltype(m)>;
        using T = typename Mod::Gate;  // fp32 for bf16 modules
        if (m.derived()) return;
        const auto counts = m.candidate_parameters();
        const auto labels = Mod::candidate_labels();
        const auto& used = m.gate_state().used;
        if (used.size() != Mod::candidates)
            throw Error(detail::concat(detail::display_path(m.path()), ": penalty before any forward"));
        std::vector<T> dgate(Mod::candidates);
        const double base = double(m.base_parameters());
        for (std::size_t k = 0; k < Mod::candidates; ++k) {
            const double pk = labels[k] == Frozen::name() ? frozen * base : double(counts[k]);
            const double c = pen.lambda * pk / full;
            value += double(used[k]) * c;
            dgate[k] = T(c);
        }
        m.add_gate_grad(dgate);
    });
    return value;
}

}  // namespace patchwork::search
