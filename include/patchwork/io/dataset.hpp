#pragma once
// Labelled image datasets and mini-batching.
//
// Dataset<T> holds the images as one [N, features] tensor (each image
// flattened row-major, pixels scaled from 0..255 to [0, 1]) and one int label
// per image. load_fashion_mnist reads Debian's dataset-fashion-mnist
// (/usr/share/datasets/fashion-mnist); load_idx_pair reads any pair of IDX
// image/label files. filter_classes, first_per_class, split, subset and gather derive new
// datasets (copies; the source is left untouched).
//
// Batcher<T> walks a Dataset in mini-batches and satisfies BatchSource
// (patchwork/train/batch.hpp). Each epoch's order is a Fisher-Yates shuffle
// drawn from a generator seeded with (seed, epoch) alone, so epoch e has the
// same order on every run and on every standard library, whatever epochs came
// before it. The batch is assembled in a buffer the Batcher owns and returned
// by const reference: after the first epoch no step allocates.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/random.hpp"
#include "patchwork/core/tensor.hpp"
#include "patchwork/io/idx.hpp"
#include "patchwork/train/batch.hpp"

namespace patchwork {

/// Images [N, features] in [0, 1] and their class labels.
template <class T = float>
struct Dataset {
    Tensor<T> images;
    std::vector<int> labels;

    /// Number of samples.
    [[nodiscard]] std::size_t size() const noexcept { return labels.size(); }
    [[nodiscard]] bool empty() const noexcept { return labels.empty(); }
    /// Values per sample (784 for 28x28 images).
    [[nodiscard]] std::size_t features() const noexcept { return images.cols(); }
    /// One more than the largest label (0 for an empty dataset).
    [[nodiscard]] int num_classes() const noexcept {
        int m = -1;
        for (int l : labels) m = std::max(m, l);
        return m + 1;
    }
};

/// Which half of a dataset distributed as train/test files to load.
enum class Split { train, test };

/// Where Debian's dataset-fashion-mnist package installs the files.
inline constexpr const char* fashion_mnist_default_dir = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST's ten classes, indexed by label.
inline constexpr std::array<std::string_view, 10> fashion_mnist_class_names = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"};

/// Read an IDX image file ([N, ...] unsigned bytes) and an IDX label file ([N]
/// unsigned bytes). Images are flattened to [N, features] and scaled to [0, 1].
/// `limit` > 0 keeps only the first `limit` samples. Throws IoError for a
/// malformed file or when the two files disagree on the sample count.
template <class T = float>
[[nodiscard]] Dataset<T> load_idx_pair(const std::filesystem::path& images_path,
                                       const std::filesystem::path& labels_path, std::size_t limit = 0) {
    const IdxArray images = read_idx(images_path);
    const IdxArray labels = read_idx(labels_path);
    if (images.dims.size() < 2)
        throw IoError(detail::concat("load_idx_pair: ", images_path.string(), ": expected images with at least 2 dims",
                                     " [N, ...], got dims ", detail::dims_str(images.dims)));
    if (labels.dims.size() != 1)
        throw IoError(detail::concat("load_idx_pair: ", labels_path.string(), ": expected labels with 1 dim [N], got dims ",
                                     detail::dims_str(labels.dims)));
    if (images.count() != labels.count())
        throw IoError(detail::concat("load_idx_pair: count mismatch: ", images_path.string(), " holds ", images.count(),
                                     " images but ", labels_path.string(), " holds ", labels.count(), " labels"));

    const std::size_t n = limit ? std::min(limit, images.count()) : images.count();
    const std::size_t features = images.item_size();
    std::array<T, 256> scale{};
    for (std::size_t v = 0; v < scale.size(); ++v) scale[v] = T(v) / T(255);

    Dataset<T> ds;
    ds.images = Tensor<T>(Shape{n, features});
    T* dst = ds.images.data();
    for (std::size_t i = 0; i < n * features; ++i) dst[i] = scale[images.data[i]];
    ds.labels.assign(labels.data.begin(), labels.data.begin() + std::ptrdiff_t(n));
    return ds;
}

/// Load Fashion-MNIST's train (60000) or test (10000) split from `dir`, which
/// holds {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz. `limit` > 0 keeps the
/// first `limit` samples.
template <class T = float>
[[nodiscard]] Dataset<T> load_fashion_mnist(const std::filesystem::path& dir = fashion_mnist_default_dir,
                                            Split split = Split::train, std::size_t limit = 0) {
    const char* prefix = split == Split::train ? "train" : "t10k";
    return load_idx_pair<T>(dir / (std::string(prefix) + "-images-idx3-ubyte.gz"),
                            dir / (std::string(prefix) + "-labels-idx1-ubyte.gz"), limit);
}

/// Load a Fashion-MNIST split from the default directory.
template <class T = float>
[[nodiscard]] Dataset<T> load_fashion_mnist(Split split, std::size_t limit = 0) {
    return load_fashion_mnist<T>(fashion_mnist_default_dir, split, limit);
}

/// The samples at `indices`, in that order (repeats allowed).
template <class T>
[[nodiscard]] Dataset<T> gather(const Dataset<T>& ds, std::span<const std::size_t> indices) {
    const std::size_t f = ds.features();
    Dataset<T> out;
    out.images = Tensor<T>(Shape{indices.size(), f});
    out.labels.resize(indices.size());
    for (std::size_t k = 0; k < indices.size(); ++k) {
        const std::size_t i = indices[k];
        if (i >= ds.size())
            throw ConfigError(detail::concat("gather: index ", i, " out of range (dataset of ", ds.size(), ")"));
        std::copy_n(ds.images.data() + i * f, f, out.images.data() + k * f);
        out.labels[k] = ds.labels[i];
    }
    return out;
}

/// The first min(n, size()) samples.
template <class T>
[[nodiscard]] Dataset<T> subset(const Dataset<T>& ds, std::size_t n) {
    n = std::min(n, ds.size());
    const std::size_t f = ds.features();
    Dataset<T> out;
    out.images = Tensor<T>(Shape{n, f});
    std::copy_n(ds.images.data(), n * f, out.images.data());
    out.labels.assign(ds.labels.begin(), ds.labels.begin() + std::ptrdiff_t(n));
    return out;
}

/// The first n samples of each class, in the original order (n = 0: all).
/// Labels must be non-negative.
template <class T>
[[nodiscard]] Dataset<T> first_per_class(const Dataset<T>& ds, std::size_t n) {
    if (n == 0) return ds;
    std::vector<std::size_t> keep, seen(std::size_t(std::max(ds.num_classes(), 0)), 0);
    for (std::size_t i = 0; i < ds.size(); ++i) {
        if (ds.labels[i] < 0)
            throw ConfigError(detail::concat("first_per_class: label ", ds.labels[i], " at sample ", i,
                                             " is negative"));
        if (seen[std::size_t(ds.labels[i])]++ < n) keep.push_back(i);
    }
    return gather(ds, std::span<const std::size_t>(keep));
}

/// Keep only the samples whose label is in `classes` (original order kept).
/// With `relabel`, the label classes[k] becomes k, so the result has labels
/// 0..k-1 in the order given. Throws ConfigError for an empty or repeating list.
template <class T>
[[nodiscard]] Dataset<T> filter_classes(const Dataset<T>& ds, std::span<const int> classes, bool relabel) {
    if (classes.empty()) throw ConfigError("filter_classes: no classes given");
    for (std::size_t a = 0; a < classes.size(); ++a)
        for (std::size_t b = a + 1; b < classes.size(); ++b)
            if (classes[a] == classes[b])
                throw ConfigError(detail::concat("filter_classes: class ", classes[a], " is listed twice"));
    std::vector<std::size_t> keep;
    std::vector<int> new_labels;
    for (std::size_t i = 0; i < ds.size(); ++i) {
        const auto it = std::find(classes.begin(), classes.end(), ds.labels[i]);
        if (it == classes.end()) continue;
        keep.push_back(i);
        new_labels.push_back(relabel ? int(it - classes.begin()) : ds.labels[i]);
    }
    Dataset<T> out = gather(ds, std::span<const std::size_t>(keep));
    out.labels = std::move(new_labels);
    return out;
}
template <class T>
[[nodiscard]] Dataset<T> filter_classes(const Dataset<T>& ds, std::initializer_list<int> classes, bool relabel) {
    return filter_classes(ds, std::span<const int>(classes.begin(), classes.size()), relabel);
}

namespace detail {

/// splitmix64: decorrelates nearby seeds (seed, seed + 1, ...).
constexpr std::uint64_t mix64(std::uint64_t x) noexcept {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/// Uniform integer in [0, n) by rejection: the same on every standard library
/// (std::uniform_int_distribution and std::shuffle are not).
inline std::uint64_t uniform_below(Rng& rng, std::uint64_t n) {
    const std::uint64_t limit = ~std::uint64_t(0) - (~std::uint64_t(0) % n);
    std::uint64_t r;
    do r = rng.next();
    while (r >= limit);
    return r % n;
}

/// Fisher-Yates shuffle, reproducible across platforms.
inline void shuffle_indices(std::vector<std::size_t>& v, Rng& rng) {
    for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[std::size_t(uniform_below(rng, i))]);
}

}  // namespace detail

/// Split into two datasets at random: `first` holds round(fraction * size())
/// samples, `second` the rest; each keeps the original sample order. The same
/// seed gives the same split. Throws ConfigError unless 0 < fraction < 1 and
/// both parts are non-empty.
template <class T>
[[nodiscard]] std::pair<Dataset<T>, Dataset<T>> split(const Dataset<T>& ds, double fraction,
                                                      std::uint64_t seed = 0) {
    if (!(fraction > 0.0 && fraction < 1.0))
        throw ConfigError(detail::concat("split: fraction must lie in (0, 1), got ", fraction));
    const std::size_t n = ds.size();
    const auto n_first = std::size_t(double(n) * fraction + 0.5);
    if (n_first == 0 || n_first == n)
        throw ConfigError(detail::concat("split: fraction ", fraction, " of ", n, " samples leaves a part empty (",
                                         n_first, " + ", n - n_first, ")"));
    std::vector<std::size_t> order(n);
    for (std::size_t i = 0; i < n; ++i) order[i] = i;
    Rng rng(detail::mix64(seed));
    detail::shuffle_indices(order, rng);
    std::sort(order.begin(), order.begin() + std::ptrdiff_t(n_first));
    std::sort(order.begin() + std::ptrdiff_t(n_first), order.end());
    const std::span<const std::size_t> all(order);
    return {gather(ds, all.first(n_first)), gather(ds, all.subspan(n_first))};
}

/// Batcher settings.
struct BatchOptions {
    std::size_t batch_size = 64;
    std::uint64_t seed = 0;
    /// Draw a new order every epoch; otherwise samples come in dataset order.
    bool shuffle = true;
    /// Omit the last batch when it would be smaller than batch_size.
    bool drop_last = false;
};

/// Mini-batches over a Dataset, reshuffled per epoch; a BatchSource.
/// Holds a reference to the dataset, which must outlive the Batcher.
/// Until start_epoch is called the order is that of epoch 0.
template <class T = float>
class Batcher {
public:
    using Scalar = T;

    Batcher(const Dataset<T>& data, BatchOptions options) : data_(&data), opt_(options) {
        if (opt_.batch_size == 0) throw ConfigError("Batcher: batch size must be positive, got 0");
        if (data.images.rows() != data.size() && !(data.empty() && data.images.empty()))
            throw ConfigError(detail::concat("Batcher: dataset has ", data.images.rows(), " image rows but ",
                                             data.size(), " labels"));
        order_.resize(data.size());
        start_epoch(0);
    }
    Batcher(const Dataset<T>& data, std::size_t batch_size, std::uint64_t seed = 0, bool drop_last = false)
        : Batcher(data, BatchOptions{.batch_size = batch_size, .seed = seed, .shuffle = true, .drop_last = drop_last}) {}
    // A Batcher keeps a reference: refuse temporaries.
    Batcher(const Dataset<T>&&, BatchOptions) = delete;
    Batcher(const Dataset<T>&&, std::size_t, std::uint64_t = 0, bool = false) = delete;

    /// Set the sample order for `epoch`; it depends only on (seed, epoch).
    void start_epoch(std::size_t epoch) {
        epoch_ = epoch;
        for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = i;
        if (!opt_.shuffle) return;
        Rng rng(detail::mix64(opt_.seed ^ detail::mix64(std::uint64_t(epoch))));
        detail::shuffle_indices(order_, rng);
    }

    /// Batches per epoch.
    [[nodiscard]] std::size_t batches() const noexcept {
        const std::size_t n = order_.size(), b = opt_.batch_size;
        return opt_.drop_last ? n / b : (n + b - 1) / b;
    }

    /// Batch i of the current epoch. The reference stays valid until the next
    /// call to batch(); its storage is reused.
    [[nodiscard]] const Batch<T>& batch(std::size_t i) {
        if (i >= batches())
            throw ConfigError(detail::concat("Batcher::batch: index ", i, " out of range (", batches(), " batches)"));
        const std::size_t begin = i * opt_.batch_size;
        const std::size_t count = std::min(opt_.batch_size, order_.size() - begin);
        const std::size_t f = data_->features();
        buffer_.x.resize(Shape{count, f});
        buffer_.labels.resize(count);
        const T* src = data_->images.data();
        T* dst = buffer_.x.data();
        for (std::size_t k = 0; k < count; ++k) {
            const std::size_t s = order_[begin + k];
            std::copy_n(src + s * f, f, dst + k * f);
            buffer_.labels[k] = data_->labels[s];
        }
        return buffer_;
    }

    /// The dataset indices of the current epoch, in batch order.
    [[nodiscard]] std::span<const std::size_t> order() const noexcept { return order_; }
    [[nodiscard]] std::size_t epoch() const noexcept { return epoch_; }
    [[nodiscard]] std::size_t batch_size() const noexcept { return opt_.batch_size; }
    [[nodiscard]] const BatchOptions& options() const noexcept { return opt_; }
    [[nodiscard]] const Dataset<T>& dataset() const noexcept { return *data_; }

private:
    const Dataset<T>* data_;
    BatchOptions opt_;
    std::vector<std::size_t> order_;
    std::size_t epoch_ = 0;
    Batch<T> buffer_;
};

static_assert(BatchSource<Batcher<float>>);
static_assert(BatchSource<Batcher<double>>);

}  // namespace patchwork
