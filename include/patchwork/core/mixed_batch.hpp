#pragma once
// MixedBatch<T>: what a module needs to compute a mixed-task batch in one pass.
//
// A multi-task model keeps, for some backbone parameters (its *slots*), one
// bank parameter per task. To run a batch whose rows belong to different
// tasks in one backbone pass, the model sorts the rows by task (so each task's
// rows form one contiguous *segment* of the batch), makes a MixedBatch active
// on the calling thread for the duration of the backbone's forward and of its
// backward (MixedBatchScope), and runs the backbone once over all rows.
//
// A module that supports mixed rows asks, in forward and backward, for the
// active batch (active_mixed_batch<T>()). When there is one, it works segment
// by segment: for segment s of task k it uses `use(p, k)` in place of each of
// its parameters p (bank k's parameter when p is a slot, p itself when p is
// shared), so the row computes exactly what a forward of task k alone would,
// and backward accumulates that segment's gradient into that same parameter:
// into task k's bank for a slot, into the shared parameter otherwise (which
// thereby sums over all rows, as the per-task passes would together). A
// BatchNorm2d in training mode takes its batch statistics per segment, and
// its running statistics are those of the segment's task (`statistic`).
//
// Such a module lists the parameters it can take per row with a member
// `visit_mixed(f)`; the model runs the one-pass path only when every slot is
// listed by some module of the backbone (and falls back to one backbone pass
// per task otherwise).
//
// Segments are in units of batch rows (the first dimension of the model's
// input). Tensors inside the backbone keep that first dimension (an NHWC
// activation [N, H, W, C] has N H W matrix rows, H W per batch row);
// `rows_per_item` gives the matrix rows per batch row of a module's tensor.
#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/parameter.hpp"
#include "patchwork/core/tensor.hpp"

namespace patchwork {

/// Rows [begin, end) of a mixed batch belong to `task`.
struct MixedSegment {
    int task = 0;
    std::size_t begin = 0, end = 0;
    [[nodiscard]] std::size_t size() const noexcept { return end - begin; }
};

template <class T>
class MixedBatch {
public:
    /// A batch of `rows` rows, sorted into `segments` (contiguous, in order,
    /// covering [0, rows)), with `tasks` banks per slot.
    void reset(std::size_t rows, std::size_t tasks) {
        rows_ = rows;
        tasks_ = tasks;
        segments_.clear();
        slots_.clear();
        banks_.clear();
        stats_.clear();
        bank_stats_.clear();
    }
    void add_segment(int task, std::size_t begin, std::size_t end) { segments_.push_back({task, begin, end}); }
    /// Slot `slot` takes bank[k] for the rows of task k (bank has one entry per task).
    void add_slot(Parameter<T>* slot, std::span<Parameter<T>* const> bank) {
        slots_.push_back(slot);
        banks_.insert(banks_.end(), bank.begin(), bank.end());
    }
    /// Running statistic `own` takes bank[k] for the rows of task k.
    void add_statistic(Tensor<T>* own, std::span<Tensor<T>* const> bank) {
        stats_.push_back(own);
        bank_stats_.insert(bank_stats_.end(), bank.begin(), bank.end());
    }

    /// Rows of the batch (the first dimension of the model's input).
    [[nodiscard]] std::size_t rows() const noexcept { return rows_; }
    [[nodiscard]] std::size_t tasks() const noexcept { return tasks_; }
    [[nodiscard]] std::span<const MixedSegment> segments() const noexcept { return segments_; }

    /// True when `p` is a slot (its value differs per task).
    [[nodiscard]] bool per_task(const Parameter<T>& p) const noexcept { return find(slots_, &p) != npos; }
    /// The parameter rows of `task` use in place of `p`: bank `task`'s for a slot, `p` itself otherwise.
    [[nodiscard]] Parameter<T>& use(Parameter<T>& p, int task) const noexcept {
        const std::size_t i = find(slots_, &p);
        return i == npos ? p : *banks_[i * tasks_ + std::size_t(task)];
    }
    /// The running statistic rows of `task` use in place of `own` (`own` when not per task).
    [[nodiscard]] Tensor<T>& statistic(Tensor<T>& own, int task) const noexcept {
        const std::size_t i = find(stats_, &own);
        return i == npos ? own : *bank_stats_[i * tasks_ + std::size_t(task)];
    }

    /// Matrix rows of `t` per batch row; `t` must keep the batch as its first
    /// dimension (a ShapeError naming the module otherwise).
    [[nodiscard]] std::size_t rows_per_item(const Tensor<T>& t, const std::string& path, const char* what) const {
        if (t.rank() < 2 || t.dim(0) != rows_ || t.rows() % rows_ != 0)
            throw ShapeError(detail::concat(detail::display_path(path), ": ", what, " ", t.shape(),
                                            " in a mixed-task batch of ", rows_,
                                            " rows: one pass over mixed tasks needs the batch as the first "
                                            "dimension of every tensor"));
        return t.rows() / rows_;
    }

private:
    static constexpr std::size_t npos = std::size_t(-1);
    template <class P>
    static std::size_t find(const std::vector<P*>& v, const P* p) noexcept {
        for (std::size_t i = 0; i < v.size(); ++i)
            if (v[i] == p) return i;
        return npos;
    }

    std::size_t rows_ = 0, tasks_ = 0;
    std::vector<MixedSegment> segments_;
    std::vector<Parameter<T>*> slots_;
    std::vector<Parameter<T>*> banks_;  ///< slot i, task k at i * tasks + k
    std::vector<Tensor<T>*> stats_;
    std::vector<Tensor<T>*> bank_stats_;
};

namespace detail {
template <class T>
const MixedBatch<T>*& mixed_batch_slot() noexcept {
    thread_local const MixedBatch<T>* active = nullptr;
    return active;
}
}  // namespace detail

/// The mixed batch active on this thread, or nullptr.
template <class T>
[[nodiscard]] const MixedBatch<T>* active_mixed_batch() noexcept {
    return detail::mixed_batch_slot<T>();
}

/// Makes `batch` the active mixed batch of this thread while alive (nullptr: none).
template <class T>
class MixedBatchScope {
public:
    explicit MixedBatchScope(const MixedBatch<T>* batch) noexcept : saved_(detail::mixed_batch_slot<T>()) {
        detail::mixed_batch_slot<T>() = batch;
    }
    ~MixedBatchScope() { detail::mixed_batch_slot<T>() = saved_; }
    MixedBatchScope(const MixedBatchScope&) = delete;
    MixedBatchScope& operator=(const MixedBatchScope&) = delete;

private:
    const MixedBatch<T>* saved_;
};

/// The active mixed batch when any of `params` is per task in it, else nullptr
/// (a module whose parameters are all shared needs no per-segment work).
template <class T, class... P>
[[nodiscard]] const MixedBatch<T>* mixed_batch_for(const P&... params) noexcept {
    const MixedBatch<T>* mb = active_mixed_batch<T>();
    return mb != nullptr && (mb->per_task(params) || ...) ? mb : nullptr;
}

/// `p`, or the parameter rows of `task` use in its place in mixed batch `mb` (nullptr: `p`).
template <class T>
[[nodiscard]] Parameter<T>& mixed_use(const MixedBatch<T>* mb, Parameter<T>& p, int task) noexcept {
    return mb == nullptr ? p : mb->use(p, task);
}

/// f(task, first matrix row, matrix rows) for each segment of mixed batch `mb`
/// over the matrix rows of `t`; without a mixed batch, one call f(-1, 0, t.rows()).
template <class T, class F>
void for_each_segment(const MixedBatch<T>* mb, const Tensor<T>& t, const std::string& path, const char* what,
                      F&& f) {
    if (mb == nullptr) {
        f(-1, std::size_t(0), t.rows());
        return;
    }
    const std::size_t r = mb->rows_per_item(t, path, what);
    for (const MixedSegment& s : mb->segments()) f(s.task, s.begin * r, s.size() * r);
}

/// For a module's backward: the mixed batch its forward used (`forward_batch`,
/// nullptr when that forward was not mixed), which must be the active one again.
template <class T>
[[nodiscard]] const MixedBatch<T>* mixed_batch_for_backward(const MixedBatch<T>* forward_batch,
                                                            const std::string& path) {
    if (forward_batch == nullptr) return nullptr;
    if (active_mixed_batch<T>() != forward_batch)
        throw Error(detail::concat(detail::display_path(path),
                                   ": backward of a mixed-task forward must run inside the same mixed batch (the "
                                   "multi-task model's backward); none or another one is active"));
    return forward_batch;
}

}  // namespace patchwork
