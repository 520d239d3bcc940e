#pragma once
// Definitions of the device operations declared in patchwork/ops/cuda_ops.hpp
// (and of cross_entropy for device logits): what Linear, the activations,
// LayerNorm, the losses and the optimisers run when their Device is Cuda.
// Each kernel computes exactly the formula of the CPU module it serves; the
// derivations are in those modules' headers. Include from nvcc-compiled
// translation units only (patchwork/cuda.cuh includes everything).
//
// Reductions are deterministic: a column sum is taken in fixed-size row
// chunks whose partial sums are added in a fixed order by a second kernel
// (no atomics), so two runs give bit-identical gradients.
#include <climits>
#include <cmath>
#include <span>
#include <string_view>
#include <vector>

#include "patchwork/cuda/gemm_plan.hpp"
#include "patchwork/cuda/device_tensor.hpp"
#include "patchwork/kernels/common.cuh"
#include "patchwork/kernels/plan.hpp"
#include "patchwork/kernels/scale_shift.cuh"
#include "patchwork/layers/activation.hpp"
#include "patchwork/ops/cuda_ops.hpp"
#include "patchwork/train/loss.hpp"

namespace patchwork::kernels {

namespace detail {

/// Element counts are indexed with int inside some kernels and passed to cuBLAS as int.
inline int checked_int(std::size_t n, std::string_view what, std::string_view where) {
    if (n > std::size_t(INT_MAX))
        throw ShapeError(patchwork::detail::concat(where, ": ", what, " = ", n, " exceeds the 32-bit limit ",
                                                   INT_MAX, " of the CUDA backend"));
    return int(n);
}

// ---- element-wise --------------------------------------------------------

/// y[i] += b[i % cols], or b[task[row] cols + i % cols] with per-row tasks (task
/// not null, b stacked [K, cols]); I is 32-bit unsigned whenever the sizes fit
/// (see scale_shift.cuh).
template <class T, class I>
__global__ void add_row_vector_kernel(T* __restrict__ y, const T* __restrict__ b, const int* __restrict__ task, I n,
                                      I cols) {
    for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < n; i += I(gridDim.x) * I(blockDim.x)) {
        const I row = i / cols, c = i - row * cols;
        y[i] += b[task == nullptr ? std::size_t(c) : std::size_t(task[row]) * cols + c];
    }
}

/// Device value/derivative of each activation functor (same formulas as layers/activation.hpp).
template <class Fn>
struct device_activation;
template <>
struct device_activation<activation::Relu> {
    template <class T>
    __device__ static T value(T x) { return x > T(0) ? x : T(0); }
    template <class T>
    __device__ static T grad(T g, T x, T) { return x > T(0) ? g : T(0); }
};
template <>
struct device_activation<activation::Gelu> {
    template <class T>
    __device__ static T value(T x) { return gelu_value(x); }  // core/gelu.hpp
    template <class T>
    __device__ static T grad(T g, T x, T) { return gelu_grad(g, x); }
};
template <>
struct device_activation<activation::Tanh> {
    template <class T>
    __device__ static T value(T x) { return tanh(x); }
    template <class T>
    __device__ static T grad(T g, T, T y) { return g * (T(1) - y * y); }
};

template <class Fn, class T>
__global__ void activation_forward_kernel(const T* __restrict__ x, T* __restrict__ y, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        y[i] = device_activation<Fn>::value(x[i]);
}
template <class Fn, class T>
__global__ void activation_backward_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                           const T* __restrict__ y, T* __restrict__ dx, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        dx[i] = device_activation<Fn>::grad(g[i], x[i], y[i]);
}

// ---- column sums ---------------------------------------------------------

constexpr unsigned colsum_rows_per_chunk = 256;

/// partial[chunk, c] = sum over the chunk's rows of f(r, c). Block (32, 8):
/// threadIdx.x picks the column, threadIdx.y strides the chunk's rows; block
/// row y takes chunks y, y + gridDim.y, ... (a grid holds at most 65535 block
/// rows; every chunk's sum is the same whichever block takes it).
template <class T, class F>
__global__ void column_partial_kernel(F f, std::size_t rows, std::size_t cols, std::size_t chunks,
                                      T* __restrict__ partial) {
    __shared__ T part[8][33];
    const std::size_t c = blockIdx.x * 32 + threadIdx.x;
    for (std::size_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
        const std::size_t r0 = chunk * colsum_rows_per_chunk;
        const std::size_t r1 = r0 + colsum_rows_per_chunk < rows ? r0 + colsum_rows_per_chunk : rows;
        T s = T(0);
        if (c < cols)
            for (std::size_t r = r0 + threadIdx.y; r < r1; r += 8) s += f(r, c);
        __syncthreads();  // part is still read for the previous chunk
        part[threadIdx.y][threadIdx.x] = s;
        __syncthreads();
        if (threadIdx.y == 0 && c < cols) {
            T t = part[0][threadIdx.x];
            for (int k = 1; k < 8; ++k) t += part[k][threadIdx.x];
            partial[chunk * cols + c] = t;
        }
    }
}

/// out[c] += sum_k partial[k, c], chunks in order.
template <class T>
__global__ void column_finish_kernel(const T* __restrict__ partial, std::size_t chunks, std::size_t cols,
                                     T* __restrict__ out) {
    const std::size_t c = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
    if (c >= cols) return;
    T t = T(0);
    for (std::size_t k = 0; k < chunks; ++k) t += partial[k * cols + c];
    out[c] += t;
}

/// out[c] += sum_r f(r, c) for an element functor f (deterministic, two passes:
/// chunk sums of 256 rows into the current context's workspace, then the chunk
/// sums in chunk order). `max_block_rows` (65535, the grid's limit) is a
/// parameter only so that tests can make blocks take several chunks.
template <class T, class F>
void add_column_sums(F f, std::size_t rows, std::size_t cols, T* out, std::string_view where,
                     std::size_t max_block_rows = 65535) {
    if (rows == 0 || cols == 0) return;
    const std::size_t chunks = ceil_div(rows, colsum_rows_per_chunk);
    check::extent(where, "the column-sum chunks", chunks, cols);
    Scratch scratch({}, ws_bytes(chunks * cols, sizeof(T)), where);
    T* partial = scratch.take<T>(chunks * cols);
    const unsigned block_rows = unsigned(chunks < max_block_rows ? chunks : max_block_rows);
    kernels::launch(column_partial_kernel<T, F>, dim3(unsigned(ceil_div(cols, 32)), block_rows), dim3(32, 8), 0,
                    stream(), f, rows, cols, chunks, partial);
    cuda::check_launch("column_partial_kernel", where);
    kernels::launch(column_finish_kernel<T>, unsigned(ceil_div(cols, 256)), 256, 0, stream(), partial, chunks, cols,
                    out);
    cuda::check_launch("column_finish_kernel", where);
}

template <class T>
struct load_element {
    const T* p;
    std::size_t cols;
    __device__ T operator()(std::size_t r, std::size_t c) const { return p[r * cols + c]; }
};
template <class T>
struct load_product {
    const T* a;
    const T* b;
    std::size_t cols;
    __device__ T operator()(std::size_t r, std::size_t c) const { return a[r * cols + c] * b[r * cols + c]; }
};

// ---- LayerNorm -----------------------------------------------------------

/// One block per row: mean, variance (two passes over the row), then xhat and
/// y; with per-row tasks (task not null) gamma and beta are [K, d] and the row
/// uses its task's.
template <class T>
__global__ void layer_norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ gamma,
                                          const T* __restrict__ beta, const int* __restrict__ task, T eps,
                                          std::size_t d, T* __restrict__ xhat, T* __restrict__ inv_std,
                                          T* __restrict__ y) {
    __shared__ T red[32];
    const std::size_t row = blockIdx.x;
    if (task != nullptr) {
        gamma += std::size_t(task[row]) * d;
        beta += std::size_t(task[row]) * d;
    }
    const T* xr = x + row * d;
    T s = T(0);
    for (std::size_t i = threadIdx.x; i < d; i += blockDim.x) s += xr[i];
    const T mean = block_sum(s, red) / T(d);
    T q = T(0);
    for (std::size_t i = threadIdx.x; i < d; i += blockDim.x) {
        const T c = xr[i] - mean;
        q += c * c;
    }
    const T var = block_sum(q, red) / T(d);
    const T is = T(1) / sqrt(var + eps);
    if (threadIdx.x == 0) inv_std[row] = is;
    for (std::size_t i = threadIdx.x; i < d; i += blockDim.x) {
        const T h = (xr[i] - mean) * is;
        xhat[row * d + i] = h;
        y[row * d + i] = gamma[i] * h + beta[i];
    }
}

/// One block per row: dx = s (gh - mean(gh) - xhat mean(gh xhat)), gh = g gamma.
template <class T>
__global__ void layer_norm_backward_kernel(const T* __restrict__ g, const T* __restrict__ xhat,
                                           const T* __restrict__ inv_std, const T* __restrict__ gamma,
                                           const int* __restrict__ task, std::size_t d, T* __restrict__ dx) {
    __shared__ T red[32];
    const std::size_t row = blockIdx.x;
    if (task != nullptr) gamma += std::size_t(task[row]) * d;
    const T* gr = g + row * d;
    const T* hr = xhat + row * d;
    T a = T(0), b = T(0);
    for (std::size_t i = threadIdx.x; i < d; i += blockDim.x) {
        const T gh = gr[i] * gamma[i];
        a += gh;
        b += gh * hr[i];
    }
    const T mean_gh = block_sum(a, red) / T(d);
    const T mean_ghxh = block_sum(b, red) / T(d);
    const T s = inv_std[row];
    for (std::size_t i = threadIdx.x; i < d; i += blockDim.x)
        dx[row * d + i] = s * (gr[i] * gamma[i] - mean_gh - hr[i] * mean_ghxh);
}

inline unsigned row_block_threads(std::size_t d) {
    if (d >= 512) return 256;
    if (d >= 128) return 128;
    return 32;
}

// ---- softmax cross-entropy -----------------------------------------------

/// One block per row: p = softmax(z), grad = (p - onehot) / N, loss[r] = lse - z_y.
template <class T>
__global__ void cross_entropy_kernel(const T* __restrict__ z, const int* __restrict__ labels, std::size_t c,
                                     T inv_n, T* __restrict__ grad, double* __restrict__ loss) {
    __shared__ T red[32];
    const std::size_t row = blockIdx.x;
    const T* zr = z + row * c;
    T m = -INFINITY;
    for (std::size_t j = threadIdx.x; j < c; j += blockDim.x) m = zr[j] > m ? zr[j] : m;
    m = block_max(m, red);
    T s = T(0);
    for (std::size_t j = threadIdx.x; j < c; j += blockDim.x) s += exp(zr[j] - m);
    s = block_sum(s, red);
    const int y = labels[row];
    const T inv_s = T(1) / s;
    for (std::size_t j = threadIdx.x; j < c; j += blockDim.x)
        grad[row * c + j] = exp(zr[j] - m) * inv_s * inv_n - (int(j) == y ? inv_n : T(0));
    if (threadIdx.x == 0) loss[row] = double(m) + log(double(s)) - double(zr[y]);
}

// ---- optimisers (the formulas of train/optimizer.hpp, element by element) ----

template <class T>
__global__ void sgd_kernel(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ b, std::size_t n, T lr,
                           T mu, T wd, bool first, bool nesterov) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        const T gi = g[i] + wd * w[i];
        if (b == nullptr) {
            w[i] -= lr * gi;
            continue;
        }
        const T bi = first ? gi : mu * b[i] + gi;
        b[i] = bi;
        w[i] -= lr * (nesterov ? gi + mu * bi : bi);
    }
}

template <class T>
__global__ void adam_kernel(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                            std::size_t n, T b1, T b2, T wd, T decay, T step, T sqrt_bc2, T eps, bool decoupled) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        T wi = w[i];
        if (decoupled) wi *= decay;
        const T gi = decoupled ? g[i] : g[i] + wd * wi;
        const T mi = b1 * m[i] + (T(1) - b1) * gi;
        const T vi = b2 * v[i] + (T(1) - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        w[i] = wi - step * mi / (sqrt(vi) / sqrt_bc2 + eps);
    }
}

// ---- vector operations (search mixing, gradient clipping) -----------------

/// y[i] += a x[i].
template <class T>
__global__ void axpy_kernel(T a, const T* __restrict__ x, T* __restrict__ y, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        y[i] += a * x[i];
}

/// x[i] *= a.
template <class T>
__global__ void scale_kernel(T a, T* __restrict__ x, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        x[i] *= a;
}

/// dst[i] = a src[i].
template <class T>
__global__ void scaled_copy_kernel(T a, const T* __restrict__ src, T* __restrict__ dst, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        dst[i] = a * src[i];
}

/// out[i] = slices[i] + slices[n + i] + ... (rank order).
template <class T>
__global__ void sum_slices_kernel(const T* __restrict__ slices, std::size_t ranks, std::size_t n,
                                  T* __restrict__ out) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        T s = slices[i];
        for (std::size_t r = 1; r < ranks; ++r) s += slices[r * n + i];
        out[i] = s;
    }
}

/// Blocks of the squared norm: a fixed count for a given n, so the sum order
/// (and the result) does not depend on the device.
constexpr unsigned squared_norm_blocks(std::size_t n) {
    const std::size_t b = ceil_div(n, 256);
    return unsigned(b == 0 ? 1 : (b < 256 ? b : 256));
}

/// partial[block] = sum of x[i]^2 over the block's grid-stride elements, in double.
template <class T>
__global__ void __launch_bounds__(256) squared_sum_kernel(const T* __restrict__ x, std::size_t n,
                                                          double* __restrict__ partial) {
    __shared__ double scratch[32];
    double s = 0;
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        s += double(x[i]) * double(x[i]);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

/// out[0] = sum of partial[0 .. blocks) in block order (one warp, lanes strided, then a warp sum).
__global__ void squared_sum_finish_kernel(const double* __restrict__ partial, unsigned blocks,
                                          double* __restrict__ out) {
    double s = 0;
    for (unsigned b = threadIdx.x; b < blocks; b += 32) s += partial[b];
    s = warp_sum(s);
    if (threadIdx.x == 0) out[0] = s;
}

// ---- multi-task batches ----------------------------------------------------

/// dst row i = src row idx[i] (gather) or dst row idx[i] = src row i (scatter), rows of `row` elements.
template <class T, bool Gather>
__global__ void move_rows_kernel(const T* __restrict__ src, const int* __restrict__ idx, std::size_t rows,
                                 std::size_t row, T* __restrict__ dst) {
    const std::size_t total = rows * row;
    for (std::size_t e = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; e < total;
         e += std::size_t(gridDim.x) * blockDim.x) {
        const std::size_t i = e / row, c = e - i * row, j = std::size_t(idx[i]);
        if constexpr (Gather)
            dst[e] = src[j * row + c];
        else
            dst[j * row + c] = src[e];
    }
}

/// Move m = blockIdx.y (grid-stride over moves and over elements): dst[i] =
/// (add ? dst[i] : 0) + src[i] + src[stride + i] + ... (count terms, in order).
template <class T>
__global__ void slice_moves_kernel(const cuda::SliceMove<T>* __restrict__ moves, std::size_t count) {
    for (std::size_t m = blockIdx.y; m < count; m += gridDim.y) {
        const cuda::SliceMove<T> mv = moves[m];
        for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < mv.n;
             i += std::size_t(gridDim.x) * blockDim.x) {
            T s = mv.add ? mv.dst[i] : T(0);
            for (std::size_t c = 0; c < mv.count; ++c) s += mv.src[c * mv.stride + i];
            mv.dst[i] = s;
        }
    }
}

}  // namespace detail
}  // namespace patchwork::kernels

namespace patchwork::cuda {

template <class T>
void gemm(bool ta, bool tb, T alpha, const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, T beta, Tensor<T, Cuda>& c,
          std::string_view where) {
    // Row-major in, column-major cuBLAS underneath: see cuda/gemm_plan.hpp.
    const GemmPlan p = plan_row_major_gemm(ta, tb, a.rows(), a.cols(), b.rows(), b.cols(), c.rows(), c.cols(), where);
    if (p.m == 0 || p.n == 0) return;
    using kernels::detail::checked_int;
    const int m = checked_int(p.m, "gemm size", where), n = checked_int(p.n, "gemm size", where);
    const int k = checked_int(p.k, "gemm inner dimension", where);
    const int ldf = checked_int(p.ld_first, "gemm leading dimension", where);
    const int lds = checked_int(p.ld_second, "gemm leading dimension", where);
    const int ldc = checked_int(p.ld_c, "gemm leading dimension", where);
    const cublasOperation_t opf = p.transpose_first ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t ops = p.transpose_second ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasHandle_t h = context().blas();
    if constexpr (std::is_same_v<T, float>)
        check(cublasSgemm(h, opf, ops, m, n, k, &alpha, b.data(), ldf, a.data(), lds, &beta, c.data(), ldc),
              "cublasSgemm", where);
    else
        check(cublasDgemm(h, opf, ops, m, n, k, &alpha, b.data(), ldf, a.data(), lds, &beta, c.data(), ldc),
              "cublasDgemm", where);
}

template <class T>
void add_row_vector(Tensor<T, Cuda>& y, const Tensor<T, Cuda>& b, std::string_view where, TaskRows rows) {
    if (b.size() != y.cols() * rows.tasks)
        throw ShapeError(patchwork::detail::concat(where, ": bias ", b.shape(), " does not fit rows of ", y.shape(),
                                                   rows.mixed() ? patchwork::detail::concat(" for ", rows.tasks,
                                                                                            " tasks")
                                                                : std::string()));
    if (y.empty()) return;
    const unsigned blocks = kernels::grid_1d(y.size(), 256);
    if (y.size() + std::size_t(blocks) * 256 <= 0xffffffffu)
        kernels::launch(kernels::detail::add_row_vector_kernel<T, unsigned>, blocks, 256, 0, kernels::stream(),
                        y.data(), b.data(), rows.task, unsigned(y.size()), unsigned(y.cols()));
    else
        kernels::launch(kernels::detail::add_row_vector_kernel<T, unsigned long long>, blocks, 256, 0,
                        kernels::stream(), y.data(), b.data(), rows.task, (unsigned long long)y.size(),
                        (unsigned long long)y.cols());
    check_launch("add_row_vector_kernel", where);
}

template <class T>
void add_column_sums(const Tensor<T, Cuda>& g, Tensor<T, Cuda>& out, std::string_view where, TaskRows rows) {
    if (out.size() != g.cols() * rows.tasks)
        throw ShapeError(patchwork::detail::concat(where, ": column sums of ", g.shape(), " into ", out.shape(),
                                                   rows.mixed() ? patchwork::detail::concat(" for ", rows.tasks,
                                                                                            " tasks")
                                                                : std::string()));
    if (rows.mixed())  // per-task column sums: the ordered reduction of scale_shift.cuh (dbeta only)
        kernels::detail::scale_shift_backward<T>(nullptr, g.data(), rows.task, g.rows(), g.cols(), rows.tasks,
                                                 nullptr, nullptr, nullptr, out.data(), {}, where);
    else
        kernels::detail::add_column_sums(kernels::detail::load_element<T>{g.data(), g.cols()}, g.rows(), g.cols(),
                                         out.data(), where);
}

template <class Fn, class T>
void activation_forward(const Tensor<T, Cuda>& x, Tensor<T, Cuda>& y, std::string_view where) {
    kernels::launch(kernels::detail::activation_forward_kernel<Fn, T>, kernels::grid_1d(x.size(), 256), 256, 0, kernels::stream(), x.data(), y.data(), x.size());
    check_launch("activation_forward_kernel", where);
}

template <class Fn, class T>
void activation_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& y,
                         Tensor<T, Cuda>& dx, std::string_view where) {
    kernels::launch(kernels::detail::activation_backward_kernel<Fn, T>, kernels::grid_1d(g.size(), 256), 256, 0, kernels::stream(), g.data(), x.data(), y.data(), dx.data(),
                                                                         g.size());
    check_launch("activation_backward_kernel", where);
}

template <class T>
void layer_norm_forward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& gamma, const Tensor<T, Cuda>& beta,
                        double eps, Tensor<T, Cuda>& xhat, Tensor<T, Cuda>& inv_std, Tensor<T, Cuda>& y,
                        std::string_view where, TaskRows rows) {
    const std::size_t n = x.rows(), d = x.cols();
    if (gamma.size() != d * rows.tasks || beta.size() != d * rows.tasks)
        throw ShapeError(patchwork::detail::concat(where, ": layernorm scale ", gamma.shape(), " and shift ",
                                                   beta.shape(), " for rows of ", d, " values and ", rows.tasks,
                                                   " task(s)"));
    if (n == 0) return;
    if (n > 0x7fffffffu) kernels::detail::checked_int(n, "layernorm rows", where);
    kernels::launch(kernels::detail::layer_norm_forward_kernel<T>, unsigned(n), kernels::detail::row_block_threads(d),
                    0, kernels::stream(), x.data(), gamma.data(), beta.data(), rows.task, T(eps), d, xhat.data(),
                    inv_std.data(), y.data());
    check_launch("layer_norm_forward_kernel", where);
}

template <class T>
void layer_norm_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& xhat, const Tensor<T, Cuda>& inv_std,
                         const Tensor<T, Cuda>& gamma, Tensor<T, Cuda>* dgamma, Tensor<T, Cuda>* dbeta,
                         Tensor<T, Cuda>* dx, std::string_view where, TaskRows rows) {
    const std::size_t n = g.rows(), d = g.cols();
    if (rows.mixed()) {
        // Per task: dgamma_t += sum over its rows of g xhat, dbeta_t += sum of g, the
        // ordered per-task column reduction of scale_shift.cuh (h = xhat).
        if (dgamma != nullptr || dbeta != nullptr)
            kernels::detail::scale_shift_backward<T>(xhat.data(), g.data(), rows.task, n, d, rows.tasks, nullptr,
                                                     nullptr, dgamma != nullptr ? dgamma->data() : nullptr,
                                                     dbeta != nullptr ? dbeta->data() : nullptr, {}, where);
    } else {
        if (dgamma != nullptr)
            kernels::detail::add_column_sums(kernels::detail::load_product<T>{g.data(), xhat.data(), d}, n, d,
                                             dgamma->data(), where);
        if (dbeta != nullptr)
            kernels::detail::add_column_sums(kernels::detail::load_element<T>{g.data(), d}, n, d, dbeta->data(),
                                             where);
    }
    if (dx == nullptr || n == 0) return;
    if (n > 0x7fffffffu) kernels::detail::checked_int(n, "layernorm rows", where);
    kernels::launch(kernels::detail::layer_norm_backward_kernel<T>, unsigned(n), kernels::detail::row_block_threads(d),
                    0, kernels::stream(), g.data(), xhat.data(), inv_std.data(), gamma.data(), rows.task, d,
                    dx->data());
    check_launch("layer_norm_backward_kernel", where);
}

template <class T>
void sgd_update(Tensor<T, Cuda>& w, const Tensor<T, Cuda>& g, Tensor<T, Cuda>& momentum, bool first, double lr,
                double mu, double weight_decay, bool nesterov, std::string_view where) {
    kernels::launch(kernels::detail::sgd_kernel<T>, kernels::grid_1d(w.size(), 256), 256, 0, kernels::stream(), w.data(), g.data(), mu == 0 ? nullptr : momentum.data(), w.size(), T(lr), T(mu), T(weight_decay), first,
        nesterov);
    check_launch("sgd_kernel", where);
}

template <class T>
void adam_update(Tensor<T, Cuda>& w, const Tensor<T, Cuda>& g, Tensor<T, Cuda>& m, Tensor<T, Cuda>& v,
                 std::size_t t, double lr, double beta1, double beta2, double eps, double weight_decay,
                 bool decoupled, std::string_view where) {
    // The scalars exactly as the CPU update forms them (train/optimizer.hpp).
    const double bc1 = 1 - std::pow(beta1, double(t));
    const double bc2 = 1 - std::pow(beta2, double(t));
    const bool decay = decoupled && weight_decay != 0;
    kernels::launch(kernels::detail::adam_kernel<T>, kernels::grid_1d(w.size(), 256), 256, 0, kernels::stream(), w.data(), g.data(), m.data(), v.data(), w.size(), T(beta1), T(beta2), T(decoupled ? 0 : weight_decay),
        decay ? T(1 - lr * weight_decay) : T(1), T(lr / bc1), T(std::sqrt(bc2)), T(eps), decoupled);
    check_launch("adam_kernel", where);
}

template <class T>
void axpy(T a, const Tensor<T, Cuda>& x, Tensor<T, Cuda>& y, std::string_view where) {
    if (!(x.shape() == y.shape()))
        throw ShapeError(patchwork::detail::concat(where, ": y += a x needs equal shapes, got x ", x.shape(),
                                                   " and y ", y.shape()));
    if (x.size() == 0) return;
    kernels::launch(kernels::detail::axpy_kernel<T>, kernels::grid_1d(x.size(), 256), 256, 0, kernels::stream(), a,
                    x.data(), y.data(), x.size());
    check_launch("axpy_kernel", where);
}

template <class T>
void scale(Tensor<T, Cuda>& x, T a, std::string_view where) {
    if (x.size() == 0) return;
    kernels::launch(kernels::detail::scale_kernel<T>, kernels::grid_1d(x.size(), 256), 256, 0, kernels::stream(), a,
                    x.data(), x.size());
    check_launch("scale_kernel", where);
}

template <class T>
void scaled_copy(T a, const T* src, T* dst, std::size_t n, std::string_view where) {
    if (n == 0) return;
    kernels::launch(kernels::detail::scaled_copy_kernel<T>, kernels::grid_1d(n, 256), 256, 0, kernels::stream(), a,
                    src, dst, n);
    check_launch("scaled_copy_kernel", where);
}

template <class T>
void sum_slices(const T* slices, std::size_t ranks, std::size_t n, T* out, std::string_view where) {
    if (n == 0) return;
    kernels::launch(kernels::detail::sum_slices_kernel<T>, kernels::grid_1d(n, 256), 256, 0, kernels::stream(),
                    slices, ranks, n, out);
    check_launch("sum_slices_kernel", where);
}

template <class T>
void upload_elements(T* dst, const T* src, std::size_t n, std::string_view where) {
    if (n == 0) return;
    check(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyHostToDevice, context().stream()), "cudaMemcpyAsync",
          where);
}

template <class T>
void gather_rows(const T* src, const int* idx, std::size_t rows, std::size_t row, T* dst, std::string_view where) {
    if (rows == 0 || row == 0) return;
    kernels::launch(kernels::detail::move_rows_kernel<T, true>, kernels::grid_1d(rows * row, 256), 256, 0,
                    kernels::stream(), src, idx, rows, row, dst);
    check_launch("move_rows_kernel (gather)", where);
}

template <class T>
void scatter_rows(const T* src, const int* idx, std::size_t rows, std::size_t row, T* dst, std::string_view where) {
    if (rows == 0 || row == 0) return;
    kernels::launch(kernels::detail::move_rows_kernel<T, false>, kernels::grid_1d(rows * row, 256), 256, 0,
                    kernels::stream(), src, idx, rows, row, dst);
    check_launch("move_rows_kernel (scatter)", where);
}

template <class T>
void slice_moves(std::span<const SliceMove<T>> moves, std::string_view where) {
    std::size_t longest = 0;
    for (const auto& m : moves) longest = m.n > longest ? m.n : longest;
    if (longest == 0) return;
    // The move list lives in the context's workspace until the kernel, queued
    // right behind the upload on the same stream, has read it.
    kernels::detail::Scratch scratch({}, kernels::ws_bytes(moves.size(), sizeof(SliceMove<T>)), where);
    auto* table = scratch.take<SliceMove<T>>(moves.size());
    upload_elements(table, moves.data(), moves.size(), where);
    const unsigned bx = kernels::grid_1d(longest, 256) < 64 ? kernels::grid_1d(longest, 256) : 64;
    const unsigned by = moves.size() < 65535 ? unsigned(moves.size()) : 65535u;
    kernels::launch(kernels::detail::slice_moves_kernel<T>, dim3(bx, by), 256, 0, kernels::stream(), table,
                    moves.size());
    check_launch("slice_moves_kernel", where);
}

template <class T>
void copy_elements(T* dst, const T* src, std::size_t n, CopyKind kind, std::string_view where) {
    if (n == 0) return;
    const cudaMemcpyKind k = kind == CopyKind::host_to_device   ? cudaMemcpyHostToDevice
                             : kind == CopyKind::device_to_host ? cudaMemcpyDeviceToHost
                                                                : cudaMemcpyDeviceToDevice;
    check(cudaMemcpyAsync(dst, src, n * sizeof(T), k, context().stream()), "cudaMemcpyAsync", where);
    // A host source must stay valid until the copy has read it, a host destination
    // until it has been written: both wait here.
    if (kind != CopyKind::device_to_device) context().synchronize(where);
}

template <class T>
void squared_norm_to(const Tensor<T, Cuda>& x, double* out, std::string_view where) {
    if (x.size() == 0) {
        check(cudaMemsetAsync(out, 0, sizeof(double), context().stream()), "cudaMemsetAsync", where);
        return;
    }
    const unsigned blocks = kernels::detail::squared_norm_blocks(x.size());
    // The partial sums live in the context's workspace until the finish kernel,
    // queued right behind on the same stream, has read them.
    kernels::detail::Scratch scratch({}, kernels::ws_bytes(blocks, sizeof(double)), where);
    double* partial = scratch.take<double>(blocks);
    kernels::launch(kernels::detail::squared_sum_kernel<T>, blocks, 256, 0, kernels::stream(), x.data(), x.size(),
                    partial);
    check_launch("squared_sum_kernel", where);
    kernels::launch(kernels::detail::squared_sum_finish_kernel, 1, 32, 0, kernels::stream(), partial, blocks, out);
    check_launch("squared_sum_finish_kernel", where);
}

template <class T>
std::vector<double> squared_norms(std::span<const Tensor<T, Cuda>* const> xs, std::string_view where) {
    std::vector<double> out(xs.size(), 0.0);
    if (xs.empty()) return out;
    Tensor<double, Cuda> slots(Shape{xs.size()});
    for (std::size_t i = 0; i < xs.size(); ++i) squared_norm_to(*xs[i], slots.data() + i, where);
    check(cudaMemcpyAsync(out.data(), slots.data(), xs.size() * sizeof(double), cudaMemcpyDeviceToHost,
                          context().stream()),
          "cudaMemcpyAsync(device to host)", where);
    context().synchronize(where);
    return out;
}

}  // namespace patchwork::cuda

namespace patchwork {

template <class T>
Loss<T, Cuda> cross_entropy(const Tensor<T, Cuda>& logits, std::span<const int> labels) {
    detail::check_cross_entropy(logits, labels);
    const std::size_t n = logits.rows(), c = logits.cols();
    Loss<T, Cuda> out{T(0), Tensor<T, Cuda>(logits.shape())};
    thread_local cuda::Buffer<int> device_labels;
    thread_local cuda::Buffer<double> row_loss;
    device_labels.upload(labels, "cross_entropy");
    row_loss.reserve(n);
    kernels::launch(kernels::detail::cross_entropy_kernel<T>, unsigned(n), kernels::detail::row_block_threads(c), 0,
                                            kernels::stream(), logits.data(), device_labels.data(), c,
                                                                 T(1) / T(n), out.grad.data(), row_loss.data());
    cuda::check_launch("cross_entropy_kernel", "cross_entropy");
    const std::vector<double> per_row = row_loss.download(n, "cross_entropy");  // waits for the stream
    double total = 0;
    for (double v : per_row) total += v;
    out.value = T(total / double(n));
    return out;
}

}  // namespace patchwork
