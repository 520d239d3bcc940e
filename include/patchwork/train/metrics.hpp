#pragma once
// Classification metrics over logits [N, C] (leading dimensions flattened into rows):
//   argmax_rows(z)_n = argmax_c z_nc      (the first index on ties)
//   accuracy(z, y)   = (1/N) sum_n [argmax_rows(z)_n == y_n]
#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/tensor.hpp"

namespace patchwork {

/// Index of the largest entry of each row (the predicted class).
template <class T>
[[nodiscard]] std::vector<int> argmax_rows(const Tensor<T>& logits) {
    if (logits.rank() < 1 || logits.empty())
        throw ShapeError(detail::concat("argmax_rows: logits must be a non-empty [N, C] tensor, got ",
                                        logits.shape()));
    const std::size_t n = logits.rows(), c = logits.cols();
    std::vector<int> out(n);
    for (std::size_t r = 0; r < n; ++r) {
        const T* z = logits.data() + r * c;
        std::size_t best = 0;
        for (std::size_t j = 1; j < c; ++j)
            if (z[j] > z[best]) best = j;
        out[r] = int(best);
    }
    return out;
}

/// Number of rows whose argmax equals the label. Throws ShapeError on a count mismatch.
template <class T>
[[nodiscard]] std::size_t count_correct(const Tensor<T>& logits, std::span<const int> labels) {
    const std::vector<int> pred = argmax_rows(logits);
    if (labels.size() != pred.size())
        throw ShapeError(detail::concat("accuracy: ", labels.size(), " labels for ", pred.size(),
                                        " rows of logits ", logits.shape()));
    std::size_t correct = 0;
    for (std::size_t r = 0; r < pred.size(); ++r) correct += pred[r] == labels[r] ? 1 : 0;
    return correct;
}

/// Number of rows whose argmax over their first `classes` logits equals the
/// label (a task's rows under a head padded to a wider task's width).
template <class T>
[[nodiscard]] std::size_t count_correct(const Tensor<T>& logits, std::span<const int> labels, std::size_t classes) {
    if (logits.rank() < 1 || logits.empty() || classes == 0 || classes > logits.cols())
        throw ShapeError(detail::concat("accuracy: the first ", classes, " classes of logits ", logits.shape()));
    if (labels.size() != logits.rows())
        throw ShapeError(detail::concat("accuracy: ", labels.size(), " labels for ", logits.rows(),
                                        " rows of logits ", logits.shape()));
    std::size_t correct = 0;
    for (std::size_t r = 0; r < logits.rows(); ++r) {
        const T* z = logits.data() + r * logits.cols();
        std::size_t best = 0;
        for (std::size_t j = 1; j < classes; ++j)
            if (z[j] > z[best]) best = j;
        correct += int(best) == labels[r] ? 1 : 0;
    }
    return correct;
}

/// Fraction of rows (in [0, 1]) whose argmax equals the label.
template <class T>
[[nodiscard]] double accuracy(const Tensor<T>& logits, std::span<const int> labels) {
    return double(count_correct(logits, labels)) / double(logits.rows());
}

/// Mean and sample standard deviation (divisor n - 1; 0 for fewer than two
/// values) of repeated measurements, e.g. accuracies over seeds.
struct MeanSd {
    double mean = 0, sd = 0;
};

[[nodiscard]] inline MeanSd mean_sd(std::span<const double> v) {
    MeanSd s;
    for (double x : v) s.mean += x;
    s.mean /= double(v.size());
    if (v.size() > 1) {
        for (double x : v) s.sd += (x - s.mean) * (x - s.mean);
        s.sd = std::sqrt(s.sd / double(v.size() - 1));
    }
    return s;
}

}  // namespace patchwork
