#pragma once
// Batch<T> and the BatchSource concept: the one interface between data
// loading (patchwork/io) and training (patchwork/train).
//
// A source is a sequence of mini-batches that may be reshuffled per epoch:
//
//     src.start_epoch(e);                       // e = 0, 1, 2, ...
//     for (std::size_t i = 0; i < src.batches(); ++i) {
//         const Batch<T>& b = src.batch(i);     // x: [N, features], labels: N ints
//         ...
//     }
//
// `batch(i)` may return by value or by const reference; a reference need only
// stay valid until the next call on the source. This interface is kept minimal
// and stable on purpose: anything with these three members and a `Scalar`
// type is a source (the IDX/Fashion-MNIST batcher, an in-memory vector, a
// synthetic generator in a test).
#include <concepts>
#include <cstddef>
#include <type_traits>
#include <utility>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/tensor.hpp"

namespace patchwork {

/// One mini-batch: inputs with one row per sample, and one class label per row
/// (labels may be empty for sources that feed a non-classification loss).
template <class T>
struct Batch {
    Tensor<T> x{};
    std::vector<int> labels{};
};

/// A per-epoch sequence of mini-batches of any type (what loops that hand the
/// batch to a caller's step function need, e.g. search::run with token batches).
template <class S>
concept EpochSource = requires(S& s, std::size_t i) {
    s.start_epoch(i);
    { s.batches() } -> std::convertible_to<std::size_t>;
    s.batch(i);
};

/// A per-epoch sequence of mini-batches of Batch<Scalar>.
template <class S>
concept BatchSource = EpochSource<S> && requires(S& s, std::size_t i) {
    typename S::Scalar;
    { s.batch(i) } -> std::convertible_to<const Batch<typename S::Scalar>&>;
};

/// The simplest source: a fixed list of batches, the same order every epoch.
template <class T>
class VectorSource {
public:
    using Scalar = T;

    VectorSource() = default;
    explicit VectorSource(std::vector<Batch<T>> batches) : batches_(std::move(batches)) {}

    void start_epoch(std::size_t /*epoch*/) noexcept {}
    [[nodiscard]] std::size_t batches() const noexcept { return batches_.size(); }
    [[nodiscard]] const Batch<T>& batch(std::size_t i) const {
        if (i >= batches_.size())
            throw ConfigError(detail::concat("VectorSource::batch: index ", i, " out of range (", batches_.size(),
                                             " batches)"));
        return batches_[i];
    }
    void push_back(Batch<T> b) { batches_.push_back(std::move(b)); }

private:
    std::vector<Batch<T>> batches_;
};

static_assert(BatchSource<VectorSource<float>>);
static_assert(BatchSource<VectorSource<double>>);

}  // namespace patchwork
