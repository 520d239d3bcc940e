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
// backbone, and swaps back. Outside a forward/backward the slots hold the
// pre-trained values and no gradient. visit() shows the shared backbone
// parameters, then per task its bank and its head, never the slots, so
// optimisers, parameter_report and the safetensors functions (save_base,
// save_patch(model, path, k)) see exactly what is stored.
//
// Gradients. For a single-task batch the model is head_k(backbone(x; theta,
// bank_k)); binding makes the slot *be* bank k's tensors, so the backbone's
// own backward accumulates dL/dbank_k into bank k's grad and dL/dtheta into
// the shared gradients, unchanged. For a mixed batch with rows grouped by task
// (G_k = rows of task k), L = sum_k L_k(rows G_k) and, since the rows of
// different groups never interact (a row's output depends only on its own
// input, its task's bank and the shared weights; BatchNorm2d in training mode
// takes its statistics over the group, exactly as the per-task pass would),
//   dL/dtheta = sum_k dL_k/dtheta,   dL/dbank_k = dL_k/dbank_k,
//   dL/dx[G_k] = dL_k/dx[G_k],
// which is what per-group backward passes accumulate.
//
// Mixed batches are computed by grouping rows by task (gather, one forward
// per task present, scatter), not in one fused pass. Layers keep only the
// state of their last forward, so the backward of a mixed batch re-runs the
// backbone forward of every group but the last one (restoring BatchNorm
// running statistics afterwards, so they move once per forward as in the
// per-task passes): a mixed step costs one extra backbone forward per group.
//
// The model is neither copyable nor movable (slots are pointers into the
// backbone); construct it in place.
#include <algorithm>
#include <cstddef>
#include <deque>
#include <functional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/module.hpp"
#include "patchwork/core/parameter.hpp"
#include "patchwork/core/tensor.hpp"

namespace patchwork {

/// Selects the backbone parameters that are per task.
template <class T>
using TaskSelector = std::function<bool(const Parameter<T>&)>;

/// Per task: every parameter that is trainable when the model is built (what
/// the backbone's policies train).
struct PerTaskTrainable {
    template <class T>
    bool operator()(const Parameter<T>& p) const noexcept {
        return p.trainable();
    }
};

/// Per task: every parameter whose role is in `roles` (bit r for Role r, see role_bit).
struct PerTaskRoles {
    unsigned roles = 0;
    template <class T>
    bool operator()(const Parameter<T>& p) const noexcept {
        return (roles & role_bit(p.role())) != 0;
    }
};

/// Options of a MultiTask model.
struct MultiTaskOptions {
    /// Keep BatchNorm2d running statistics per task (the statistics are part of a task's patch).
    bool per_task_statistics = true;
};

template <Module Backbone, Module Head>
class MultiTask : public ModuleBase {
public:
    using Scalar = typename Backbone::Scalar;
    using T = Scalar;
    static_assert(std::is_same_v<typename Head::Scalar, Scalar>,
                  "patchwork::MultiTask: the backbone and the heads must use the same scalar type");
    static constexpr const char* kind() { return "multitask"; }
    static constexpr unsigned roles = Backbone::roles | Head::roles;
    static constexpr bool fixed_width = Head::fixed_width;

    /// One task per head. Bank k starts as a copy of the backbone's values.
    template <class Selector = PerTaskTrainable>
    MultiTask(Backbone backbone, std::vector<Head> heads, Selector per_task = {}, MultiTaskOptions options = {})
        : backbone_(std::move(backbone)) {
        if (heads.empty()) throw ConfigError("multitask: at least one task (one head) is needed");
        backbone_.set_path("");
        backbone_.visit([&](Parameter<T>& p) {
            if (!per_task(std::as_const(p))) return;
            slots_.push_back(&p);
            slot_trainable_.push_back(p.trainable());
            slot_rel_.push_back(p.name());
            pretrained_.push_back(p.value);
        });
        if (options.per_task_statistics) {
            for_each_module(backbone_, [&](auto& m) {
                if constexpr (requires {
                                  m.running_mean;
                                  m.running_var;
                                  m.fold();
                              }) {
                    if constexpr (std::is_same_v<std::remove_cvref_t<decltype(m.running_mean)>, Tensor<T>>) {
                        stats_.push_back(&m.running_mean);
                        stats_.push_back(&m.running_var);
                        stat_rel_.push_back(m.path().empty() ? std::string("running_mean")
                                                             : m.path() + ".running_mean");
                        stat_rel_.push_back(m.path().empty() ? std::string("running_var")
                                                             : m.path() + ".running_var");
                        pretrained_stats_.push_back(m.running_mean);
                        pretrained_stats_.push_back(m.running_var);
                    }
                }
            });
        }
        for (auto* s : slots_) s->set_trainable(false);
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
        visit_all([&](Parameter<T>& p, bool statistic) { p.set_trainable(!statistic && p.task() == task); });
    }

    [[nodiscard]] Backbone& backbone() noexcept { return backbone_; }
    [[nodiscard]] Head& head(int task) {
        check_task(task);
        return heads_[std::size_t(task)];
    }
    /// Bank parameters of `task` (per-task backbone parameters, in slot order).
    [[nodiscard]] std::deque<Parameter<T>>& bank(int task) {
        check_task(task);
        return banks_[std::size_t(task)];
    }
    /// The per-task BatchNorm statistics of `task` (running_mean, running_var per BatchNorm2d).
    [[nodiscard]] std::deque<Parameter<T>>& statistics(int task) {
        check_task(task);
        return bank_stats_[std::size_t(task)];
    }
    /// Number of per-task backbone parameters (slots) and of their scalars.
    [[nodiscard]] std::size_t slot_count() const noexcept { return slots_.size(); }
    [[nodiscard]] std::size_t patch_size() const noexcept {
        std::size_t n = 0;
        for (const auto& v : pretrained_) n += v.size();
        return n;
    }

    // -- Module interface ------------------------------------------------------

    [[nodiscard]] std::size_t out_features() const { return heads_[std::size_t(active_)].out_features(); }

    /// Forward of the active task.
    const Tensor<T>& forward(const Tensor<T>& x) { return forward(x, active_); }

    /// Forward of a batch whose rows all belong to `task`.
    const Tensor<T>& forward(const Tensor<T>& x, int task) {
        check_task(task);
        state_ = State::none;
        const Tensor<T>* feat = nullptr;
        {
            Binding bind(*this, task);
            feat = &backbone_.forward(x);
        }
        Head& h = heads_[std::size_t(task)];
        h.set_input_grad(true);
        const Tensor<T>& y = h.forward(*feat);
        state_ = State::single;
        last_task_ = task;
        return y;
    }

    /// Forward of a mixed batch: row i of x belongs to task task_ids[i].
    /// Equal row for row to the per-task passes (computed by grouping rows by task).
    const Tensor<T>& forward(const Tensor<T>& x, std::span<const int> task_ids) {
        state_ = State::none;
        if (x.rank() < 1 || x.empty())
            throw ShapeError(detail::concat(detail::display_path(path_), ": multitask input must be a non-empty batch, got ",
                                            x.shape()));
        const std::size_t n = x.dim(0);
        if (task_ids.size() != n)
            throw ShapeError(detail::concat(detail::display_path(path_), ": ", task_ids.size(),
                                            " task ids for a batch of ", n, " rows ", x.shape(),
                                            " (one task id per row)"));
        for (std::size_t i = 0; i < n; ++i) check_task(task_ids[i], i);

        groups_.clear();
        for (std::size_t k = 0; k < tasks(); ++k) {
            Group g;
            g.task = int(k);
            for (std::size_t i = 0; i < n; ++i)
                if (task_ids[i] == int(k)) g.rows.push_back(i);
            if (!g.rows.empty()) groups_.push_back(std::move(g));
        }
        if (group_x_.size() < groups_.size()) {
            group_x_.resize(groups_.size());
            group_feat_.resize(groups_.size());
        }
        x_shape_ = x.shape();
        const std::size_t row = x.size() / n;
        for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
            const Group& g = groups_[gi];
            gather(x, g.rows, row, group_x_[gi]);
            {
                Binding bind(*this, g.task);
                group_feat_[gi] = backbone_.forward(group_x_[gi]);
            }
            Head& h = heads_[std::size_t(g.task)];
            h.set_input_grad(true);
            const Tensor<T>& yg = h.forward(group_feat_[gi]);
            if (gi == 0) {
                Shape s = yg.shape();
                s[0] = n;
                y_.resize(s);
            } else if (yg.size() / g.rows.size() != y_.size() / n) {
                throw ShapeError(detail::concat(detail::display_path(path_), ": a mixed batch needs heads of one "
                                                "output width; task ", g.task, " gives ", yg.shape(), " for ",
                                                g.rows.size(), " rows, task ", groups_[0].task, " rows of ",
                                                y_.size() / n, " values"));
            }
            scatter(yg, g.rows, y_.size() / n, y_);
        }
        state_ = State::mixed;
        return y_;
    }

    /// Backward of the last forward (single-task or mixed).
    const Tensor<T>& backward(const Tensor<T>& dy) {
        if (state_ == State::none)
            throw Error(detail::concat(detail::display_path(path_),
                                       ": backward needs a forward first (no forward since the model was built, or "
                                       "the last one failed)"));
        if (state_ == State::single) {
            Binding bind(*this, last_task_);
            const Tensor<T>& dfeat = heads_[std::size_t(last_task_)].backward(dy);
            backbone_.set_input_grad(input_grad_);
            const Tensor<T>& dx = backbone_.backward(dfeat);
            return dx;
        }
        check_same_shape(dy, y_.shape(), path_, "multitask output gradient");
        const std::size_t n = x_shape_[0];
        const std::size_t out_row = y_.size() / n, in_row = x_shape_.numel() / n;
        if (input_grad_) {
            dx_.resize(x_shape_);
            dx_.zero();
        }
        backbone_.set_input_grad(input_grad_);
        for (std::size_t gi = groups_.size(); gi-- > 0;) {
            const Group& g = groups_[gi];
            gather(dy, g.rows, out_row, group_dy_);
            Binding bind(*this, g.task);
            // The layers hold the state of the last group's forward only; redo
            // this group's forward (its running statistics restored after).
            if (gi + 1 != groups_.size()) {
                snapshot_.resize(stats_.size());
                for (std::size_t i = 0; i < stats_.size(); ++i) snapshot_[i] = *stats_[i];
                backbone_.forward(group_x_[gi]);
                for (std::size_t i = 0; i < stats_.size(); ++i) *stats_[i] = snapshot_[i];
            }
            const Tensor<T>& dfeat = heads_[std::size_t(g.task)].backward(group_dy_);
            const Tensor<T>& dxg = backbone_.backward(dfeat);
            if (input_grad_) scatter(dxg, g.rows, in_row, dx_);
        }
        if (!input_grad_) {
            dx_.clear();
        }
        return dx_;
    }

    /// Shared backbone parameters, then per task its bank, statistics and head.
    template <class F>
    void visit(F&& f) {
        visit_all([&](Parameter<T>& p, bool) { f(p); });
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
        for (std::size_t i = 0; i < slots_.size(); ++i) pretrained_[i] = slots_[i]->value;
        for (std::size_t i = 0; i < stats_.size(); ++i) pretrained_stats_[i] = *stats_[i];
        for (std::size_t k = 0; k < tasks(); ++k) {
            for (std::size_t i = 0; i < slots_.size(); ++i) banks_[k][i].value = pretrained_[i];
            for (std::size_t i = 0; i < stats_.size(); ++i) bank_stats_[k][i].value = pretrained_stats_[i];
            heads_[k].reset_parameters(rng);
        }
    }

    void set_path(const std::string& p) {
        path_ = p;
        backbone_.set_path(p);
        for (std::size_t k = 0; k < tasks(); ++k) name_task(k);
    }

private:
    enum class State { none, single, mixed };
    struct Group {
        int task = 0;
        std::vector<std::size_t> rows;
    };

    /// Swaps bank `task` into the slots for its lifetime (and back out).
    class Binding {
    public:
        Binding(MultiTask& m, int task) : m_(m), k_(std::size_t(task)) { m_.swap_bank(k_, true); }
        ~Binding() { m_.swap_bank(k_, false); }
        Binding(const Binding&) = delete;
        Binding& operator=(const Binding&) = delete;

    private:
        MultiTask& m_;
        std::size_t k_;
    };

    void swap_bank(std::size_t k, bool bind) noexcept {
        auto& bank = banks_[k];
        for (std::size_t i = 0; i < slots_.size(); ++i) {
            Parameter<T>& s = *slots_[i];
            Parameter<T>& b = bank[i];
            std::swap(s.value, b.value);
            std::swap(s.grad, b.grad);
            // While bound the slot trains exactly when the bank does; the
            // gradient buffer it would allocate is already there (swapped in).
            if (bind) s.set_trainable(b.trainable());
            else s.set_trainable(false);
        }
        auto& st = bank_stats_[k];
        for (std::size_t i = 0; i < stats_.size(); ++i) std::swap(*stats_[i], st[i].value);
    }

    template <class F>
    void visit_all(F&& f) {
        backbone_.visit([&](Parameter<T>& p) {
            if (std::find(slots_.begin(), slots_.end(), &p) == slots_.end()) f(p, false);
        });
        for (std::size_t k = 0; k < tasks(); ++k) {
            for (auto& p : banks_[k]) f(p, false);
            for (auto& p : bank_stats_[k]) f(p, true);
            heads_[k].visit([&](Parameter<T>& p) { f(p, false); });
        }
    }

    int add_bank_and_head(Head head, int init_from) {
        const int k = int(tasks());
        auto& bank = banks_.emplace_back();
        for (std::size_t i = 0; i < slots_.size(); ++i) {
            Parameter<T>& p = bank.emplace_back(slots_[i]->leaf(), slots_[i]->role(), slots_[i]->value.shape(),
                                                slot_trainable_[i], k);
            p.value = init_from < 0 ? pretrained_[i] : banks_[std::size_t(init_from)][i].value;
        }
        auto& st = bank_stats_.emplace_back();
        for (std::size_t i = 0; i < stats_.size(); ++i) {
            const std::string& rel = stat_rel_[i];
            const auto dot = rel.rfind('.');
            Parameter<T>& p = st.emplace_back(dot == std::string::npos ? rel : rel.substr(dot + 1), Role::norm_shift,
                                              stats_[i]->shape(), false, k);
            p.value = init_from < 0 ? pretrained_stats_[i] : bank_stats_[std::size_t(init_from)][i].value;
        }
        Head& h = heads_.emplace_back(std::move(head));
        h.visit([&](Parameter<T>& p) { p.set_task(k); });
        name_task(std::size_t(k));
        return k;
    }

    /// Names: bank "task<k>.<slot name>", statistics "task<k>.<bn path>.running_mean", head "task<k>.head".
    void name_task(std::size_t k) {
        const std::string prefix = "task" + std::to_string(k);
        const auto module_of = [&](const std::string& rel) {
            const auto dot = rel.rfind('.');
            return child_path(dot == std::string::npos ? prefix : prefix + "." + rel.substr(0, dot));
        };
        for (std::size_t i = 0; i < slots_.size(); ++i) banks_[k][i].set_prefix(module_of(slot_rel_[i]));
        for (std::size_t i = 0; i < stats_.size(); ++i) bank_stats_[k][i].set_prefix(module_of(stat_rel_[i]));
        heads_[k].set_path(child_path(prefix + ".head"));
        heads_[k].visit([&](Parameter<T>& p) { p.set_task(int(k)); });
    }

    void check_task(int task, std::size_t row = std::size_t(-1)) const {
        if (task < 0 || std::size_t(task) >= tasks())
            throw ConfigError(detail::concat(detail::display_path(path_), ": task id ", task,
                                             row == std::size_t(-1) ? std::string() : detail::concat(" at row ", row),
                                             " is out of range; the model has ", tasks(), " tasks (0 to ",
                                             int(tasks()) - 1, ")"));
    }

    static void gather(const Tensor<T>& src, const std::vector<std::size_t>& rows, std::size_t row,
                       Tensor<T>& dst) {
        Shape s = src.shape();
        s[0] = rows.size();
        dst.resize(s);
        for (std::size_t r = 0; r < rows.size(); ++r)
            std::copy_n(src.data() + rows[r] * row, row, dst.data() + r * row);
    }
    static void scatter(const Tensor<T>& src, const std::vector<std::size_t>& rows, std::size_t row,
                        Tensor<T>& dst) {
        for (std::size_t r = 0; r < rows.size(); ++r)
            std::copy_n(src.data() + r * row, row, dst.data() + rows[r] * row);
    }

    Backbone backbone_;
    std::vector<Parameter<T>*> slots_;
    std::vector<bool> slot_trainable_;
    std::vector<std::string> slot_rel_;  ///< slot names relative to the backbone
    std::vector<Tensor<T>> pretrained_;  ///< slot values at construction
    std::vector<Tensor<T>*> stats_;      ///< running_mean, running_var of each BatchNorm2d
    std::vector<std::string> stat_rel_;
    std::vector<Tensor<T>> pretrained_stats_;
    // deques: adding a task never moves existing parameters (optimisers hold pointers).
    std::deque<std::deque<Parameter<T>>> banks_;
    std::deque<std::deque<Parameter<T>>> bank_stats_;
    std::deque<Head> heads_;
    int active_ = 0;

    State state_ = State::none;
    int last_task_ = 0;
    std::vector<Group> groups_;
    std::vector<Tensor<T>> group_x_, group_feat_, snapshot_;
    Tensor<T> group_dy_, y_, dx_;
    Shape x_shape_;
};

}  // namespace patchwork
