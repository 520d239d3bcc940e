#pragma once
// OverParam<Factors...>: train a Linear layer through an overparameterised
// product of factors, then collapse the product back into the compact layer
// (deep overparameterised multi-task learning, Ren & Shi, 2023).
//
// Forward. With W: [out, in] the Linear's weight and K = sizeof...(Factors) >= 2:
//   W_t = F_1 F_2 ... F_K,   F_1: [out, h],  F_j: [h, h] (1 < j < K),  F_K: [h, in]
//   y   = x W_t^T + b
// where h = expansion * min(in, out) is the inner width and t the active task.
// Each factor is declared SharedFactor (one matrix for every task) or
// TaskFactor (one matrix per task, the active task's used): OverParam<
// SharedFactor, TaskFactor, SharedFactor> is W_t = U M_t V. OverParam<> means
// three shared factors, W = U M V. The product is formed once per forward (not
// per sample), written into the Linear's weight, and the Linear's own forward
// runs; the bias stays the Linear's (selection policies decide whether it
// trains: Tune<Linear, FineTune, OverParam<>> trains factors and bias).
//
// Backward. With g = dL/dy [N, out] and x the input [N, in], the Linear's
// backward gives dL/dx = g W and db = 1^T g; the weight's gradient is formed
// once, dL/dW = g^T x [out, in]. Writing W = A F_j B with A = F_1..F_{j-1}
// (the identity for j = 1) and B = F_{j+1}..F_K (the identity for j = K):
//   W_pq = sum_{r,s} A_pr (F_j)_rs B_sq
//   dL/d(F_j)_rs = sum_{p,q} dW_pq A_pr B_sq   ->   dF_j = A^T dW B^T
// e.g. for U M V: dU = dW (M V)^T, dM = U^T dW V^T, dV = (U M)^T dW. The code
// keeps the prefixes P_j = F_1..F_j from forward and walks right to left
// with E = dW B^T, which grows one factor at a time:
//   dF_K = P_{K-1}^T dW;   E = dW F_K^T;
//   for j = K-1 .. 2:  dF_j = P_{j-1}^T E,  E <- E F_j^T;
//   dF_1 = E.
// Cost per step: the product, about out h in + (K-2) out h^2 multiply-adds,
// the same again for the factor gradients, plus the dW GEMM (N out in) that a
// trainable compact Linear would run anyway. When out > in every product runs
// on the transposed chain (W^T = F_K^T .. F_1^T), so the kept prefixes are
// always min(in, out) x h.
//
// collapse() multiplies the factors into the compact layer and releases them:
// afterwards forward is the plain Linear's (same kernel, same shapes), and the
// parameters are the compact ones, out in + out with shared factors only, or
// one [out, in] weight per task ("<path>.task<t>.weight") plus the bias when a
// factor is per task; set_task then selects the weight (one copy per switch).
// Collapse is final: backward afterwards throws.
//
// Initialisation (OverParamOptions::init):
// * from_weight (default): the product reproduces the Linear's current weight
//   (pre-trained, or its own Kaiming draw) exactly, up to rounding. All factors
//   but the one at the narrow end are drawn as for `random`; the last one is
//   then solved for: with L = F_1..F_{K-1} ([out, h], full row rank as h >= out)
//   and Z a random draw, F_K = Z + L^T (L L^T)^{-1} (W - L Z), so L F_K = W and
//   F_K keeps a random component in the null space of L (without it the extra
//   width would start, and stay, unused). When out > in the solve runs on the
//   transposed chain, for F_1. Per-task factors start as copies, so every
//   task starts from W.
// * random: every factor entry is N(0, 1/fan_in) with fan_in = h for F_1..F_{K-1}
//   and in for F_K, so each product entry sums h^{K-1} terms of variance
//   (1/h)^{K-1} (1/in): Var(W_pq) = 1/in, the variance of the Linear's own
//   Kaiming-uniform (gain 1) initialisation. Per-task factors are independent.
//
// Parameters while training: the factors ("<path>.overparam.factor<j>", per
// task "<path>.overparam.factor<j>.task<t>", owner task t) and the bias. The
// factors carry Role::weight (they are the layer's weight, factored) and are
// trainable by construction: the policy decides them, so an outer selection
// policy leaves them alone, as it leaves injected parameters.
#include <algorithm>
#include <array>
#include <concepts>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "patchwork/core/module.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/ops/gemm.hpp"
#include "patchwork/policies/policy.hpp"

namespace patchwork {

/// A factor shared by every task.
struct SharedFactor {
    static constexpr bool per_task = false;
};
/// A factor with one matrix per task; the active task's is used.
struct TaskFactor {
    static constexpr bool per_task = true;
};

/// How the factors start (see the header comment).
enum class OverParamInit {
    from_weight,  ///< the product reproduces the Linear's weight exactly
    random,       ///< variance-preserving random factors (training from scratch)
};

/// Run-time settings of an OverParam layer: `{.expansion = 4, .tasks = 3}`.
struct OverParamOptions {
    std::size_t expansion = 2;  ///< inner width h = expansion * min(in, out); must be positive
    std::size_t tasks = 1;      ///< number of tasks (per-task factors hold one matrix each)
    OverParamInit init = OverParamInit::from_weight;
};

namespace detail {
template <class M>
inline constexpr bool over_param_applies = false;
template <class T>
inline constexpr bool over_param_applies<BasicLinear<T>> = true;

template <class F>
inline constexpr bool is_factor_kind = std::is_same_v<F, SharedFactor> || std::is_same_v<F, TaskFactor>;

/// Z + L^T (L L^T)^{-1} (W - L Z): the solution F of L F = W closest to Z
/// (L: [a, h] of full row rank, W: [a, b], Z: [h, b]); one refinement step.
inline RowMatrix<double> solve_end_factor(const RowMatrix<double>& l, const RowMatrix<double>& w,
                                          const RowMatrix<double>& z) {
    const RowMatrix<double> gram = l * l.transpose();
    const Eigen::LDLT<RowMatrix<double>> ldlt(gram);
    RowMatrix<double> f = z + l.transpose() * ldlt.solve(w - l * z);
    f += l.transpose() * ldlt.solve(w - l * f);
    return f;
}
}  // namespace detail

/// A Linear layer trained through a product of factors and collapsed back into it.
template <class Inner, class... Factors>
class OverParamModule : public ModuleBase {
    static_assert(detail::over_param_applies<Inner>,
                  "patchwork::OverParam applies only to a Linear layer; to overparameterise a block, tune each of "
                  "its Linear layers: Sequential<Tune<Linear, OverParam<>>, Relu, ...>");
    static_assert(sizeof...(Factors) >= 2,
                  "patchwork::OverParam<F...>: a factor chain needs at least two factors (W = F1 F2 ...)");
    static_assert((detail::is_factor_kind<Factors> && ...),
                  "patchwork::OverParam<F...>: every factor is patchwork::SharedFactor or patchwork::TaskFactor");

public:
    using Scalar = typename Inner::Scalar;
    static constexpr const char* kind() { return Inner::kind(); }
    static constexpr unsigned roles = Inner::roles;
    static constexpr bool fixed_width = true;
    /// Number of factors K.
    static constexpr std::size_t depth = sizeof...(Factors);
    /// per_task[j]: factor j holds one matrix per task.
    static constexpr std::array<bool, depth> per_task = {Factors::per_task...};
    static constexpr bool any_per_task = (Factors::per_task || ...);

    /// Build the Linear from its constructor arguments (in, out[, bias]), with default options.
    template <class... Args>
        requires std::constructible_from<Inner, Args...> &&
                 (sizeof...(Args) != 1 || (!std::same_as<std::remove_cvref_t<Args>, OverParamModule> && ...))
    explicit OverParamModule(Args&&... args) : OverParamModule(Inner(std::forward<Args>(args)...), OverParamOptions{}) {}

    /// Overparameterise `inner` (a pre-trained or new Linear) with the given options.
    OverParamModule(Inner inner, OverParamOptions options) : inner_(std::move(inner)), options_(options) {
        if (options_.expansion == 0)
            throw ConfigError(detail::concat(detail::display_path(inner_.path()),
                                             ": OverParam expansion must be positive, got expansion=0 (linear in=",
                                             inner_.in_features(), " out=", inner_.out_features(), ")"));
        if (options_.tasks == 0)
            throw ConfigError(detail::concat(detail::display_path(inner_.path()),
                                             ": OverParam needs at least one task, got tasks=0"));
        width_ = options_.expansion * std::min(inner_.in_features(), inner_.out_features());
        flip_ = inner_.out_features() > inner_.in_features();
        // The Linear's weight is the product from now on, never trained directly.
        inner_.weight.set_trainable(false);
        make_factors();
        init_factors(default_rng());
        renew_decisions(*this);  // a bias copied out of another policy's module is undecided here
        set_path(inner_.path());
    }

    /// Marks the Linear's weight, the factors and the collapsed per-task weights
    /// as decided by this module (see renew_decisions).
    void remark_decided() {
        inner_.weight.mark_policy_decided();
        for (auto& list : factors_)
            for (auto& p : list) p.mark_policy_decided();
        for (auto& w : task_weights_) w.mark_policy_decided();
    }

    /// The wrapped Linear (its weight holds the last formed product).
    [[nodiscard]] Inner& inner() noexcept { return inner_; }
    [[nodiscard]] const Inner& inner() const noexcept { return inner_; }
    template <class F>
    void visit_children(F&& f) {
        f(inner_);
    }
    [[nodiscard]] std::size_t in_features() const noexcept { return inner_.in_features(); }
    [[nodiscard]] std::size_t out_features() const noexcept { return inner_.out_features(); }
    /// Inner width h = expansion * min(in, out).
    [[nodiscard]] std::size_t width() const noexcept { return width_; }
    [[nodiscard]] std::size_t expansion() const noexcept { return options_.expansion; }
    [[nodiscard]] std::size_t tasks() const noexcept { return options_.tasks; }
    [[nodiscard]] const OverParamOptions& options() const noexcept { return options_; }
    [[nodiscard]] bool collapsed() const noexcept { return collapsed_; }

    /// The active task.
    [[nodiscard]] std::size_t task() const noexcept { return task_; }
    /// Select the task whose factors (or, after collapse, whose weight) forward uses.
    void set_task(std::size_t t) {
        if (t >= options_.tasks)
            throw ConfigError(detail::concat(detail::display_path(path_), ": task index ", t,
                                             " out of range (this OverParam layer has ", options_.tasks, " task",
                                             options_.tasks == 1 ? "" : "s", ")"));
        if (t == task_) return;
        task_ = t;
        if constexpr (any_per_task)
            if (collapsed_) inner_.weight.value = task_weights_[t].value;
    }

    /// Factor j (0-based) of task t (of the active task when omitted); shared factors ignore t.
    [[nodiscard]] Parameter<Scalar>& factor(std::size_t j, std::size_t t) {
        check_factors_exist("factor()");
        if (j >= depth)
            throw ConfigError(detail::concat(detail::display_path(path_), ": factor index ", j,
                                             " out of range (the chain has ", depth, " factors)"));
        if (t >= options_.tasks)
            throw ConfigError(detail::concat(detail::display_path(path_), ": task index ", t,
                                             " out of range (this OverParam layer has ", options_.tasks, " tasks)"));
        return param(j, t);
    }
    [[nodiscard]] Parameter<Scalar>& factor(std::size_t j) { return factor(j, task_); }

    /// The compact weight of task t: the product of its factors, or after collapse the stored weight.
    [[nodiscard]] Tensor<Scalar> weight_of(std::size_t t) {
        if (t >= options_.tasks)
            throw ConfigError(detail::concat(detail::display_path(path_), ": task index ", t,
                                             " out of range (this OverParam layer has ", options_.tasks, " tasks)"));
        if (collapsed_) {
            if constexpr (any_per_task) return task_weights_[t].value;
            else return inner_.weight.value;
        }
        Tensor<Scalar> w(Shape{inner_.out_features(), inner_.in_features()});
        form(t, w);
        return w;
    }

    /// A plain Linear with task t's compact weight and this layer's bias (new
    /// parameters, trainable, undecided by any policy): the inference layer.
    [[nodiscard]] Inner compact(std::size_t t) {
        Inner c = inner_;
        c.weight = Parameter<Scalar>("weight", Role::weight, Shape{inner_.out_features(), inner_.in_features()});
        c.weight.value = weight_of(t);
        c.bias = Parameter<Scalar>("bias", Role::bias, Shape{inner_.has_bias() ? inner_.out_features() : 0});
        c.bias.value = inner_.bias.value;
        if (!inner_.has_bias()) c.bias.set_trainable(false);
        c.set_path(inner_.path());
        return c;
    }

    /// Multiply the factors into the compact weight (one per task when a factor
    /// is per task) and release them. No-op when already collapsed.
    void collapse() {
        if (collapsed_) return;
        if constexpr (any_per_task) {
            task_weights_.clear();
            task_weights_.reserve(options_.tasks);
            for (std::size_t t = 0; t < options_.tasks; ++t) {
                Parameter<Scalar> w(detail::concat("task", t, ".weight"), Role::weight,
                                    Shape{inner_.out_features(), inner_.in_features()}, false, int(t));
                w.mark_policy_decided();
                form(t, w.value);
                task_weights_.push_back(std::move(w));
            }
            inner_.weight.value = task_weights_[task_].value;
        } else {
            form(0, inner_.weight.value);
        }
        for (auto& list : factors_)
            for (auto& p : list) {
                p.set_trainable(false);
                p.value.release();
            }
        for (auto& t : prefix_) t.release();
        dw_.release();
        e_.release();
        e2_.release();
        collapsed_ = true;
        formed_task_ = no_task;
        set_path(path_);
    }

    /// Re-draws the Linear, then the factors per the options (un-collapsing a collapsed layer).
    void reset_parameters(Rng& rng) {
        inner_.reset_parameters(rng);
        if (collapsed_) {
            make_factors();
            task_weights_.clear();
            collapsed_ = false;
            set_path(path_);
        }
        init_factors(rng);
        formed_task_ = no_task;
    }

    const Tensor<Scalar>& forward(const Tensor<Scalar>& x) {
        if (!collapsed_) {
            form(task_, inner_.weight.value, prefix_);
            formed_task_ = task_;
        }
        return inner_.forward(x);
    }

    const Tensor<Scalar>& backward(const Tensor<Scalar>& dy) {
        using T = Scalar;
        if (collapsed_)
            throw Error(detail::concat(detail::display_path(path_),
                                       ": OverParam backward after collapse(): the factors were multiplied into the "
                                       "compact weight and released; train before collapsing"));
        if (formed_task_ != no_task && formed_task_ != task_)
            throw Error(detail::concat(detail::display_path(path_), ": OverParam backward for task ", task_,
                                       ", but the last forward used task ", formed_task_,
                                       " (call set_task before forward, not between forward and backward)"));
        inner_.set_input_grad(input_grad_);
        const Tensor<T>& dx = inner_.backward(dy);  // checks dy; db and dX = dY W
        bool any = false;
        for (std::size_t j = 0; j < depth; ++j) any = any || param(j, task_).wants_grad();
        if (!any) return dx;
        const Tensor<T>& x = inner_.last_input();
        dw_.resize(Shape{inner_.out_features(), inner_.in_features()});
        ops::gemm_tn(dy.matrix(), x.matrix(), dw_.matrix(), T(1), T(0));  // dW = dY^T X, once
        if (flip_) factor_grads<true>(task_, dw_.matrix().transpose());
        else factor_grads<false>(task_, dw_.matrix());
        return dx;
    }

    /// Before collapse: the factors (every task's), then the bias. After: the
    /// compact weight(s), then the bias.
    template <class F>
    void visit(F&& f) {
        if (!collapsed_) {
            for (auto& list : factors_)
                for (auto& p : list) f(p);
            if (inner_.has_bias()) f(inner_.bias);
        } else if constexpr (any_per_task) {
            for (auto& w : task_weights_) f(w);
            if (inner_.has_bias()) f(inner_.bias);
        } else {
            inner_.visit(f);
        }
    }

    /// The Linear keeps the path; factors read "<path>.overparam.factor<j>[.task<t>]",
    /// collapsed per-task weights "<path>.task<t>.weight".
    void set_path(const std::string& p) {
        path_ = p;
        inner_.set_path(p);
        const std::string own = child_path("overparam");
        for (auto& list : factors_)
            for (auto& q : list) q.set_prefix(own);
        for (auto& w : task_weights_) w.set_prefix(p);
    }

private:
    static constexpr std::size_t no_task = std::numeric_limits<std::size_t>::max();

    [[nodiscard]] Parameter<Scalar>& param(std::size_t j, std::size_t t) noexcept {
        return factors_[j][per_task[j] ? t : 0];
    }

    void check_factors_exist(const char* what) const {
        if (collapsed_)
            throw Error(detail::concat(detail::display_path(path_), ": OverParam ", what,
                                       " after collapse(): the factors were released"));
    }

    [[nodiscard]] Shape factor_shape(std::size_t j) const {
        const std::size_t rows = j == 0 ? inner_.out_features() : width_;
        const std::size_t cols = j + 1 == depth ? inner_.in_features() : width_;
        return Shape{rows, cols};
    }

    void make_factors() {
        for (std::size_t j = 0; j < depth; ++j) {
            auto& list = factors_[j];
            list.clear();
            const std::size_t copies = per_task[j] ? options_.tasks : 1;
            for (std::size_t t = 0; t < copies; ++t) {
                std::string leaf = detail::concat("factor", j);
                if (per_task[j]) leaf += detail::concat(".task", t);
                list.emplace_back(std::move(leaf), Role::weight, factor_shape(j), true,
                                  per_task[j] ? int(t) : shared_task);
                list.back().mark_policy_decided();
            }
        }
        prefix_.assign(depth > 2 ? depth - 2 : 0, Tensor<Scalar>{});
    }

    void init_factors(Rng& rng) {
        const bool random = options_.init == OverParamInit::random;
        for (std::size_t j = 0; j < depth; ++j) {
            const double fan_in = double(j + 1 == depth ? inner_.in_features() : width_);
            auto& list = factors_[j];
            for (std::size_t t = 0; t < list.size(); ++t) {
                if (random || t == 0) init::normal(list[t].value, rng, 0.0, 1.0 / std::sqrt(fan_in));
                else list[t].value = list[0].value;  // per-task copies start equal
            }
        }
        if (random) return;
        // Solve the factor at the narrow end so that the product is the Linear's weight.
        using Mat = RowMatrix<double>;
        const auto as_double = [](const Tensor<Scalar>& t) -> Mat { return t.matrix().template cast<double>(); };
        const Mat w = as_double(inner_.weight.value);
        const std::size_t solved = flip_ ? 0 : depth - 1;
        Mat f;
        if (!flip_) {
            Mat l = as_double(factors_[0][0].value);
            for (std::size_t j = 1; j + 1 < depth; ++j) l = (l * as_double(factors_[j][0].value)).eval();
            f = detail::solve_end_factor(l, w, as_double(factors_[solved][0].value));
        } else {
            Mat r = as_double(factors_[depth - 1][0].value);
            for (std::size_t j = depth - 1; j-- > 1;) r = (as_double(factors_[j][0].value) * r).eval();
            const Mat rt = r.transpose(), wt = w.transpose(), zt = as_double(factors_[0][0].value).transpose();
            f = detail::solve_end_factor(rt, wt, zt).transpose();
        }
        for (auto& p : factors_[solved]) p.value.matrix() = f.template cast<Scalar>();
    }

    /// Factor j (0-based) of the chain in processing order, G_j: F_j, or on the transposed
    /// chain (out > in) F_{K-1-j}^T, so that G_0 G_1 ... G_{K-1} is W or W^T.
    template <bool Flip>
    [[nodiscard]] auto chain(std::size_t j, std::size_t t) {
        auto& p = param(Flip ? depth - 1 - j : j, t);
        if constexpr (Flip) return p.value.matrix().transpose();
        else return p.value.matrix();
    }
    template <bool Flip>
    [[nodiscard]] Parameter<Scalar>& chain_param(std::size_t j, std::size_t t) noexcept {
        return param(Flip ? depth - 1 - j : j, t);
    }
    template <bool Flip>
    [[nodiscard]] auto chain_grad(std::size_t j, std::size_t t) {
        auto& p = chain_param<Flip>(j, t);
        if constexpr (Flip) return p.grad.matrix().transpose();
        else return p.grad.matrix();
    }
    /// f(G_0 G_1 ... G_{j-1}) for j >= 1: G_0 itself, or the prefix kept by the last product.
    template <bool Flip, class F>
    void with_prefix(const std::vector<Tensor<Scalar>>& prefixes, std::size_t j, std::size_t t, F&& f) {
        if (j == 1) f(chain<Flip>(0, t));
        else f(prefixes[j - 2].matrix());
    }

    /// W_t into `dst` ([out, in]), the partial products into `prefixes` (forward
    /// keeps them in prefix_ for backward; weight_of and collapse use their own).
    void form(std::size_t t, Tensor<Scalar>& dst, std::vector<Tensor<Scalar>>& prefixes) {
        dst.resize(Shape{inner_.out_features(), inner_.in_features()});
        prefixes.resize(depth > 2 ? depth - 2 : 0);
        if (flip_) form_chain<true>(t, dst.matrix().transpose(), prefixes);
        else form_chain<false>(t, dst.matrix(), prefixes);
    }
    void form(std::size_t t, Tensor<Scalar>& dst) {
        std::vector<Tensor<Scalar>> scratch;
        form(t, dst, scratch);
    }
    template <bool Flip, class Dst>
    void form_chain(std::size_t t, Dst&& dst, std::vector<Tensor<Scalar>>& prefixes) {
        using T = Scalar;
        const std::size_t a = Flip ? inner_.in_features() : inner_.out_features();
        for (std::size_t j = 1; j + 1 < depth; ++j) {  // prefixes[j-1] = G_0 .. G_j
            prefixes[j - 1].resize(Shape{a, width_});
            with_prefix<Flip>(prefixes, j, t, [&](const auto& left) {
                ops::gemm_nn(left, chain<Flip>(j, t), prefixes[j - 1].matrix(), T(1), T(0));
            });
        }
        with_prefix<Flip>(prefixes, depth - 1, t, [&](const auto& left) {
            ops::gemm_nn(left, chain<Flip>(depth - 1, t), dst, T(1), T(0));
        });
    }

    /// Factor gradients of task t from dP (dW, or dW^T on the transposed chain); see the header comment.
    template <bool Flip, class DP>
    void factor_grads(std::size_t t, const DP& dp) {
        using T = Scalar;
        const std::size_t last = depth - 1;
        if (chain_param<Flip>(last, t).wants_grad())
            with_prefix<Flip>(prefix_, last, t, [&](const auto& left) {
                ops::gemm_tn(left, dp, chain_grad<Flip>(last, t), T(1), T(1));  // dG_K = P_{K-1}^T dP
            });
        const auto earlier_trains = [&](std::size_t j) {  // any of G_0 .. G_{j-1} trainable
            for (std::size_t i = 0; i < j; ++i)
                if (chain_param<Flip>(i, t).wants_grad()) return true;
            return false;
        };
        if (!earlier_trains(last)) return;
        const std::size_t a = Flip ? inner_.in_features() : inner_.out_features();
        e_.resize(Shape{a, width_});
        ops::gemm_nt(dp, chain<Flip>(last, t), e_.matrix(), T(1), T(0));  // E = dP G_K^T
        for (std::size_t j = last - 1; j >= 1; --j) {
            if (chain_param<Flip>(j, t).wants_grad())
                with_prefix<Flip>(prefix_, j, t, [&](const auto& left) {
                    ops::gemm_tn(left, e_.matrix(), chain_grad<Flip>(j, t), T(1), T(1));  // dG_j = P_{j-1}^T E
                });
            if (!earlier_trains(j)) return;
            e2_.resize(Shape{a, width_});
            ops::gemm_nt(e_.matrix(), chain<Flip>(j, t), e2_.matrix(), T(1), T(0));  // E <- E G_j^T
            std::swap(e_, e2_);
        }
        chain_grad<Flip>(0, t) += e_.matrix();  // dG_1 = E
    }

    Inner inner_;
    OverParamOptions options_;
    std::size_t width_ = 0;
    bool flip_ = false;
    std::size_t task_ = 0;
    std::size_t formed_task_ = no_task;
    bool collapsed_ = false;
    std::array<std::vector<Parameter<Scalar>>, depth> factors_;
    std::vector<Parameter<Scalar>> task_weights_;  ///< after collapse, when a factor is per task
    std::vector<Tensor<Scalar>> prefix_;           ///< P_2 .. P_{K-1} of the last product
    Tensor<Scalar> dw_, e_, e2_;
};

namespace detail {
template <class Inner, class... Factors>
struct over_param_module {
    using type = OverParamModule<Inner, Factors...>;
};
template <class Inner>
struct over_param_module<Inner> {
    using type = OverParamModule<Inner, SharedFactor, SharedFactor, SharedFactor>;
};

template <class M>
inline constexpr bool is_over_param = false;
template <class Inner, class... Factors>
inline constexpr bool is_over_param<OverParamModule<Inner, Factors...>> = true;
}  // namespace detail

/// Injection policy: train a Linear through a product of factors, each
/// SharedFactor or TaskFactor; OverParam<> is W = U M V with all three shared.
/// Expansion, tasks and initialisation are run-time options:
/// `Tune<Linear, OverParam<SharedFactor, TaskFactor, SharedFactor>>(Linear(784, 64), {.expansion = 4, .tasks = 2})`.
template <class... Factors>
struct OverParam {
    static constexpr PolicyKind policy_kind = PolicyKind::inject;
    static constexpr const char* name() { return "OverParam"; }
    template <class Inner>
    using module = typename detail::over_param_module<Inner, Factors...>::type;
};

/// set_task(t) on every OverParam layer inside `model`; returns how many there are.
/// Throws ConfigError (naming the layer) when t is out of range for one of them.
template <class M>
std::size_t set_overparam_task(M& model, std::size_t t) {
    std::size_t n = 0;
    for_each_module(model, [&](auto& m) {
        if constexpr (detail::is_over_param<std::remove_cvref_t<decltype(m)>>) {
            m.set_task(t);
            ++n;
        }
    });
    return n;
}

/// collapse() every OverParam layer inside `model`; returns how many there are.
template <class M>
std::size_t collapse_overparam(M& model) {
    std::size_t n = 0;
    for_each_module(model, [&](auto& m) {
        if constexpr (detail::is_over_param<std::remove_cvref_t<decltype(m)>>) {
            m.collapse();
            ++n;
        }
    });
    return n;
}

}  // namespace patchwork
