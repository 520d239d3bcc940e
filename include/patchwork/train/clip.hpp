#pragma once
// Gradient clipping by global norm. Over the gradients g_i of every trainable
// parameter given:
//   n = sqrt(sum_i ||g_i||^2)                 (accumulated in double)
//   if n > max_norm:  g_i <- g_i * (max_norm / n)   for every i
// so the direction of the full gradient is kept and its norm becomes
// max_norm. Frozen parameters are neither counted nor touched. A non-finite
// norm (an overflow or NaN upstream) is returned as is and nothing is scaled,
// so the caller can see and report it. Unlike PyTorch no 1e-6 is added to n:
// after clipping the norm is max_norm up to rounding.
#include <cmath>
#include <cstddef>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/module.hpp"
#include "patchwork/core/parameter.hpp"
#include "patchwork/ops/cuda_ops.hpp"

namespace patchwork {

/// Global L2 norm of the trainable gradients among `params` (on the device:
/// each gradient's squared norm by a reduction kernel, in a fixed order; the
/// values come back to the host in one copy, the only wait).
template <class T, class D>
[[nodiscard]] double grad_norm(const std::vector<Parameter<T, D>*>& params) {
    double sq = 0;
    if constexpr (std::is_same_v<D, Cuda>) {
        using G = compute_t<T>;  // the gradients' type (fp32 for bf16 parameters)
        std::vector<const Tensor<G, Cuda>*> grads;  // reduced on the device, one wait for all
        for (const auto* p : params)
            if (p != nullptr && p->trainable()) grads.push_back(&p->grad);
        for (const double s : cuda::squared_norms<G>(grads, "grad_norm")) sq += s;
    } else {
        for (const auto* p : params) {
            if (p == nullptr || !p->trainable()) continue;
            for (const T g : p->grad) sq += double(g) * double(g);
        }
    }
    return std::sqrt(sq);
}

/// Scale the trainable gradients so their global L2 norm is at most `max_norm`.
/// Returns the norm before clipping. Throws ConfigError unless max_norm > 0.
template <class T, class D>
double clip_grad_norm(const std::vector<Parameter<T, D>*>& params, double max_norm) {
    if (!(std::isfinite(max_norm) && max_norm > 0))
        throw ConfigError(detail::concat("clip_grad_norm: max_norm must be positive and finite, got max_norm=",
                                         max_norm));
    const double norm = grad_norm(params);
    if (std::isfinite(norm) && norm > max_norm) {
        const compute_t<T> scale = compute_t<T>(max_norm / norm);
        for (auto* p : params) {
            if (p == nullptr || !p->trainable()) continue;
            if constexpr (std::is_same_v<D, Cuda>) cuda::scale(p->grad, scale, p->name());
            else p->grad.vector() *= scale;
        }
    }
    return norm;
}

/// The same over every trainable parameter of a module.
template <Module M>
double clip_grad_norm(M& model, double max_norm) {
    return clip_grad_norm(trainable_parameters(model), max_norm);
}

}  // namespace patchwork
