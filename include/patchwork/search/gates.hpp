#pragma once
// Gates of a searched module: how architecture weights alpha (one per
// candidate) become the mixing weights g of y = sum_k g_k o_k(x).
//
//   softmax:         p = softmax(alpha)
//   gumbel-softmax:  p = softmax((alpha + G) / tau),  G_k = -log(-log U_k),  U_k ~ U(0, 1)
//   hard:            g = onehot(argmax p) in the forward pass; the backward
//                    uses p (straight-through), so alpha still learns
//   otherwise        g = p
//
// Backward. With dg = dL/dg and z the softmax's argument (alpha, or
// (alpha + G) / tau), dp_j/dz_i = p_j ([i = j] - p_i), so
//   dL/dz_i = sum_j dg_j p_j ([i = j] - p_i) = p_i (dg_i - sum_j p_j dg_j)
// and dL/dalpha_i = dL/dz_i (softmax) or dL/dz_i / tau (Gumbel-softmax).
// The noise G is drawn once per forward and kept, so the backward (and a
// gradient check with fixed noise) sees the same p.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/random.hpp"

namespace patchwork::search {

enum class GateMode { softmax, gumbel };

/// How a searched module mixes its candidates. Set on a whole model with
/// search::set_gates(model, config); a schedule may change tau every step.
struct GateConfig {
    GateMode mode = GateMode::softmax;
    double tau = 1.0;   ///< Gumbel-softmax temperature (> 0)
    bool hard = false;  ///< one-hot forward, straight-through backward

    void validate() const {
        if (!(tau > 0) || !std::isfinite(tau))
            throw ConfigError(detail::concat("search: the Gumbel-softmax temperature tau must be positive and "
                                             "finite, got ",
                                             tau));
    }
};

/// The gate values of one forward: p (soft) and g (used), with the noise drawn.
template <class T>
struct GateState {
    std::vector<T> noise;  ///< Gumbel noise G (zeros in softmax mode)
    std::vector<T> soft;   ///< p
    std::vector<T> used;   ///< g: p, or onehot(argmax p) when hard
    double inv_tau = 1.0;  ///< dz/dalpha

    /// Draws noise (Gumbel mode) and computes p and g from alpha.
    void compute(const T* alpha, std::size_t k, const GateConfig& cfg, Rng& rng) {
        draw_noise(k, cfg, rng);
        compute_with_noise(alpha, k, cfg);
    }

    /// Draws the noise only (Gumbel mode; zeros otherwise) and sets inv_tau:
    /// what a device module does on the host before its kernel computes p and g.
    void draw_noise(std::size_t k, const GateConfig& cfg, Rng& rng) {
        inv_tau = cfg.mode == GateMode::gumbel ? 1.0 / cfg.tau : 1.0;
        noise.assign(k, T(0));
        if (cfg.mode == GateMode::gumbel) {
            for (auto& g : noise) {
                // U in (0, 1): avoid log(0) at both ends.
                const double u = std::clamp(rng.uniform(), 1e-12, 1.0 - 1e-12);
                g = T(-std::log(-std::log(u)));
            }
        }
    }

    /// Computes p and g from alpha and the noise already held (used by gradient checks).
    void compute_with_noise(const T* alpha, std::size_t k, const GateConfig& cfg) {
        inv_tau = cfg.mode == GateMode::gumbel ? 1.0 / cfg.tau : 1.0;
        if (noise.size() != k) noise.assign(k, T(0));
        soft.resize(k);
        T zmax = -std::numeric_limits<T>::infinity();
        for (std::size_t i = 0; i < k; ++i) {
            soft[i] = T((double(alpha[i]) + double(noise[i])) * inv_tau);
            zmax = std::max(zmax, soft[i]);
        }
        T sum = 0;
        for (auto& v : soft) sum += (v = std::exp(v - zmax));
        for (auto& v : soft) v /= sum;
        used = soft;
        if (cfg.hard) {
            const std::size_t best = argmax();
            std::fill(used.begin(), used.end(), T(0));
            used[best] = T(1);
        }
    }

    /// Index of the largest p (the first on ties).
    [[nodiscard]] std::size_t argmax() const {
        return std::size_t(std::max_element(soft.begin(), soft.end()) - soft.begin());
    }

    /// Adds dL/dalpha to `alpha_grad` given dL/dg (straight-through when hard).
    void backward(const T* dgate, T* alpha_grad) const {
        T dot = 0;
        for (std::size_t j = 0; j < soft.size(); ++j) dot += soft[j] * dgate[j];
        for (std::size_t i = 0; i < soft.size(); ++i) alpha_grad[i] += T(inv_tau) * soft[i] * (dgate[i] - dot);
    }
};

}  // namespace patchwork::search
