#pragma once
// Embedding: a lookup table, and TokenBatch, the token ids a transformer reads.
//
// A table W of shape [V, D] maps an id i in [0, V) to its row W_i. For a batch
// of ids [B, T] the output is [B, T, D] with y_bt = W_{id_bt}.
//
// Backward. y_bt depends on W only through row id_bt, with dy_bt/dW_{id_bt} = I:
//   dL/dW_v = sum over (b, t) with id_bt = v of dL/dy_bt      (scatter-add)
// Ids are not differentiable, so there is no input gradient. A frozen table
// has no gradient buffer (Parameter frees it) and its backward does nothing,
// so a frozen embedding allocates nothing beyond its value and its output.
//
// Device = Cuda: the ids stay on the host, where they are checked, and are
// uploaded (int32) at each call. The gather is one thread per output element.
// The scatter-add must not race where an id repeats, and must not depend on
// timing: the host groups the rows by id (a stable sort, so each id's rows
// stay in increasing order) and uploads [distinct ids | offsets | rows]; one
// thread per (distinct id, column) then owns dL/dW_v[j] and adds the rows of
// v in that order, so the sum is the CPU's sequential loop, bit for bit.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "patchwork/core/mixed_batch.hpp"
#include "patchwork/core/module.hpp"
#include "patchwork/ops/cuda_attention_ops.hpp"

namespace patchwork {

/// Token ids of a padded batch of sequences, row-major [batch, tokens].
/// `token_types` (segment ids) and `mask` may be empty: all zero, and all real tokens.
/// In `mask`, 1 marks a real token and 0 padding (Hugging Face's attention_mask).
struct TokenBatch {
    std::size_t batch = 0;
    std::size_t tokens = 0;
    std::vector<std::int32_t> ids;
    std::vector<std::int32_t> token_types;
    std::vector<std::int32_t> mask;

    /// From any padded batch with Hugging Face's field names (the tokenizer's BatchEncoding).
    template <class Encoded>
        requires requires(const Encoded& e) {
            e.batch;
            e.tokens;
            e.ids;
            e.token_type_ids;
            e.attention_mask;
        }
    [[nodiscard]] static TokenBatch from(const Encoded& e) {
        TokenBatch b;
        b.batch = e.batch;
        b.tokens = e.tokens;
        b.ids.assign(e.ids.begin(), e.ids.end());
        b.token_types.assign(e.token_type_ids.begin(), e.token_type_ids.end());
        b.mask.assign(e.attention_mask.begin(), e.attention_mask.end());
        return b;
    }

    /// Number of real tokens of sequence b.
    [[nodiscard]] std::size_t length(std::size_t b) const {
        if (mask.empty()) return tokens;
        std::size_t n = 0;
        for (std::size_t t = 0; t < tokens; ++t) n += mask[b * tokens + t] != 0;
        return n;
    }
    /// Throws ShapeError naming `path` when the vectors do not match batch x tokens.
    void check(const std::string& path) const {
        const std::size_t n = batch * tokens;
        const auto bad = [&](const char* what, std::size_t got) {
            throw ShapeError(detail::concat(detail::display_path(path), ": token batch of ", batch, " x ", tokens,
                                            " has ", got, " ", what, " (expected ", n, ")"));
        };
        if (n == 0) bad("ids: an empty batch", 0);
        if (ids.size() != n) bad("ids", ids.size());
        if (!token_types.empty() && token_types.size() != n) bad("token types", token_types.size());
        if (!mask.empty() && mask.size() != n) bad("mask entries", mask.size());
    }
};

namespace detail {
/// The rows of `ids` grouped by id, as cuda::RowGroups reads them: out =
/// [distinct ids | offsets (distinct + 1) | rows], each id's rows increasing.
/// Returns the number of distinct ids.
inline std::size_t group_rows_by_id(std::span<const std::int32_t> ids, std::vector<int>& out) {
    std::vector<int> order(ids.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return ids[std::size_t(a)] < ids[std::size_t(b)]; });
    std::vector<int> distinct, offsets;
    for (std::size_t i = 0; i < order.size(); ++i)
        if (i == 0 || ids[std::size_t(order[i])] != ids[std::size_t(order[i - 1])]) {
            distinct.push_back(ids[std::size_t(order[i])]);
            offsets.push_back(int(i));
        }
    offsets.push_back(int(order.size()));
    out.clear();
    out.insert(out.end(), distinct.begin(), distinct.end());
    out.insert(out.end(), offsets.begin(), offsets.end());
    out.insert(out.end(), order.begin(), order.end());
    return distinct.size();
}
}  // namespace detail

template <class T, class D = Cpu>
class BasicEmbedding : public ModuleBase {
public:
    using Scalar = T;
    using Device = D;
    static constexpr const char* kind() { return "embedding"; }
    static constexpr unsigned roles = role_bit(Role::weight);
    static constexpr bool fixed_width = true;

    BasicEmbedding(std::size_t entries, std::size_t features)
        : entries_(entries), features_(features), weight("weight", Role::weight, Shape{entries, features}) {
        if (entries == 0 || features == 0)
            throw ConfigError(detail::concat("embedding: entries and features must be positive, got ", entries,
                                             " x ", features));
        reset_parameters(default_rng());
    }

private:
    std::size_t entries_, features_;

public:
    Parameter<T, D> weight;  ///< [entries, features]

    [[nodiscard]] std::size_t entries() const noexcept { return entries_; }
    [[nodiscard]] std::size_t out_features() const noexcept { return features_; }

    void reset_parameters(Rng& rng) {
        init::on_host(weight.value, [&](Tensor<T>& w) { init::normal(w, rng, 0.0, 0.02); });
    }

    /// Check every id lies in [0, entries); `what` names the ids in the error.
    void check_ids(std::span<const std::int32_t> ids, const char* what) const {
        for (std::size_t i = 0; i < ids.size(); ++i)
            if (ids[i] < 0 || std::size_t(ids[i]) >= entries_)
                throw ShapeError(detail::concat(detail::display_path(path_), ": ", what, " ", ids[i], " at position ",
                                                i, " is outside the table of ", entries_, " entries"));
    }

    /// out_r += W_{ids[r]} for each row r of out ([rows, D], rows = ids.size()).
    /// Ids must have been checked (check_ids).
    void gather_add(std::span<const std::int32_t> ids, Tensor<T, D>& out) const {
        if constexpr (std::is_same_v<D, Cuda>) {
            if (out.rows() != ids.size())
                throw_shape_error(path_, "embedding output", Shape{ids.size(), features_}, out.shape());
            staged_ids_.assign(ids.begin(), ids.end());
            ids_dev_.upload(std::span<const int>(staged_ids_), path_);
            cuda::embedding_gather_add(weight.value, ids_dev_.data(), out, path_);
            return;
        }
        const std::size_t d = features_;
        for_rows(ids.size(), d, [&](std::size_t r) {
            const T* src = weight.value.data() + std::size_t(ids[r]) * d;
            T* dst = out.data() + r * d;
            for (std::size_t j = 0; j < d; ++j) dst[j] += src[j];
        });
    }

    /// dL/dW_{ids[r]} += dy_r (scatter-add; sequential, so the sums are deterministic).
    void scatter_add(std::span<const std::int32_t> ids, const Tensor<T, D>& dy) {
        if (!weight.wants_grad()) return;
        if constexpr (std::is_same_v<D, Cuda>) {
            const std::size_t distinct = detail::group_rows_by_id(ids, groups_);
            groups_dev_.upload(std::span<const int>(groups_), path_);
            cuda::embedding_scatter_add(dy, cuda::RowGroups{groups_dev_.data(), distinct, ids.size()}, weight.grad,
                                        path_);
        } else {
            const std::size_t d = features_;
            for (std::size_t r = 0; r < ids.size(); ++r) {
                T* dst = weight.grad.data() + std::size_t(ids[r]) * d;
                const T* src = dy.data() + r * d;
                for (std::size_t j = 0; j < d; ++j) dst[j] += src[j];
            }
        }
    }

    /// y = W_ids as [ids.size(), D] (or [B, T, D] when `shape` is given).
    const Tensor<T, D>& forward(std::span<const std::int32_t> ids, const Shape& shape) {
        check_ids(ids, "id");
        if (shape.numel() != ids.size() * features_) throw_shape_error(path_, "embedding output", Shape{ids.size(), features_}, shape);
        ids_.assign(ids.begin(), ids.end());
        y_.resize(shape);
        y_.zero();
        gather_add(ids, y_);
        return y_;
    }
    /// Scatter-add dy into the table's gradient (nothing when frozen).
    void backward(const Tensor<T, D>& dy) {
        check_same_shape(dy, y_.shape(), path_, "embedding output gradient");
        scatter_add(ids_, dy);
    }

    template <class F>
    void visit(F&& f) {
        f(weight);
    }
    void set_path(const std::string& p) {
        path_ = p;
        weight.set_prefix(p);
    }

private:
    std::vector<std::int32_t> ids_;
    Tensor<T, D> y_;
    // Device only: the ids of the last gather and the row groups of the last
    // scatter, on the host (kept until the next call) and on the device.
    mutable std::vector<int> staged_ids_;
    mutable index_storage_t<D> ids_dev_;
    std::vector<int> groups_;
    index_storage_t<D> groups_dev_;
};

using Embedding = BasicEmbedding<float>;

}  // namespace patchwork
