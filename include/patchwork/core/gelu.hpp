#pragma once
// GELU (exact, with the normal CDF), written once for the CPU modules
// (layers/activation.hpp) and the CUDA kernels (kernels/ops.cuh, lowrank.cuh):
//   gelu(x)  = x Phi(x),            Phi(x) = (1 + erf(x / sqrt 2)) / 2
//   gelu'(x) = Phi(x) + x phi(x),   phi(x) = Phi'(x) = exp(-x^2 / 2) / sqrt(2 pi)
// (the product rule on x Phi(x)). Host code calls std::erf / std::exp (so the
// CPU modules compute exactly what they always did); device code calls
// CUDA's erff / expf for float and erf / exp for double.
#include <cmath>
#include <type_traits>

// Under nvcc these are __host__ __device__ functions; a host compiler (also
// the CPU execution of the CUDA code in tests/cpu_cuda) sees plain functions.
#if defined(__CUDACC__)
#define PATCHWORK_HOST_DEVICE __host__ __device__
#else
#define PATCHWORK_HOST_DEVICE
#endif

namespace patchwork {

namespace detail {
template <class T>
PATCHWORK_HOST_DEVICE inline T gelu_erf(T x) {
#ifdef __CUDA_ARCH__
    if constexpr (std::is_same_v<T, float>) return erff(x);
    else return erf(x);
#else
    return std::erf(x);
#endif
}
template <class T>
PATCHWORK_HOST_DEVICE inline T gelu_exp(T x) {
#ifdef __CUDA_ARCH__
    if constexpr (std::is_same_v<T, float>) return expf(x);
    else return exp(x);
#else
    return std::exp(x);
#endif
}
}  // namespace detail

/// Phi(x), the standard normal CDF.
template <class T>
PATCHWORK_HOST_DEVICE inline T gelu_cdf(T x) {
    return T(0.5) * (T(1) + detail::gelu_erf(x * T(0.70710678118654752440)));  // 1 / sqrt 2
}
/// gelu(x) = x Phi(x).
template <class T>
PATCHWORK_HOST_DEVICE inline T gelu_value(T x) {
    return x * gelu_cdf(x);
}
/// g * gelu'(x) = g (Phi(x) + x phi(x)).
template <class T>
PATCHWORK_HOST_DEVICE inline T gelu_grad(T g, T x) {
    const T pdf = detail::gelu_exp(T(-0.5) * x * x) * T(0.39894228040143267794);  // 1 / sqrt(2 pi)
    return g * (gelu_cdf(x) + x * pdf);
}

}  // namespace patchwork
