#pragma once
// The GEMMs every layer uses, in one place: C = alpha * op(A) op(B) + beta * C
// over Eigen row-major views. Eigen picks its own blocked kernels, or BLAS when
// the build defines EIGEN_USE_BLAS (meson option `blas=openblas`).
#include <Eigen/Core>

namespace patchwork::ops {

namespace detail {
template <class Dst, class Product, class S>
void assign_scaled(Dst&& c, const Product& p, S alpha, S beta) {
    if (beta == S(0)) {
        if (alpha == S(1)) c.noalias() = p;
        else c.noalias() = alpha * p;
    } else {
        if (beta != S(1)) c *= beta;
        if (alpha == S(1)) c.noalias() += p;
        else c.noalias() += alpha * p;
    }
}
}  // namespace detail

/// C = alpha * A B + beta * C
template <class A, class B, class C, class S>
void gemm_nn(const A& a, const B& b, C&& c, S alpha, S beta) {
    detail::assign_scaled(c, a * b, alpha, beta);
}

/// C = alpha * A B^T + beta * C
template <class A, class B, class C, class S>
void gemm_nt(const A& a, const B& b, C&& c, S alpha, S beta) {
    detail::assign_scaled(c, a * b.transpose(), alpha, beta);
}

/// C = alpha * A^T B + beta * C
template <class A, class B, class C, class S>
void gemm_tn(const A& a, const B& b, C&& c, S alpha, S beta) {
    detail::assign_scaled(c, a.transpose() * b, alpha, beta);
}

}  // namespace patchwork::ops
