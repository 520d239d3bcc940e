#pragma once
// Optimisers: SGD (with momentum and Nesterov), Adam and AdamW, following
// PyTorch's update rules exactly. For a parameter p with gradient g, learning
// rate lr and weight decay wd (step t = 1, 2, ... counted per parameter):
//
// SGD (no dampening):
//   g' = g + wd p                                    (L2 added to the gradient)
//   b  = g'  at the first step,  b = mu b + g'  afterwards   (only when mu > 0)
//   d  = g' + mu b  (nesterov),  d = b  (momentum),  d = g'  (mu = 0)
//   p <- p - lr d
//
// Adam:
//   g' = g + wd p                                    (L2 added to the gradient)
//   m  = b1 m + (1 - b1) g'              v = b2 v + (1 - b2) g'^2
//   m^ = m / (1 - b1^t)                  v^ = v / (1 - b2^t)
//   p <- p - lr m^ / (sqrt(v^) + eps)                (eps outside the root)
//
// AdamW (decoupled weight decay, Loshchilov & Hutter):
//   p <- p (1 - lr wd)                               (before the Adam update)
//   then Adam as above with g' = g (no L2 term)
//
// With Device = Cuda (BasicAdamW<float, Cuda>, ...) the parameters and the
// moments live on the GPU and each update is one element-wise kernel with the
// same formula (kernels/ops.cuh). Parameters stored in bf16 (BasicAdamW<bf16,
// Cuda>) keep their state in fp32 and an fp32 master copy of their values,
// taken at their first update: the update runs on the master in fp32 and
// stores its rounding in the parameter, so steps below bf16's resolution are
// not lost (mixed-precision training with fp32 master weights).
//
// Parameters live in groups, each with its own options. The learning rate a
// group uses is its base rate (options.lr) times the optimiser's factor, which
// a schedule sets each step with set_lr_factor. Moments are allocated lazily,
// at a parameter's first update. A parameter that is not trainable when step()
// runs is skipped entirely: its value is never read or written and it gets no
// state (it may have been passed while trainable and frozen since).
//
//     auto opt = patchwork::AdamW{patchwork::trainable_parameters(model), {.lr = 1e-3}};
//     opt.add_group(head_params, {.lr = 1e-2, .weight_decay = 0});
#include <cmath>
#include <concepts>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/parameter.hpp"
#include "patchwork/core/tensor.hpp"
#include "patchwork/ops/cuda_ops.hpp"

namespace patchwork {

/// Options of SGD. `{.lr = 0.1, .momentum = 0.9}`.
struct SGDOptions {
    double lr = 1e-3;
    double momentum = 0.0;      ///< mu in [0, 1); 0 disables the momentum buffer
    bool nesterov = false;      ///< Nesterov momentum (needs momentum > 0)
    double weight_decay = 0.0;  ///< L2 coefficient added to the gradient
};

/// Options of Adam. `{.lr = 1e-3, .weight_decay = 1e-4}`.
struct AdamOptions {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0.0;  ///< L2 coefficient added to the gradient
};

/// Options of AdamW (PyTorch's defaults, including weight_decay = 0.01).
struct AdamWOptions {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 1e-2;  ///< decoupled: p <- p (1 - lr wd) each step
};

/// A set of parameters sharing one set of options; `options.lr` is the base rate.
template <class T, class Options, class D = Cpu>
struct ParamGroup {
    std::vector<Parameter<T, D>*> params{};
    Options options{};
};

/// What the trainer needs from an optimiser.
template <class O>
concept Optimizer = requires(O& o, double f) {
    typename O::Scalar;
    o.step();
    o.zero_grad();
    o.set_lr_factor(f);
    { o.lr() } -> std::convertible_to<double>;
};

namespace detail {

inline void check_option(bool ok, const char* who, const char* what, double value, std::size_t group,
                         const char* requirement) {
    if (!ok)
        throw ConfigError(concat(who, ": ", what, " must be ", requirement, ", got ", what, "=", value, " (group ",
                                 group, ")"));
}

inline void check_lr(const char* who, double lr, std::size_t group) {
    check_option(std::isfinite(lr) && lr > 0, who, "lr", lr, group, "positive and finite");
}
inline void check_weight_decay(const char* who, double wd, std::size_t group) {
    check_option(std::isfinite(wd) && wd >= 0, who, "weight_decay", wd, group, "non-negative and finite");
}
inline void check_beta(const char* who, const char* name, double beta, std::size_t group) {
    check_option(beta >= 0 && beta < 1, who, name, beta, group, "in [0, 1)");
}

inline void validate(const SGDOptions& o, const char* who, std::size_t group) {
    check_lr(who, o.lr, group);
    check_option(o.momentum >= 0 && o.momentum < 1, who, "momentum", o.momentum, group, "in [0, 1)");
    check_weight_decay(who, o.weight_decay, group);
    if (o.nesterov && o.momentum == 0)
        throw ConfigError(concat(who, ": nesterov needs momentum > 0, got momentum=0 (group ", group, ")"));
}

template <class O>
    requires std::same_as<O, AdamOptions> || std::same_as<O, AdamWOptions>
void validate(const O& o, const char* who, std::size_t group) {
    check_lr(who, o.lr, group);
    check_beta(who, "beta1", o.beta1, group);
    check_beta(who, "beta2", o.beta2, group);
    check_option(std::isfinite(o.eps) && o.eps > 0, who, "eps", o.eps, group, "positive and finite");
    check_weight_decay(who, o.weight_decay, group);
}

/// Allocate a zeroed state tensor on first use; afterwards check it still fits the parameter.
template <class S, class T, class D>
Tensor<S, D>& state_tensor(Tensor<S, D>& s, const Parameter<T, D>& p, const char* who) {
    if (s.empty()) {
        s = Tensor<S, D>(p.value.shape());
    } else if (s.size() != p.value.size()) {
        throw ShapeError(concat(who, ": parameter ", display_path(p.name()), " changed from ", s.shape(), " to ",
                                p.value.shape(), " after its optimiser state was created"));
    }
    return s;
}

/// Groups, learning-rate factor, validation and the step loop shared by every
/// optimiser. Derived supplies `name`, `State` and
/// `static void update(Parameter<T, D>&, State&, const Options&, double lr)`.
template <class T, class D, class Options, class State, class Derived>
class OptimizerBase {
public:
    using Scalar = T;
    using Device = D;
    using Group = ParamGroup<T, Options, D>;

    /// Add parameters with their own options. Null pointers, and a parameter
    /// already held by this optimiser, are ConfigErrors.
    void add_group(std::vector<Parameter<T, D>*> params, Options options) {
        const std::size_t g = groups_.size();
        validate(options, Derived::name, g);
        std::unordered_set<const Parameter<T, D>*> seen;
        for (const auto& group : groups_) seen.insert(group.params.begin(), group.params.end());
        for (std::size_t i = 0; i < params.size(); ++i) {
            if (params[i] == nullptr)
                throw ConfigError(concat(Derived::name, ": parameter ", i, " of group ", g, " is null"));
            if (!seen.insert(params[i]).second)
                throw ConfigError(concat(Derived::name, ": parameter ", display_path(params[i]->name()),
                                         " is given twice (group ", g, ", position ", i, ")"));
        }
        states_.emplace_back(params.size());
        groups_.push_back(Group{std::move(params), options});
    }

    [[nodiscard]] const std::vector<Group>& groups() const noexcept { return groups_; }

    /// Effective learning rate of a group: its base rate times the schedule factor.
    [[nodiscard]] double lr(std::size_t group = 0) const {
        check_group(group);
        return groups_[group].options.lr * factor_;
    }
    /// Set the base learning rate. Every group is rescaled by the same ratio,
    /// so group 0's base becomes `lr` and the ratios between groups are kept.
    void set_lr(double lr) {
        check_lr(Derived::name, lr, 0);
        if (groups_.empty()) return;
        const double ratio = lr / groups_[0].options.lr;
        for (auto& g : groups_) g.options.lr *= ratio;
        groups_[0].options.lr = lr;  // exact, whatever the rounding of the ratio
    }
    /// Multiply every group's base rate by `factor` (what a schedule returns);
    /// the base rates themselves are unchanged. 0 is allowed (a no-op step for SGD).
    void set_lr_factor(double factor) {
        if (!std::isfinite(factor) || factor < 0)
            throw ConfigError(concat(Derived::name, ": learning-rate factor must be non-negative and finite, got ",
                                     factor));
        factor_ = factor;
    }
    [[nodiscard]] double lr_factor() const noexcept { return factor_; }

    /// Zero the gradient of every trainable parameter held.
    void zero_grad() {
        for (auto& g : groups_)
            for (auto* p : g.params) p->zero_grad();
    }

    /// One update of every trainable parameter held; frozen ones are skipped.
    void step() {
        for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
            const auto& group = groups_[gi];
            const double lr = group.options.lr * factor_;
            for (std::size_t i = 0; i < group.params.size(); ++i) {
                Parameter<T, D>& p = *group.params[i];
                if (!p.trainable()) continue;
                if (p.grad.size() != p.value.size())
                    throw ShapeError(concat(Derived::name, ": parameter ", display_path(p.name()), " has value ",
                                            p.value.shape(), " but gradient ", p.grad.shape()));
                Derived::update(p, states_[gi][i], group.options, lr);
            }
        }
        ++steps_;
    }

    /// Number of step() calls so far.
    [[nodiscard]] std::size_t steps() const noexcept { return steps_; }
    /// Scalars of optimiser state allocated so far (moments are created lazily).
    [[nodiscard]] std::size_t state_size() const {
        std::size_t n = 0;
        for (const auto& g : states_)
            for (const auto& s : g) n += s.size();
        return n;
    }

protected:
    OptimizerBase(std::vector<Parameter<T, D>*> params, Options options) { add_group(std::move(params), options); }

private:
    void check_group(std::size_t group) const {
        if (group >= groups_.size())
            throw ConfigError(concat(Derived::name, ": group ", group, " does not exist (", groups_.size(),
                                     " groups)"));
    }

    std::vector<Group> groups_;
    std::vector<std::vector<State>> states_;  ///< parallel to groups_[g].params
    double factor_ = 1.0;
    std::size_t steps_ = 0;
};

}  // namespace detail

namespace detail {
/// bf16 parameters (device only) are updated through an fp32 master copy.
template <class T, class D>
void check_optimizer_scalar() {
    static_assert(!std::is_same_v<T, bf16> || std::is_same_v<D, Cuda>,
                  "patchwork optimisers: bf16 parameters live on the device (Device = Cuda); CPU modules compute "
                  "in float or double");
}

/// The fp32 master copy of a bf16 parameter (null for float and double ones),
/// taken from the parameter's value at its first update: from then on the
/// update reads and writes the master and stores its rounding in the parameter.
template <class T, class D>
Tensor<compute_t<T>, D>* master_copy(Tensor<compute_t<T>, D>& master, Parameter<T, D>& p, const char* who) {
    if constexpr (!std::is_same_v<T, bf16>) {
        return nullptr;
    } else {
        if (master.empty()) cuda::convert(p.value, master, p.name());
        else state_tensor(master, p, who);
        return &master;
    }
}
}  // namespace detail

/// Per-parameter state of SGD: the momentum buffer (empty until the first step,
/// or when mu = 0), in compute_t<T>; for a bf16 parameter its fp32 master copy.
template <class T, class D = Cpu>
struct SGDState {
    Tensor<compute_t<T>, D> momentum;
    Tensor<compute_t<T>, D> master;  ///< bf16 parameters only
    [[nodiscard]] std::size_t size() const noexcept { return momentum.size() + master.size(); }
};

/// Per-parameter state of Adam and AdamW: first and second moments (in
/// compute_t<T>), the step count t, and for a bf16 parameter its fp32 master copy.
template <class T, class D = Cpu>
struct AdamState {
    Tensor<compute_t<T>, D> m, v;
    Tensor<compute_t<T>, D> master;  ///< bf16 parameters only
    std::size_t t = 0;
    [[nodiscard]] std::size_t size() const noexcept { return m.size() + v.size() + master.size(); }
};

/// Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.
template <class T, class D = Cpu>
class BasicSGD : public detail::OptimizerBase<T, D, SGDOptions, SGDState<T, D>, BasicSGD<T, D>> {
    using Base = detail::OptimizerBase<T, D, SGDOptions, SGDState<T, D>, BasicSGD<T, D>>;
    friend Base;

public:
    static constexpr const char* name = "SGD";
    using Options = SGDOptions;

    explicit BasicSGD(std::vector<Parameter<T, D>*> params, SGDOptions options = {})
        : Base(std::move(params), options) {
        detail::check_optimizer_scalar<T, D>();
    }

private:
    static void update(Parameter<T, D>& p, SGDState<T, D>& s, const SGDOptions& o, double lr) {
        if constexpr (std::is_same_v<D, Cuda>) {
            const bool first = s.momentum.empty();
            if (o.momentum != 0) detail::state_tensor(s.momentum, p, name);
            cuda::sgd_update(p.value, p.grad, s.momentum, detail::master_copy(s.master, p, name), first, lr,
                             o.momentum, o.weight_decay, o.nesterov, p.name());
        } else {
            cpu_update(p, s, o, lr);
        }
    }
    static void cpu_update(Parameter<T>& p, SGDState<T>& s, const SGDOptions& o, double lr) {
        auto w = p.value.vector().array();
        const auto g = p.grad.vector().array();
        const T step = T(lr), wd = T(o.weight_decay), mu = T(o.momentum);
        if (o.momentum == 0) {
            if (o.weight_decay != 0)
                w -= step * (g + wd * w);
            else
                w -= step * g;
            return;
        }
        const bool first = s.momentum.empty();
        auto b = detail::state_tensor(s.momentum, p, name).vector().array();
        if (first)
            b = g + wd * w;
        else
            b = mu * b + g + wd * w;
        if (o.nesterov)
            w -= step * (g + wd * w + mu * b);
        else
            w -= step * b;
    }
};

namespace detail {

/// The Adam update; `decoupled` selects AdamW's weight decay instead of L2.
template <bool decoupled, class T, class O>
void adam_update_cpu(Parameter<T>& p, AdamState<T>& s, const O& o, double lr, const char* who) {
    auto w = p.value.vector().array();
    const auto g = p.grad.vector().array();
    auto m = state_tensor(s.m, p, who).vector().array();
    auto v = state_tensor(s.v, p, who).vector().array();
    ++s.t;
    const double bc1 = 1 - std::pow(o.beta1, double(s.t));
    const double bc2 = 1 - std::pow(o.beta2, double(s.t));
    const T b1 = T(o.beta1), b2 = T(o.beta2), wd = T(o.weight_decay);
    if (decoupled && o.weight_decay != 0) w *= T(1 - lr * o.weight_decay);
    if (!decoupled && o.weight_decay != 0) {
        m = b1 * m + (T(1) - b1) * (g + wd * w);
        v = b2 * v + (T(1) - b2) * (g + wd * w).square();
    } else {
        m = b1 * m + (T(1) - b1) * g;
        v = b2 * v + (T(1) - b2) * g.square();
    }
    // As PyTorch: p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps).
    const T step = T(lr / bc1), sqrt_bc2 = T(std::sqrt(bc2)), eps = T(o.eps);
    w -= step * m / (v.sqrt() / sqrt_bc2 + eps);
}

template <bool decoupled, class T, class D, class O>
void adam_update(Parameter<T, D>& p, AdamState<T, D>& s, const O& o, double lr, const char* who) {
    if constexpr (std::is_same_v<D, Cuda>) {
        state_tensor(s.m, p, who);
        state_tensor(s.v, p, who);
        ++s.t;
        cuda::adam_update(p.value, p.grad, s.m, s.v, master_copy(s.master, p, who), s.t, lr, o.beta1, o.beta2, o.eps,
                          o.weight_decay, decoupled, p.name());
    } else {
        adam_update_cpu<decoupled>(p, s, o, lr, who);
    }
}

}  // namespace detail

namespace detail {
/// Adam and AdamW: one implementation, `Decoupled` choosing the weight decay
/// (L2 added to the gradient, or AdamW's p <- p (1 - lr wd)); Options carries
/// the defaults (AdamOptions, AdamWOptions).
template <class T, class D, class Opts, bool Decoupled>
class AdamFamily : public OptimizerBase<T, D, Opts, AdamState<T, D>, AdamFamily<T, D, Opts, Decoupled>> {
    using Base = OptimizerBase<T, D, Opts, AdamState<T, D>, AdamFamily<T, D, Opts, Decoupled>>;
    friend Base;

public:
    static constexpr const char* name = Decoupled ? "AdamW" : "Adam";
    using Options = Opts;

    explicit AdamFamily(std::vector<Parameter<T, D>*> params, Opts options = {}) : Base(std::move(params), options) {
        check_optimizer_scalar<T, D>();
    }

private:
    static void update(Parameter<T, D>& p, AdamState<T, D>& s, const Opts& o, double lr) {
        adam_update<Decoupled>(p, s, o, lr, name);
    }
};
}  // namespace detail

/// Adam with bias correction; weight decay is L2 added to the gradient.
template <class T, class D = Cpu>
using BasicAdam = detail::AdamFamily<T, D, AdamOptions, false>;

/// AdamW: Adam with decoupled weight decay, p <- p (1 - lr wd) before each update.
template <class T, class D = Cpu>
using BasicAdamW = detail::AdamFamily<T, D, AdamWOptions, true>;

using SGD = BasicSGD<float>;
using Adam = BasicAdam<float>;
using AdamW = BasicAdamW<float>;

}  // namespace patchwork
