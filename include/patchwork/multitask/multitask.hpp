#pragma once
// MultiTask<Backbone, Head>: one shared backbone, K tasks, each with its own
// patch (a bank of per-task backbone parameters) and its own head.
//
// Which backbone parameters are per task is decided once, at construction, by
// a selector (by default: every parameter that is trainable then, i.e. what
// the backbone's Tune policies chose: norm scale/shift for NormPatch, biases
// for BiasOnly, depthwise filters for DepthwisePatch, the injected
// adapter/LoRA/scale-shift parameters). Those backbone parameters become
// *slots*: for each task k the model keeps a bank of real Parameters named
// "task<k>.<original name>" and owned by task k (Parameter::task() == k).
// BatchNorm2d running statistics are per task too (bank parameters
// "task<k>.<bn path>.running_mean" / ".running_var", frozen, never trained).
//
// A forward or backward of task k binds bank k into the slots by swapping
// tensors (std::swap of value and grad: O(1) per parameter, no copy), runs the
// backbone, and swaps back. The banks, their names and the binding are
// TaskBanks (multitask/banks.hpp); this file holds the model and its passes. Outside a forward/backward the slots hold the
// pre-trained values and no gradient. visit() shows the shared backbone
// parameters, then per task its bank and its head, never the slots, so
// optimisers, parameter_report and the safetensors functions (save_base,
// save_patch(model, path, k)) see exactly what is stored.
//
// Gradients. For a single-task batch the model is head_k(backbone(x; theta,
// bank_k)); binding makes the slot *be* bank k's tensors, so the backbone's
// own backward accumulates dL/dbank_k into bank k's grad and dL/dtheta into
// the shared gradients, unchanged. For a mixed batch (G_k = rows of task k),
// L = sum_k L_k(rows G_k) and, since the rows of different tasks never
// interact (a row's output depends only on its own input, its task's bank and
// the shared weights; BatchNorm2d in training mode takes its statistics over
// the task's rows, exactly as the per-task pass would),
//   dL/dtheta = sum_k dL_k/dtheta,   dL/dbank_k = dL_k/dbank_k,
//   dL/dx[G_k] = dL_k/dx[G_k].
//
// Mixed batches, one pass. forward(x, task_ids) sorts the rows by task (a
// stable permutation, gathered once; each task's rows become one contiguous
// segment, tasks ascending), makes a MixedBatch (core/mixed_batch.hpp)
// active for the backbone's forward and for its backward, and runs the
// backbone once over all rows. The slots stay unbound (pre-trained values, no
// gradient); every module that holds a slot applies, segment by segment, the
// bank parameter of that segment's task (MixedBatch::use) and accumulates the
// segment's gradient into it, while shared computation runs once over the
// whole batch and its gradients sum over all rows. Each present task's head
// then runs on its segment of the features, and the outputs are scattered
// back into row order (dx likewise in backward). Per module, each segment
// computes what that task's pass alone computes, so the two terms above are
// exactly what one backward accumulates (the per-module derivations are next
// to their code: ScaleShift, Adapter, LoRA, BatchNorm2d, Conv2d).
//
// The one pass runs when every slot is listed by the module holding it as
// one it applies per row (`visit_mixed`: the injected ScaleShift, Adapter and
// LoRA parameters, BatchNorm2d scale and shift, depthwise convolution filters,
// convolution biases) and every module with running statistics takes part
// (BatchNorm2d); see one_pass_supported(). Otherwise, e.g. for LayerNorm or
// Linear parameters per task, or with MultiTaskOptions::one_pass = false, the
// rows are grouped by task (gather, one backbone forward per task present,
// scatter), and since layers keep only the state of their last forward the
// backward re-runs the backbone forward of every group but the last one
// (restoring BatchNorm running statistics afterwards, so they move once per
// forward as in the per-task passes). last_mixed_pass() says which path the
// last mixed forward took.
//
// On the device (a backbone and heads with Device = Cuda) every pass is the
// same; the row moves (sorting by task, gathering a group, scattering back)
// are kernels over device index arrays, and in the one pass each per-row
// module runs its fused kernel once over all rows with the task of every row
// over per-task parameters the MixedBatch stacks [K, ...] for the batch (one
// launch for all slots), its parameter gradients going into stacked per-task
// gradients that one more launch adds into the banks after the backward
// (core/mixed_batch.hpp). The algebra is the per-segment one above.
//
// The model is neither copyable nor movable (slots are pointers into the
// backbone); construct it in place.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/module.hpp"
#include "patchwork/core/parameter.hpp"
#include "patchwork/core/tensor.hpp"
#include "patchwork/core/mixed_batch.hpp"
#include "patchwork/layers/attention.hpp"
#include "patchwork/multitask/banks.hpp"
#include "patchwork/ops/cuda_ops.hpp"

namespace patchwork {

/// Options of a MultiTask model.
struct MultiTaskOptions {
    /// Keep BatchNorm2d running statistics per task (the statistics are part of a task's patch).
    bool per_task_statistics = true;
    /// Compute a mixed-task batch in one backbone pass when the backbone supports it
    /// (see one_pass_supported()); false: always one backbone pass per task present.
    bool one_pass = true;
};

/// How the last mixed-task forward was computed.
enum class MixedPass {
    none,      ///< the last forward was not a mixed one (or failed)
    one_pass,  ///< one backbone pass over all rows, per-task parameters applied per row
    grouped,   ///< one backbone pass per task present (rows gathered by task)
};

template <Module Backbone, Module Head>
class MultiTask : public ModuleBase {
public:
    using Scalar = typename Backbone::Scalar;
    using Device = device_of_t<Backbone>;
    using T = Scalar;
    using D = Device;
    static_assert(std::is_same_v<typename Head::Scalar, Scalar>,
                  "patchwork::MultiTask: the backbone and the heads must use the same scalar type");
    static_assert(std::is_same_v<device_of_t<Head>, Device>,
                  "patchwork::MultiTask: the backbone and the heads must live on the same device (Cpu or Cuda)");
    static constexpr const char* kind() { return "multitask"; }
    static constexpr unsigned roles = Backbone::roles | Head::roles;
    static constexpr bool fixed_width = Head::fixed_width;

    /// One task per head. Bank k starts as a copy of the backbone's values.
    template <class Selector = PerTaskTrainable>
    MultiTask(Backbone backbone, std::vector<Head> heads, Selector per_task = {}, MultiTaskOptions options = {})
        : backbone_(std::move(backbone)), banks_(unnamed(backbone_), per_task, options.per_task_statistics),
          one_pass_(options.one_pass) {
        if (heads.empty()) throw ConfigError("multitask: at least one task (one head) is needed");
        for (auto& h : heads) add_bank_and_head(std::move(h), -1);
        set_path("");
    }

    MultiTask(const MultiTask&) = delete;
    MultiTask& operator=(const MultiTask&) = delete;
    MultiTask(MultiTask&&) = delete;
    MultiTask& operator=(MultiTask&&) = delete;

    // -- tasks ---------------------------------------------------------------

    [[nodiscard]] std::size_t tasks() const noexcept { return heads_.size(); }
    /// The task forward(x) and backward(dy) use (0 by default).
    void set_active_task(int task) {
        check_task(task);
        active_ = task;
    }
    [[nodiscard]] int active_task() const noexcept { return active_; }

    /// Add a task: its bank starts from the pre-trained values (those the
    /// backbone had when the model was built) and its BatchNorm statistics
    /// from the pre-trained ones. Returns its id (the old task count).
    int add_task(Head head) { return add_bank_and_head(std::move(head), -1); }
    /// Add a task whose bank and statistics start as copies of task `init_from`'s.
    int add_task(Head head, int init_from) {
        check_task(init_from);
        return add_bank_and_head(std::move(head), init_from);
    }

    /// Freeze everything except task `task`'s bank and head (which become
    /// trainable; its statistics stay frozen): sequential transfer trains only
    /// the new task, and the other tasks stay bit-for-bit as they are.
    void train_only(int task) {
        check_task(task);
        visit_all([&](Parameter<T, D>& p, bool statistic) { p.set_trainable(!statistic && p.task() == task); });
    }

    [[nodiscard]] Backbone& backbone() noexcept { return backbone_; }
    [[nodiscard]] Head& head(int task) {
        check_task(task);
        return heads_[std::size_t(task)];
    }
    /// Bank parameters of `task` (per-task backbone parameters, in slot order).
    [[nodiscard]] std::deque<Parameter<T, D>>& bank(int task) {
        check_task(task);
        return banks_.bank(std::size_t(task));
    }
    /// The per-task BatchNorm statistics of `task` (running_mean, running_var per BatchNorm2d).
    [[nodiscard]] std::deque<Parameter<T, D>>& statistics(int task) {
        check_task(task);
        return banks_.statistics(std::size_t(task));
    }
    /// Number of per-task backbone parameters (slots) and of their scalars.
    [[nodiscard]] std::size_t slot_count() const noexcept { return banks_.slot_count(); }
    [[nodiscard]] std::size_t patch_size() const noexcept { return banks_.patch_size(); }

    /// Whether forward(x, task_ids) may use the one-pass path (MultiTaskOptions::one_pass).
    void set_one_pass(bool on) noexcept { one_pass_ = on; }
    [[nodiscard]] bool one_pass() const noexcept { return one_pass_; }
    /// True when the backbone can compute a mixed batch in one pass: every slot
    /// is a parameter that the module holding it applies per row (it lists it
    /// in `visit_mixed`: ScaleShift, Adapter, LoRA, BatchNorm2d, the filters of
    /// depthwise convolutions, convolution biases), and every module with
    /// running statistics splits its batch statistics by task (BatchNorm2d).
    [[nodiscard]] bool one_pass_supported() {
        std::vector<const Parameter<T, D>*> per_row;
        bool statistics_ok = true;
        for_each_module(backbone_, [&](auto& m) {
            using Mod = std::remove_cvref_t<decltype(m)>;
            if constexpr (requires { m.visit_mixed([](Parameter<T, D>&) {}); })
                m.visit_mixed([&](Parameter<T, D>& p) { per_row.push_back(&p); });
            // Running statistics must be split by task too (Mod::mixed_statistics: BatchNorm2d on the CPU).
            if constexpr (requires {
                              m.running_mean;
                              m.running_var;
                          }) {
                if constexpr (!requires { requires Mod::mixed_statistics; }) statistics_ok = false;
            }
        });
        if (!statistics_ok) return false;
        for (const auto* slot : banks_.slots())
            if (std::find(per_row.begin(), per_row.end(), slot) == per_row.end()) return false;
        return true;
    }
    /// How the last forward(x, task_ids) was computed (MixedPass::none after a single-task forward).
    [[nodiscard]] MixedPass last_mixed_pass() const noexcept { return last_pass_; }

    // -- Module interface ------------------------------------------------------

    [[nodiscard]] std::size_t out_features() const { return heads_[std::size_t(active_)].out_features(); }

    /// Forward of the active task.
    const Tensor<T, D>& forward(const Tensor<T, D>& x) { return forward(x, active_); }

    /// Forward of a batch whose rows all belong to `task`.
    const Tensor<T, D>& forward(const Tensor<T, D>& x, int task) {
        check_task(task);
        state_ = State::none;
        last_pass_ = MixedPass::none;
        const Tensor<T, D>* feat = nullptr;
        {
            Binding bind(banks_, task);
            feat = &backbone_.forward(x);
        }
        Head& h = heads_[std::size_t(task)];
        h.set_input_grad(true);
        const Tensor<T, D>& y = h.forward(*feat);
        state_ = State::single;
        last_task_ = task;
        return y;
    }

    /// Forward of a mixed batch: row i of x belongs to task task_ids[i].
    /// Equal row for row to the per-task passes; computed in one backbone pass
    /// when one_pass() and one_pass_supported(), else one pass per task present
    /// (last_mixed_pass() says which).
    const Tensor<T, D>& forward(const Tensor<T, D>& x, std::span<const int> task_ids) {
        state_ = State::none;
        last_pass_ = MixedPass::none;
        if (x.rank() < 1 || x.empty())
            throw ShapeError(detail::concat(detail::display_path(path_), ": multitask input must be a non-empty batch, got ",
                                            x.shape()));
        const std::size_t n = x.dim(0);
        if (task_ids.size() != n)
            throw ShapeError(detail::concat(detail::display_path(path_), ": ", task_ids.size(),
                                            " task ids for a batch of ", n, " rows ", x.shape(),
                                            " (one task id per row)"));
        for (std::size_t i = 0; i < n; ++i) check_task(task_ids[i], i);
        mask_ = detail::current_attention_mask();
        if (mask_.data != nullptr && mask_.batch != n)
            throw ShapeError(detail::concat(detail::display_path(path_), ": the attention mask is ", mask_.batch,
                                            " x ", mask_.tokens, ", the mixed batch has ", n, " rows ", x.shape()));
        x_shape_ = x.shape();
        if (one_pass_ && one_pass_supported()) return forward_one_pass(x, task_ids);
        return forward_grouped(x, task_ids);
    }

    /// Backward of the last forward (single-task or mixed).
    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        if (state_ == State::none)
            throw Error(detail::concat(detail::display_path(path_),
                                       ": backward needs a forward first (no forward since the model was built, or "
                                       "the last one failed)"));
        if (state_ == State::single) {
            Binding bind(banks_, last_task_);
            const Tensor<T, D>& dfeat = heads_[std::size_t(last_task_)].backward(dy);
            backbone_.set_input_grad(input_grad_);
            const Tensor<T, D>& dx = backbone_.backward(dfeat);
            return dx;
        }
        check_same_shape(dy, y_.shape(), path_, "multitask output gradient");
        if (state_ == State::one_pass) return backward_one_pass(dy);
        const std::size_t n = x_shape_[0];
        const std::size_t out_row = y_.size() / n, in_row = x_shape_.numel() / n;
        if (input_grad_) {
            dx_.resize(x_shape_);
            dx_.zero();
        }
        backbone_.set_input_grad(input_grad_);
        for (std::size_t gi = groups_used_; gi-- > 0;) {
            const Group& g = groups_[gi];
            gather(dy, g.rows, 0, g.rows.size(), out_row, group_dy_);
            Binding bind(banks_, g.task);
            // The layers hold the state of the last group's forward only; redo
            // this group's forward (its running statistics restored after).
            if (gi + 1 != groups_used_) {
                const auto& stats = banks_.statistics_slots();
                snapshot_.resize(stats.size());
                for (std::size_t i = 0; i < stats.size(); ++i) snapshot_[i] = *stats[i];
                std::optional<AttentionMask> group_mask;
                open_group_mask(gi, group_mask);
                backbone_.forward(group_x_[gi]);
                for (std::size_t i = 0; i < stats.size(); ++i) *stats[i] = snapshot_[i];
            }
            const Tensor<T, D>& dfeat = heads_[std::size_t(g.task)].backward(group_dy_);
            const Tensor<T, D>& dxg = backbone_.backward(dfeat);
            if (input_grad_) scatter(dxg, g.rows, 0, g.rows.size(), in_row, dx_);
        }
        if (!input_grad_) {
            dx_.clear();
        }
        return dx_;
    }

    /// Shared backbone parameters, then per task its bank, statistics and head.
    template <class F>
    void visit(F&& f) {
        visit_all([&](Parameter<T, D>& p, bool) { f(p); });
    }

    /// The backbone and the heads (for_each_module, set_training).
    template <class F>
    void visit_children(F&& f) {
        f(backbone_);
        for (auto& h : heads_) f(h);
    }

    /// What full fine-tuning of one task would train: the backbone's
    /// pre-trained parameters (once, not per slot) and one head's.
    [[nodiscard]] std::size_t pretrained_parameters() {
        std::size_t n = patchwork::pretrained_parameters(backbone_);
        n += patchwork::pretrained_parameters(heads_[std::size_t(active_)]);
        return n;
    }

    /// Re-draws the backbone and the heads; every bank restarts from the new backbone values.
    void reset_parameters(Rng& rng) {
        backbone_.reset_parameters(rng);
        banks_.restart();
        for (std::size_t k = 0; k < tasks(); ++k) heads_[k].reset_parameters(rng);
    }

    void set_path(const std::string& p) {
        path_ = p;
        backbone_.set_path(p);
        for (std::size_t k = 0; k < tasks(); ++k) name_task(k);
    }

private:
    enum class State { none, single, mixed, one_pass };
    static constexpr bool on_device = std::is_same_v<D, Cuda>;

    /// Batch row indices; on the device also an int32 copy in device memory
    /// (uploaded by sync(), queued without waiting) for the row kernels.
    struct RowList {
        std::vector<std::size_t> rows;
        std::vector<int> rows32;
        index_storage_t<D> device;
        [[nodiscard]] std::size_t size() const noexcept { return rows.size(); }
        [[nodiscard]] std::size_t operator[](std::size_t i) const noexcept { return rows[i]; }
        void sync() {
            if constexpr (on_device) {
                rows32.assign(rows.begin(), rows.end());
                device.upload(std::span<const int>(rows32), "multitask: row indices");
            }
        }
    };
    struct Group {
        int task = 0;
        RowList rows;
    };

    using Binding = typename TaskBanks<T, D>::Binding;

    /// While alive: `ctx_` is this thread's active mixed batch, and the slots
    /// read as trainable where a bank trains (TaskBanks::OnePassTrainable).
    class OnePass {
    public:
        explicit OnePass(MultiTask& m) : scope_(&m.ctx_), trainable_(m.banks_) {}

    private:
        MixedBatchScope<T, D> scope_;
        typename TaskBanks<T, D>::OnePassTrainable trainable_;
    };

    /// One backbone pass: rows sorted by task (a stable counting sort, so each
    /// task's rows keep their order and form one segment, tasks ascending),
    /// the backbone run once under the mixed batch, then each present task's
    /// head on its segment of the features, scattered back into row order.
    /// On the device the slots' banks are first stacked per task (one launch;
    /// see core/mixed_batch.hpp) and each patch runs its fused kernel once
    /// over all rows.
    const Tensor<T, D>& forward_one_pass(const Tensor<T, D>& x, std::span<const int> task_ids) {
        const std::size_t n = x.dim(0), K = tasks(), row = x.size() / n;
        std::vector<std::size_t> start(K + 1, 0);
        for (std::size_t i = 0; i < n; ++i) ++start[std::size_t(task_ids[i]) + 1];
        for (std::size_t k = 0; k < K; ++k) start[k + 1] += start[k];
        order_.rows.resize(n);
        {
            std::vector<std::size_t> next(start.begin(), start.end() - 1);
            for (std::size_t i = 0; i < n; ++i) order_.rows[next[std::size_t(task_ids[i])]++] = i;
        }
        order_.sync();
        bool sorted = true;
        for (std::size_t i = 0; i < n && sorted; ++i) sorted = order_[i] == i;

        ctx_.reset(n, K);
        for (std::size_t k = 0; k < K; ++k)
            if (start[k + 1] > start[k]) ctx_.add_segment(int(k), start[k], start[k + 1]);
        banks_.describe(ctx_);
        if constexpr (on_device) ctx_.stack_slots();

        if (!sorted) gather(x, order_, 0, n, row, xp_);
        const Tensor<T, D>* feat = nullptr;
        {
            // Sorted rows keep their attention-mask rows (when a mask is active).
            std::optional<AttentionMask> sorted_mask;
            if (!sorted && mask_.data != nullptr)
                sorted_mask.emplace(mask_rows(order_.rows, mask_p_), n, mask_.tokens);
            OnePass pass(*this);
            feat = &backbone_.forward(sorted ? x : xp_);
        }
        feat_shape_ = feat->shape();
        const auto segments = ctx_.segments();
        if (group_feat_.size() < segments.size()) group_feat_.resize(segments.size());
        const std::size_t feat_row = feat->size() / n;
        for (std::size_t si = 0; si < segments.size(); ++si) {
            const MixedSegment& seg = segments[si];
            Shape fs = feat_shape_;
            fs[0] = seg.size();
            group_feat_[si].resize(fs);
            copy_rows(*feat, seg.begin, group_feat_[si], 0, seg.size(), feat_row);
            Head& h = heads_[std::size_t(seg.task)];
            h.set_input_grad(true);
            const Tensor<T, D>& yg = h.forward(group_feat_[si]);
            if (si == 0) {
                Shape ys = yg.shape();
                ys[0] = n;
                y_.resize(ys);
            } else if (yg.size() / seg.size() != y_.size() / n) {
                throw_head_width(seg.task, yg.shape(), seg.size(), segments[0].task);
            }
            scatter(yg, order_, seg.begin, seg.size(), y_.size() / n, y_);
        }
        state_ = State::one_pass;
        last_pass_ = MixedPass::one_pass;
        return y_;
    }

    /// Backward of a one-pass forward: each head's backward on its segment's
    /// rows of dy gives its segment of dL/dfeatures; one backbone backward
    /// under the same mixed batch then accumulates every row's contribution
    /// into its task's banks and the shared gradients (on the device: into
    /// the stacked gradients, then each task's slice into its bank in one
    /// launch); dx is scattered back into row order. (Derivation: the
    /// one-pass forward computes, row for row, what the per-task passes
    /// compute, so L = sum_k L_k(rows of task k) and each module's per-segment
    /// backward is the per-task backward of that segment; see the comment at
    /// the top of this file.)
    const Tensor<T, D>& backward_one_pass(const Tensor<T, D>& dy) {
        const std::size_t n = x_shape_[0], out_row = y_.size() / n, feat_row = feat_shape_.numel() / n;
        dfeat_.resize(feat_shape_);
        for (const MixedSegment& seg : ctx_.segments()) {
            gather(dy, order_, seg.begin, seg.size(), out_row, group_dy_);
            const Tensor<T, D>& dfg = heads_[std::size_t(seg.task)].backward(group_dy_);
            copy_rows(dfg, 0, dfeat_, seg.begin, seg.size(), feat_row);
        }
        backbone_.set_input_grad(input_grad_);
        const Tensor<T, D>* dxp = nullptr;
        {
            OnePass pass(*this);
            dxp = &backbone_.backward(dfeat_);
            if constexpr (on_device) ctx_.finish_backward();
        }
        if (!input_grad_) {
            dx_.clear();
            return dx_;
        }
        dx_.resize(x_shape_);
        scatter(*dxp, order_, 0, n, x_shape_.numel() / n, dx_);
        return dx_;
    }

    /// Rows grouped by task: one backbone pass per task present.
    const Tensor<T, D>& forward_grouped(const Tensor<T, D>& x, std::span<const int> task_ids) {
        const std::size_t n = x.dim(0);
        std::size_t used = 0;
        for (std::size_t k = 0; k < tasks(); ++k) {
            std::size_t count = 0;
            for (std::size_t i = 0; i < n; ++i) count += task_ids[i] == int(k);
            if (count == 0) continue;
            if (used == groups_.size()) groups_.emplace_back();
            Group& g = groups_[used++];
            g.task = int(k);
            g.rows.rows.clear();
            for (std::size_t i = 0; i < n; ++i)
                if (task_ids[i] == int(k)) g.rows.rows.push_back(i);
            g.rows.sync();
        }
        groups_used_ = used;
        if (group_x_.size() < used) {
            group_x_.resize(used);
            group_feat_.resize(used);
        }
        const std::size_t row = x.size() / n;
        for (std::size_t gi = 0; gi < used; ++gi) {
            const Group& g = groups_[gi];
            gather(x, g.rows, 0, g.rows.size(), row, group_x_[gi]);
            if (mask_.data != nullptr) {
                if (group_mask_.size() <= gi) group_mask_.resize(gi + 1);
                mask_rows(g.rows.rows, group_mask_[gi]);
            }
            {
                std::optional<AttentionMask> group_mask;
                open_group_mask(gi, group_mask);
                Binding bind(banks_, g.task);
                group_feat_[gi] = backbone_.forward(group_x_[gi]);
            }
            Head& h = heads_[std::size_t(g.task)];
            h.set_input_grad(true);
            const Tensor<T, D>& yg = h.forward(group_feat_[gi]);
            if (gi == 0) {
                Shape s = yg.shape();
                s[0] = n;
                y_.resize(s);
            } else if (yg.size() / g.rows.size() != y_.size() / n) {
                throw_head_width(g.task, yg.shape(), g.rows.size(), groups_[0].task);
            }
            scatter(yg, g.rows, 0, g.rows.size(), y_.size() / n, y_);
        }
        state_ = State::mixed;
        last_pass_ = MixedPass::grouped;
        return y_;
    }

    /// The attention-mask rows of batch rows `rows`, in that order (into `buf`).
    std::span<const std::int32_t> mask_rows(const std::vector<std::size_t>& rows, std::vector<std::int32_t>& buf) const {
        const std::size_t t = mask_.tokens;
        buf.resize(rows.size() * t);
        for (std::size_t r = 0; r < rows.size(); ++r) std::copy_n(mask_.data + rows[r] * t, t, buf.data() + r * t);
        return buf;
    }

    /// When the mixed forward had an attention mask: makes `scope` the mask of
    /// group gi's rows (gathered by that forward) while it lives.
    void open_group_mask(std::size_t gi, std::optional<AttentionMask>& scope) const {
        if (mask_.data != nullptr) scope.emplace(group_mask_[gi], groups_[gi].rows.size(), mask_.tokens);
    }

    [[noreturn]] void throw_head_width(int task, const Shape& got, std::size_t rows, int first_task) const {
        throw ShapeError(detail::concat(detail::display_path(path_), ": a mixed batch needs heads of one "
                                        "output width; task ", task, " gives ", got, " for ", rows, " rows, task ",
                                        first_task, " rows of ", y_.size() / x_shape_[0], " values"));
    }

    template <class F>
    void visit_all(F&& f) {
        backbone_.visit([&](Parameter<T, D>& p) {
            if (!banks_.is_slot(&p)) f(p, false);
        });
        for (std::size_t k = 0; k < tasks(); ++k) {
            banks_.visit(k, f);
            heads_[k].visit([&](Parameter<T, D>& p) { f(p, false); });
        }
    }

    int add_bank_and_head(Head head, int init_from) {
        const int k = banks_.add(init_from);
        Head& h = heads_.emplace_back(std::move(head));
        h.visit([&](Parameter<T, D>& p) { p.set_task(k); });
        name_task(std::size_t(k));
        return k;
    }

    /// Names: bank "task<k>.<slot name>", statistics "task<k>.<bn path>.running_mean", head "task<k>.head".
    void name_task(std::size_t k) {
        const std::string prefix = "task" + std::to_string(k);
        const auto module_of = [&](const std::string& rel) {
            return child_path(rel.empty() ? prefix : prefix + "." + rel);
        };
        banks_.name(k, module_of);
        heads_[k].set_path(child_path(prefix + ".head"));
        heads_[k].visit([&](Parameter<T, D>& p) { p.set_task(int(k)); });
    }

    void check_task(int task, std::size_t row = std::size_t(-1)) const {
        if (task < 0 || std::size_t(task) >= tasks())
            throw ConfigError(detail::concat(detail::display_path(path_), ": task id ", task,
                                             row == std::size_t(-1) ? std::string() : detail::concat(" at row ", row),
                                             " is out of range; the model has ", tasks(), " tasks (0 to ",
                                             int(tasks()) - 1, ")"));
    }

    /// dst = rows idx[first], ..., idx[first + count - 1] of src (rows of `row` elements).
    static void gather(const Tensor<T, D>& src, const RowList& idx, std::size_t first, std::size_t count,
                       std::size_t row, Tensor<T, D>& dst) {
        Shape s = src.shape();
        s[0] = count;
        dst.resize(s);
        if constexpr (on_device) {
            cuda::gather_rows(src.data(), idx.device.data() + first, count, row, dst.data(), "multitask: gather");
        } else {
            for (std::size_t r = 0; r < count; ++r)
                std::copy_n(src.data() + idx[first + r] * row, row, dst.data() + r * row);
        }
    }
    /// Row idx[first + r] of dst = row r of src, for r < count.
    static void scatter(const Tensor<T, D>& src, const RowList& idx, std::size_t first, std::size_t count,
                        std::size_t row, Tensor<T, D>& dst) {
        if constexpr (on_device) {
            cuda::scatter_rows(src.data(), idx.device.data() + first, count, row, dst.data(), "multitask: scatter");
        } else {
            for (std::size_t r = 0; r < count; ++r)
                std::copy_n(src.data() + r * row, row, dst.data() + idx[first + r] * row);
        }
    }
    /// Rows [dst_first, dst_first + count) of dst = rows [src_first, ...) of src.
    static void copy_rows(const Tensor<T, D>& src, std::size_t src_first, Tensor<T, D>& dst, std::size_t dst_first,
                          std::size_t count, std::size_t row) {
        if constexpr (on_device)
            cuda::copy_elements(dst.data() + dst_first * row, src.data() + src_first * row, count * row,
                                cuda::CopyKind::device_to_device, "multitask: rows");
        else
            std::copy_n(src.data() + src_first * row, count * row, dst.data() + dst_first * row);
    }

    /// The backbone with its path cleared, so slot names are relative to it.
    static Backbone& unnamed(Backbone& b) {
        b.set_path("");
        return b;
    }

    Backbone backbone_;
    TaskBanks<T, D> banks_;
    // a deque: adding a task never moves existing heads (optimisers hold pointers).
    std::deque<Head> heads_;
    int active_ = 0;

    bool one_pass_ = true;
    State state_ = State::none;
    MixedPass last_pass_ = MixedPass::none;
    int last_task_ = 0;
    std::vector<Group> groups_;  ///< the first groups_used_ are the last grouped forward's (storage reused)
    std::size_t groups_used_ = 0;
    std::vector<Tensor<T, D>> group_x_, group_feat_, snapshot_;
    Tensor<T, D> group_dy_, y_, dx_;
    Shape x_shape_;
    // One-pass state: the mixed batch (segments, slot and statistic banks),
    // the row order (sorted row i is input row order_[i]) and buffers.
    MixedBatch<T, D> ctx_;
    RowList order_;
    // The attention mask (layers/attention.hpp) active at the last mixed
    // forward, and its rows in the order the backbone saw them.
    detail::MaskView mask_;
    std::vector<std::int32_t> mask_p_;
    std::vector<std::vector<std::int32_t>> group_mask_;
    Tensor<T, D> xp_, dfeat_;
    Shape feat_shape_;
};

}  // namespace patchwork
