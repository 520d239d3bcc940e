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
//
// Storage and arithmetic: a kernel's element type E is a tensor's storage type
// (float, double, or __nv_bfloat16 for patchwork::bf16, see device_t in
// common.cuh); it loads E, computes in accum_t<E> (fp32 for bf16) and rounds
// once when it stores. For float and double both are the same type, so these
// kernels compute exactly what they did before bf16 existed.
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
        y[i] = store<T>(load(y[i]) + load(b[task == nullptr ? std::size_t(c) : std::size_t(task[row]) * cols + c]));
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
        y[i] = store<T>(device_activation<Fn>::value(load(x[i])));
}
template <class Fn, class T>
__global__ void activation_backward_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                           const T* __restrict__ y, T* __restrict__ dx, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        dx[i] = store<T>(device_activation<Fn>::grad(load(g[i]), load(x[i]), load(y[i])));
}

// ---- column sums ---------------------------------------------------------

constexpr unsigned colsum_rows_per_chunk = 256;

/// partial[chunk, c] = sum over the chunk's rows of f(r, c) (A: the accumulation type). Block (32, 8):
/// threadIdx.x picks the column, threadIdx.y strides the chunk's rows; block
/// row y takes chunks y, y + gridDim.y, ... (a grid holds at most 65535 block
/// rows; every chunk's sum is the same whichever block takes it).
template <class A, class F>
__global__ void column_partial_kernel(F f, std::size_t rows, std::size_t cols, std::size_t chunks,
                                      A* __restrict__ partial) {
    __shared__ A part[8][33];
    const std::size_t c = blockIdx.x * 32 + threadIdx.x;
    for (std::size_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
        const std::size_t r0 = chunk * colsum_rows_per_chunk;
        const std::size_t r1 = r0 + colsum_rows_per_chunk < rows ? r0 + colsum_rows_per_chunk : rows;
        A s = A(0);
        if (c < cols)
            for (std::size_t r = r0 + threadIdx.y; r < r1; r += 8) s += f(r, c);
        __syncthreads();  // part is still read for the previous chunk
        part[threadIdx.y][threadIdx.x] = s;
        __syncthreads();
        if (threadIdx.y == 0 && c < cols) {
            A t = part[0][threadIdx.x];
            for (int k = 1; k < 8; ++k) t += part[k][threadIdx.x];
            partial[chunk * cols + c] = t;
        }
    }
}

/// out[c] += sum_k partial[k, c], chunks in order (one rounding into out's storage).
template <class T>
__global__ void column_finish_kernel(const accum_t<T>* __restrict__ partial, std::size_t chunks, std::size_t cols,
                                     T* __restrict__ out) {
    const std::size_t c = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
    if (c >= cols) return;
    accum_t<T> t = 0;
    for (std::size_t k = 0; k < chunks; ++k) t += partial[k * cols + c];
    out[c] = store<T>(load(out[c]) + t);
}

/// out[c] += sum_r f(r, c) for an element functor f returning accum_t<T> (deterministic, two passes:
/// chunk sums of 256 rows into the current context's workspace, then the chunk
/// sums in chunk order). `max_block_rows` (65535, the grid's limit) is a
/// parameter only so that tests can make blocks take several chunks.
template <class T, class F>
void add_column_sums(F f, std::size_t rows, std::size_t cols, T* out, std::string_view where,
                     std::size_t max_block_rows = 65535) {
    if (rows == 0 || cols == 0) return;
    const std::size_t chunks = ceil_div(rows, colsum_rows_per_chunk);
    check::extent(where, "the column-sum chunks", chunks, cols);
    using A = accum_t<T>;
    Scratch scratch({}, ws_bytes(chunks * cols, sizeof(A)), where);
    A* partial = scratch.take<A>(chunks * cols);
    const unsigned block_rows = unsigned(chunks < max_block_rows ? chunks : max_block_rows);
    kernels::launch(column_partial_kernel<A, F>, dim3(unsigned(ceil_div(cols, 32)), block_rows), dim3(32, 8), 0,
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
    __device__ accum_t<T> operator()(std::size_t r, std::size_t c) const { return load(p[r * cols + c]); }
};
template <class T>
struct load_product {
    const T* a;
    const T* b;
    std::size_t cols;
    __device__ accum_t<T> operator()(std::size_t r, std::size_t c) const {
        return load(a[r * cols + c]) * load(b[r * cols + c]);
    }
};

// ---- LayerNorm -----------------------------------------------------------

/// One block per row: mean, variance (two passes over the row), then xhat and
/// y; with per-row tasks (task not null) gamma and beta are [K, d] and the row
/// uses its task's.
template <class T>
__global__ void layer_norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ gamma,
                                          const T* __restrict__ beta, const int* __restrict__ task,
                                          accum_t<T> eps, std::size_t d, T* __restrict__ xhat,
                                          T* __restrict__ inv_std, T* __restrict__ y) {
    using A = accum_t<T>;
    __shared__ A red[32];
    const std::size_t row = blockIdx.x;
    if (task != nullptr) {
        gamma += std::size_t(task[row]) * d;
        beta += std::size_t(task[row]) * d;
    }
    const T* xr = x + row * d;
    A s = A(0);
    for (std::size_t i = threadIdx.x; i < d; i += blockDim.x) s += load(xr[i]);
    const A mean = block_sum(s, red) / A(d);
    A q = A(0);
    for (std::size_t i = threadIdx.x; i < d; i += blockDim.x) {
        const A c = load(xr[i]) - mean;
        q += c * c;
    }
    const A var = block_sum(q, red) / A(d);
    const A is = A(1) / sqrt(var + eps);
    if (threadIdx.x == 0) inv_std[row] = store<T>(is);
    for (std::size_t i = threadIdx.x; i < d; i += blockDim.x) {
        const A h = (load(xr[i]) - mean) * is;
        xhat[row * d + i] = store<T>(h);
        y[row * d + i] = store<T>(load(gamma[i]) * h + load(beta[i]));
    }
}

/// One block per row: dx = s (gh - mean(gh) - xhat mean(gh xhat)), gh = g gamma.
template <class T>
__global__ void layer_norm_backward_kernel(const T* __restrict__ g, const T* __restrict__ xhat,
                                           const T* __restrict__ inv_std, const T* __restrict__ gamma,
                                           const int* __restrict__ task, std::size_t d, T* __restrict__ dx) {
    using A = accum_t<T>;
    __shared__ A red[32];
    const std::size_t row = blockIdx.x;
    if (task != nullptr) gamma += std::size_t(task[row]) * d;
    const T* gr = g + row * d;
    const T* hr = xhat + row * d;
    A a = A(0), b = A(0);
    for (std::size_t i = threadIdx.x; i < d; i += blockDim.x) {
        const A gh = load(gr[i]) * load(gamma[i]);
        a += gh;
        b += gh * load(hr[i]);
    }
    const A mean_gh = block_sum(a, red) / A(d);
    const A mean_ghxh = block_sum(b, red) / A(d);
    const A s = load(inv_std[row]);
    for (std::size_t i = threadIdx.x; i < d; i += blockDim.x)
        dx[row * d + i] = store<T>(s * (load(gr[i]) * load(gamma[i]) - mean_gh - load(hr[i]) * mean_ghxh));
}

inline unsigned row_block_threads(std::size_t d) {
    if (d >= 512) return 256;
    if (d >= 128) return 128;
    return 32;
}

// ---- softmax cross-entropy -----------------------------------------------

/// One block per row: p = softmax(z), grad = (p - onehot) / N, loss[r] = lse - z_y.
/// With `widths` (not null), row r's softmax runs over its first widths[r]
/// logits and the rest of the row gets gradient 0 (mixed-task batches whose
/// heads are padded to the widest task; derivation at detail::cross_entropy_rows).
template <class T>
__global__ void cross_entropy_kernel(const T* __restrict__ z, const int* __restrict__ labels,
                                     const int* __restrict__ widths, std::size_t c, accum_t<T> inv_n,
                                     T* __restrict__ grad, double* __restrict__ loss) {
    using A = accum_t<T>;
    __shared__ A red[32];
    const std::size_t row = blockIdx.x;
    const std::size_t w = widths != nullptr ? std::size_t(widths[row]) : c;
    const T* zr = z + row * c;
    A m = -INFINITY;
    for (std::size_t j = threadIdx.x; j < w; j += blockDim.x) m = load(zr[j]) > m ? load(zr[j]) : m;
    m = block_max(m, red);
    A s = A(0);
    for (std::size_t j = threadIdx.x; j < w; j += blockDim.x) s += exp(load(zr[j]) - m);
    s = block_sum(s, red);
    const int y = labels[row];
    const A inv_s = A(1) / s;
    for (std::size_t j = threadIdx.x; j < c; j += blockDim.x)
        grad[row * c + j] =
            j < w ? store<T>(exp(load(zr[j]) - m) * inv_s * inv_n - (int(j) == y ? inv_n : A(0))) : store<T>(A(0));
    if (threadIdx.x == 0) loss[row] = double(m) + log(double(s)) - double(load(zr[y]));
}

// ---- optimisers (the formulas of train/optimizer.hpp, element by element) ----
// The state (momentum, moments) is kept in accum_t<T>. A bf16 parameter also
// has an fp32 master copy (`master` not null): the update reads and writes the
// master and stores its rounding into the parameter, so steps far below bf16's
// resolution (2^-8 relative) still accumulate.

/// Element i of the weight an update starts from: the master copy when there is one.
template <class T>
__device__ inline accum_t<T> weight_in(const T* w, const accum_t<T>* master, std::size_t i) {
    return master != nullptr ? master[i] : load(w[i]);
}
/// Write element i of the updated weight (master and storage).
template <class T>
__device__ inline void weight_out(T* w, accum_t<T>* master, std::size_t i, accum_t<T> value) {
    if (master != nullptr) master[i] = value;
    w[i] = store<T>(value);
}

template <class T>
__global__ void sgd_kernel(T* __restrict__ w, accum_t<T>* __restrict__ master, const accum_t<T>* __restrict__ g,
                           accum_t<T>* __restrict__ b, std::size_t n, accum_t<T> lr, accum_t<T> mu, accum_t<T> wd,
                           bool first, bool nesterov) {
    using A = accum_t<T>;
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        const A wi = weight_in(w, master, i);
        const A gi = g[i] + wd * wi;
        if (b == nullptr) {
            weight_out(w, master, i, wi - lr * gi);
            continue;
        }
        const A bi = first ? gi : mu * b[i] + gi;
        b[i] = bi;
        weight_out(w, master, i, wi - lr * (nesterov ? gi + mu * bi : bi));
    }
}

template <class T>
__global__ void adam_kernel(T* __restrict__ w, accum_t<T>* __restrict__ master, const accum_t<T>* __restrict__ g,
                            accum_t<T>* __restrict__ m, accum_t<T>* __restrict__ v, std::size_t n, accum_t<T> b1,
                            accum_t<T> b2, accum_t<T> wd, accum_t<T> decay, accum_t<T> step, accum_t<T> sqrt_bc2,
                            accum_t<T> eps, bool decoupled) {
    using A = accum_t<T>;
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        A wi = weight_in(w, master, i);
        if (decoupled) wi *= decay;
        const A gi = decoupled ? g[i] : g[i] + wd * wi;
        const A mi = b1 * m[i] + (A(1) - b1) * gi;
        const A vi = b2 * v[i] + (A(1) - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        weight_out(w, master, i, wi - step * mi / (sqrt(vi) / sqrt_bc2 + eps));
    }
}

// ---- vector operations (search mixing, gradient clipping) -----------------

/// y[i] += a x[i].
template <class T>
__global__ void axpy_kernel(accum_t<T> a, const T* __restrict__ x, T* __restrict__ y, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        y[i] = store<T>(load(y[i]) + a * load(x[i]));
}

/// x[i] *= a.
template <class T>
__global__ void scale_kernel(accum_t<T> a, T* __restrict__ x, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        x[i] = store<T>(load(x[i]) * a);
}

/// dst[i] = a src[i].
template <class T>
__global__ void scaled_copy_kernel(accum_t<T> a, const T* __restrict__ src, T* __restrict__ dst, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        dst[i] = store<T>(a * load(src[i]));
}

/// out[i] = slices[i] + slices[n + i] + ... (rank order).
template <class T>
__global__ void sum_slices_kernel(const T* __restrict__ slices, std::size_t ranks, std::size_t n,
                                  T* __restrict__ out) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        accum_t<T> s = load(slices[i]);
        for (std::size_t r = 1; r < ranks; ++r) s += load(slices[r * n + i]);
        out[i] = store<T>(s);
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
        s += double(load(x[i])) * double(load(x[i]));
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

/// dst[i] = src[i] converted (through the accumulation types; to bf16 rounds to nearest even).
template <class To, class From>
__global__ void convert_kernel(const From* __restrict__ src, To* __restrict__ dst, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x)
        dst[i] = store<To>(accum_t<To>(load(src[i])));
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
        const auto* src = dev(mv.src);
        auto* dst = dev(mv.dst);
        using E = device_t<T>;
        for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < mv.n;
             i += std::size_t(gridDim.x) * blockDim.x) {
            accum_t<E> s = mv.add ? load(dst[i]) : accum_t<E>(0);
            for (std::size_t c = 0; c < mv.count; ++c) s += load(src[c * mv.stride + i]);
            dst[i] = store<E>(s);
        }
    }
}

}  // namespace detail
}  // namespace patchwork::kernels

namespace patchwork::cuda {

template <class T, class C>
void gemm(bool ta, bool tb, T alpha, const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, T beta, Tensor<C, Cuda>& c,
          std::string_view where) {
    static_assert(std::is_same_v<C, T> || (std::is_same_v<T, bf16> && std::is_same_v<C, float>),
                  "cuda::gemm: C holds the operands' type, or float for bf16 operands");
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
    if constexpr (!std::is_same_v<C, T>) {
        // bf16 operands, an fp32 result (a parameter gradient): fp32 products and sums, C read and written in fp32.
        const float af = float(alpha), bf = float(beta);
        const BlasMathScope tensor_cores(h, CUBLAS_DEFAULT_MATH, where);
        check(cublasGemmEx(h, opf, ops, m, n, k, &af, b.data(), CUDA_R_16BF, ldf, a.data(), CUDA_R_16BF, lds, &bf,
                           c.data(), CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              "cublasGemmEx(bf16 -> fp32)", where);
    } else if constexpr (std::is_same_v<T, float>) {
        check(cublasSgemm(h, opf, ops, m, n, k, &alpha, b.data(), ldf, a.data(), lds, &beta, c.data(), ldc),
              "cublasSgemm", where);
    } else if constexpr (std::is_same_v<T, double>) {
        check(cublasDgemm(h, opf, ops, m, n, k, &alpha, b.data(), ldf, a.data(), lds, &beta, c.data(), ldc),
              "cublasDgemm", where);
    } else {
        // bf16 operands and result, fp32 products and sums (tensor cores), alpha and beta in fp32:
        // C is read (beta != 0) and written in bf16, rounded once.
        const float af = float(alpha), bf = float(beta);
        const BlasMathScope tensor_cores(h, CUBLAS_DEFAULT_MATH, where);
        check(cublasGemmEx(h, opf, ops, m, n, k, &af, b.data(), CUDA_R_16BF, ldf, a.data(), CUDA_R_16BF, lds, &bf,
                           c.data(), CUDA_R_16BF, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              "cublasGemmEx(bf16)", where);
    }
}

template <class T>
void add_row_vector(Tensor<T, Cuda>& y, const Tensor<T, Cuda>& b, std::string_view where, TaskRows rows) {
    if (b.size() != y.cols() * rows.tasks)
        throw ShapeError(patchwork::detail::concat(where, ": bias ", b.shape(), " does not fit rows of ", y.shape(),
                                                   rows.mixed() ? patchwork::detail::concat(" for ", rows.tasks,
                                                                                            " tasks")
                                                                : std::string()));
    if (y.empty()) return;
    using E = kernels::device_t<T>;
    using kernels::dev;
    const unsigned blocks = kernels::grid_1d(y.size(), 256);
    if (y.size() + std::size_t(blocks) * 256 <= 0xffffffffu)
        kernels::launch(kernels::detail::add_row_vector_kernel<E, unsigned>, blocks, 256, 0, kernels::stream(),
                        dev(y.data()), dev(b.data()), rows.task, unsigned(y.size()), unsigned(y.cols()));
    else
        kernels::launch(kernels::detail::add_row_vector_kernel<E, unsigned long long>, blocks, 256, 0,
                        kernels::stream(), dev(y.data()), dev(b.data()), rows.task, (unsigned long long)y.size(),
                        (unsigned long long)y.cols());
    check_launch("add_row_vector_kernel", where);
}

template <class T>
void add_column_sums(const Tensor<T, Cuda>& g, Tensor<compute_t<T>, Cuda>& out, std::string_view where,
                     TaskRows rows) {
    if (out.size() != g.cols() * rows.tasks)
        throw ShapeError(patchwork::detail::concat(where, ": column sums of ", g.shape(), " into ", out.shape(),
                                                   rows.mixed() ? patchwork::detail::concat(" for ", rows.tasks,
                                                                                            " tasks")
                                                                : std::string()));
    using E = kernels::device_t<T>;
    using kernels::dev;
    if (rows.mixed())  // per-task column sums: the ordered reduction of scale_shift.cuh (dbeta only)
        kernels::detail::scale_shift_backward<E>(nullptr, dev(g.data()), rows.task, g.rows(), g.cols(), rows.tasks,
                                                 nullptr, nullptr, nullptr, out.data(), {}, where);
    else
        kernels::detail::add_column_sums(kernels::detail::load_element<E>{dev(g.data()), g.cols()}, g.rows(),
                                         g.cols(), out.data(), where);
}

template <class Fn, class T>
void activation_forward(const Tensor<T, Cuda>& x, Tensor<T, Cuda>& y, std::string_view where) {
    using kernels::dev;
    kernels::launch(kernels::detail::activation_forward_kernel<Fn, kernels::device_t<T>>,
                    kernels::grid_1d(x.size(), 256), 256, 0, kernels::stream(), dev(x.data()), dev(y.data()),
                    x.size());
    check_launch("activation_forward_kernel", where);
}

template <class Fn, class T>
void activation_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& y,
                         Tensor<T, Cuda>& dx, std::string_view where) {
    using kernels::dev;
    kernels::launch(kernels::detail::activation_backward_kernel<Fn, kernels::device_t<T>>,
                    kernels::grid_1d(g.size(), 256), 256, 0, kernels::stream(), dev(g.data()), dev(x.data()),
                    dev(y.data()), dev(dx.data()), g.size());
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
    using E = kernels::device_t<T>;
    using kernels::dev;
    kernels::launch(kernels::detail::layer_norm_forward_kernel<E>, unsigned(n), kernels::detail::row_block_threads(d),
                    0, kernels::stream(), dev(x.data()), dev(gamma.data()), dev(beta.data()), rows.task,
                    kernels::accum_t<E>(eps), d, dev(xhat.data()), dev(inv_std.data()), dev(y.data()));
    check_launch("layer_norm_forward_kernel", where);
}

template <class T>
void layer_norm_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& xhat, const Tensor<T, Cuda>& inv_std,
                         const Tensor<T, Cuda>& gamma, Tensor<compute_t<T>, Cuda>* dgamma,
                         Tensor<compute_t<T>, Cuda>* dbeta, Tensor<T, Cuda>* dx, std::string_view where,
                         TaskRows rows) {
    const std::size_t n = g.rows(), d = g.cols();
    using E = kernels::device_t<T>;
    using kernels::dev;
    if (rows.mixed()) {
        // Per task: dgamma_t += sum over its rows of g xhat, dbeta_t += sum of g, the
        // ordered per-task column reduction of scale_shift.cuh (h = xhat).
        if (dgamma != nullptr || dbeta != nullptr)
            kernels::detail::scale_shift_backward<E>(dev(xhat.data()), dev(g.data()), rows.task, n, d, rows.tasks,
                                                     nullptr, nullptr,
                                                     dgamma != nullptr ? dgamma->data() : nullptr,
                                                     dbeta != nullptr ? dbeta->data() : nullptr, {}, where);
    } else {
        if (dgamma != nullptr)
            kernels::detail::add_column_sums(kernels::detail::load_product<E>{dev(g.data()), dev(xhat.data()), d},
                                             n, d, dgamma->data(), where);
        if (dbeta != nullptr)
            kernels::detail::add_column_sums(kernels::detail::load_element<E>{dev(g.data()), d}, n, d,
                                             dbeta->data(), where);
    }
    if (dx == nullptr || n == 0) return;
    if (n > 0x7fffffffu) kernels::detail::checked_int(n, "layernorm rows", where);
    kernels::launch(kernels::detail::layer_norm_backward_kernel<E>, unsigned(n), kernels::detail::row_block_threads(d),
                    0, kernels::stream(), dev(g.data()), dev(xhat.data()), dev(inv_std.data()), dev(gamma.data()),
                    rows.task, d, dev(dx->data()));
    check_launch("layer_norm_backward_kernel", where);
}

template <class T>
void sgd_update(Tensor<T, Cuda>& w, const Tensor<compute_t<T>, Cuda>& g, Tensor<compute_t<T>, Cuda>& momentum,
                Tensor<compute_t<T>, Cuda>* master, bool first, double lr, double mu, double weight_decay,
                bool nesterov, std::string_view where) {
    using E = kernels::device_t<T>;
    using A = kernels::accum_t<E>;
    using kernels::dev;
    kernels::launch(kernels::detail::sgd_kernel<E>, kernels::grid_1d(w.size(), 256), 256, 0, kernels::stream(),
                    dev(w.data()), master != nullptr ? master->data() : nullptr, g.data(),
                    mu == 0 ? nullptr : momentum.data(), w.size(), A(lr), A(mu), A(weight_decay), first, nesterov);
    check_launch("sgd_kernel", where);
}

template <class T>
void adam_update(Tensor<T, Cuda>& w, const Tensor<compute_t<T>, Cuda>& g, Tensor<compute_t<T>, Cuda>& m,
                 Tensor<compute_t<T>, Cuda>& v, Tensor<compute_t<T>, Cuda>* master, std::size_t t, double lr,
                 double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                 std::string_view where) {
    using E = kernels::device_t<T>;
    using A = kernels::accum_t<E>;
    using kernels::dev;
    // The scalars exactly as the CPU update forms them (train/optimizer.hpp).
    const double bc1 = 1 - std::pow(beta1, double(t));
    const double bc2 = 1 - std::pow(beta2, double(t));
    const bool decay = decoupled && weight_decay != 0;
    kernels::launch(kernels::detail::adam_kernel<E>, kernels::grid_1d(w.size(), 256), 256, 0, kernels::stream(),
                    dev(w.data()), master != nullptr ? master->data() : nullptr, g.data(), m.data(), v.data(),
                    w.size(), A(beta1), A(beta2), A(decoupled ? 0 : weight_decay),
                    decay ? A(1 - lr * weight_decay) : A(1), A(lr / bc1), A(std::sqrt(bc2)), A(eps), decoupled);
    check_launch("adam_kernel", where);
}

template <class T>
void axpy(T a, const Tensor<T, Cuda>& x, Tensor<T, Cuda>& y, std::string_view where) {
    if (!(x.shape() == y.shape()))
        throw ShapeError(patchwork::detail::concat(where, ": y += a x needs equal shapes, got x ", x.shape(),
                                                   " and y ", y.shape()));
    if (x.size() == 0) return;
    using kernels::dev;
    kernels::launch(kernels::detail::axpy_kernel<kernels::device_t<T>>, kernels::grid_1d(x.size(), 256), 256, 0,
                    kernels::stream(), compute_t<T>(a), dev(x.data()), dev(y.data()), x.size());
    check_launch("axpy_kernel", where);
}

template <class T>
void scale(Tensor<T, Cuda>& x, T a, std::string_view where) {
    if (x.size() == 0) return;
    kernels::launch(kernels::detail::scale_kernel<kernels::device_t<T>>, kernels::grid_1d(x.size(), 256), 256, 0,
                    kernels::stream(), compute_t<T>(a), kernels::dev(x.data()), x.size());
    check_launch("scale_kernel", where);
}

template <class T>
void scaled_copy(T a, const T* src, T* dst, std::size_t n, std::string_view where) {
    if (n == 0) return;
    kernels::launch(kernels::detail::scaled_copy_kernel<kernels::device_t<T>>, kernels::grid_1d(n, 256), 256, 0,
                    kernels::stream(), compute_t<T>(a), kernels::dev(src), kernels::dev(dst), n);
    check_launch("scaled_copy_kernel", where);
}

template <class T>
void sum_slices(const T* slices, std::size_t ranks, std::size_t n, T* out, std::string_view where) {
    if (n == 0) return;
    kernels::launch(kernels::detail::sum_slices_kernel<kernels::device_t<T>>, kernels::grid_1d(n, 256), 256, 0,
                    kernels::stream(), kernels::dev(slices), ranks, n, kernels::dev(out));
    check_launch("sum_slices_kernel", where);
}

template <class To, class From>
void convert(const Tensor<From, Cuda>& src, Tensor<To, Cuda>& dst, std::string_view where) {
    dst.resize(src.shape());
    if (src.empty()) return;
    kernels::launch(kernels::detail::convert_kernel<kernels::device_t<To>, kernels::device_t<From>>,
                    kernels::grid_1d(src.size(), 256), 256, 0, kernels::stream(), kernels::dev(src.data()),
                    kernels::dev(dst.data()), src.size());
    check_launch("convert_kernel", where);
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
    kernels::launch(kernels::detail::move_rows_kernel<kernels::device_t<T>, true>, kernels::grid_1d(rows * row, 256),
                    256, 0, kernels::stream(), kernels::dev(src), idx, rows, row, kernels::dev(dst));
    check_launch("move_rows_kernel (gather)", where);
}

template <class T>
void scatter_rows(const T* src, const int* idx, std::size_t rows, std::size_t row, T* dst, std::string_view where) {
    if (rows == 0 || row == 0) return;
    kernels::launch(kernels::detail::move_rows_kernel<kernels::device_t<T>, false>,
                    kernels::grid_1d(rows * row, 256), 256, 0, kernels::stream(), kernels::dev(src), idx, rows, row,
                    kernels::dev(dst));
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
    kernels::launch(kernels::detail::squared_sum_kernel<kernels::device_t<T>>, blocks, 256, 0, kernels::stream(),
                    kernels::dev(x.data()), x.size(), partial);
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

namespace detail {
/// Device cross-entropy after the host checks: `ints` holds the n labels,
/// then (with_widths) the n class counts, uploaded in one copy.
template <class T>
Loss<T, Cuda> device_cross_entropy(const Tensor<T, Cuda>& logits, const std::vector<int>& ints, bool with_widths) {
    const std::size_t n = logits.rows(), c = logits.cols();
    using E = kernels::device_t<T>;
    Loss<T, Cuda> out{T(0), Tensor<T, Cuda>(logits.shape())};
    thread_local cuda::Buffer<int> device_ints;
    thread_local cuda::Buffer<double> row_loss;
    device_ints.upload(std::span<const int>(ints), "cross_entropy");
    row_loss.reserve(n);
    kernels::launch(kernels::detail::cross_entropy_kernel<E>, unsigned(n), kernels::detail::row_block_threads(c), 0,
                    kernels::stream(), kernels::dev(logits.data()), device_ints.data(),
                    with_widths ? device_ints.data() + n : nullptr, c,
                    kernels::accum_t<E>(1) / kernels::accum_t<E>(n), kernels::dev(out.grad.data()), row_loss.data());
    cuda::check_launch("cross_entropy_kernel", "cross_entropy");
    const std::vector<double> per_row = row_loss.download(n, "cross_entropy");  // waits for the stream
    double total = 0;
    for (double v : per_row) total += v;
    out.value = compute_t<T>(total / double(n));
    return out;
}
}  // namespace detail

template <class T>
Loss<T, Cuda> cross_entropy(const Tensor<T, Cuda>& logits, std::span<const int> labels) {
    detail::check_cross_entropy(logits, labels);
    return detail::device_cross_entropy(logits, std::vector<int>(labels.begin(), labels.end()), false);
}

template <class T>
Loss<T, Cuda> cross_entropy(const Tensor<T, Cuda>& logits, std::span<const int> labels,
                            std::span<const std::size_t> classes) {
    detail::check_cross_entropy(logits, labels, classes);
    std::vector<int> ints(labels.begin(), labels.end());
    for (std::size_t k : classes) ints.push_back(int(k));
    return detail::device_cross_entropy(logits, ints, true);
}

}  // namespace patchwork
