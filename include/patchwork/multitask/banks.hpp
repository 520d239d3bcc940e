#pragma once
// TaskBanks<T>: the per-task parameter banks of a multi-task model
// (multitask/multitask.hpp).
//
// A selector picks, once, which backbone parameters are per task; those
// become *slots*. For each task k the banks keep a real Parameter per slot,
// named "task<k>.<slot name>" and owned by task k (Parameter::task() == k),
// and, when asked, the running statistics of every BatchNorm2d (frozen bank
// parameters "task<k>.<bn path>.running_mean" / ".running_var").
//
// bind(k) swaps bank k's tensors into the slots (std::swap of value and
// grad, O(1) per parameter, no copy) so the backbone computes task k; the
// Binding guard swaps them back. Outside a binding the slots hold the
// pre-trained values and no gradient. For the one-pass mixed batch,
// describe(ctx) lists every slot's and statistic's per-task banks in a
// MixedBatch (core/mixed_batch.hpp), and OnePassTrainable makes each slot read
// as trainable while any task's bank of it trains.
//
// Banks live in deques, so adding a task never moves existing parameters
// (optimisers hold pointers).
#include <algorithm>
#include <cstddef>
#include <deque>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "patchwork/core/mixed_batch.hpp"
#include "patchwork/core/module.hpp"
#include "patchwork/core/parameter.hpp"
#include "patchwork/core/tensor.hpp"

namespace patchwork {

/// Selects the backbone parameters that are per task.
template <class T, class D = Cpu>
using TaskSelector = std::function<bool(const Parameter<T, D>&)>;

/// Per task: every parameter that is trainable when the model is built (what
/// the backbone's policies train).
struct PerTaskTrainable {
    template <class T, class D>
    bool operator()(const Parameter<T, D>& p) const noexcept {
        return p.trainable();
    }
};

/// Per task: every parameter whose role is in `roles` (bit r for Role r, see role_bit).
struct PerTaskRoles {
    unsigned roles = 0;
    template <class T, class D>
    bool operator()(const Parameter<T, D>& p) const noexcept {
        return (roles & role_bit(p.role())) != 0;
    }
};

template <class T, class D = Cpu>
class TaskBanks {
public:
    /// Collects the slots of `backbone` (parameters `per_task` selects) and,
    /// with `per_task_statistics`, the running statistics of its BatchNorm2d
    /// layers. The slots are frozen: only the banks train.
    template <class Backbone, class Selector>
    TaskBanks(Backbone& backbone, Selector& per_task, bool per_task_statistics) {
        backbone.visit([&](Parameter<T, D>& p) {
            if (!per_task(std::as_const(p))) return;
            slots_.push_back(&p);
            slot_trainable_.push_back(p.trainable());
            slot_rel_.push_back(p.name());
            pretrained_.push_back(p.value);
        });
        if (per_task_statistics) {
            for_each_module(backbone, [&](auto& m) {
                if constexpr (requires {
                                  m.running_mean;
                                  m.running_var;
                                  m.fold();
                              }) {
                    if constexpr (std::is_same_v<std::remove_cvref_t<decltype(m.running_mean)>, Tensor<T, D>>) {
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
    }

    TaskBanks(const TaskBanks&) = delete;
    TaskBanks& operator=(const TaskBanks&) = delete;

    [[nodiscard]] std::size_t tasks() const noexcept { return banks_.size(); }
    [[nodiscard]] std::size_t slot_count() const noexcept { return slots_.size(); }
    /// Scalars of one task's bank (its slots, not its statistics).
    [[nodiscard]] std::size_t patch_size() const noexcept {
        std::size_t n = 0;
        for (const auto& v : pretrained_) n += v.size();
        return n;
    }
    [[nodiscard]] const std::vector<Parameter<T, D>*>& slots() const noexcept { return slots_; }
    [[nodiscard]] bool is_slot(const Parameter<T, D>* p) const {
        return std::find(slots_.begin(), slots_.end(), p) != slots_.end();
    }
    /// The running-statistics tensors of the backbone (running_mean, running_var per BatchNorm2d).
    [[nodiscard]] const std::vector<Tensor<T, D>*>& statistics_slots() const noexcept { return stats_; }
    [[nodiscard]] std::deque<Parameter<T, D>>& bank(std::size_t k) noexcept { return banks_[k]; }
    [[nodiscard]] std::deque<Parameter<T, D>>& statistics(std::size_t k) noexcept { return bank_stats_[k]; }

    /// Adds task k = tasks(): its bank and statistics start from the
    /// pre-trained values, or from task `init_from`'s (init_from >= 0).
    /// Returns k.
    int add(int init_from) {
        const int k = int(tasks());
        auto& bank = banks_.emplace_back();
        for (std::size_t i = 0; i < slots_.size(); ++i) {
            Parameter<T, D>& p = bank.emplace_back(slots_[i]->leaf(), slots_[i]->role(), slots_[i]->value.shape(),
                                                slot_trainable_[i], k);
            p.value = init_from < 0 ? pretrained_[i] : banks_[std::size_t(init_from)][i].value;
        }
        auto& st = bank_stats_.emplace_back();
        for (std::size_t i = 0; i < stats_.size(); ++i) {
            const std::string& rel = stat_rel_[i];
            const auto dot = rel.rfind('.');
            Parameter<T, D>& p = st.emplace_back(dot == std::string::npos ? rel : rel.substr(dot + 1), Role::norm_shift,
                                              stats_[i]->shape(), false, k);
            p.value = init_from < 0 ? pretrained_stats_[i] : bank_stats_[std::size_t(init_from)][i].value;
        }
        return k;
    }

    /// Names task k's bank parameters: `module_of(rel)` gives the module path
    /// for the path `rel` of the module holding a slot or statistic, relative
    /// to the backbone ("" for the backbone itself).
    template <class ModuleOf>
    void name(std::size_t k, ModuleOf&& module_of) {
        // A leaf may hold dots itself ("down.bias" of an adapter): strip the leaf, not the last component.
        const auto module_rel = [](const std::string& rel, const std::string& leaf) {
            return rel.size() > leaf.size() ? rel.substr(0, rel.size() - leaf.size() - 1) : std::string();
        };
        for (std::size_t i = 0; i < slots_.size(); ++i)
            banks_[k][i].set_prefix(module_of(module_rel(slot_rel_[i], banks_[k][i].leaf())));
        for (std::size_t i = 0; i < stats_.size(); ++i)
            bank_stats_[k][i].set_prefix(module_of(module_rel(stat_rel_[i], bank_stats_[k][i].leaf())));
    }

    /// f(p, is_statistic) for every bank parameter of task k.
    template <class F>
    void visit(std::size_t k, F&& f) {
        for (auto& p : banks_[k]) f(p, false);
        for (auto& p : bank_stats_[k]) f(p, true);
    }

    /// After the backbone was re-drawn: its new values become the pre-trained
    /// ones and every bank restarts from them.
    void restart() {
        for (std::size_t i = 0; i < slots_.size(); ++i) pretrained_[i] = slots_[i]->value;
        for (std::size_t i = 0; i < stats_.size(); ++i) pretrained_stats_[i] = *stats_[i];
        for (std::size_t k = 0; k < tasks(); ++k) {
            for (std::size_t i = 0; i < slots_.size(); ++i) banks_[k][i].value = pretrained_[i];
            for (std::size_t i = 0; i < stats_.size(); ++i) bank_stats_[k][i].value = pretrained_stats_[i];
        }
    }

    /// Swaps bank k into the slots (bind) or back out.
    void swap(std::size_t k, bool bind) noexcept {
        auto& bank = banks_[k];
        for (std::size_t i = 0; i < slots_.size(); ++i) {
            Parameter<T, D>& s = *slots_[i];
            Parameter<T, D>& b = bank[i];
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

    /// Bank k swapped into the slots for its lifetime (and back out).
    class Binding {
    public:
        Binding(TaskBanks& b, int task) : b_(b), k_(std::size_t(task)) { b_.swap(k_, true); }
        ~Binding() { b_.swap(k_, false); }
        Binding(const Binding&) = delete;
        Binding& operator=(const Binding&) = delete;

    private:
        TaskBanks& b_;
        std::size_t k_;
    };

    /// Lists every slot's and statistic's per-task banks in `ctx` (after its reset).
    void describe(MixedBatch<T, D>& ctx) {
        const std::size_t K = tasks();
        std::vector<Parameter<T, D>*> bank_of(K);
        for (std::size_t i = 0; i < slots_.size(); ++i) {
            for (std::size_t k = 0; k < K; ++k) bank_of[k] = &banks_[k][i];
            ctx.add_slot(slots_[i], bank_of);
        }
        std::vector<Tensor<T, D>*> stat_of(K);
        for (std::size_t i = 0; i < stats_.size(); ++i) {
            for (std::size_t k = 0; k < K; ++k) stat_of[k] = &bank_stats_[k][i].value;
            ctx.add_statistic(stats_[i], stat_of);
        }
    }

    /// While alive, each slot reads as trainable when any task's bank of it is
    /// (so that modules which skip a backward when nothing below them trains
    /// still run it); the slots keep their pre-trained values and receive no
    /// gradient, so they get no gradient buffer (the modules route per-row
    /// work to the banks).
    class OnePassTrainable {
    public:
        explicit OnePassTrainable(TaskBanks& b) : b_(b) {
            for (std::size_t i = 0; i < b_.slots_.size(); ++i) {
                bool any = false;
                for (auto& bank : b_.banks_) any = any || bank[i].trainable();
                if (any) b_.slots_[i]->set_routed_trainable(true);
            }
        }
        ~OnePassTrainable() {
            for (auto* s : b_.slots_) s->set_routed_trainable(false);
        }
        OnePassTrainable(const OnePassTrainable&) = delete;
        OnePassTrainable& operator=(const OnePassTrainable&) = delete;

    private:
        TaskBanks& b_;
    };

private:
    std::vector<Parameter<T, D>*> slots_;
    std::vector<bool> slot_trainable_;
    std::vector<std::string> slot_rel_;     ///< slot names relative to the backbone
    std::vector<Tensor<T, D>> pretrained_;  ///< slot values at construction
    std::vector<Tensor<T, D>*> stats_;      ///< running_mean, running_var of each BatchNorm2d
    std::vector<std::string> stat_rel_;
    std::vector<Tensor<T, D>> pretrained_stats_;
    std::deque<std::deque<Parameter<T, D>>> banks_;
    std::deque<std::deque<Parameter<T, D>>> bank_stats_;
};

}  // namespace patchwork
