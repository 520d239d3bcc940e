#pragma once
// Search<Candidates...>: architecture search over adaptation policies for one
// module (DARTS-style relaxation, Liu et al. 2018; as used per module of a
// cascade in Deng et al. 2023).
//
//   Tune<Block, Search<Frozen, Adapter<32>, FineTune>>
//
// During the search the module computes the mixed operation
//   y = sum_k g_k o_k(x),   g = gates(alpha)  (search/gates.hpp)
// with one architecture weight alpha_k per candidate (Role::architecture,
// initialised 1e-3 N(0, 1)). The candidates are realised as branches:
//
//   Frozen                      o = h,                           h = base(x), the frozen pre-trained module
//   Adapter<r>, ScaleShift      o = P(h): the injection policy around an Identity, applied to h
//   LoRA<r, a> on a Linear      o = h + s (x A^T) B^T
//   FineTune, BiasOnly,         o = copy_k(x): a trainable copy of the base, initialised
//   NormPatch (selection)       from the pre-trained weights, selected by the policy
//   LoRA<r, a> on a block that  o = copy_k(x): Tune<Inner, LoRA<r, a>> built from the base
//   names its LoRA targets      (BertLayer: LoRA on query and value), pre-trained weights frozen
//
// The frozen base is computed once per forward and shared by every branch of
// the first three kinds; only selection candidates pay for their own pass.
//
// Backward. With G = dL/dy:
//   dL/do_k = g_k G           (each branch's own backward: its parameter
//                              gradients, and its contribution to dL/dh or dL/dx)
//   dL/dg_k = <G, o_k>        (sum over every element)
//   dL/dalpha from dL/dg through the gate Jacobian (gates.hpp).
//   dL/dx = sum over copy branches of their dx + the LoRA branches' s (g_k G B) A
//           + base^T(sum over shared branches of their dL/dh)  (one base backward)
// A branch whose gate is exactly 0 (hard gates) contributes nothing and is skipped.
//
// On the GPU (an Inner with Device = Cuda) the same module runs on the device:
// the gates and the mixing are one kernel (kernels/mix.cuh, through
// cuda::search_mix_forward), the backward one more (dL/do_k for every branch
// and the partial sums of <G, o_k>) and a one-block kernel for dL/dalpha.
// alpha lives on the device; the Gumbel noise is drawn on the host (the same
// generator as on the CPU, so a device search follows the CPU search step by
// step) and uploaded with the forward. The host learns the gate values only
// when asked (gate_state(), the penalty, hard gates in the backward: one small
// copy that waits for the stream). Without hard gates no gate is known to be
// zero, so the device backward runs every branch (a zero gate then adds zeros).
//
// derive(k) ends the search for this module: only candidate k is kept, the
// other branches and alpha are freed, and the module then computes exactly
// what Tune<Inner, Candidate_k> computes, with the same parameters under the
// same names (so copy_parameters moves them into the fixed type).
#include <array>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstddef>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "patchwork/core/module.hpp"
#include "patchwork/ops/cuda_ops.hpp"
#include "patchwork/ops/gemm.hpp"
#include "patchwork/policies/frozen.hpp"
#include "patchwork/policies/policy.hpp"
#include "patchwork/policies/tune.hpp"
#include "patchwork/search/branches.hpp"
#include "patchwork/search/gates.hpp"

namespace patchwork {

/// Implemented by every searched module; search/model.hpp finds them with for_each_module.
struct SearchModuleTag {};

template <class Inner, class... Cands>
class SearchModule : public ModuleBase, public SearchModuleTag {
    static_assert(sizeof...(Cands) > 0,
                  "patchwork::Search<>: give at least one candidate, e.g. Search<Frozen, Adapter<32>, FineTune>");
    static_assert((Policy<Cands> && ...),
                  "patchwork::Search<Candidates...>: every candidate must be a patchwork policy (Frozen, FineTune, "
                  "BiasOnly, NormPatch, Adapter<r>, LoRA<r>, ScaleShift)");
    static_assert((detail::candidate_applies<Inner, Cands>() && ...),
                  "patchwork::Search: the LoRA<r> candidate applies only to a Linear layer or to a block that names "
                  "its LoRA targets (BertLayer: query and value); search each Linear of another block separately: "
                  "Sequential<Tune<Linear, Search<Frozen, LoRA<8>>>, Relu, ...>");
    static_assert(Inner::fixed_width || ((detail::branch_kind<Inner, Cands>() == detail::BranchKind::shared ||
                                          detail::branch_kind<Inner, Cands>() == detail::BranchKind::copy) &&
                                         ...),
                  "patchwork::Search: Adapter and ScaleShift candidates need a module whose output width is known "
                  "(not a bare activation)");

public:
    using Scalar = typename Inner::Scalar;
    using T = Scalar;
    using Device = device_of_t<Inner>;
    /// The gates' type: T, and fp32 for a bf16 module (alpha is stored in bf16 like every parameter, with an
    /// fp32 gradient and an fp32 master in the optimiser; the gates, their noise and dL/dalpha are fp32).
    using Gate = compute_t<T>;
    using Base = Inner;
    static constexpr std::size_t candidates = sizeof...(Cands);
    static constexpr const char* kind() { return Inner::kind(); }
    static constexpr unsigned roles = Inner::roles;
    static constexpr bool fixed_width = Inner::fixed_width;
    static constexpr bool shares_base = ((detail::branch_kind<Inner, Cands>() != detail::BranchKind::copy) || ...);

    template <class... Args>
        requires std::constructible_from<Inner, Args...> &&
                 (sizeof...(Args) != 1 || (!std::same_as<std::remove_cvref_t<Args>, SearchModule> && ...))
    explicit SearchModule(Args&&... args)
        : alpha("alpha", Role::architecture, Shape{candidates}),
          base_(std::forward<Args>(args)...),
          branches_(typename detail::branch_for<Inner, Cands>::type(base_)...) {
        base_.visit([&](auto& p) {
            p.set_trainable(false);
            base_count_ += p.size();
        });
        renew_decisions(*this);  // the base (remark_decided), and what policies inside it decided
        reset_alpha(default_rng());
        set_path("");
    }

    /// Marks the base's parameters as decided (frozen by the search; see renew_decisions).
    void remark_decided() {
        base_.visit([](auto& p) { p.mark_policy_decided(); });
    }

    /// The shared, frozen pre-trained module.
    [[nodiscard]] Inner& base() noexcept { return base_; }
    [[nodiscard]] Inner& inner() noexcept { return base_; }
    [[nodiscard]] std::size_t out_features() const { return base_.out_features(); }

    /// The architecture weights, [K], Role::architecture (on the module's device).
    Parameter<T, Device> alpha;

    /// Candidate k's branch (Branch types live in patchwork::detail).
    template <std::size_t K>
    [[nodiscard]] auto& branch() noexcept {
        return std::get<K>(branches_);
    }

    // ---- gates --------------------------------------------------------------
    void set_gates(const search::GateConfig& cfg) {
        cfg.validate();
        gates_cfg_ = cfg;
    }
    [[nodiscard]] const search::GateConfig& gate_config() const noexcept { return gates_cfg_; }
    /// Seeds this module's Gumbel noise.
    void seed(std::uint64_t s) { rng_ = Rng(s); }
    /// Gate values of the last forward (p soft, g used); empty before one. On
    /// the device they are copied to the host here (once per forward).
    [[nodiscard]] const search::GateState<Gate>& gate_state() const {
        if constexpr (on_gpu) {
            if (!gates_on_host_ && soft_d_.size() == candidates) {
                const Tensor<Gate> soft = to_host(soft_d_), used = to_host(used_d_);
                gates_.soft.assign(soft.begin(), soft.end());
                gates_.used.assign(used.begin(), used.end());
                gates_on_host_ = true;
            }
        }
        return gates_;
    }
    /// softmax(alpha): the search's current preference, independent of noise.
    [[nodiscard]] std::vector<double> probabilities() const {
        Tensor<T> host;
        const Tensor<T>* a = nullptr;
        if constexpr (on_gpu) {
            host = to_host(alpha.value);
            a = &host;
        } else {
            a = &alpha.value;
        }
        std::vector<double> p(candidates);
        double m = -1e300, s = 0;  // bf16 alpha: the stored values (the optimiser's fp32 master rounded)
        for (std::size_t k = 0; k < candidates; ++k) m = std::max(m, double((*a)[k]));
        for (std::size_t k = 0; k < candidates; ++k) s += (p[k] = std::exp(double((*a)[k]) - m));
        for (auto& v : p) v /= s;
        return p;
    }
    /// Fixes the gates to a one-hot on candidate k (for tests and ablations).
    void fix_noise(const std::vector<Gate>& noise) { fixed_noise_ = noise; }

    /// Adds dR/dg (a penalty's gradient with respect to the gates of the last
    /// forward) to alpha's gradient.
    void add_gate_grad(const std::vector<Gate>& dgate) {
        if (derived()) return;
        if ((on_gpu ? soft_d_.size() : gates_.soft.size()) != candidates)
            throw Error(detail::concat(detail::display_path(path_), ": gate gradient before any forward"));
        if (dgate.size() != candidates)
            throw ShapeError(detail::concat(detail::display_path(path_), ": gate gradient of ", dgate.size(),
                                            " values for ", candidates, " candidates"));
        if (!alpha.wants_grad()) return;
        if constexpr (on_gpu) {
            Tensor<Gate> host(Shape{candidates});
            std::copy(dgate.begin(), dgate.end(), host.begin());
            dgate_d_.resize(host.shape());
            copy(host, dgate_d_);
            cuda::search_gate_backward(dgate_d_, soft_d_, 1.0 / gates_.inv_tau, noisy_, alpha.grad, path_);
        } else {
            gates_.backward(dgate.data(), alpha.grad.data());
        }
    }

    // ---- parameter counts and names ----------------------------------------
    /// Trainable parameters candidate k adds when chosen (what the penalty charges).
    [[nodiscard]] std::array<std::size_t, candidates> candidate_parameters() {
        std::array<std::size_t, candidates> n{};
        std::size_t k = 0;
        std::apply(
            [&](auto&... b) {
                ((n[k++] = [&] {
                     std::size_t c = 0;
                     b.visit([&](auto& p) { c += p.trainable() ? p.size() : 0; });
                     return c;
                 }()),
                 ...);
            },
            branches_);
        return n;
    }
    /// Parameters of the pre-trained module (what fine-tuning it would train),
    /// counted at construction (a derived FineTune candidate frees the base).
    [[nodiscard]] std::size_t base_parameters() const noexcept { return base_count_; }
    /// For pretrained_parameters(model): the base counts once, its copies not at all.
    [[nodiscard]] std::size_t pretrained_parameters() const noexcept { return base_count_; }
    /// The candidates as spelled in C++.
    [[nodiscard]] static std::array<std::string, candidates> candidate_labels() {
        return {detail::policy_label<Cands>()...};
    }

    // ---- derive --------------------------------------------------------------
    [[nodiscard]] bool derived() const noexcept { return chosen_.has_value(); }
    [[nodiscard]] std::size_t chosen() const {
        if (!chosen_) throw Error(detail::concat(detail::display_path(path_), ": not derived yet"));
        return *chosen_;
    }
    /// Keeps candidate k only: frees the other branches and alpha; the module
    /// then computes exactly Tune<Inner, Candidate_k> with the same names.
    void derive(std::size_t k) {
        if (k >= candidates)
            throw ConfigError(detail::concat(detail::display_path(path_), ": derive(", k, ") but the module has ",
                                             candidates, " candidates"));
        if (derived()) throw Error(detail::concat(detail::display_path(path_), ": already derived"));
        chosen_ = k;
        std::size_t i = 0;
        std::apply([&](auto&... b) { ((i++ != k ? b.release() : void()), ...); }, branches_);
        if (chosen_kind() == detail::BranchKind::copy) {
            base_.visit([](auto& p) { p.value.release(); });
        }
        alpha.set_trainable(false);
        alpha.value.release();
        set_path(path_);
    }

    // ---- module interface ----------------------------------------------------
    void reset_parameters(Rng& rng) {
        base_.reset_parameters(rng);
        std::apply([&](auto&... b) { (b.reset(base_, rng), ...); }, branches_);
        reset_alpha(rng);
    }
    /// Re-copies the pre-trained weights into the selection candidates' copies
    /// (after loading new base weights).
    void sync_copies() {
        std::apply(
            [&](auto&... b) {
                (
                    [&] {
                        if constexpr (requires { b.sync(base_); }) b.sync(base_);
                    }(),
                    ...);
            },
            branches_);
    }

    const Tensor<T, Device>& forward(const Tensor<T, Device>& x) {
        if (derived()) return forward_derived(x);
        last_x_shape_ = x.shape();
        if constexpr (on_gpu) {
            // The noise on the host (as on the CPU), p and g by the mixing kernel below.
            if (fixed_noise_) {
                gates_.noise = *fixed_noise_;
                gates_.inv_tau = gates_cfg_.mode == search::GateMode::gumbel ? 1.0 / gates_cfg_.tau : 1.0;
            } else {
                gates_.draw_noise(candidates, gates_cfg_, rng_);
            }
            gates_on_host_ = false;
        } else if (fixed_noise_) {
            gates_.noise = *fixed_noise_;
            gates_.compute_with_noise(alpha.value.data(), candidates, gates_cfg_);
        } else {
            gates_.compute(alpha.value.data(), candidates, gates_cfg_, rng_);
        }
        const Tensor<T, Device>* h = &x;
        if constexpr (shares_base) h = &base_.forward(x);
        std::size_t k = 0;
        std::apply([&](auto&... b) { ((outs_[k] = &b.forward(x, *h), ++k), ...); }, branches_);
        if constexpr (on_gpu) {
            // Noise enters the kernel whenever the CPU would add it: Gumbel mode or fixed noise.
            noisy_ = gates_cfg_.mode == search::GateMode::gumbel || fixed_noise_.has_value();
            if (noisy_) {
                if (gates_.noise.size() != candidates)
                    throw ShapeError(detail::concat(detail::display_path(path_), ": fixed noise of ",
                                                    gates_.noise.size(), " values for ", candidates, " candidates"));
                // Queued without waiting for the stream: the driver stages the pageable source at the call.
                noise_d_.resize(Shape{candidates});
                cuda::upload_elements(noise_d_.data(), gates_.noise.data(), candidates, path_);
            }
            const Tensor<Gate, Device>* a = nullptr;
            if constexpr (std::is_same_v<Gate, T>) {
                a = &alpha.value;
            } else {
                cuda::convert(alpha.value, alpha_d_, path_);  // bf16 -> fp32, exact
                a = &alpha_d_;
            }
            cuda::search_mix_forward<T>(*a, noisy_ ? &noise_d_ : nullptr, 1.0 / gates_.inv_tau, gates_cfg_.hard,
                                        outs_.data(), y_, soft_d_, used_d_, path_);
            return y_;
        } else {
            y_.resize(outs_[0]->shape());
            auto y = y_.matrix();
            y.setZero();
            for (std::size_t j = 0; j < candidates; ++j) {
                check_same_shape(*outs_[j], y_.shape(), path_, "candidate output");
                if (gates_.used[j] != T(0)) y += gates_.used[j] * outs_[j]->matrix();
            }
            return y_;
        }
    }

    const Tensor<T, Device>& backward(const Tensor<T, Device>& dy) {
        if (derived()) return backward_derived(dy);
        check_same_shape(dy, y_.shape(), path_, "search output gradient");
        // The gate of each branch, where the host knows it (always on the CPU; on
        // the device with hard gates, read back here): a zero gate skips the branch.
        std::array<bool, candidates> skip{};
        if constexpr (on_gpu) {
            if (gates_cfg_.hard) {
                const auto& used = gate_state().used;
                for (std::size_t j = 0; j < candidates; ++j) skip[j] = used[j] == Gate(0);
            }
            std::array<Tensor<T, Device>*, candidates> d{};
            for (std::size_t j = 0; j < candidates; ++j) d[j] = skip[j] ? nullptr : &scaled_[j];
            cuda::search_mix_backward<T>(dy, outs_.data(), soft_d_, used_d_, noisy_ ? &noise_d_ : nullptr,
                                         1.0 / gates_.inv_tau, d.data(), alpha.wants_grad() ? &alpha.grad : nullptr,
                                         path_);
        } else {
            std::array<T, candidates> dgate{};
            const auto g = dy.matrix();
            for (std::size_t j = 0; j < candidates; ++j) {
                dgate[j] = (g.array() * outs_[j]->matrix().array()).sum();
                skip[j] = gates_.used[j] == T(0);
            }
            if (alpha.wants_grad()) gates_.backward(dgate.data(), alpha.grad.data());
        }

        bool dh_used = false, dx_used = false;
        std::size_t k = 0;
        std::apply(
            [&](auto&... b) {
                (
                    [&] {
                        const std::size_t j = k++;
                        if (skip[j]) return;
                        if constexpr (!on_gpu) {
                            scaled_[0].resize(dy.shape());
                            scaled_[0].matrix() = gates_.used[j] * dy.matrix();
                        }
                        b.backward(scaled_[on_gpu ? j : 0], dh_, dh_used, dx_, dx_used, input_grad_);
                    }(),
                    ...);
            },
            branches_);
        if (!input_grad_) return empty_;
        if constexpr (shares_base) {
            if (dh_used) {
                base_.set_input_grad(true);
                const Tensor<T, Device>& d = base_.backward(dh_);
                if (dx_used) detail::add_to(dx_, d, path_);
                else {
                    dx_ = d;
                    dx_used = true;
                }
            }
        }
        if (!dx_used) {  // every gate was zero: the input gradient is zero
            dx_.resize(last_input_shape());
            dx_.zero();
        }
        return dx_;
    }

    template <class F>
    void visit(F&& f) {
        if (!derived()) {
            base_.visit(f);
            std::apply([&](auto&... b) { (b.visit(f), ...); }, branches_);
            f(alpha);
            return;
        }
        if (chosen_kind() != detail::BranchKind::copy) base_.visit(f);
        visit_chosen(f);
    }
    /// The base, then each candidate's own module (an injection candidate's patch,
    /// a selection candidate's copy), so for_each_module reaches them all (for
    /// example to switch batch-norm layers between training and inference).
    template <class F>
    void visit_children(F&& f) {
        f(base_);
        std::apply(
            [&](auto&... b) {
                (
                    [&] {
                        if constexpr (requires { b.module(); }) f(b.module());
                        else if constexpr (requires { b.head(); }) f(b.head());
                    }(),
                    ...);
            },
            branches_);
    }

    /// Searching: the base keeps the module's names, candidate k's parameters
    /// read "<path>.cand<k>. ..." and alpha "<path>.alpha". Derived: the names of
    /// Tune<Inner, Candidate>.
    void set_path(const std::string& p) {
        path_ = p;
        base_.set_path(p);
        std::size_t k = 0;
        std::apply(
            [&](auto&... b) {
                ((b.set_path(derived() && *chosen_ == k ? p : child_path("cand" + std::to_string(k)), derived()),
                  ++k),
                 ...);
            },
            branches_);
        alpha.set_prefix(p);
    }

private:
    [[nodiscard]] detail::BranchKind chosen_kind() const {
        static constexpr std::array<detail::BranchKind, candidates> kinds{detail::branch_kind<Inner, Cands>()...};
        return kinds[*chosen_];
    }

    template <class F>
    void visit_chosen(F&& f) {
        std::size_t k = 0;
        std::apply(
            [&](auto&... b) {
                (
                    [&] {
                        if (k++ == *chosen_) b.visit(f);
                    }(),
                    ...);
            },
            branches_);
    }

    template <class F>
    void with_chosen(F&& f) {
        std::size_t k = 0;
        std::apply(
            [&](auto&... b) {
                (
                    [&] {
                        if (k++ == *chosen_) f(b);
                    }(),
                    ...);
            },
            branches_);
    }

    const Tensor<T, Device>& forward_derived(const Tensor<T, Device>& x) {
        const Tensor<T, Device>* out = nullptr;
        const bool shared = chosen_kind() != detail::BranchKind::copy;
        const Tensor<T, Device>& h = shared ? base_.forward(x) : x;
        with_chosen([&](auto& b) { out = &b.forward(x, h); });
        derived_out_ = out;
        return *out;
    }

    const Tensor<T, Device>& backward_derived(const Tensor<T, Device>& dy) {
        bool dh_used = false, dx_used = false;
        with_chosen([&](auto& b) { b.backward(dy, dh_, dh_used, dx_, dx_used, input_grad_); });
        if (!input_grad_) return empty_;
        if (chosen_kind() != detail::BranchKind::copy && dh_used) {
            base_.set_input_grad(true);
            const Tensor<T, Device>& d = base_.backward(dh_);
            if (!dx_used) return d;
            detail::add_to(dx_, d, path_);
        }
        return dx_;
    }

    [[nodiscard]] Shape last_input_shape() const { return last_x_shape_; }

    void reset_alpha(Rng& rng) {
        // DARTS: alpha = 1e-3 N(0, 1), so every candidate starts with (almost) equal weight.
        if constexpr (std::is_same_v<T, bf16>) {  // drawn in fp32 as for float, then rounded
            Tensor<float> a(alpha.value.shape());
            init::normal(a, rng, 0.0, 1e-3);
            copy(cast<bf16>(a), alpha.value);
        } else {
            init::on_host(alpha.value, [&](Tensor<T>& a) { init::normal(a, rng, 0.0, 1e-3); });
        }
    }

    static constexpr bool on_gpu = std::is_same_v<Device, Cuda>;

    std::size_t base_count_ = 0;
    Inner base_;
    std::tuple<typename detail::branch_for<Inner, Cands>::type...> branches_;
    search::GateConfig gates_cfg_;
    mutable search::GateState<Gate> gates_;  ///< on the device: the noise, and p and g once read back
    std::optional<std::vector<Gate>> fixed_noise_;
    Rng rng_{0x5ea4c4};
    std::optional<std::size_t> chosen_;
    std::array<const Tensor<T, Device>*, candidates> outs_{};
    const Tensor<T, Device>* derived_out_ = nullptr;
    Shape last_x_shape_;
    Tensor<T, Device> y_, dh_, dx_, empty_;
    /// dL/do_k = g_k dL/dy: one buffer reused branch after branch on the CPU, one
    /// per candidate on the device (the mixing backward writes them all at once).
    std::array<Tensor<T, Device>, on_gpu ? candidates : 1> scaled_;
    // The device's gate state: noise uploaded per forward, p and g written by the kernel.
    Tensor<Gate, Device> noise_d_, soft_d_, used_d_, dgate_d_;
    Tensor<Gate, Device> alpha_d_;  ///< bf16 modules: alpha in fp32 for the kernels
    bool noisy_ = false;
    mutable bool gates_on_host_ = false;
};

/// Injection policy: search over the candidate policies for the module (see SearchModule).
template <class... Cands>
struct Search {
    static constexpr PolicyKind policy_kind = PolicyKind::inject;
    static constexpr const char* name() { return "Search"; }
    static constexpr bool on_device = true;  ///< also on Device = Cuda (the mixing kernels of kernels/mix.cuh)
    template <class Inner>
    using module = SearchModule<Inner, Cands...>;
};

}  // namespace patchwork
