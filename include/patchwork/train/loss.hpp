#pragma once
// Losses: each returns the scalar value and dL/d(output), ready for backward.
//
// Softmax cross-entropy over the rows of logits z [N, C] with labels y_n:
//   m_n   = max_c z_nc                                  (for stability)
//   lse_n = m_n + log sum_c exp(z_nc - m_n)             (= log sum_c exp z_nc)
//   L     = (1/N) sum_n (lse_n - z_n,y_n)
// With p_nc = softmax(z_n)_c = exp(z_nc - lse_n):
//   d lse_n / d z_nc = exp(z_nc - lse_n) = p_nc,   d z_n,y_n / d z_nc = [c == y_n]
//   dL/dz_nc = (p_nc - [c == y_n]) / N
// Subtracting m_n keeps every exponent <= 0, so nothing overflows, and at
// least one term of the sum is exp(0) = 1, so the logarithm never sees 0.
// Leading dimensions are flattened into rows: logits [B, T, C] take B*T labels.
//
// Mean squared error over every element of y and t (same shape, M elements):
//   L = (1/M) sum_i (y_i - t_i)^2,     dL/dy_i = 2 (y_i - t_i) / M
//
// Values are accumulated in double, also for float tensors.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>

#include "patchwork/core/error.hpp"
#include "patchwork/core/tensor.hpp"

namespace patchwork {

/// A loss value and its gradient with respect to the tensor the loss was computed from.
template <class T, class D = Cpu>
struct Loss {
    compute_t<T> value{};  ///< float for bf16 logits
    Tensor<T, D> grad{};  ///< dL/d(input), same shape as the input, on the input's device
};

/// Softmax cross-entropy of device logits: the same loss as below, computed
/// by a kernel (one block per row). Labels are checked on the host, then
/// copied to the device; the value comes back to the host (one synchronisation).
/// Defined in kernels/ops.cuh.
template <class T>
[[nodiscard]] Loss<T, Cuda> cross_entropy(const Tensor<T, Cuda>& logits, std::span<const int> labels);

/// Cross-entropy of device logits whose rows have different class counts (the
/// mixed-task form below, same checks): row r's softmax runs over its first
/// classes[r] logits, the rest of the row gets gradient 0. Defined in kernels/ops.cuh.
template <class T>
[[nodiscard]] Loss<T, Cuda> cross_entropy(const Tensor<T, Cuda>& logits, std::span<const int> labels,
                                          std::span<const std::size_t> classes);

namespace detail {
/// The checks every cross-entropy runs before computing (host side, any device).
template <class T, class D>
void check_cross_entropy(const Tensor<T, D>& logits, std::span<const int> labels) {
    if (logits.rank() < 1 || logits.empty())
        throw ShapeError(concat("cross_entropy: logits must be a non-empty [N, C] tensor, got ", logits.shape()));
    const std::size_t n = logits.rows();
    const std::size_t c = logits.cols();
    if (labels.size() != n)
        throw ShapeError(concat("cross_entropy: ", labels.size(), " labels for ", n, " rows of logits ",
                                logits.shape()));
    for (std::size_t r = 0; r < n; ++r)
        if (labels[r] < 0 || std::size_t(labels[r]) >= c)
            throw ConfigError(concat("cross_entropy: label ", labels[r], " at row ", r, " is outside [0, ", c,
                                     ") for logits ", logits.shape()));
}

/// The checks of the per-row class-count form: one count per row, each in
/// [1, width], each label below its row's count.
template <class T, class D>
void check_cross_entropy(const Tensor<T, D>& logits, std::span<const int> labels,
                         std::span<const std::size_t> classes) {
    check_cross_entropy(logits, labels);
    const std::size_t n = logits.rows(), c = logits.cols();
    if (classes.size() != n)
        throw ShapeError(concat("cross_entropy: ", classes.size(), " class counts for ", n, " rows of logits ",
                                logits.shape()));
    for (std::size_t r = 0; r < n; ++r) {
        if (classes[r] == 0 || classes[r] > c)
            throw ConfigError(concat("cross_entropy: row ", r, " has ", classes[r], " classes, outside [1, ", c,
                                     "] for logits ", logits.shape()));
        if (std::size_t(labels[r]) >= classes[r])
            throw ConfigError(concat("cross_entropy: label ", labels[r], " at row ", r, " is outside [0, ",
                                     classes[r], ") (the row's class count)"));
    }
}

/// Mean softmax cross-entropy where row r's softmax runs over its first
/// width(r) logits (the rest of the row gets no gradient). Labels are checked.
///   L = (1/N) sum_r ( log sum_{c < C_r} exp z_rc  -  z_r,y_r )
///   dL/dz_rc = (p_rc - [c == y_r]) / N  for c < C_r,   0 for c >= C_r
/// (p_r: the softmax over row r's first C_r logits; the derivative of
/// log-sum-exp is that softmax, that of -z_r,y_r the one-hot).
template <class T, class Width>
Loss<T> cross_entropy_rows(const Tensor<T>& logits, std::span<const int> labels, Width width) {
    const std::size_t n = logits.rows();
    const std::size_t stride = logits.cols();
    Loss<T> out{T(0), Tensor<T>(logits.shape())};
    const T inv_n = T(1) / T(n);
    double total = 0;
    for (std::size_t r = 0; r < n; ++r) {
        const std::size_t c = width(r);
        const T* z = logits.data() + r * stride;
        T* g = out.grad.data() + r * stride;
        const T m = *std::max_element(z, z + c);
        double sum = 0;
        for (std::size_t j = 0; j < c; ++j) {
            g[j] = std::exp(z[j] - m);  // exp(z - m) in (0, 1]
            sum += double(g[j]);
        }
        const double lse = double(m) + std::log(sum);
        total += lse - double(z[labels[r]]);
        const T inv_sum = T(1.0 / sum);
        for (std::size_t j = 0; j < c; ++j) g[j] *= inv_sum * inv_n;  // p / N
        g[labels[r]] -= inv_n;                                        // - onehot / N
        std::fill(g + c, g + stride, T(0));
    }
    out.value = T(total / double(n));
    return out;
}
}  // namespace detail

/// Mean softmax cross-entropy of `logits` (rows = samples, last dimension = classes)
/// against one integer class label per row (derivation at detail::cross_entropy_rows).
/// Throws ShapeError when the label count differs from the row count, and
/// ConfigError when a label lies outside [0, classes).
template <class T>
[[nodiscard]] Loss<T> cross_entropy(const Tensor<T>& logits, std::span<const int> labels) {
    detail::check_cross_entropy(logits, labels);
    const std::size_t c = logits.cols();
    return detail::cross_entropy_rows(logits, labels, [c](std::size_t) { return c; });
}

/// Cross-entropy of a batch whose rows have different class counts: row r has
/// `classes[r]` classes, its softmax runs over its first classes[r] logits, and
/// the logits after those get no gradient. For mixed-task batches whose heads
/// are padded to the widest task (MultiTask needs one output width per batch):
/// each task reads its own first C_k logits, so the padding never trains or
/// matters. Throws ShapeError for a count mismatch and ConfigError for a class
/// count outside [1, width] or a label outside [0, classes[r]), naming the row.
template <class T>
[[nodiscard]] Loss<T> cross_entropy(const Tensor<T>& logits, std::span<const int> labels,
                                    std::span<const std::size_t> classes) {
    detail::check_cross_entropy(logits, labels, classes);
    return detail::cross_entropy_rows(logits, labels, [classes](std::size_t r) { return classes[r]; });
}

/// Mean squared error over all elements; `y` and `target` must have the same shape.
template <class T>
[[nodiscard]] Loss<T> mse(const Tensor<T>& y, const Tensor<T>& target) {
    if (!(y.shape() == target.shape()))
        throw ShapeError(detail::concat("mse: prediction ", y.shape(), " and target ", target.shape(),
                                        " must have the same shape"));
    if (y.empty()) throw ShapeError(detail::concat("mse: empty prediction ", y.shape()));
    Loss<T> out{T(0), Tensor<T>(y.shape())};
    const double m = double(y.size());
    const T scale = T(2.0 / m);
    double total = 0;
    for (std::size_t i = 0; i < y.size(); ++i) {
        const T d = y[i] - target[i];
        total += double(d) * double(d);
        out.grad[i] = scale * d;
    }
    out.value = T(total / m);
    return out;
}

}  // namespace patchwork
