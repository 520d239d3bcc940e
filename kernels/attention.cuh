#pragma once
// Definitions of the transformer operations declared in
// patchwork/ops/cuda_attention_ops.hpp: what SelfAttention, Dropout,
// Embedding and the BERT layers run with Device = Cuda. The math (and its
// derivation) is in the layers; here, how it is split over threads:
//   gemm_batched      one cuBLAS strided-batched call (the row-major mapping of
//                     cuda/gemm_plan.hpp, applied to every matrix of the batch)
//   split/merge_heads one thread per element, a pure permutation
//   masked softmax    one block per row of scores: block max over the real
//                     keys, exponentials, block sum, scaling; the backward's
//                     dot product sum_k p_k dp_k is a block sum too
//   gather            one thread per output element
//   scatter-add       one thread per (distinct id, column), walking the rows of
//                     that id in increasing order: one writer per element, no
//                     atomics, the additions in a sequential loop's order
// Include from nvcc-compiled translation units only.
#include <cstddef>
#include <string_view>

#include "patchwork/kernels/common.cuh"
#include "patchwork/kernels/ops.cuh"
#include "patchwork/ops/cuda_attention_ops.hpp"

namespace patchwork::kernels::detail {

template <class T>
__global__ void split_heads_kernel(const T* __restrict__ x, std::size_t n, std::size_t heads, std::size_t tokens,
                                   std::size_t d, T* __restrict__ y) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        const std::size_t c = i % d, t = (i / d) % tokens, bh = i / (d * tokens);
        const std::size_t b = bh / heads, h = bh % heads;
        y[i] = x[(b * tokens + t) * heads * d + h * d + c];
    }
}

template <class T>
__global__ void merge_heads_kernel(const T* __restrict__ y, std::size_t n, std::size_t heads, std::size_t tokens,
                                   std::size_t d, T* __restrict__ x) {
    const std::size_t width = heads * d;
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        const std::size_t col = i % width, bt = i / width;
        const std::size_t b = bt / tokens, t = bt % tokens, h = col / d, c = col % d;
        x[i] = y[((b * heads + h) * tokens + t) * d + c];
    }
}

/// Rows r of [rows, keys]; the mask row of r is r / rows_per_sequence (H L rows per sequence).
/// p may be s: each thread reads and writes only its own elements, and writes
/// them last. The exponentials are computed twice (for the sum, then for the
/// output) rather than stored in between: one write of p instead of a write,
/// a read and a write, and one rounding of each probability in bf16.
template <class T>
__global__ void masked_softmax_forward_kernel(const T* s, const int* __restrict__ mask, std::size_t rows,
                                              std::size_t keys, std::size_t rows_per_sequence, accum_t<T> scale,
                                              T* p) {
    using A = accum_t<T>;
    __shared__ A red[32];
    for (std::size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int* real = mask == nullptr ? nullptr : mask + (r / rows_per_sequence) * keys;
        const T* sr = s + r * keys;
        T* pr = p + r * keys;
        A m = -INFINITY;
        for (std::size_t j = threadIdx.x; j < keys; j += blockDim.x)
            if (real == nullptr || real[j] != 0) m = load(sr[j]) * scale > m ? load(sr[j]) * scale : m;
        m = block_max(m, red);
        A sum = A(0);
        for (std::size_t j = threadIdx.x; j < keys; j += blockDim.x)
            sum += real == nullptr || real[j] != 0 ? A(exp(load(sr[j]) * scale - m)) : A(0);
        sum = block_sum(sum, red);  // its barriers also order every read of sr before the writes below
        const A inv = A(1) / sum;
        for (std::size_t j = threadIdx.x; j < keys; j += blockDim.x)
            pr[j] = store<T>(real == nullptr || real[j] != 0 ? A(exp(load(sr[j]) * scale - m)) * inv : A(0));
    }
}

/// ds may be dp (each thread reads its elements before writing them; block_sum's barriers order the rest).
template <class T>
__global__ void masked_softmax_backward_kernel(const T* __restrict__ p, const T* dp, std::size_t rows,
                                               std::size_t keys, T* ds) {
    using A = accum_t<T>;
    __shared__ A red[32];
    for (std::size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* pr = p + r * keys;
        const T* gr = dp + r * keys;
        A dot = A(0);
        for (std::size_t j = threadIdx.x; j < keys; j += blockDim.x) dot += load(pr[j]) * load(gr[j]);
        dot = block_sum(dot, red);
        for (std::size_t j = threadIdx.x; j < keys; j += blockDim.x)
            ds[r * keys + j] = store<T>(load(pr[j]) * (load(gr[j]) - dot));
    }
}

template <class T>
__global__ void multiply_kernel(const T* a, const T* b, std::size_t n, T* y) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        y[i] = store<T>(load(a[i]) * load(b[i]));
}

template <class T>
__global__ void add_kernel(const T* a, const T* b, std::size_t n, T* y) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        y[i] = store<T>(load(a[i]) + load(b[i]));
}

template <class T>
__global__ void embedding_gather_add_kernel(const T* __restrict__ table, const int* __restrict__ ids,
                                            std::size_t rows, std::size_t d, T* __restrict__ out) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < rows * d;
         i += std::size_t(gridDim.x) * blockDim.x) {
        const std::size_t r = i / d, j = i % d;
        out[i] = store<T>(load(out[i]) + load(table[std::size_t(ids[r]) * d + j]));
    }
}

/// groups: [distinct ids | offsets (distinct + 1) | rows]; the gradient is in accum_t<T>.
template <class T>
__global__ void embedding_scatter_add_kernel(const T* __restrict__ dy, const int* __restrict__ groups,
                                             std::size_t distinct, std::size_t d, accum_t<T>* __restrict__ grad) {
    const int* offsets = groups + distinct;
    const int* rows = offsets + distinct + 1;
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < distinct * d;
         i += std::size_t(gridDim.x) * blockDim.x) {
        const std::size_t u = i / d, j = i % d;
        accum_t<T>* g = grad + std::size_t(groups[u]) * d + j;
        accum_t<T> s = *g;
        for (int q = offsets[u]; q < offsets[u + 1]; ++q) s += load(dy[std::size_t(rows[q]) * d + j]);
        *g = s;
    }
}

template <class T>
void check_attention_tensor(const Tensor<T, Cuda>& t, const Shape& want, std::string_view where, const char* what) {
    if (!(t.shape() == want))
        throw ShapeError(patchwork::detail::concat(where, ": ", what, ": expected ", want, ", got ", t.shape()));
}

/// A grid of one block per row, capped (the kernels stride over the rest).
inline unsigned row_grid(std::size_t rows) { return unsigned(rows < 65535 * 32 ? (rows ? rows : 1) : 65535 * 32); }

}  // namespace patchwork::kernels::detail

namespace patchwork::cuda {

template <class T>
void gemm_batched(bool ta, bool tb, T alpha, const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, T beta,
                  Tensor<T, Cuda>& c, std::string_view where) {
    const auto matrix = [](const Tensor<T, Cuda>& t, std::size_t i) { return t.rank() >= 3 ? t.dim(t.rank() - 2 + i) : 0; };
    const auto batch_of = [&](const Tensor<T, Cuda>& t) {
        const std::size_t n = matrix(t, 0) * matrix(t, 1);
        return n == 0 ? 0 : t.size() / n;
    };
    const std::size_t count = batch_of(a);
    if (a.rank() < 3 || b.rank() < 3 || c.rank() < 3 || batch_of(b) != count || batch_of(c) != count)
        throw ShapeError(patchwork::detail::concat(where, ": batched gemm takes [batch..., rows, cols] operands of one batch, got ",
                                                   a.shape(), ", ", b.shape(), " and ", c.shape()));
    // Every matrix of the batch maps as one row-major product does (cuda/gemm_plan.hpp).
    const GemmPlan p = plan_row_major_gemm(ta, tb, matrix(a, 0), matrix(a, 1), matrix(b, 0), matrix(b, 1),
                                           matrix(c, 0), matrix(c, 1), where);
    if (p.m == 0 || p.n == 0 || count == 0) return;
    using kernels::detail::checked_int;
    const int m = checked_int(p.m, "gemm size", where), n = checked_int(p.n, "gemm size", where);
    const int k = checked_int(p.k, "gemm inner dimension", where);
    const int ldf = checked_int(p.ld_first, "gemm leading dimension", where);
    const int lds = checked_int(p.ld_second, "gemm leading dimension", where);
    const int ldc = checked_int(p.ld_c, "gemm leading dimension", where);
    const int batch = checked_int(count, "gemm batch", where);
    const long long sa = (long long)(a.size() / count), sb = (long long)(b.size() / count);
    const long long sc = (long long)(c.size() / count);
    const cublasOperation_t opf = p.transpose_first ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t ops = p.transpose_second ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasHandle_t h = context().blas();
    if constexpr (std::is_same_v<T, float>) {
        check(cublasSgemmStridedBatched(h, opf, ops, m, n, k, &alpha, b.data(), ldf, sb, a.data(), lds, sa, &beta,
                                        c.data(), ldc, sc, batch),
              "cublasSgemmStridedBatched", where);
    } else if constexpr (std::is_same_v<T, double>) {
        check(cublasDgemmStridedBatched(h, opf, ops, m, n, k, &alpha, b.data(), ldf, sb, a.data(), lds, sa, &beta,
                                        c.data(), ldc, sc, batch),
              "cublasDgemmStridedBatched", where);
    } else {
        // bf16 as in cuda::gemm: bf16 operands and results, fp32 products and sums.
        const float af = float(alpha), bf = float(beta);
        const BlasMathScope tensor_cores(h, CUBLAS_DEFAULT_MATH, where);
        check(cublasGemmStridedBatchedEx(h, opf, ops, m, n, k, &af, b.data(), CUDA_R_16BF, ldf, sb, a.data(),
                                         CUDA_R_16BF, lds, sa, &bf, c.data(), CUDA_R_16BF, ldc, sc, batch,
                                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              "cublasGemmStridedBatchedEx(bf16)", where);
    }
}

template <class T>
void split_heads(const Tensor<T, Cuda>& x, std::size_t heads, Tensor<T, Cuda>& y, std::string_view where) {
    if (x.rank() != 3 || heads == 0 || x.dim(2) % heads != 0)
        throw ShapeError(patchwork::detail::concat(where, ": splitting ", heads, " heads of ", x.shape()));
    const std::size_t B = x.dim(0), L = x.dim(1), d = x.dim(2) / heads;
    y.resize(Shape{B, heads, L, d});
    if (y.empty()) return;
    kernels::launch(kernels::detail::split_heads_kernel<kernels::device_t<T>>, kernels::grid_1d(y.size(), 256), 256, 0,
                    kernels::stream(), kernels::dev(x.data()), y.size(), heads, L, d, kernels::dev(y.data()));
    check_launch("split_heads_kernel", where);
}

template <class T>
void merge_heads(const Tensor<T, Cuda>& y, Tensor<T, Cuda>& x, std::string_view where) {
    if (y.rank() != 4) throw ShapeError(patchwork::detail::concat(where, ": merging heads of ", y.shape()));
    const std::size_t B = y.dim(0), heads = y.dim(1), L = y.dim(2), d = y.dim(3);
    x.resize(Shape{B, L, heads * d});
    if (x.empty()) return;
    kernels::launch(kernels::detail::merge_heads_kernel<kernels::device_t<T>>, kernels::grid_1d(x.size(), 256), 256, 0,
                    kernels::stream(), kernels::dev(y.data()), x.size(), heads, L, d, kernels::dev(x.data()));
    check_launch("merge_heads_kernel", where);
}

template <class T>
void masked_softmax_forward(const Tensor<T, Cuda>& s, const int* mask, double scale, Tensor<T, Cuda>& p,
                            std::string_view where) {
    if (s.rank() != 4 || s.dim(2) != s.dim(3))
        throw ShapeError(patchwork::detail::concat(where, ": attention scores must be [batch, heads, tokens, tokens], got ",
                                                   s.shape()));
    const std::size_t heads = s.dim(1), L = s.dim(3), rows = s.rows();
    p.resize(s.shape());
    if (rows == 0) return;
    kernels::launch(kernels::detail::masked_softmax_forward_kernel<kernels::device_t<T>>, kernels::detail::row_grid(rows),
                    kernels::detail::row_block_threads(L), 0, kernels::stream(), kernels::dev(s.data()), mask, rows, L, heads * L,
                    kernels::accum_t<kernels::device_t<T>>(scale), kernels::dev(p.data()));
    check_launch("masked_softmax_forward_kernel", where);
}

template <class T>
void masked_softmax_backward(const Tensor<T, Cuda>& p, const Tensor<T, Cuda>& dp, Tensor<T, Cuda>& ds,
                             std::string_view where) {
    kernels::detail::check_attention_tensor(dp, p.shape(), where, "attention probability gradient");
    const std::size_t L = p.cols(), rows = p.rows();
    ds.resize(p.shape());
    if (rows == 0 || L == 0) return;
    kernels::launch(kernels::detail::masked_softmax_backward_kernel<kernels::device_t<T>>, kernels::detail::row_grid(rows),
                    kernels::detail::row_block_threads(L), 0, kernels::stream(), kernels::dev(p.data()), kernels::dev(dp.data()), rows, L,
                    kernels::dev(ds.data()));
    check_launch("masked_softmax_backward_kernel", where);
}

template <class T>
void multiply(const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, Tensor<T, Cuda>& y, std::string_view where) {
    if (a.size() != b.size())
        throw ShapeError(patchwork::detail::concat(where, ": element-wise product of ", a.shape(), " and ", b.shape()));
    if (&y != &a) y.resize(a.shape());
    if (y.empty()) return;
    kernels::launch(kernels::detail::multiply_kernel<kernels::device_t<T>>, kernels::grid_1d(y.size(), 256), 256, 0, kernels::stream(),
                    kernels::dev(a.data()), kernels::dev(b.data()), y.size(), kernels::dev(y.data()));
    check_launch("multiply_kernel", where);
}

template <class T>
void add(const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, Tensor<T, Cuda>& y, std::string_view where) {
    if (a.size() != b.size())
        throw ShapeError(patchwork::detail::concat(where, ": element-wise sum of ", a.shape(), " and ", b.shape()));
    if (&y != &a) y.resize(a.shape());
    if (y.empty()) return;
    kernels::launch(kernels::detail::add_kernel<kernels::device_t<T>>, kernels::grid_1d(y.size(), 256), 256, 0, kernels::stream(),
                    kernels::dev(a.data()), kernels::dev(b.data()), y.size(), kernels::dev(y.data()));
    check_launch("add_kernel", where);
}

template <class T>
void embedding_gather_add(const Tensor<T, Cuda>& table, const int* ids, Tensor<T, Cuda>& out,
                          std::string_view where) {
    if (table.rank() != 2 || out.cols() != table.cols())
        throw ShapeError(patchwork::detail::concat(where, ": gathering rows of ", table.shape(), " into ",
                                                   out.shape()));
    if (out.empty()) return;
    kernels::launch(kernels::detail::embedding_gather_add_kernel<kernels::device_t<T>>, kernels::grid_1d(out.size(), 256), 256, 0,
                    kernels::stream(), kernels::dev(table.data()), ids, out.rows(), out.cols(), kernels::dev(out.data()));
    check_launch("embedding_gather_add_kernel", where);
}

template <class T>
void embedding_scatter_add(const Tensor<T, Cuda>& dy, const RowGroups& groups, Tensor<compute_t<T>, Cuda>& grad,
                           std::string_view where) {
    if (grad.rank() != 2 || dy.cols() != grad.cols() || dy.rows() != groups.rows)
        throw ShapeError(patchwork::detail::concat(where, ": scatter-adding ", dy.shape(), " (", groups.rows,
                                                   " ids) into ", grad.shape()));
    if (groups.distinct == 0 || grad.cols() == 0) return;
    kernels::launch(kernels::detail::embedding_scatter_add_kernel<kernels::device_t<T>>,
                    kernels::grid_1d(groups.distinct * grad.cols(), 256), 256, 0, kernels::stream(), kernels::dev(dy.data()),
                    groups.data, groups.distinct, grad.cols(), grad.data());
    check_launch("embedding_scatter_add_kernel", where);
}

}  // namespace patchwork::cuda
