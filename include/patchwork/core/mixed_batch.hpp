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
//
// On the device (D = Cuda) a module does not loop over segments: it launches
// its fused kernel once over all rows with the task of every row
// (`task_rows`: device int32 ids, one per matrix row) and each parameter
// stacked over the tasks (`stacked(p)`: [K, ...], bank k's value at k, or p's
// own value K times when p is shared), and accumulates its parameter
// gradients into stacked gradients (`stacked_grad(p)`, zeroed at the first
// request of a backward). The model stacks every slot's banks in one launch
// before the forward (`stack_slots`) and, after the backward, adds each
// task's slice of every requested stacked gradient into that task's bank (or
// all slices, in task order, into a shared p) in one more launch
// (`finish_backward`). Each row uses its own task's slice only, so this is
// the per-segment computation above with the segments' work fused; the
// stacked copies cost O(K x patch size) per step, small next to the
// backbone's activations for the patch sizes of parameter-efficient tuning.
#include <cstddef>
#include <deque>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/parameter.hpp"
#include "patchwork/core/tensor.hpp"
#include "patchwork/core/task_rows.hpp"

namespace patchwork {

namespace cuda {
template <class E>
class Buffer;  // cuda/device_tensor.hpp
}  // namespace cuda

namespace detail {
/// Where a device's int32 index arrays live (unused on the CPU).
template <class D>
struct index_storage {
    using type = std::vector<int>;
};
template <>
struct index_storage<Cuda> {
    using type = cuda::Buffer<int>;
};
}  // namespace detail

/// An int32 array on device D (task ids per row, row orders).
template <class D>
using index_storage_t = typename detail::index_storage<D>::type;

/// Rows [begin, end) of a mixed batch belong to `task`.
struct MixedSegment {
    int task = 0;
    std::size_t begin = 0, end = 0;
    [[nodiscard]] std::size_t size() const noexcept { return end - begin; }
};

template <class T, class D = Cpu>
class MixedBatch {
public:
    using Device = D;

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
        for (auto& e : stacks_) e.value_ready = e.grad_requested = false;
        for (auto& r : task_rows_) r.ready = false;
    }
    void add_segment(int task, std::size_t begin, std::size_t end) { segments_.push_back({task, begin, end}); }
    /// Slot `slot` takes bank[k] for the rows of task k (bank has one entry per task).
    void add_slot(Parameter<T, D>* slot, std::span<Parameter<T, D>* const> bank) {
        slots_.push_back(slot);
        banks_.insert(banks_.end(), bank.begin(), bank.end());
    }
    /// Running statistic `own` takes bank[k] for the rows of task k.
    void add_statistic(Tensor<T, D>* own, std::span<Tensor<T, D>* const> bank) {
        stats_.push_back(own);
        bank_stats_.insert(bank_stats_.end(), bank.begin(), bank.end());
    }

    /// Rows of the batch (the first dimension of the model's input).
    [[nodiscard]] std::size_t rows() const noexcept { return rows_; }
    [[nodiscard]] std::size_t tasks() const noexcept { return tasks_; }
    [[nodiscard]] std::span<const MixedSegment> segments() const noexcept { return segments_; }

    /// True when `p` is a slot (its value differs per task).
    [[nodiscard]] bool per_task(const Parameter<T, D>& p) const noexcept { return find(slots_, &p) != npos; }
    /// The parameter rows of `task` use in place of `p`: bank `task`'s for a slot, `p` itself otherwise.
    [[nodiscard]] Parameter<T, D>& use(Parameter<T, D>& p, int task) const noexcept {
        const std::size_t i = find(slots_, &p);
        return i == npos ? p : *banks_[i * tasks_ + std::size_t(task)];
    }
    /// The running statistic rows of `task` use in place of `own` (`own` when not per task).
    [[nodiscard]] Tensor<T, D>& statistic(Tensor<T, D>& own, int task) const noexcept {
        const std::size_t i = find(stats_, &own);
        return i == npos ? own : *bank_stats_[i * tasks_ + std::size_t(task)];
    }

    /// Matrix rows of `t` per batch row; `t` must keep the batch as its first
    /// dimension (a ShapeError naming the module otherwise).
    [[nodiscard]] std::size_t rows_per_item(const Tensor<T, D>& t, const std::string& path, const char* what) const {
        if (t.rank() < 2 || t.dim(0) != rows_ || t.rows() % rows_ != 0)
            throw ShapeError(detail::concat(detail::display_path(path), ": ", what, " ", t.shape(),
                                            " in a mixed-task batch of ", rows_,
                                            " rows: one pass over mixed tasks needs the batch as the first "
                                            "dimension of every tensor"));
        return t.rows() / rows_;
    }

    // ---- device (D = Cuda): fused per-row kernels over stacked parameters ----

    /// The task of every matrix row of `t` (rows_per_item rows per batch row),
    /// as device ids for the patch kernels; uploaded once per batch and factor.
    [[nodiscard]] cuda::TaskRows task_rows(const Tensor<T, D>& t, const std::string& path, const char* what) const
        requires std::is_same_v<D, Cuda>
    {
        const std::size_t per_item = rows_per_item(t, path, what);
        RowIds* ids = nullptr;
        for (auto& r : task_rows_)
            if (r.per_item == per_item) ids = &r;
        if (ids == nullptr) {
            ids = &task_rows_.emplace_back();
            ids->per_item = per_item;
        }
        if (!ids->ready) {
            ids->host.resize(rows_ * per_item);
            for (const MixedSegment& s : segments_)
                std::fill(ids->host.begin() + std::ptrdiff_t(s.begin * per_item),
                          ids->host.begin() + std::ptrdiff_t(s.end * per_item), s.task);
            ids->device.upload(std::span<const int>(ids->host), path);
            ids->ready = true;
        }
        return {ids->device.data(), tasks_};
    }

    /// Stacks every slot's banks [K, ...] in one launch (the model calls it
    /// after describing the slots, before the backbone's forward).
    void stack_slots()
        requires std::is_same_v<D, Cuda>
    {
        std::vector<cuda::SliceMove<T>> moves;
        for (Parameter<T, D>* slot : slots_) {
            Stack& e = entry(*slot);
            const std::size_t n = slot->value.size();
            for (std::size_t k = 0; k < tasks_; ++k)
                moves.push_back({use(*slot, int(k)).value.data(), e.value.data() + k * n, n, 1, 0, 0});
            e.value_ready = true;
        }
        cuda::slice_moves<T>(moves, "multitask: stacking the task banks");
    }

    /// p's value per task, stacked [K, ...]: bank k's at k for a slot, p's own
    /// value K times for a shared parameter (stacked at its first request).
    [[nodiscard]] const Tensor<T, D>& stacked(Parameter<T, D>& p) const
        requires std::is_same_v<D, Cuda>
    {
        Stack& e = entry(p);
        if (!e.value_ready) {
            const std::size_t n = p.value.size();
            std::vector<cuda::SliceMove<T>> moves;
            for (std::size_t k = 0; k < tasks_; ++k)
                moves.push_back({use(p, int(k)).value.data(), e.value.data() + k * n, n, 1, 0, 0});
            cuda::slice_moves<T>(moves, p.name());
            e.value_ready = true;
        }
        return e.value;
    }

    /// The stacked gradient [K, ...] a module accumulates p's per-row
    /// gradients into: zeroed at its first request in a backward; nullptr
    /// when no task's parameter wants a gradient.
    [[nodiscard]] Tensor<compute_t<T>, D>* stacked_grad(Parameter<T, D>& p) const
        requires std::is_same_v<D, Cuda>
    {
        bool any = false;
        for (std::size_t k = 0; k < tasks_ && !any; ++k) any = use(p, int(k)).wants_grad();
        if (!any) return nullptr;
        Stack& e = entry(p);
        if (!e.grad_requested) {
            e.grad.resize(e.value.shape());
            e.grad.zero();
            e.grad_requested = true;
        }
        return &e.grad;
    }

    /// After the backbone's backward: slice k of every requested stacked
    /// gradient added into task k's parameter (when it wants a gradient); for
    /// a shared parameter all K slices, in task order, into its own gradient.
    /// One launch.
    void finish_backward()
        requires std::is_same_v<D, Cuda>
    {
        std::vector<cuda::SliceMove<compute_t<T>>> moves;
        for (Stack& e : stacks_) {
            if (!e.grad_requested) continue;
            e.grad_requested = false;
            Parameter<T, D>& p = *e.param;
            const std::size_t n = p.value.size();
            if (per_task(p)) {
                for (std::size_t k = 0; k < tasks_; ++k) {
                    Parameter<T, D>& b = use(p, int(k));
                    if (b.wants_grad()) moves.push_back({e.grad.data() + k * n, b.grad.data(), n, 1, 0, 1});
                }
            } else if (p.wants_grad()) {
                moves.push_back({e.grad.data(), p.grad.data(), n, tasks_, n, 1});
            }
        }
        cuda::slice_moves<compute_t<T>>(moves, "multitask: task gradients");
    }

private:
    static constexpr std::size_t npos = std::size_t(-1);
    template <class P>
    static std::size_t find(const std::vector<P*>& v, const P* p) noexcept {
        for (std::size_t i = 0; i < v.size(); ++i)
            if (v[i] == p) return i;
        return npos;
    }

    /// A parameter's stacked value and gradient (device); kept across batches
    /// so their memory is reused.
    struct Stack {
        Parameter<T, D>* param = nullptr;
        Tensor<T, D> value;
        Tensor<compute_t<T>, D> grad;  ///< in the parameters' gradient type (fp32 for bf16)
        bool value_ready = false, grad_requested = false;
    };
    /// Device task ids of the rows, for one rows-per-item factor.
    struct RowIds {
        std::size_t per_item = 0;
        std::vector<int> host;
        index_storage_t<D> device;
        bool ready = false;
    };

    Stack& entry(Parameter<T, D>& p) const {
        for (Stack& e : stacks_)
            if (e.param == &p) {
                e.value.resize(p.value.shape().prepended(tasks_));
                return e;
            }
        Stack& e = stacks_.emplace_back();
        e.param = &p;
        e.value.resize(p.value.shape().prepended(tasks_));
        return e;
    }

    std::size_t rows_ = 0, tasks_ = 0;
    std::vector<MixedSegment> segments_;
    std::vector<Parameter<T, D>*> slots_;
    std::vector<Parameter<T, D>*> banks_;  ///< slot i, task k at i * tasks + k
    std::vector<Tensor<T, D>*> stats_;
    std::vector<Tensor<T, D>*> bank_stats_;
    // deques: a reference handed out stays valid while more entries are added.
    mutable std::deque<Stack> stacks_;
    mutable std::deque<RowIds> task_rows_;
};

namespace detail {
template <class T, class D>
const MixedBatch<T, D>*& mixed_batch_slot() noexcept {
    thread_local const MixedBatch<T, D>* active = nullptr;
    return active;
}
}  // namespace detail

/// The mixed batch active on this thread, or nullptr.
template <class T, class D = Cpu>
[[nodiscard]] const MixedBatch<T, D>* active_mixed_batch() noexcept {
    return detail::mixed_batch_slot<T, D>();
}

/// Makes `batch` the active mixed batch of this thread while alive (nullptr: none).
template <class T, class D = Cpu>
class MixedBatchScope {
public:
    explicit MixedBatchScope(const MixedBatch<T, D>* batch) noexcept : saved_(detail::mixed_batch_slot<T, D>()) {
        detail::mixed_batch_slot<T, D>() = batch;
    }
    ~MixedBatchScope() { detail::mixed_batch_slot<T, D>() = saved_; }
    MixedBatchScope(const MixedBatchScope&) = delete;
    MixedBatchScope& operator=(const MixedBatchScope&) = delete;

private:
    const MixedBatch<T, D>* saved_;
};

/// The active mixed batch when any of `params` is per task in it, else nullptr
/// (a module whose parameters are all shared needs no per-segment work).
template <class T, class D = Cpu, class... P>
[[nodiscard]] const MixedBatch<T, D>* mixed_batch_for(const P&... params) noexcept {
    const MixedBatch<T, D>* mb = active_mixed_batch<T, D>();
    return mb != nullptr && (mb->per_task(params) || ...) ? mb : nullptr;
}

/// `p`, or the parameter rows of `task` use in its place in mixed batch `mb` (nullptr: `p`).
template <class T, class D>
[[nodiscard]] Parameter<T, D>& mixed_use(const MixedBatch<T, D>* mb, Parameter<T, D>& p, int task) noexcept {
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
template <class T, class D>
[[nodiscard]] const MixedBatch<T, D>* mixed_batch_for_backward(const MixedBatch<T, D>* forward_batch,
                                                               const std::string& path) {
    if (forward_batch == nullptr) return nullptr;
    if (active_mixed_batch<T, D>() != forward_batch)
        throw Error(detail::concat(detail::display_path(path),
                                   ": backward of a mixed-task forward must run inside the same mixed batch (the "
                                   "multi-task model's backward); none or another one is active"));
    return forward_batch;
}

}  // namespace patchwork
