#pragma once
// The device operations behind the transformer layers with Device = Cuda:
// SelfAttention (batched GEMMs, head split and merge, the masked softmax),
// Dropout and the residual sums (element-wise products and sums), and
// Embedding (row gather, deterministic scatter-add). Declarations only, as in
// patchwork/ops/cuda_ops.hpp (whose conventions hold here too: the current
// context's stream, `where` named in every error). The definitions are in
// kernels/attention.cuh, which nvcc-compiled translation units include
// (patchwork/cuda.cuh includes it). The math, and its derivation, is in the
// layer each operation serves (layers/attention.hpp, dropout.hpp,
// embedding.hpp, transformer/bert.hpp); kernels/attention.cuh says how each
// sum is split over threads.
#include <cstddef>
#include <string_view>

#include "patchwork/core/tensor.hpp"

namespace patchwork::cuda {

/// C_i = alpha op(A_i) op(B_i) + beta C_i for every i < batch (cuBLAS, strided
/// batched): a, b, c are [batch..., rows, cols] (row-major matrices back to
/// back; the leading dimensions, one or more, count the batch), op(X) = X or
/// X^T of each matrix.
template <class T>
void gemm_batched(bool transpose_a, bool transpose_b, T alpha, const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b,
                  T beta, Tensor<T, Cuda>& c, std::string_view where);

/// Heads apart: x [B, L, H d] -> y [B, H, L, d] with y[b, h, t, i] = x[b, t, h d + i] (y is resized).
template <class T>
void split_heads(const Tensor<T, Cuda>& x, std::size_t heads, Tensor<T, Cuda>& y, std::string_view where);

/// Heads side by side again: y [B, H, L, d] -> x [B, L, H d] (x is resized; split_heads' inverse).
template <class T>
void merge_heads(const Tensor<T, Cuda>& y, Tensor<T, Cuda>& x, std::string_view where);

/// Row softmax of scale * s over the real keys: s, p [B, H, L, L]; key j of
/// sequence b is real when mask[b L + j] != 0 (mask: device int32 [B, L], null:
/// every key real; each sequence needs a real key). Padded keys get
/// probability exactly 0. p is resized and may be s (in place).
template <class T>
void masked_softmax_forward(const Tensor<T, Cuda>& s, const int* mask, double scale, Tensor<T, Cuda>& p,
                            std::string_view where);

/// Its backward per row: ds_j = p_j (dp_j - sum_k p_k dp_k). ds may be dp (in place); it is resized.
template <class T>
void masked_softmax_backward(const Tensor<T, Cuda>& p, const Tensor<T, Cuda>& dp, Tensor<T, Cuda>& ds,
                             std::string_view where);

/// y = a * b element-wise (equal sizes; y is resized to a's shape and may be a or b).
template <class T>
void multiply(const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, Tensor<T, Cuda>& y, std::string_view where);

/// y = a + b element-wise (equal sizes; y is resized to a's shape and may be a or b).
template <class T>
void add(const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, Tensor<T, Cuda>& y, std::string_view where);

/// out[r, :] += table[ids[r], :] for r < out.rows() (ids: device int32, checked by the caller).
template <class T>
void embedding_gather_add(const Tensor<T, Cuda>& table, const int* ids, Tensor<T, Cuda>& out,
                          std::string_view where);

/// The rows of an id list grouped by id, for a deterministic scatter-add:
/// device int32 [distinct | offsets | rows] with `distinct` ids, offsets
/// [distinct + 1] into rows, and rows [n] the positions holding each id in
/// increasing order (built on the host by the caller: embedding_row_groups).
struct RowGroups {
    const int* data = nullptr;
    std::size_t distinct = 0, rows = 0;
};

/// grad[v, :] += dy[r, :] over the rows r holding id v, in increasing r, one
/// thread per (id, column): every gradient element has one writer (no atomics),
/// and the additions happen in the order of a sequential loop over r.
template <class T>
void embedding_scatter_add(const Tensor<T, Cuda>& dy, const RowGroups& groups, Tensor<compute_t<T>, Cuda>& grad,
                           std::string_view where);

}  // namespace patchwork::cuda
