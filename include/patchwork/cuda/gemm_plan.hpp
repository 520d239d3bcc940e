#pragma once
// How a row-major product maps onto column-major BLAS (cuBLAS), as plain host
// logic that tests can check without a GPU.
//
// A row-major matrix X [r, c] in memory is the column-major matrix X^T [c, r]
// with leading dimension c. So for row-major C [M, N] = op(A) [M, K] op(B) [K, N],
// column-major BLAS computes C^T [N, M] = op(B)^T op(A)^T: B is passed first
// with B's own transpose flag, A second with A's, and the sizes are (N, M, K)
// with leading dimensions cols(B), cols(A) and N.
#include <cstddef>
#include <string_view>

#include "patchwork/core/error.hpp"
#include "patchwork/core/shape.hpp"

namespace patchwork::cuda {

/// The arguments of one column-major GEMM call: C = alpha op(first) op(second) + beta C.
struct GemmPlan {
    bool first_is_b = true;  ///< always true: the row-major B is the column-major call's first operand
    bool transpose_first = false, transpose_second = false;
    std::size_t m = 0, n = 0, k = 0;  ///< column-major sizes: op(first) [m, k], op(second) [k, n]
    std::size_t ld_first = 0, ld_second = 0, ld_c = 0;
};

/// Plan row-major C = op(A) op(B) for matrices with the given (rows, cols) shapes;
/// throws ShapeError naming `where` when the sizes do not agree.
[[nodiscard]] inline GemmPlan plan_row_major_gemm(bool ta, bool tb, std::size_t a_rows, std::size_t a_cols,
                                                  std::size_t b_rows, std::size_t b_cols, std::size_t c_rows,
                                                  std::size_t c_cols, std::string_view where) {
    const std::size_t m = ta ? a_cols : a_rows, k = ta ? a_rows : a_cols;
    const std::size_t kb = tb ? b_cols : b_rows, n = tb ? b_rows : b_cols;
    if (k != kb || c_rows != m || c_cols != n)
        throw ShapeError(patchwork::detail::concat(where, ": gemm shapes do not agree: op(A) of [", a_rows, ", ", a_cols, "]",
                                        (ta ? " transposed" : ""), ", op(B) of [", b_rows, ", ", b_cols, "]",
                                        (tb ? " transposed" : ""), ", C [", c_rows, ", ", c_cols, "]"));
    GemmPlan p;
    p.transpose_first = tb;
    p.transpose_second = ta;
    p.m = n;
    p.n = m;
    p.k = k;
    p.ld_first = b_cols;
    p.ld_second = a_cols;
    p.ld_c = n;
    return p;
}

}  // namespace patchwork::cuda
