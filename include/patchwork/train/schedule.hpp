#pragma once
// Learning-rate schedules: a factor per optimiser step (0-based, counted over
// the whole run), which the trainer hands to optimizer.set_lr_factor. Each
// schedule is callable, so it converts to std::function<double(std::size_t)>.
//
// WarmupCosine with W warm-up steps, S total steps and floor r = min_ratio:
//   step s < W:       f(s) = (s + 1) / W                     (linear, reaches 1 at s = W - 1)
//   W <= s < S:       f(s) = r + (1 - r) (1 + cos(pi (s - W) / (S - W))) / 2
//   s >= S:           f(s) = r
// so f(W) = 1, and f falls smoothly towards r at s = S. With W = 0 there is
// no warm-up; starting at (s + 1) / W means the very first step already moves.
#include <cmath>
#include <cstddef>
#include <numbers>

#include "patchwork/core/error.hpp"

namespace patchwork {

/// The same factor at every step.
struct Constant {
    double value = 1.0;

    [[nodiscard]] double factor(std::size_t /*step*/) const {
        if (!std::isfinite(value) || value < 0)
            throw ConfigError(detail::concat("Constant schedule: value must be non-negative and finite, got ", value));
        return value;
    }
    [[nodiscard]] double operator()(std::size_t step) const { return factor(step); }
};

/// Linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps`.
struct WarmupCosine {
    std::size_t warmup_steps = 0;
    std::size_t total_steps = 0;
    double min_ratio = 0.0;

    /// Throws ConfigError unless 0 < total_steps, warmup_steps <= total_steps and min_ratio in [0, 1].
    void validate() const {
        if (total_steps == 0) throw ConfigError("WarmupCosine: total_steps must be positive, got total_steps=0");
        if (warmup_steps > total_steps)
            throw ConfigError(detail::concat("WarmupCosine: warmup_steps=", warmup_steps,
                                             " exceeds total_steps=", total_steps));
        if (!(min_ratio >= 0 && min_ratio <= 1))
            throw ConfigError(detail::concat("WarmupCosine: min_ratio must be in [0, 1], got min_ratio=", min_ratio));
    }

    [[nodiscard]] double factor(std::size_t step) const {
        validate();
        if (step < warmup_steps) return double(step + 1) / double(warmup_steps);
        if (step >= total_steps) return min_ratio;
        const double progress = double(step - warmup_steps) / double(total_steps - warmup_steps);
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + std::cos(std::numbers::pi * progress));
    }
    [[nodiscard]] double operator()(std::size_t step) const { return factor(step); }
};

}  // namespace patchwork
