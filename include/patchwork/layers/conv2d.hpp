#pragma once
// Conv2d over NHWC tensors: x [N, H, W, C_in] -> y [N, Ho, Wo, C_out], with a
// square kernel k, stride s, zero padding p and G groups:
//   Ho = (H + 2p - k) / s + 1   (likewise Wo)
//   y[n,oy,ox,co] = b[co] + sum_{ky,kx,j} W[co,ky,kx,j] x[n, oy s - p + ky, ox s - p + kx, g(co) Cg + j]
// where Cg = C_in / G, g(co) = co / (C_out / G) is the group of output channel
// co, and taps outside the image read zero. The weight is stored as
// [C_out, k, k, C_in / G] (channels last, like the activations), so row co of
// its [C_out, k k Cg] matrix view is one filter.
//
// Channels last makes the matrix view of an output [N Ho Wo, C_out]: per-channel
// patches written for Linear outputs (ScaleShift, Adapter, BiasOnly) apply to a
// convolution per pixel without change, and out_features() is C_out.
//
// Dense and grouped convolutions (G < C_in) run as im2col + GEMM. The patch
// matrix X_col has one row per output pixel (P = N Ho Wo rows) and its columns
// ordered (group, ky, kx, j), so group g owns the contiguous column block
// [g K, (g + 1) K), K = k k Cg:
//   Y[:, group g] = X_col[:, block g] W_g^T          (W_g: the group's [C_out/G, K] rows)
// Backward, with dY = dL/dy viewed as [P, C_out]:
//   dW_g += dY[:, group g]^T X_col[:, block g]       (the weight-gradient GEMM)
//   db   += 1^T dY
//   dX_col[:, block g] = dY[:, group g] W_g,  and dx is dX_col scattered back
//   (col2im: every patch entry adds into the input pixel it was copied from).
// A 1x1 convolution with stride 1 and no padding needs no im2col: X_col is x's
// own matrix view and dX_col is dx.
//
// X_col is never built whole (9x the input for a 3x3 kernel, written once and
// read twice per step). The output pixels are cut into chunks of whole images
// and each chunk into tiles of a few dozen pixels (detail::ConvTiling); a
// tile's rows of X_col are built in a per-thread scratch block that stays in
// the cache, used at once, and built again in backward. Per tile
// (rows R of X_col, Y and dY):
//   Y[R] = 1 b^T + X_col[R] W^T                    (the bias is the GEMM's starting value)
//   dW_c += dY[R]^T X_col[R],  db_c += 1^T dY[R]   (partial sums of chunk c)
//   dX_col[R] = dY[R] W, scattered into dx at once
// and dW += sum_c dW_c, db += sum_c db_c in chunk order afterwards. The chunks
// depend only on the shapes, never on the thread count, so neither does the
// rounding; a chunk's scatter stays inside its own images, so threads never
// write the same pixel of dx.
//
// Depthwise convolutions (G = C_in > 1, or a DepthwiseConv2d, so every filter
// sees one input channel; C_out = m C_in with channel multiplier m) skip the GEMM, which would have
// K = k k rows per group, and loop directly:
//   y[p, co] = b[co] + sum_t x[q(p,t), co / m] Wt[t, co]
//   dWt[t, co] += sum_p dY[p, co] x[q(p,t), co / m]
//   dx[q(p,t), co / m] += dY[p, co] Wt[t, co]
// with t = ky k + kx the tap, q(p,t) the input pixel tap t of output pixel p
// reads, and Wt the weight transposed to [k k, C_out] so that the inner loops
// run over contiguous channels. With one output channel per input channel
// (m = 1, the common case) every such sum runs in blocks of channels whose
// partial sums stay in vector registers (detail::ChannelSums): y[p] starts at
// b and adds its window's taps; dWt[t] adds, per tap, the pixels of each image
// row whose tap lands inside the image; and for stride 1 dx is gathered rather
// than scattered, since q = q(p,t) means p is the output pixel (iy + pad - ky,
// ix + pad - kx) of input pixel (iy, ix):
//   dx[(iy, ix), c] = sum_{ky,kx} dY[(iy + pad - ky, ix + pad - kx), c] Wt[ky k + kx, c]
// over the taps whose output pixel exists, each dx row written once.
// Depthwise filters carry Role::depthwise (the
// "depthwise patch" of K for the price of 1 re-learns exactly these); every
// other convolution weight carries Role::weight.
//
// Mixed-task batches (core/mixed_batch.hpp). The filters of a depthwise
// convolution and the bias of any convolution may be per task: the images of
// task k (a contiguous segment of the batch, pixels p in P_k) use task k's
// Wt^k and b^k. A pixel reads only its own image, so the sums over pixels
// above split by segment:
//   y[p, co]      = b^k[co] + sum_t x[q(p,t), co / m] Wt^k[t, co]        (p in P_k)
//   dWt^k[t, co] += sum_{p in P_k} dY[p, co] x[q(p,t), co / m]
//   db^k         += sum_{p in P_k} dY[p, :]
//   dx[q(p,t), co / m] += dY[p, co] Wt^k[t, co]                          (p in P_k)
// (a parameter that is not per task receives every segment's sum). The
// weight of a dense or grouped convolution is never per row (its GEMM runs
// once over all pixels): a mixed batch in which it is per task throws.
//
// With the meson option `dnnl` (PATCHWORK_USE_DNNL), float convolutions run on
// oneDNN instead (ops/dnnl_conv.hpp: the same NHWC tensors, no layout copies of
// the activations), except the cases it leaves to the kernels above: double
// precision, mixed-task batches of depthwise convolutions, shapes oneDNN has
// only reference kernels for, and layers told set_onednn(false).
//
// With Device = Cuda (layers/conv2d_cuda.hpp) the same layer, with the same
// parameters, runs on the kernels of kernels/conv.cuh: im2col + cuBLAS for
// dense and grouped convolutions, direct window sums for depthwise ones.
//
// As for Linear, the layer keeps a pointer to its input: x must stay alive and
// unchanged until the matching backward. A frozen weight skips its gradient
// work; a switched-off input gradient skips dX_col and col2im.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <string>

#if defined(__FMA__)
#include <immintrin.h>
#endif

#include "patchwork/core/module.hpp"
#include "patchwork/core/mixed_batch.hpp"
#include "patchwork/core/parallel.hpp"
#include "patchwork/ops/dnnl_conv.hpp"
#include "patchwork/ops/gemm.hpp"

namespace patchwork {

/// Options of a convolution: `Conv2d(16, 32, 3, {.stride = 2, .padding = 1})`.
struct Conv2dOptions {
    std::size_t stride = 1;
    std::size_t padding = 0;  ///< zeros added on every side
    std::size_t groups = 1;   ///< groups = in_channels: depthwise
    bool bias = true;
};

namespace detail {

/// A square sliding window (convolution kernel or pooling window).
struct SlidingWindow {
    std::size_t kernel = 1, stride = 1, padding = 0;

    [[nodiscard]] bool fits(std::size_t in) const noexcept { return in + 2 * padding >= kernel; }
    [[nodiscard]] std::size_t out(std::size_t in) const noexcept { return (in + 2 * padding - kernel) / stride + 1; }
    /// The smallest input extent the window fits in.
    [[nodiscard]] std::size_t min_in() const noexcept { return kernel > 2 * padding ? kernel - 2 * padding : 1; }
};

/// Where a window slides over one NHWC input: sizes in and out, and the walk
/// from an output pixel to the input pixels its taps read.
struct SpatialGeometry {
    std::size_t batch = 0, h = 0, w = 0, ho = 0, wo = 0;
    SlidingWindow window;

    SpatialGeometry() = default;
    SpatialGeometry(const Shape& in, const SlidingWindow& win)
        : batch(in[0]), h(in[1]), w(in[2]), ho(win.out(in[1])), wo(win.out(in[2])), window(win) {}

    [[nodiscard]] std::size_t in_pixels() const noexcept { return batch * h * w; }
    [[nodiscard]] std::size_t out_pixels() const noexcept { return batch * ho * wo; }
    [[nodiscard]] std::size_t taps() const noexcept { return window.kernel * window.kernel; }

    /// The kernel rows [ky0, ky1) and columns [kx0, kx1) whose taps of output
    /// pixel (oy, ox) land inside the image, and the input pixel (iy, ix) the
    /// kernel's top-left tap reads (possibly in the padding).
    struct TapsInside {
        std::size_t ky0, ky1, kx0, kx1;
        std::ptrdiff_t iy, ix;
    };
    [[nodiscard]] TapsInside taps_inside(std::size_t oy, std::size_t ox) const noexcept {
        const auto k = std::ptrdiff_t(window.kernel);
        const std::ptrdiff_t iy = std::ptrdiff_t(oy * window.stride) - std::ptrdiff_t(window.padding);
        const std::ptrdiff_t ix = std::ptrdiff_t(ox * window.stride) - std::ptrdiff_t(window.padding);
        return {std::size_t(std::clamp<std::ptrdiff_t>(-iy, 0, k)),
                std::size_t(std::clamp<std::ptrdiff_t>(std::ptrdiff_t(h) - iy, 0, k)),
                std::size_t(std::clamp<std::ptrdiff_t>(-ix, 0, k)),
                std::size_t(std::clamp<std::ptrdiff_t>(std::ptrdiff_t(w) - ix, 0, k)), iy, ix};
    }

    /// f(t, q) for every tap t = ky k + kx of output pixel p (row of [N Ho Wo, C])
    /// that lands inside the image; q is the input pixel (row of [N H W, C]).
    /// Taps in the padding are skipped: they read zero.
    template <class F>
    void for_each_tap(std::size_t p, F&& f) const {
        const std::size_t ox = p % wo, oy = (p / wo) % ho, b = p / (wo * ho);
        const std::size_t k = window.kernel;
        for (std::size_t ky = 0; ky < k; ++ky) {
            const std::ptrdiff_t iy = std::ptrdiff_t(oy * window.stride + ky) - std::ptrdiff_t(window.padding);
            if (iy < 0 || iy >= std::ptrdiff_t(h)) continue;
            for (std::size_t kx = 0; kx < k; ++kx) {
                const std::ptrdiff_t ix = std::ptrdiff_t(ox * window.stride + kx) - std::ptrdiff_t(window.padding);
                if (ix < 0 || ix >= std::ptrdiff_t(w)) continue;
                f(ky * k + kx, (b * h + std::size_t(iy)) * w + std::size_t(ix));
            }
        }
    }
};

/// The thread running the caller inside for_rows (0 outside a parallel loop),
/// and how many threads a for_rows may use: the index and count of per-thread
/// scratch blocks.
inline std::size_t thread_slot() noexcept {
#if defined(_OPENMP)
    return std::size_t(omp_get_thread_num());
#else
    return 0;
#endif
}
inline std::size_t thread_slots() noexcept {
#if defined(_OPENMP)
    return std::size_t(std::max(1, omp_get_max_threads()));
#else
    return 1;
#endif
}

/// How a convolution's output pixels are split for threads and caches: chunks
/// of whole images, then tiles of at most `tile` pixels inside a chunk. Both
/// depend only on the shapes (never on the thread count), so per-chunk partial
/// sums added in chunk order round the same way on any number of threads.
struct ConvTiling {
    /// Aim for about this many output pixels per chunk (so that small images
    /// still give chunks worth a thread) ...
    static constexpr std::size_t chunk_pixels = 2048;
    /// ... and a chunk count that is a multiple of this, while the batch allows,
    /// so that 2, 4 or 8 threads get equal shares.
    static constexpr std::size_t chunk_multiple = 8;
    /// Elements of one tile's widest row block (an X_col or dX_col tile):
    /// 64 KiB of floats, which stays in the L2 cache (measured against 16, 32,
    /// 128 and 256 KiB on the conv_bench shapes: within the noise, this one ahead).
    static constexpr std::size_t tile_elements = 16384;

    std::size_t per_image = 1, batch = 0, images_per_chunk = 1, chunks = 0, tile = 1;

    ConvTiling() = default;
    /// `row_width`: elements per pixel of the widest per-tile block.
    ConvTiling(const SpatialGeometry& geo, std::size_t row_width)
        : per_image(geo.ho * geo.wo), batch(geo.batch) {
        std::size_t want = (batch * per_image + chunk_pixels - 1) / chunk_pixels;
        want = std::min(batch, (want + chunk_multiple - 1) / chunk_multiple * chunk_multiple);
        images_per_chunk = (batch + want - 1) / want;
        chunks = (batch + images_per_chunk - 1) / images_per_chunk;
        tile = std::clamp<std::size_t>(tile_elements / std::max<std::size_t>(row_width, 1), 8, 1024);
    }

    [[nodiscard]] std::size_t first_image(std::size_t c) const noexcept { return c * images_per_chunk; }
    [[nodiscard]] std::size_t end_image(std::size_t c) const noexcept {
        return std::min(batch, (c + 1) * images_per_chunk);
    }
    /// Work of one chunk in elements, for for_rows' decision to use threads.
    [[nodiscard]] std::size_t chunk_cost(std::size_t per_pixel) const noexcept {
        return images_per_chunk * per_image * per_pixel;
    }
    /// f(p0, np) for the tiles [p0, p0 + np) of chunk c, in order.
    template <class F>
    void for_each_tile(std::size_t c, F&& f) const {
        const std::size_t end = end_image(c) * per_image;
        for (std::size_t p = first_image(c) * per_image; p < end; p += tile) f(p, std::min(tile, end - p));
    }
};

/// dst[0, n) = src[0, n), as one vectorised loop (no library call per pixel and tap).
template <class T>
void copy_row(const T* src, T* dst, std::size_t n) noexcept {
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>>(dst, Eigen::Index(n)) =
        Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>(src, Eigen::Index(n));
}

/// dst[0, n) += src[0, n).
template <class T>
void add_row(const T* src, T* dst, std::size_t n) noexcept {
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>>(dst, Eigen::Index(n)) +=
        Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>(src, Eigen::Index(n));
}

/// dst[c] += sum_{r < rows} m[r cols + c]: the column sums of a row-major
/// block, row after row (one pass over the rows; a column-wise reduction of a
/// row-major matrix would walk it once per column).
template <class T>
void add_column_sums(const T* m, std::size_t rows, std::size_t cols, T* dst) noexcept {
    for (std::size_t r = 0; r < rows; ++r) add_row(m + r * cols, dst, cols);
}

/// Sums over a depthwise window (or any sum of products of two channel rows),
/// for channels [0, n) of one pixel, vectorised over the channels:
///   out[c] = init[c] + sum_{r < rows, j < cols} a[r a_row + j a_col + c] b[r b_row + j b_col + c]
/// (init may be null: zero). Channels go in blocks of four vectors, then one
/// vector, then one at a time; a block's sums stay in registers over all taps.
template <class T>
struct ChannelSums {
    // One SIMD register (GCC and clang vector extension): 32 bytes where AVX is
    // enabled, else 16 (a wider vector than the target has would change the ABI).
#if defined(__AVX__)
    static constexpr std::size_t vector_bytes = 32;
#else
    static constexpr std::size_t vector_bytes = 16;
#endif
    typedef T Vec __attribute__((vector_size(vector_bytes)));
    static constexpr std::size_t lanes = vector_bytes / sizeof(T);

    static Vec load(const T* p) noexcept {
        Vec v;
        std::memcpy(&v, p, sizeof v);
        return v;
    }
    static void store(T* p, const Vec& v) noexcept { std::memcpy(p, &v, sizeof v); }

    template <std::size_t NV>
    static void block(T* out, const T* init, const T* a, std::ptrdiff_t a_row, std::ptrdiff_t a_col, const T* b,
                      std::ptrdiff_t b_row, std::ptrdiff_t b_col, std::size_t rows, std::size_t cols) noexcept {
        Vec acc[NV];
        for (std::size_t i = 0; i < NV; ++i) acc[i] = init != nullptr ? load(init + i * lanes) : Vec{};
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t j = 0; j < cols; ++j) {
                const T* pa = a + std::ptrdiff_t(r) * a_row + std::ptrdiff_t(j) * a_col;
                const T* pb = b + std::ptrdiff_t(r) * b_row + std::ptrdiff_t(j) * b_col;
                for (std::size_t i = 0; i < NV; ++i) acc[i] += load(pa + i * lanes) * load(pb + i * lanes);
            }
        for (std::size_t i = 0; i < NV; ++i) store(out + i * lanes, acc[i]);
    }

    static void run(std::size_t n, T* out, const T* init, const T* a, std::ptrdiff_t a_row, std::ptrdiff_t a_col,
                    const T* b, std::ptrdiff_t b_row, std::ptrdiff_t b_col, std::size_t rows,
                    std::size_t cols) noexcept {
        std::size_t c = 0;
        const auto at = [&](const T* p) { return p == nullptr ? p : p + c; };
        for (; c + 4 * lanes <= n; c += 4 * lanes)
            block<4>(out + c, at(init), a + c, a_row, a_col, b + c, b_row, b_col, rows, cols);
        for (; c + lanes <= n; c += lanes)
            block<1>(out + c, at(init), a + c, a_row, a_col, b + c, b_row, b_col, rows, cols);
        for (; c < n; ++c) {
            T acc = init != nullptr ? init[c] : T(0);
            for (std::size_t r = 0; r < rows; ++r)
                for (std::size_t j = 0; j < cols; ++j)
                    acc += a[std::ptrdiff_t(r) * a_row + std::ptrdiff_t(j) * a_col + std::ptrdiff_t(c)] *
                           b[std::ptrdiff_t(r) * b_row + std::ptrdiff_t(j) * b_col + std::ptrdiff_t(c)];
            out[c] = acc;
        }
    }
};

/// a b + c on SIMD vectors, fused where the target has FMA.
template <class Vec>
inline Vec fused_multiply_add(const Vec& a, const Vec& b, const Vec& c) noexcept {
#if defined(__FMA__)
    if constexpr (sizeof(Vec) == 32 && sizeof(a[0]) == 4) return Vec(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(c)));
    else if constexpr (sizeof(Vec) == 32 && sizeof(a[0]) == 8)
        return Vec(_mm256_fmadd_pd(__m256d(a), __m256d(b), __m256d(c)));
    else if constexpr (sizeof(Vec) == 16 && sizeof(a[0]) == 4) return Vec(_mm_fmadd_ps(__m128(a), __m128(b), __m128(c)));
    else if constexpr (sizeof(Vec) == 16 && sizeof(a[0]) == 8)
        return Vec(_mm_fmadd_pd(__m128d(a), __m128d(b), __m128d(c)));
    else
#endif
        return a * b + c;
}

/// Where the K x K windows of output row oy lie over an image of in_h x in_w
/// pixels (stride s, padding p): the first input row iy0 (possibly in the
/// padding), the kernel rows [ky0, ky1) inside the image, and the output
/// columns [ox_lo, ox_hi) whose windows lie inside horizontally (empty when
/// none do); columns(ox) gives the kernel columns inside for any column.
struct WindowRow {
    std::ptrdiff_t iy0;
    std::size_t ky0, ky1, ox_lo, ox_hi;
    std::size_t k, in_w, stride, pad;

    WindowRow(std::size_t kernel, std::size_t in_h, std::size_t in_width, std::size_t out_w, std::size_t s,
              std::size_t p, std::size_t oy) noexcept
        : iy0(std::ptrdiff_t(oy * s) - std::ptrdiff_t(p)), ky0(iy0 < 0 ? std::size_t(-iy0) : 0),
          ky1(std::size_t(std::clamp<std::ptrdiff_t>(std::ptrdiff_t(in_h) - iy0, 0, std::ptrdiff_t(kernel)))),
          ox_lo(std::min(out_w, (p + s - 1) / s)),  // p <= ox s
          ox_hi(std::max(ox_lo, in_width + p >= kernel ? std::min(out_w, (in_width + p - kernel) / s + 1)
                                                       : std::size_t(0))),  // ox s - p + K <= in_w
          k(kernel), in_w(in_width), stride(s), pad(p) {}

    /// The input column of output column ox's first kernel column, and its kernel columns [kx0, kx1) inside.
    struct Columns {
        std::ptrdiff_t ix0;
        std::size_t kx0, kx1;
    };
    [[nodiscard]] Columns columns(std::size_t ox) const noexcept {
        const std::ptrdiff_t ix0 = std::ptrdiff_t(ox * stride) - std::ptrdiff_t(pad);
        return {ix0, ix0 < 0 ? std::size_t(-ix0) : 0,
                std::size_t(std::clamp<std::ptrdiff_t>(std::ptrdiff_t(in_w) - ix0, 0, std::ptrdiff_t(k)))};
    }
};

/// One output row of a depthwise window sum with a K x K kernel known at
/// compile time, over all channels (C a multiple of the vector width):
///   out[ox, c] = init[c] + sum_{ky, kx} in[oy s - p + ky, ox s - p + kx, c] wt[(ky K + kx) C + c]
/// with `in` one image of in_h x in_w pixels, taps outside it reading zero.
/// Per block of one vector of channels, the K K filter vectors stay in
/// registers and four output pixels are summed at once (four independent
/// chains of fused multiply-adds); the columns whose window crosses the left
/// or right border take a checked loop. Used for the forward (in = x, wt = Wt,
/// init = b) and, with stride 1, for the gathered input gradient (in = dY,
/// wt = Wt flipped, p' = K - 1 - p): the same sums.
template <class T, std::size_t K>
void depthwise_row(const T* in, std::size_t in_h, std::size_t in_w, std::size_t c_all, std::size_t out_w,
                   std::size_t stride, std::size_t pad, std::size_t oy, const T* wt, const T* init, T* out) noexcept {
    using CS = ChannelSums<T>;
    using Vec = typename CS::Vec;
    constexpr std::size_t lanes = CS::lanes;
    const WindowRow wr(K, in_h, in_w, out_w, stride, pad, oy);
    const std::size_t ky0 = wr.ky0, ky1 = wr.ky1, ox_hi = wr.ox_hi;
    const auto row_of = [&](std::size_t ky) { return in + std::size_t(wr.iy0 + std::ptrdiff_t(ky)) * in_w * c_all; };
    for (std::size_t cb = 0; cb < c_all; cb += lanes) {
        Vec w[K * K];
        for (std::size_t t = 0; t < K * K; ++t) w[t] = CS::load(wt + t * c_all + cb);
        const Vec start = init != nullptr ? CS::load(init + cb) : Vec{};
        const auto checked = [&](std::size_t ox) {
            const auto [ix0, kx0, kx1] = wr.columns(ox);
            Vec acc = start;
            for (std::size_t ky = ky0; ky < ky1; ++ky)
                for (std::size_t kx = kx0; kx < kx1; ++kx)
                    acc = fused_multiply_add(CS::load(row_of(ky) + std::size_t(ix0 + std::ptrdiff_t(kx)) * c_all + cb),
                                             w[ky * K + kx], acc);
            CS::store(out + ox * c_all + cb, acc);
        };
        std::size_t ox = 0;
        for (; ox < wr.ox_lo; ++ox) checked(ox);
        const std::size_t step = stride * c_all;
        for (; ox + 4 <= ox_hi; ox += 4) {
            Vec a0 = start, a1 = start, a2 = start, a3 = start;
            for (std::size_t ky = ky0; ky < ky1; ++ky) {
                const T* r = row_of(ky) + (ox * stride - pad) * c_all + cb;
                for (std::size_t kx = 0; kx < K; ++kx, r += c_all) {
                    const Vec wk = w[ky * K + kx];
                    a0 = fused_multiply_add(CS::load(r), wk, a0);
                    a1 = fused_multiply_add(CS::load(r + step), wk, a1);
                    a2 = fused_multiply_add(CS::load(r + 2 * step), wk, a2);
                    a3 = fused_multiply_add(CS::load(r + 3 * step), wk, a3);
                }
            }
            T* o = out + ox * c_all + cb;
            CS::store(o, a0);
            CS::store(o + c_all, a1);
            CS::store(o + 2 * c_all, a2);
            CS::store(o + 3 * c_all, a3);
        }
        for (; ox < out_w; ++ox) checked(ox);
    }
}

/// The weight gradient's share of output pixels [ox_a, ox_b) of one output row:
///   dwt[(ky K + kx) C + c] += sum_ox g[ox, c] in[oy s - p + ky, ox s - p + kx, c]
/// (g: the output gradient's row, in: one image, taps outside it read zero).
/// Per block of one vector of channels, the K K sums stay in registers over
/// the row; a row whose window is inside the image vertically takes a fully
/// unrolled loop (compile-time tap indices), the border rows a checked one.
template <class T, std::size_t K>
void depthwise_row_weight_grad(const T* in, std::size_t in_h, std::size_t in_w, std::size_t c_all,
                               std::size_t stride, std::size_t pad, std::size_t oy, std::size_t ox_a,
                               std::size_t ox_b, const T* g, T* dwt) noexcept {
    using CS = ChannelSums<T>;
    using Vec = typename CS::Vec;
    constexpr std::size_t lanes = CS::lanes;
    const WindowRow wr(K, in_h, in_w, ox_b, stride, pad, oy);
    const std::size_t ky0 = wr.ky0, ky1 = wr.ky1, out_w = ox_b;
    // The inside columns, cut to [ox_a, ox_b).
    const std::size_t ox_lo = std::clamp(wr.ox_lo, ox_a, out_w), ox_hi = std::clamp(wr.ox_hi, ox_lo, out_w);
    const auto row_of = [&](std::size_t ky) { return in + std::size_t(wr.iy0 + std::ptrdiff_t(ky)) * in_w * c_all; };
    for (std::size_t cb = 0; cb < c_all; cb += lanes) {
        Vec acc[K * K];
        for (std::size_t t = 0; t < K * K; ++t) acc[t] = CS::load(dwt + t * c_all + cb);
        const auto checked = [&](std::size_t ox) {
            const auto [ix0, kx0, kx1] = wr.columns(ox);
            const Vec gv = CS::load(g + ox * c_all + cb);
            for (std::size_t ky = ky0; ky < ky1; ++ky)
                for (std::size_t kx = kx0; kx < kx1; ++kx)
                    acc[ky * K + kx] = fused_multiply_add(
                        CS::load(row_of(ky) + std::size_t(ix0 + std::ptrdiff_t(kx)) * c_all + cb), gv, acc[ky * K + kx]);
        };
        for (std::size_t ox = ox_a; ox < ox_lo; ++ox) checked(ox);
        if (ky0 == 0 && ky1 == K) {
            const T* r0 = row_of(0);
            const std::size_t row_stride = in_w * c_all;
            for (std::size_t ox = ox_lo; ox < ox_hi; ++ox) {
                const Vec gv = CS::load(g + ox * c_all + cb);
                const T* r = r0 + (ox * stride - pad) * c_all + cb;
                for (std::size_t ky = 0; ky < K; ++ky)
                    for (std::size_t kx = 0; kx < K; ++kx)
                        acc[ky * K + kx] =
                            fused_multiply_add(CS::load(r + ky * row_stride + kx * c_all), gv, acc[ky * K + kx]);
            }
        } else {
            for (std::size_t ox = ox_lo; ox < ox_hi; ++ox) checked(ox);
        }
        for (std::size_t ox = ox_hi; ox < out_w; ++ox) checked(ox);
        for (std::size_t t = 0; t < K * K; ++t) CS::store(dwt + t * c_all + cb, acc[t]);
    }
}

/// depthwise_row for the kernel sizes it is compiled for (3 and 5); false for others.
template <class T>
bool depthwise_row_for(std::size_t k, const T* in, std::size_t in_h, std::size_t in_w, std::size_t c_all,
                       std::size_t out_w, std::size_t stride, std::size_t pad, std::size_t oy, const T* wt,
                       const T* init, T* out) noexcept {
    switch (k) {
    case 3: depthwise_row<T, 3>(in, in_h, in_w, c_all, out_w, stride, pad, oy, wt, init, out); return true;
    case 5: depthwise_row<T, 5>(in, in_h, in_w, c_all, out_w, stride, pad, oy, wt, init, out); return true;
    default: return false;
    }
}

/// depthwise_row_weight_grad for the kernel sizes it is compiled for (3 and 5); false for others.
template <class T>
bool depthwise_row_weight_grad_for(std::size_t k, const T* in, std::size_t in_h, std::size_t in_w,
                                   std::size_t c_all, std::size_t stride, std::size_t pad, std::size_t oy,
                                   std::size_t ox_a, std::size_t ox_b, const T* g, T* dwt) noexcept {
    switch (k) {
    case 3: depthwise_row_weight_grad<T, 3>(in, in_h, in_w, c_all, stride, pad, oy, ox_a, ox_b, g, dwt); return true;
    case 5: depthwise_row_weight_grad<T, 5>(in, in_h, in_w, c_all, stride, pad, oy, ox_a, ox_b, g, dwt); return true;
    default: return false;
    }
}

/// The options of a convolution, checked (ConfigError otherwise).
inline Conv2dOptions validated_conv_options(std::size_t in, std::size_t out, std::size_t kernel,
                                            const Conv2dOptions& o) {
    if (in == 0 || out == 0 || kernel == 0 || o.stride == 0 || o.groups == 0)
        throw ConfigError(concat("conv: channels, kernel, stride and groups must be positive, got in=", in,
                                 " out=", out, " kernel=", kernel, " stride=", o.stride, " groups=", o.groups));
    if (in % o.groups != 0 || out % o.groups != 0)
        throw ConfigError(concat("conv: groups=", o.groups, " must divide in_channels=", in,
                                 " and out_channels=", out));
    return o;
}

/// Check that x is a non-empty NHWC tensor with `channels` channels that the window fits in.
template <class T, class D>
void check_nhwc(const Tensor<T, D>& x, std::size_t channels, const SlidingWindow& win, const std::string& path,
                const char* what) {
    if (x.rank() == 4 && x.dim(3) == channels && !x.empty() && win.fits(x.dim(1)) && win.fits(x.dim(2))) return;
    const Shape expected = x.rank() == 4 ? Shape{std::max<std::size_t>(x.dim(0), 1), std::max(x.dim(1), win.min_in()),
                                                 std::max(x.dim(2), win.min_in()), channels}
                                         : Shape{std::max<std::size_t>(x.rank() ? x.dim(0) : 1, 1), win.min_in(),
                                                 win.min_in(), channels};
    throw_shape_error(path, what, expected, x.shape());
}

}  // namespace detail

/// Device = Cpu is defined here, Device = Cuda in layers/conv2d_cuda.hpp
/// (included at the end of this header).
template <class T, class D = Cpu>
class BasicConv2d;

template <class T>
class BasicConv2d<T, Cpu> : public ModuleBase {
public:
    using Scalar = T;
    static constexpr const char* kind() { return "conv"; }
    /// A Conv2d may be depthwise (groups = in_channels), decided at run time;
    /// BasicDepthwiseConv2d states it in its type.
    static constexpr unsigned roles = role_bit(Role::weight) | role_bit(Role::depthwise) | role_bit(Role::bias);
    static constexpr bool fixed_width = true;  ///< out_features() = out_channels

    BasicConv2d(std::size_t in_channels, std::size_t out_channels, std::size_t kernel, Conv2dOptions options = {})
        : BasicConv2d(in_channels, out_channels, kernel, options, options.groups == in_channels && in_channels > 1) {}

protected:
    /// `depthwise_filters`: one filter per input channel (requires groups = in_channels).
    BasicConv2d(std::size_t in_channels, std::size_t out_channels, std::size_t kernel, Conv2dOptions options,
                bool depthwise_filters)
        : in_(in_channels), out_(out_channels), options_(validated(in_channels, out_channels, kernel, options)),
          window_{kernel, options.stride, options.padding}, depthwise_(depthwise_filters),
          weight("weight", depthwise_filters ? Role::depthwise : Role::weight,
                 Shape{out_channels, kernel, kernel, in_channels / options.groups}),
          bias("bias", Role::bias, Shape{options.bias ? out_channels : 0}) {
        if (!options_.bias) bias.set_trainable(false);
        reset_parameters(default_rng());
    }

private:
    std::size_t in_, out_;
    Conv2dOptions options_;
    detail::SlidingWindow window_;
    bool depthwise_;

public:
    Parameter<T> weight;  ///< [C_out, k, k, C_in / groups]
    Parameter<T> bias;    ///< [C_out], or empty when built without bias

    [[nodiscard]] std::size_t in_channels() const noexcept { return in_; }
    [[nodiscard]] std::size_t out_channels() const noexcept { return out_; }
    [[nodiscard]] std::size_t out_features() const noexcept { return out_; }
    [[nodiscard]] std::size_t kernel_size() const noexcept { return window_.kernel; }
    [[nodiscard]] std::size_t stride() const noexcept { return window_.stride; }
    [[nodiscard]] std::size_t padding() const noexcept { return window_.padding; }
    [[nodiscard]] std::size_t groups() const noexcept { return options_.groups; }
    [[nodiscard]] bool has_bias() const noexcept { return options_.bias; }
    /// Every filter sees one input channel (groups = in_channels > 1, or built
    /// as a DepthwiseConv2d). A single-channel dense convolution (a stem on
    /// grayscale images) is not depthwise: its filters keep Role::weight.
    [[nodiscard]] bool depthwise() const noexcept { return depthwise_; }
    /// Which implementation ran the last forward (and runs its backward):
    /// "onednn" for a float convolution in a build with the oneDNN backend
    /// (meson option `dnnl`; see ops/dnnl_conv.hpp for the cases it leaves to
    /// patchwork), "patchwork" for the own kernels.
    [[nodiscard]] const char* backend() const noexcept { return dnnl_used_ ? "onednn" : "patchwork"; }
    /// Let this layer run on oneDNN where the build has it (the default), or
    /// keep it on patchwork's kernels, whose results have the same bits on any
    /// number of threads (oneDNN's weight gradients are reproducible only on
    /// the same number of threads). Takes effect at the next forward.
    void set_onednn(bool allowed) noexcept { onednn_allowed_ = allowed; }

    void reset_parameters(Rng& rng) {
        // Kaiming-uniform with gain 1 over the filter's fan-in, as for Linear.
        init::kaiming_uniform(weight.value, rng, geo_taps() * (in_ / options_.groups), 1.0);
        if (options_.bias) bias.value.zero();
    }

    const Tensor<T>& forward(const Tensor<T>& x) {
        detail::check_nhwc(x, in_, window_, path_, "conv input (NHWC)");
        if (!depthwise()) {
            if (const MixedBatch<T>* any = active_mixed_batch<T>(); any != nullptr && any->per_task(weight))
                throw Error(detail::concat(detail::display_path(path_),
                                           ": the weight of a dense convolution cannot be per task in a one-pass "
                                           "mixed-task batch (only depthwise filters and biases can)"));
        }
        const MixedBatch<T>* mb = mixed_ = depthwise() ? mixed_batch_for<T>(weight, bias) : mixed_batch_for<T>(bias);
        x_ = x;
        geo_ = detail::SpatialGeometry(x.shape(), window_);
        y_.resize(Shape{geo_.batch, geo_.ho, geo_.wo, out_});
        dnnl_used_ = false;
        if (depthwise()) {
            // Per-task filters or biases of a mixed batch: only the native kernels apply them per segment.
            if (mb == nullptr && dnnl_forward(x, true)) return y_;
            depthwise_forward(x, mb);
            if (out_ == in_) return y_;  // the bias was the sums' starting value
        } else {
            dense_forward(x, mb == nullptr);
            if (mb == nullptr) return y_;  // the bias was the GEMMs' starting value
        }
        if (options_.bias)
            for_each_segment(mb, y_, path_, "conv output", [&](int task, std::size_t p0, std::size_t np) {
                y_.matrix().middleRows(Eigen::Index(p0), Eigen::Index(np)).rowwise() +=
                    mixed_use(mb, bias, task).value.vector().transpose();
            });
        return y_;
    }

    const Tensor<T>& backward(const Tensor<T>& dy) {
        check_same_shape(dy, y_.shape(), path_, "conv output gradient");
        const Tensor<T>& x = x_.get(input_shape(), path_, "conv input");
        // Bias and depthwise filter gradients per segment of a mixed batch (each task's pixels, with its own
        // filters), one segment otherwise; derivation at the top of this file.
        const MixedBatch<T>* mb = mixed_batch_for_backward(mixed_, path_);
        if (!depthwise()) return dense_backward(x, dy, mb);
        if (dnnl_used_)  // a forward on oneDNN had no mixed batch
            return dnnl_backward(x, dy, weight.wants_grad(), options_.bias && bias.wants_grad());
        if (options_.bias)
            for_each_segment(mb, dy, path_, "conv output gradient", [&](int task, std::size_t p0, std::size_t np) {
                Parameter<T>& b = mixed_use(mb, bias, task);
                if (b.wants_grad())
                    detail::add_column_sums(dy.data() + p0 * out_, np, out_, b.grad.data());
            });
        return depthwise_backward(x, dy, mb);
    }

    template <class F>
    void visit(F&& f) {
        f(weight);
        if (options_.bias) f(bias);
    }

    /// f(p) for each parameter this module can take per row in a mixed-task
    /// batch (see MixedBatch): the bias, and the filters of a depthwise convolution.
    template <class F>
    void visit_mixed(F&& f) {
        if (depthwise()) f(weight);
        if (options_.bias) f(bias);
    }

    void set_path(const std::string& p) {
        path_ = p;
        weight.set_prefix(p);
        bias.set_prefix(p);
    }

private:
    static Conv2dOptions validated(std::size_t in, std::size_t out, std::size_t kernel, const Conv2dOptions& o) {
        return detail::validated_conv_options(in, out, kernel, o);
    }

    [[nodiscard]] bool pointwise() const noexcept {
        return window_.kernel == 1 && window_.stride == 1 && window_.padding == 0;
    }
    /// K: columns of X_col per group, k k C_in / groups.
    [[nodiscard]] std::size_t group_cols() const noexcept { return geo_taps() * (in_ / options_.groups); }
    [[nodiscard]] std::size_t geo_taps() const noexcept { return window_.kernel * window_.kernel; }
    [[nodiscard]] Shape input_shape() const { return Shape{geo_.batch, geo_.h, geo_.w, in_}; }

    /// Columns of X_col (all groups): k k C_in.
    [[nodiscard]] std::size_t col_width() const noexcept { return options_.groups * group_cols(); }

    /// The tiled forward of a dense or grouped convolution; `with_bias`: start
    /// every output row at b (not in a mixed batch, whose bias is per segment).
    void dense_forward(const Tensor<T>& x, bool with_bias) {
        const std::size_t kg = group_cols(), cog = out_ / options_.groups, width = col_width();
        tiling_ = detail::ConvTiling(geo_, pointwise() ? std::max(in_, out_) : width);
        if (dnnl_forward(x, with_bias)) return;
        if (!pointwise()) scratch_.resize(Shape{detail::thread_slots(), tiling_.tile * width});
        const ConstMatrixMap<T> w(weight.value.data(), Eigen::Index(out_), Eigen::Index(kg));
        const bool add_bias = with_bias && options_.bias;
        for_rows(tiling_.chunks, tiling_.chunk_cost(width * out_), [&](std::size_t c) {
            T* cols = pointwise() ? nullptr : scratch_.data() + detail::thread_slot() * tiling_.tile * width;
            tiling_.for_each_tile(c, [&](std::size_t p0, std::size_t np) {
                auto yt = y_.matrix().middleRows(Eigen::Index(p0), Eigen::Index(np));
                if (add_bias) yt.rowwise() = bias.value.vector().transpose();
                else yt.setZero();
                auto run = [&](const auto& ct) {
                    for (std::size_t gi = 0; gi < options_.groups; ++gi)
                        yt.middleCols(Eigen::Index(gi * cog), Eigen::Index(cog)).noalias() +=
                            ct.middleCols(Eigen::Index(gi * kg), Eigen::Index(kg)) *
                            w.middleRows(Eigen::Index(gi * cog), Eigen::Index(cog)).transpose();
                };
                if (pointwise()) run(x.matrix().middleRows(Eigen::Index(p0), Eigen::Index(np)));
                else run(im2col_tile(x, p0, np, cols));
            });
        });
    }

    /// The tiled backward of a dense or grouped convolution (weight, bias and
    /// input gradients in one pass over the tiles; derivation at the top of the file).
    const Tensor<T>& dense_backward(const Tensor<T>& x, const Tensor<T>& dy, const MixedBatch<T>* mb) {
        const std::size_t kg = group_cols(), cog = out_ / options_.groups, width = col_width();
        // A mixed batch's bias gradient is per segment, summed outside the tiles.
        const bool bias_grad = options_.bias && bias.wants_grad() && mb == nullptr;
        if (options_.bias && mb != nullptr)
            for_each_segment(mb, dy, path_, "conv output gradient", [&](int task, std::size_t p0, std::size_t np) {
                Parameter<T>& b = mixed_use(mb, bias, task);
                if (b.wants_grad())
                    detail::add_column_sums(dy.data() + p0 * out_, np, out_, b.grad.data());
            });
        const bool weight_grad = weight.wants_grad();
        if (!weight_grad && !bias_grad && !input_grad_) return empty_;
        if (dnnl_used_) return dnnl_backward(x, dy, weight_grad, bias_grad);
        if (input_grad_) dx_.resize(x.shape());
        const std::size_t chunks = tiling_.chunks, wsize = out_ * kg;
        if (weight_grad) dw_chunks_.resize(Shape{chunks, wsize});
        if (bias_grad) db_chunks_.resize(Shape{chunks, out_});
        const bool need_cols = !pointwise() && weight_grad, need_dcols = !pointwise() && input_grad_;
        if (need_cols || need_dcols) scratch_.resize(Shape{detail::thread_slots(), 2 * tiling_.tile * width});
        const ConstMatrixMap<T> w(weight.value.data(), Eigen::Index(out_), Eigen::Index(kg));
        const std::size_t image_in = geo_.h * geo_.w * in_;

        for_rows(chunks, tiling_.chunk_cost(3 * width * out_), [&](std::size_t c) {
            T* cols = need_cols || need_dcols
                          ? scratch_.data() + detail::thread_slot() * 2 * tiling_.tile * width
                          : nullptr;
            T* dcols = cols == nullptr ? nullptr : cols + tiling_.tile * width;
            // Maps at offsets inside a buffer are not 16-byte aligned in general: unaligned maps.
            Eigen::Map<RowMatrix<T>> dw(weight_grad ? dw_chunks_.data() + c * wsize : nullptr, Eigen::Index(out_),
                            Eigen::Index(kg));
            if (weight_grad) dw.setZero();
            if (bias_grad) std::fill_n(db_chunks_.data() + c * out_, out_, T(0));
            if (input_grad_ && !pointwise())
                std::fill(dx_.data() + tiling_.first_image(c) * image_in,
                          dx_.data() + tiling_.end_image(c) * image_in, T(0));
            tiling_.for_each_tile(c, [&](std::size_t p0, std::size_t np) {
                const auto g = dy.matrix().middleRows(Eigen::Index(p0), Eigen::Index(np));
                if (bias_grad) {
                    T* db = db_chunks_.data() + c * out_;
                    for (std::size_t i = 0; i < np; ++i) detail::add_row(dy.data() + (p0 + i) * out_, db, out_);
                }
                if (weight_grad) {
                    auto run = [&](const auto& ct) {
                        for (std::size_t gi = 0; gi < options_.groups; ++gi)
                            dw.middleRows(Eigen::Index(gi * cog), Eigen::Index(cog)).noalias() +=
                                g.middleCols(Eigen::Index(gi * cog), Eigen::Index(cog)).transpose() *
                                ct.middleCols(Eigen::Index(gi * kg), Eigen::Index(kg));
                    };
                    if (pointwise()) run(x.matrix().middleRows(Eigen::Index(p0), Eigen::Index(np)));
                    else run(im2col_tile(x, p0, np, cols));
                }
                if (!input_grad_) return;
                using UnalignedMap = Eigen::Map<RowMatrix<T>>;
                auto dct = pointwise() ? UnalignedMap(dx_.data() + p0 * in_, Eigen::Index(np), Eigen::Index(in_))
                                       : UnalignedMap(dcols, Eigen::Index(np), Eigen::Index(width));
                for (std::size_t gi = 0; gi < options_.groups; ++gi)
                    dct.middleCols(Eigen::Index(gi * kg), Eigen::Index(kg)).noalias() =
                        g.middleCols(Eigen::Index(gi * cog), Eigen::Index(cog)) *
                        w.middleRows(Eigen::Index(gi * cog), Eigen::Index(cog));
                if (!pointwise()) col2im_tile(dcols, p0, np, dx_);
            });
        });
        // The chunks' partial sums, in chunk order (the same rounding on any number of threads).
        if (weight_grad) {
            T* __restrict dst = weight.grad.data();
            for (std::size_t c = 0; c < chunks; ++c) detail::add_row(dw_chunks_.data() + c * wsize, dst, wsize);
        }
        if (bias_grad)
            for (std::size_t c = 0; c < chunks; ++c) detail::add_row(db_chunks_.data() + c * out_, bias.grad.data(), out_);
        return input_grad_ ? dx_ : empty_;
    }

    /// The oneDNN backend (ops/dnnl_conv.hpp), for float convolutions in builds
    /// with PATCHWORK_USE_DNNL: y = conv(x, W) (+ b) by oneDNN, true if it ran.
    bool dnnl_forward([[maybe_unused]] const Tensor<T>& x, [[maybe_unused]] bool with_bias) {
        dnnl_used_ = false;
#if defined(PATCHWORK_USE_DNNL)
        if constexpr (std::is_same_v<T, float>) {
            if (!onednn_allowed_) return false;
            auto& conv = dnnl_.get(dnnl_shape());
            if (!conv.usable()) return false;
            conv.forward(x.data(), weight.value.data(),
                                 with_bias && options_.bias ? bias.value.data() : nullptr, y_.data());
            dnnl_used_ = true;
        }
#endif
        return dnnl_used_;
    }

    /// The backward of a forward that ran on oneDNN: the weight (and bias)
    /// gradient of the whole batch into a scratch block, added to the
    /// parameters' gradients; dx written by oneDNN.
    const Tensor<T>& dnnl_backward([[maybe_unused]] const Tensor<T>& x, [[maybe_unused]] const Tensor<T>& dy,
                                   [[maybe_unused]] bool weight_grad, [[maybe_unused]] bool bias_grad) {
#if defined(PATCHWORK_USE_DNNL)
        if constexpr (std::is_same_v<T, float>) {
            auto& conv = dnnl_.get(dnnl_shape());
            if (weight_grad) {
                dw_chunks_.resize(Shape{1, weight.value.size()});
                if (bias_grad) db_chunks_.resize(Shape{1, out_});
                conv.backward_weights(x.data(), dy.data(), dw_chunks_.data(), bias_grad ? db_chunks_.data() : nullptr);
                detail::add_row(dw_chunks_.data(), weight.grad.data(), weight.value.size());
                if (bias_grad) detail::add_row(db_chunks_.data(), bias.grad.data(), out_);
            } else if (bias_grad) {
                detail::add_column_sums(dy.data(), geo_.out_pixels(), out_, bias.grad.data());
            }
            if (input_grad_) {
                dx_.resize(x.shape());
                conv.backward_data(dy.data(), weight.value.data(), dx_.data());
            }
        }
#endif
        return input_grad_ ? dx_ : empty_;
    }

#if defined(PATCHWORK_USE_DNNL)
    [[nodiscard]] ops::dnnl_backend::ConvShape dnnl_shape() const noexcept {
        return {geo_.batch, geo_.h, geo_.w, in_, out_, window_.kernel, window_.stride, window_.padding,
                options_.groups, geo_.ho, geo_.wo};
    }
#endif

    /// f(i, q, t0, n) for every run of taps of the im2col row of output pixel p0 + i
    /// (i < np) that lies inside the image: taps t0 .. t0 + n - 1 of one kernel row read
    /// the n consecutive input pixels q .. q + n - 1. Taps outside read zero.
    template <class F>
    void for_each_tap_run(std::size_t p0, std::size_t np, F&& f) const {
        const std::size_t k = window_.kernel, s = window_.stride, pad = window_.padding;
        std::size_t ox = p0 % geo_.wo, oy = (p0 / geo_.wo) % geo_.ho, b = p0 / (geo_.wo * geo_.ho);
        for (std::size_t i = 0; i < np; ++i) {
            // Columns kx in [kx0, kx1) land inside the image: 0 <= ox s - pad + kx < w.
            const std::ptrdiff_t ix0 = std::ptrdiff_t(ox * s) - std::ptrdiff_t(pad);
            const std::size_t kx0 = ix0 < 0 ? std::size_t(-ix0) : 0;
            const std::size_t kx1 = std::size_t(std::clamp<std::ptrdiff_t>(std::ptrdiff_t(geo_.w) - ix0, 0, std::ptrdiff_t(k)));
            if (kx0 < kx1)
                for (std::size_t ky = 0; ky < k; ++ky) {
                    const std::ptrdiff_t iy = std::ptrdiff_t(oy * s + ky) - std::ptrdiff_t(pad);
                    if (iy < 0 || iy >= std::ptrdiff_t(geo_.h)) continue;
                    f(i, (b * geo_.h + std::size_t(iy)) * geo_.w + std::size_t(ix0 + std::ptrdiff_t(kx0)), ky * k + kx0,
                      kx1 - kx0);
                }
            if (++ox == geo_.wo) {
                ox = 0;
                if (++oy == geo_.ho) oy = 0, ++b;
            }
        }
    }

    /// Rows [p0, p0 + np) of X_col, built in `cols` ([np, G K], columns (group,
    /// tap, channel in group)); padding taps read zero. Without groups a run of
    /// taps in one kernel row is one contiguous copy.
    Eigen::Map<const RowMatrix<T>> im2col_tile(const Tensor<T>& x, std::size_t p0, std::size_t np, T* cols) const {
        const std::size_t groups = options_.groups, cg = in_ / groups, kg = group_cols(), width = col_width();
        if (window_.padding > 0) std::fill(cols, cols + np * width, T(0));
        for_each_tap_run(p0, np, [&](std::size_t i, std::size_t q, std::size_t t0, std::size_t n) {
            T* row = cols + i * width;
            const T* src = x.data() + q * in_;
            if (groups == 1) {
                detail::copy_row(src, row + t0 * cg, n * cg);
                return;
            }
            for (std::size_t t = t0; t < t0 + n; ++t, src += in_)
                for (std::size_t gi = 0; gi < groups; ++gi) detail::copy_row(src + gi * cg, row + gi * kg + t * cg, cg);
        });
        return Eigen::Map<const RowMatrix<T>>(cols, Eigen::Index(np), Eigen::Index(width));
    }

    /// dx += rows [p0, p0 + np) of dX_col (in `dcols`), each entry added into the
    /// input pixel im2col copied it from.
    void col2im_tile(const T* dcols, std::size_t p0, std::size_t np, Tensor<T>& dx) const {
        const std::size_t groups = options_.groups, cg = in_ / groups, kg = group_cols(), width = col_width();
        for_each_tap_run(p0, np, [&](std::size_t i, std::size_t q, std::size_t t0, std::size_t n) {
            const T* row = dcols + i * width;
            T* dst = dx.data() + q * in_;
            if (groups == 1) {
                detail::add_row(row + t0 * cg, dst, n * cg);
                return;
            }
            for (std::size_t t = t0; t < t0 + n; ++t, dst += in_)
                for (std::size_t gi = 0; gi < groups; ++gi) detail::add_row(row + gi * kg + t * cg, dst + gi * cg, cg);
        });
    }

    /// Rows [si k k, (si + 1) k k) of Wt [segments k k, C_out]: filters `w`
    /// transposed so that channel loops are contiguous. Returns them.
    const T* transpose_depthwise_weight(const Tensor<T>& w, std::size_t si) {
        const std::size_t taps = geo_taps();
        T* wt = wt_.data() + si * taps * out_;
        for (std::size_t co = 0; co < out_; ++co)
            for (std::size_t t = 0; t < taps; ++t) wt[t * out_ + co] = w[co * taps + t];
        return wt;
    }

    /// f(co, ci) for every output channel co and its input channel ci = co / m,
    /// without a division per element (m = 1 is a plain, vectorisable loop).
    template <class F>
    void for_channels(std::size_t m, F&& f) const {
        if (m == 1) {
            for (std::size_t c = 0; c < in_; ++c) f(c, c);
            return;
        }
        for (std::size_t ci = 0, co = 0; ci < in_; ++ci)
            for (std::size_t j = 0; j < m; ++j, ++co) f(co, ci);
    }

    /// One segment of pixels per task in a mixed batch (each with its task's
    /// filters, transposed into its own block of Wt), one segment otherwise.
    /// With one output channel per input channel (m = 1) each output pixel's
    /// sums over its taps are kept in registers per block of channels and start
    /// at the bias; a channel multiplier m > 1 takes the plain loops, and its
    /// bias is added afterwards.
    void depthwise_forward(const Tensor<T>& x, const MixedBatch<T>* mb) {
        const std::size_t m = out_ / in_, taps = geo_taps();
        wt_.resize(Shape{(mb == nullptr ? 1 : mb->segments().size()) * taps, out_});
        std::size_t si = 0;
        for_each_segment(mb, y_, path_, "conv output", [&](int task, std::size_t p0, std::size_t np) {
            const T* wt = transpose_depthwise_weight(mixed_use(mb, weight, task).value, si++);
            if (m == 1) {
                const T* b = options_.bias ? mixed_use(mb, bias, task).value.data() : nullptr;
                if (row_kernel()) {  // whole output rows (a segment is whole images)
                    const std::size_t in_image = geo_.h * geo_.w * in_;
                    for_rows(np / geo_.wo, geo_.wo * taps * out_, [&](std::size_t i) {
                        const std::size_t row = p0 / geo_.wo + i, n = row / geo_.ho;
                        detail::depthwise_row_for(window_.kernel, x.data() + n * in_image, geo_.h, geo_.w, out_,
                                                  geo_.wo, window_.stride, window_.padding, row % geo_.ho, wt, b,
                                                  y_.data() + row * geo_.wo * out_);
                    });
                    return;
                }
                for_rows(np, taps * out_, [&](std::size_t i) { depthwise_pixel_forward(x.data(), wt, b, p0 + i); });
                return;
            }
            for_rows(np, taps * out_, [&](std::size_t i) {
                const std::size_t p = p0 + i;
                T* __restrict y = y_.data() + p * out_;
                std::fill(y, y + out_, T(0));
                geo_.for_each_tap(p, [&](std::size_t t, std::size_t q) {
                    const T* __restrict xr = x.data() + q * in_;
                    const T* __restrict w = wt + t * out_;
                    for_channels(m, [&](std::size_t co, std::size_t ci) { y[co] += xr[ci] * w[co]; });
                });
            });
        });
    }

    /// detail::depthwise_row applies: one output channel per input channel, a
    /// kernel size it is compiled for, and whole vectors of channels.
    [[nodiscard]] bool row_kernel() const noexcept {
        return out_ == in_ && (window_.kernel == 3 || window_.kernel == 5) &&
               out_ % detail::ChannelSums<T>::lanes == 0;
    }

    /// y[p] = b + sum_t x[q(p, t)] Wt[t] for output pixel p (m = 1).
    void depthwise_pixel_forward(const T* x, const T* wt, const T* b, std::size_t p) {
        const std::size_t ox = p % geo_.wo, oy = (p / geo_.wo) % geo_.ho, n = p / (geo_.wo * geo_.ho);
        const auto r = geo_.taps_inside(oy, ox);
        if (r.ky0 >= r.ky1 || r.kx0 >= r.kx1) {
            T* y = y_.data() + p * out_;
            for (std::size_t c = 0; c < out_; ++c) y[c] = b != nullptr ? b[c] : T(0);
            return;
        }
        const auto c_all = std::ptrdiff_t(out_), k = std::ptrdiff_t(window_.kernel);
        const T* first = x + ((n * geo_.h + std::size_t(r.iy + std::ptrdiff_t(r.ky0))) * geo_.w +
                              std::size_t(r.ix + std::ptrdiff_t(r.kx0))) * out_;
        detail::ChannelSums<T>::run(out_, y_.data() + p * out_, b, first, std::ptrdiff_t(geo_.w) * c_all, c_all,
                                    wt + (r.ky0 * window_.kernel + r.kx0) * out_, k * c_all, c_all, r.ky1 - r.ky0,
                                    r.kx1 - r.kx0);
    }

    /// dx[q] = sum over the taps t and output pixels p with q(p, t) = q of
    /// dY[p] Wt[t], for input pixel q of a stride-1 depthwise convolution with
    /// m = 1: the same window sum as forward, gathered (each dx row written once,
    /// its sums in registers) rather than scattered. Output pixel
    /// (iy + pad - ky, ix + pad - kx) reads input pixel (iy, ix) through tap (ky, kx).
    void depthwise_pixel_input_grad(const T* dy, const T* wt, std::size_t q) {
        const std::size_t ix = q % geo_.w, iy = (q / geo_.w) % geo_.h, n = q / (geo_.w * geo_.h);
        const auto k = std::ptrdiff_t(window_.kernel), pad = std::ptrdiff_t(window_.padding);
        const std::ptrdiff_t oy0 = std::ptrdiff_t(iy) + pad, ox0 = std::ptrdiff_t(ix) + pad;  // output pixel of tap 0
        const auto ky0 = std::max<std::ptrdiff_t>(0, oy0 - std::ptrdiff_t(geo_.ho) + 1);
        const auto ky1 = std::min<std::ptrdiff_t>(k, oy0 + 1);
        const auto kx0 = std::max<std::ptrdiff_t>(0, ox0 - std::ptrdiff_t(geo_.wo) + 1);
        const auto kx1 = std::min<std::ptrdiff_t>(k, ox0 + 1);
        T* dx = dx_.data() + q * out_;
        if (ky0 >= ky1 || kx0 >= kx1) {
            std::fill(dx, dx + out_, T(0));
            return;
        }
        const auto c_all = std::ptrdiff_t(out_);
        const T* first = dy + ((n * geo_.ho + std::size_t(oy0 - ky0)) * geo_.wo + std::size_t(ox0 - kx0)) * out_;
        detail::ChannelSums<T>::run(out_, dx, nullptr, first, -std::ptrdiff_t(geo_.wo) * c_all, -c_all,
                                    wt + std::size_t(ky0 * k + kx0) * out_, k * c_all, c_all, std::size_t(ky1 - ky0),
                                    std::size_t(kx1 - kx0));
    }

    /// block[t] = sum over output pixels p in [begin, end) of dY[p] x[q(p, t)],
    /// for every tap t (m = 1). Per tap, the pixels go row piece by row piece
    /// (the output pixels of one image row inside [begin, end)); in each piece
    /// the pixels whose tap lands inside the image are a range read with fixed
    /// strides, summed (in pixel order) with the channel sums in registers.
    void depthwise_weight_grad_chunk(const T* x, const T* dy, std::size_t begin, std::size_t end, T* block) const {
        const std::size_t k = window_.kernel, s = window_.stride, pad = window_.padding, c_all = out_;
        if (row_kernel()) {  // row piece by row piece, all taps' sums in registers
            std::fill(block, block + k * k * c_all, T(0));
            const std::size_t in_image = geo_.h * geo_.w * c_all;
            for (std::size_t p = begin; p < end;) {
                const std::size_t ox = p % geo_.wo, row = p / geo_.wo, oy = row % geo_.ho, n = row / geo_.ho;
                const std::size_t piece_end = std::min(end, (row + 1) * geo_.wo);
                detail::depthwise_row_weight_grad_for(k, x + n * in_image, geo_.h, geo_.w, c_all, s, pad, oy, ox,
                                                      ox + (piece_end - p), dy + row * geo_.wo * c_all, block);
                p = piece_end;
            }
            return;
        }
        for (std::size_t ky = 0; ky < k; ++ky)
            for (std::size_t kx = 0; kx < k; ++kx) {
                T* dst = block + (ky * k + kx) * c_all;
                std::fill(dst, dst + c_all, T(0));
                // ox with 0 <= ox s + kx - pad < w
                const std::size_t ox_lo = kx >= pad ? 0 : (pad - kx + s - 1) / s;
                const std::size_t ox_hi = geo_.w + pad > kx ? std::min(geo_.wo, (geo_.w + pad - kx - 1) / s + 1) : 0;
                for (std::size_t p = begin; p < end;) {
                    const std::size_t ox = p % geo_.wo, row = p / geo_.wo, oy = row % geo_.ho, n = row / geo_.ho;
                    const std::size_t piece_end = std::min(end, (row + 1) * geo_.wo);  // pixels [p, piece_end)
                    const std::ptrdiff_t iy = std::ptrdiff_t(oy * s + ky) - std::ptrdiff_t(pad);
                    const std::size_t a = std::max(ox, ox_lo), e = std::min(ox + (piece_end - p), ox_hi);
                    if (iy >= 0 && iy < std::ptrdiff_t(geo_.h) && a < e) {
                        const std::size_t p_a = p + (a - ox), ix = a * s + kx - pad;
                        const T* g = dy + p_a * c_all;
                        const T* xr = x + ((n * geo_.h + std::size_t(iy)) * geo_.w + ix) * c_all;
                        // The piece's products as a sum over "rows" of one pixel each, added to dst.
                        detail::ChannelSums<T>::run(c_all, dst, dst, g, std::ptrdiff_t(c_all), 0, xr,
                                                    std::ptrdiff_t(s * c_all), 0, e - a, 1);
                    }
                    p = piece_end;
                }
            }
    }

    const Tensor<T>& depthwise_backward(const Tensor<T>& x, const Tensor<T>& dy, const MixedBatch<T>* mb) {
        const std::size_t m = out_ / in_, taps = geo_taps(), per_image = geo_.ho * geo_.wo;
        // m = 1 with stride 1 gathers each dx row (written once); otherwise dx is zeroed and scattered into.
        const bool gather = m == 1 && window_.stride == 1;
        if (input_grad_) {
            dx_.resize(x.shape());
            if (!gather) dx_.zero();
        }
        std::size_t si = 0;
        for_each_segment(mb, dy, path_, "conv output gradient", [&](int task, std::size_t p0, std::size_t np) {
            const T* wt = wt_.data() + (si++) * taps * out_;
            Parameter<T>& w = mixed_use(mb, weight, task);
            if (w.wants_grad()) {
                // dW[co, t] = sum over the segment's pixels p of g[p, co] x[q(p, t), ci(co)]. The pixels are
                // summed in fixed chunks of depthwise_grad_chunk, each chunk into its own block of dwt_ (in the
                // transposed layout [taps, C_out]; chunks may run on different threads), and the blocks are
                // then added in chunk order: the result does not depend on the number of threads.
                const std::size_t chunks = (np + depthwise_grad_chunk - 1) / depthwise_grad_chunk;
                dwt_.resize(Shape{chunks * taps, out_});
                if (m != 1) dwt_.zero();
                for_rows(chunks, depthwise_grad_chunk * taps * out_, [&](std::size_t c) {
                    T* __restrict block = dwt_.data() + c * taps * out_;
                    const std::size_t begin = p0 + c * depthwise_grad_chunk;
                    const std::size_t end = std::min(p0 + np, begin + depthwise_grad_chunk);
                    if (m == 1) {
                        depthwise_weight_grad_chunk(x.data(), dy.data(), begin, end, block);
                        return;
                    }
                    for (std::size_t p = begin; p < end; ++p) {
                        const T* __restrict g = dy.data() + p * out_;
                        geo_.for_each_tap(p, [&](std::size_t t, std::size_t q) {
                            const T* __restrict xr = x.data() + q * in_;
                            T* __restrict dw = block + t * out_;
                            for_channels(m, [&](std::size_t co, std::size_t ci) { dw[co] += g[co] * xr[ci]; });
                        });
                    }
                });
                for (std::size_t c = 1; c < chunks; ++c) {
                    const T* __restrict block = dwt_.data() + c * taps * out_;
                    for (std::size_t i = 0; i < taps * out_; ++i) dwt_[i] += block[i];
                }
                for (std::size_t co = 0; co < out_; ++co)
                    for (std::size_t t = 0; t < taps; ++t) w.grad[co * taps + t] += dwt_[t * out_ + co];
            }
            if (!input_grad_) return;
            if (gather) {
                // The segment's images are its input pixels too (one image in, one image out).
                const std::size_t in_image = geo_.h * geo_.w, q0 = p0 / per_image * in_image;
                if (row_kernel() && window_.padding < window_.kernel) {
                    // dx = the window sum of dY with the filters flipped and padding k - 1 - p (stride 1).
                    const std::size_t k = window_.kernel;
                    wt_flip_.resize(Shape{taps, out_});
                    for (std::size_t t = 0; t < taps; ++t)
                        std::copy_n(wt + t * out_, out_, wt_flip_.data() + (taps - 1 - t) * out_);
                    for_rows(np / per_image * geo_.h, geo_.w * taps * out_, [&](std::size_t i) {
                        const std::size_t row = q0 / geo_.w + i, n = row / geo_.h;
                        detail::depthwise_row_for(k, dy.data() + n * per_image * out_, geo_.ho, geo_.wo, out_, geo_.w,
                                                  1, k - 1 - window_.padding, row % geo_.h, wt_flip_.data(),
                                                  static_cast<const T*>(nullptr), dx_.data() + row * geo_.w * out_);
                    });
                    return;
                }
                for_rows(np / per_image * in_image, taps * out_,
                         [&](std::size_t i) { depthwise_pixel_input_grad(dy.data(), wt, q0 + i); });
                return;
            }
            // One image per task of the loop: windows overlap only within an image.
            const std::size_t b0 = p0 / per_image;
            for_rows(np / per_image, per_image * taps * out_, [&](std::size_t i) {
                const std::size_t b = b0 + i;
                for (std::size_t p = b * per_image; p < (b + 1) * per_image; ++p) {
                    const T* __restrict g = dy.data() + p * out_;
                    geo_.for_each_tap(p, [&](std::size_t t, std::size_t q) {
                        T* __restrict dx = dx_.data() + q * in_;
                        const T* __restrict w = wt + t * out_;
                        for_channels(m, [&](std::size_t co, std::size_t ci) { dx[ci] += g[co] * w[co]; });
                    });
                }
            });
        });
        return input_grad_ ? dx_ : empty_;
    }

    /// Output pixels per partial sum of the depthwise weight gradient (a fixed
    /// size, so the rounding does not depend on the number of threads).
    static constexpr std::size_t depthwise_grad_chunk = 2048;

    Saved<T> x_;  ///< the last forward's input (not owned)
    const MixedBatch<T>* mixed_ = nullptr;  ///< the mixed batch of the last forward, if it was one
    detail::SpatialGeometry geo_;
    detail::ConvTiling tiling_;  ///< the last dense forward's chunks and tiles
    Tensor<T> y_, dx_, wt_, dwt_, wt_flip_, empty_;
    Tensor<T> scratch_;             ///< per-thread X_col and dX_col tiles [threads, ...]
    Tensor<T> dw_chunks_, db_chunks_;  ///< per-chunk partial weight and bias gradients
    bool dnnl_used_ = false;           ///< the last forward ran on oneDNN
    bool onednn_allowed_ = true;       ///< set_onednn
#if defined(PATCHWORK_USE_DNNL)
    ops::dnnl_backend::ConvCache dnnl_;  ///< oneDNN primitives per input shape
#endif
};

/// A depthwise convolution: groups = channels, one k x k filter per channel
/// (times `multiplier` output channels per input channel). Its filters carry
/// Role::depthwise, which DepthwisePatch trains.
template <class T, class D = Cpu>
class BasicDepthwiseConv2d : public BasicConv2d<T, D> {
public:
    static constexpr const char* kind() { return "depthwiseconv"; }
    static constexpr unsigned roles = role_bit(Role::depthwise) | role_bit(Role::bias);

    /// `options.groups` is ignored: it is always `channels`.
    BasicDepthwiseConv2d(std::size_t channels, std::size_t kernel, Conv2dOptions options = {},
                         std::size_t multiplier = 1)
        : BasicConv2d<T, D>(channels, channels * multiplier, kernel, with_groups(options, channels), true) {}

private:
    static Conv2dOptions with_groups(Conv2dOptions o, std::size_t channels) {
        o.groups = channels;
        return o;
    }
};

using Conv2d = BasicConv2d<float>;
using DepthwiseConv2d = BasicDepthwiseConv2d<float>;

}  // namespace patchwork

#include "patchwork/layers/conv2d_cuda.hpp"
