#pragma once
// Parameter<T>: a named, role-tagged tensor of a module.
//
// The gradient buffer exists only while the parameter is trainable: a frozen
// parameter costs its value and nothing else, and modules skip the work that
// would only feed its gradient (the weight-gradient GEMM of a frozen Linear).
#include <cstddef>
#include <string>
#include <string_view>

#include "patchwork/core/tensor.hpp"

namespace patchwork {

/// What a parameter is for. Pre-trained roles come with the base model;
/// injected roles are added by a policy and are trainable by construction.
enum class Role {
    weight,        ///< a dense or convolutional weight
    bias,          ///< an additive bias
    norm_scale,    ///< the gain (gamma) of a normalisation layer
    norm_shift,    ///< the shift (beta) of a normalisation layer
    depthwise,     ///< depthwise convolution filters
    adapter,       ///< bottleneck adapter weights (injected)
    lora,          ///< low-rank update factors (injected)
    scale_shift,   ///< per-channel affine patch (injected)
    architecture,  ///< architecture weights of a searched module (injected)
};

[[nodiscard]] constexpr std::string_view role_name(Role r) noexcept {
    switch (r) {
        case Role::weight: return "weight";
        case Role::bias: return "bias";
        case Role::norm_scale: return "norm_scale";
        case Role::norm_shift: return "norm_shift";
        case Role::depthwise: return "depthwise";
        case Role::adapter: return "adapter";
        case Role::lora: return "lora";
        case Role::scale_shift: return "scale_shift";
        case Role::architecture: return "architecture";
    }
    return "unknown";
}

/// True for roles a policy adds on top of a pre-trained model.
[[nodiscard]] constexpr bool is_injected(Role r) noexcept {
    return r == Role::adapter || r == Role::lora || r == Role::scale_shift || r == Role::architecture;
}

namespace detail {
/// Bit r set: parameters of Role r accumulate gradients in backward (see GradientRoles).
inline unsigned& gradient_role_mask() noexcept {
    thread_local unsigned mask = ~0u;
    return mask;
}
}  // namespace detail

/// While alive, backward passes on this thread accumulate gradients only into
/// trainable parameters whose role is in `roles` (a bit set, bit r for Role r);
/// the others skip their gradient work, weight-gradient GEMMs included. Input
/// gradients still flow. Architecture search's alpha step uses
/// `GradientRoles only_architecture{1u << unsigned(Role::architecture)}`.
class GradientRoles {
public:
    explicit GradientRoles(unsigned roles) noexcept : saved_(detail::gradient_role_mask()) {
        detail::gradient_role_mask() = roles;
    }
    ~GradientRoles() { detail::gradient_role_mask() = saved_; }
    GradientRoles(const GradientRoles&) = delete;
    GradientRoles& operator=(const GradientRoles&) = delete;

private:
    unsigned saved_;
};

/// Owner task of a shared parameter (multi-task models give patches a task id >= 0).
inline constexpr int shared_task = -1;

/// A parameter's value and gradient live on Device (Cpu, or Cuda with the CUDA backend).
template <class T, class D = Cpu>
class Parameter {
    static_assert(!std::is_same_v<T, bf16> || std::is_same_v<D, Cuda>,
                  "patchwork::Parameter: bf16 is a storage type of device modules (Device = Cuda); CPU modules "
                  "compute in float or double");

public:
    using Scalar = T;
    using Device = D;

    Parameter() = default;
    Parameter(std::string leaf, Role role, const Shape& shape, bool trainable = true, int task = shared_task)
        : value(shape), leaf_(std::move(leaf)), name_(leaf_), role_(role), task_(task) {
        set_trainable(trainable);
    }

    using Grad = compute_t<T>;  ///< the gradient's element type: float for bf16 parameters, else T

    Tensor<T, D> value;
    Tensor<Grad, D> grad;  ///< empty unless trainable; fp32 for bf16 values (gradients accumulate in fp32)

    /// Full dotted path, e.g. "stage0.linear2.weight".
    [[nodiscard]] const std::string& name() const noexcept { return name_; }
    /// Name within its module, e.g. "weight".
    [[nodiscard]] const std::string& leaf() const noexcept { return leaf_; }
    [[nodiscard]] Role role() const noexcept { return role_; }
    [[nodiscard]] int task() const noexcept { return task_; }
    void set_task(int task) noexcept { task_ = task; }
    [[nodiscard]] std::size_t size() const noexcept { return value.size(); }
    [[nodiscard]] bool trainable() const noexcept { return trainable_; }
    /// Trainable, and its role accumulates gradients in the current backward
    /// (always, unless a GradientRoles scope narrows it). Modules test this
    /// before any gradient work.
    [[nodiscard]] bool wants_grad() const noexcept {
        return trainable_ && ((detail::gradient_role_mask() >> static_cast<unsigned>(role_)) & 1u) != 0;
    }

    /// Allocates a zeroed gradient when made trainable; frees it when frozen.
    void set_trainable(bool on) {
        trainable_ = on;
        if (on) {
            if (!(grad.shape() == value.shape())) grad = Tensor<Grad, D>(value.shape());
        } else {
            grad.release();
        }
    }
    /// Trainable, or frozen, without a gradient buffer of its own: for a
    /// multi-task slot while a one-pass mixed batch runs (the modules route
    /// every gradient of it to the task banks, and those that skip a backward
    /// when nothing below them trains still see it as trainable).
    void set_routed_trainable(bool on) noexcept {
        trainable_ = on;
        grad.release();
    }
    void zero_grad() {
        if (trainable_) grad.zero();
    }

    /// Set by the innermost policy that decided this parameter's trainability;
    /// outer policies leave such parameters alone (the most specific wins).
    /// A copy carries the mark, so a module built from a copy renews them
    /// (renew_decisions in core/module.hpp).
    [[nodiscard]] bool policy_decided() const noexcept { return decided_; }
    void mark_policy_decided() noexcept { decided_ = true; }
    void clear_policy_decided() noexcept { decided_ = false; }

    /// Called by the owning module when its path changes.
    void set_prefix(const std::string& module_path) {
        name_ = module_path.empty() ? leaf_ : module_path + "." + leaf_;
    }

private:
    std::string leaf_;
    std::string name_;
    Role role_ = Role::weight;
    int task_ = shared_task;
    bool trainable_ = false;
    bool decided_ = false;
};

}  // namespace patchwork
