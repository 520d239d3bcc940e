#pragma once
// Fused bottleneck adapter (the math of AdapterModule, policies/adapter.hpp):
//   z = h D^T + b_d      D: [r, d], b_d: [r]
//   a = act(z)           ReLU or GELU (exact, erf)
//   y = h + a U^T + b_u  U: [d, r], b_u: [d]
// Backward, with g = dL/dy ([N, d]):
//   dz   = (g U) * act'(z)                         [N, r]
//   dh   = g + dz D          (the residual passes g through)
//   dU  += g^T a,  db_u += 1^T g,  dD += dz^T h,  db_d += 1^T dz
// (derivation: y depends on U through a U^T, so dL/dU_cj = sum_n g_nc a_nj;
// on a through the same product, dL/da = g U; a = act(z) element-wise gives
// dz = dL/da * act'(z); z = h D^T + b_d gives dL/dD = dz^T h, dL/db_d = 1^T dz
// and dL/dh = dz D, plus g from the residual term.)
//
// One launch per direction (plus the two ordered parameter-gradient
// reductions of the backward): see lowrank.cuh for the tiling, the rank
// buckets (fused up to r = 64, passes of 64 beyond) and the bf16 handling.
// Parameter gradients are accumulated (+=) in accum_t<E> (fp32 for bf16);
// each is optional (null pointer: not computed). `save` ([N, r], accum_t<E>)
// receives z in the forward and is read by the backward.
#include <cstddef>
#include <string_view>

#include "patchwork/kernels/lowrank.cuh"

namespace patchwork::kernels {

/// The adapter's non-linearity as a kernel activation (ReLU or GELU only).
inline Act adapter_act(bool gelu) noexcept { return gelu ? Act::gelu : Act::relu; }

/// Adapter forward over rows h [n, d]: y [n, d]; save [n, r] receives z (nullable when no backward follows).
template <class E>
void adapter_forward(const E* h, std::size_t n, std::size_t d, std::size_t r, const E* down_w, const E* down_b,
                     const E* up_w, const E* up_b, Act act, E* y, accum_t<E>* save, std::string_view where) {
    if (act == Act::none) throw ConfigError(patchwork::detail::concat(where, ": an adapter needs ReLU or GELU"));
    check::pointer(where, "the adapter input h", h);
    detail::lowrank_forward<E>(act, h, h, nullptr, {n, d, d, r, 1}, down_w, down_b, up_w, up_b, accum_t<E>(1), y,
                               save, where);
}

/// Parameter gradients of an adapter (each nullable, accumulated +=).
template <class A>
struct AdapterGrads {
    A* down_w = nullptr;  ///< dD   [r, d]
    A* down_b = nullptr;  ///< db_d [r]
    A* up_w = nullptr;    ///< dU   [d, r]
    A* up_b = nullptr;    ///< db_u [d]
};

/// Adapter backward: dh [n, d] (nullable) = g + ((g U) * act'(z)) D, and the parameter gradients.
/// h and save are the forward's input and saved z.
template <class E>
void adapter_backward(const E* h, const E* g, std::size_t n, std::size_t d, std::size_t r, const E* down_w,
                      const E* up_w, Act act, const accum_t<E>* save, E* dh, const AdapterGrads<accum_t<E>>& grads,
                      std::string_view where, Workspace ws = {}) {
    if (act == Act::none) throw ConfigError(patchwork::detail::concat(where, ": an adapter needs ReLU or GELU"));
    detail::lowrank_backward<E>(act, h, g, g, nullptr, {n, d, d, r, 1}, down_w, up_w, accum_t<E>(1), save, dh,
                                {grads.down_w, grads.down_b, grads.up_w, grads.up_b}, ws, where);
}

/// Workspace bytes adapter_backward uses (pass at least this much to avoid its own allocation).
inline std::size_t adapter_backward_workspace_bytes(std::size_t n, std::size_t d, std::size_t r,
                                                    std::size_t accum_bytes) {
    return lowrank_backward_workspace_bytes(n, d, d, r, 1, accum_bytes);
}

}  // namespace patchwork::kernels
