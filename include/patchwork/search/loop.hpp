#pragma once
// search::run: first-order DARTS over a model's Search<...> modules, with the
// parameter penalty (search/penalty.hpp), Gumbel temperature annealing, a
// gate log and early stopping. derive (search/derive.hpp) ends the search.
//
//   using Model = Cascade<Tune<A, Search<Frozen, Adapter<16>, FineTune>>, ...>;
//   Model model{...pre-trained stages...};
//   search::SearchOptions opts{.penalty = {.lambda = 0.5}};
//   auto result = search::run(model, weight_opt, train, val, step_fn, opts);
//   auto report = search::derive(model);        // argmax per module
//   std::cout << report;                       // table + the fixed C++ type
#include <algorithm>
#include <cctype>
#include <iostream>
#include <typeinfo>
#include <cmath>
#include <cstddef>
#include <fstream>
#include <functional>
#include <iomanip>
#include <limits>
#include <ostream>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "patchwork/core/module.hpp"
#include "patchwork/search/penalty.hpp"
#include "patchwork/train/batch.hpp"
#include "patchwork/train/clip.hpp"
#include "patchwork/train/optimizer.hpp"
#include "patchwork/train/step.hpp"

namespace patchwork::search {
/// One row of a search's gate log: every searched module's softmax(alpha).
struct GateSnapshot {
    std::size_t step = 0;
    std::vector<std::string> modules;
    std::vector<std::vector<std::string>> labels;
    std::vector<std::vector<double>> probabilities;
    std::vector<std::size_t> argmax;
};

template <class M>
[[nodiscard]] GateSnapshot snapshot(M& model, std::size_t step) {
    GateSnapshot s;
    s.step = step;
    for_each_searched(model, [&](auto& m) {
        using Mod = std::remove_cvref_t<decltype(m)>;
        if (m.derived()) return;
        s.modules.push_back(m.path());
        const auto l = Mod::candidate_labels();
        s.labels.emplace_back(l.begin(), l.end());
        s.probabilities.push_back(m.probabilities());
        const auto& p = s.probabilities.back();
        s.argmax.push_back(std::size_t(std::max_element(p.begin(), p.end()) - p.begin()));
    });
    return s;
}

/// Settings of the first-order DARTS loop.
struct SearchOptions {
    std::size_t epochs = 10;          ///< passes over the training source
    GateConfig gates{};               ///< gate mode (softmax / gumbel, hard)
    double tau_start = 1.0;           ///< Gumbel temperature at step 0 (gumbel mode)
    double tau_end = 0.1;             ///< ... annealed exponentially to this at the last step
    Penalty penalty{};                ///< parameter penalty
    AdamOptions alpha{.lr = 3e-4, .beta1 = 0.5, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 1e-3};
    double alpha_clip = 5.0;          ///< global-norm clip of the alpha gradient (0: none)
    std::size_t alpha_warmup = 0;     ///< weight steps before the first alpha step
    std::size_t alpha_every = 1;      ///< an alpha step every N weight steps
    std::size_t log_every = 10;       ///< gate snapshot every N steps (CSV and history)
    std::size_t early_stop = 0;       ///< stop once the argmax scheme was stable for N snapshots (0: never)
    std::string csv{};                ///< gate log path (empty: none)
    std::uint64_t seed = 1;           ///< Gumbel noise seed
    bool verbose = false;             ///< one line per snapshot on stderr

    void validate() const {
        gates.validate();
        penalty.validate();
        if (epochs == 0) throw ConfigError("search: epochs must be positive");
        if (alpha_every == 0) throw ConfigError("search: alpha_every must be positive");
        if (log_every == 0) throw ConfigError("search: log_every must be positive");
        if (!(tau_start > 0) || !(tau_end > 0))
            throw ConfigError(detail::concat("search: temperatures must be positive, got tau_start=", tau_start,
                                             " tau_end=", tau_end));
        if (!(alpha_clip >= 0)) throw ConfigError(detail::concat("search: alpha_clip must be >= 0, got ", alpha_clip));
    }
};

struct SearchResult {
    std::size_t steps = 0;              ///< weight steps taken
    std::size_t alpha_steps = 0;        ///< alpha steps taken
    bool stopped_early = false;
    double last_train_loss = 0, last_val_loss = 0, last_penalty = 0;
    std::vector<GateSnapshot> history;  ///< every logged snapshot
};

namespace detail_search {
/// `weight_opt.companion(inner)` when the weight optimiser offers one (a wrapper
/// applying itself to another optimiser), else `inner` itself.
template <class WeightOpt, class Inner>
decltype(auto) companion_optimizer(WeightOpt& weight_opt, Inner& inner) {
    if constexpr (requires { weight_opt.companion(inner); })
        return weight_opt.companion(inner);
    else
        return (inner);
}

inline void write_csv_header(std::ostream& os, const GateSnapshot& s) {
    os << "step";
    for (std::size_t m = 0; m < s.modules.size(); ++m)
        for (const auto& l : s.labels[m]) os << ',' << (s.modules[m].empty() ? "model" : s.modules[m]) << ':' << l;
    os << '\n';
}
inline void write_csv_row(std::ostream& os, const GateSnapshot& s) {
    os << s.step;
    for (const auto& p : s.probabilities)
        for (double v : p) os << ',' << std::setprecision(6) << v;
    os << '\n';
}
}  // namespace detail_search

/// First-order DARTS. Each step: (every alpha_every steps, after alpha_warmup)
/// an alpha step on the next validation batch (task loss + penalty, Adam on
/// alpha only, alpha-gradient clipping; its backward computes no weight
/// gradients, under GradientRoles(architecture_only)), then a weight step on the next
/// training batch with `weight_opt`. `step_fn(model, batch)` runs the forward,
/// the loss and the backward and returns the loss value; the loop zeroes
/// gradients, adds the penalty and steps the optimisers. The sources may hold
/// any batch type step_fn takes (Batch<T>, or token batches and labels).
template <class M, EpochSource Train, EpochSource Val, class StepFn, class WeightOpt>
SearchResult run(M& model, WeightOpt& weight_opt, Train& train, Val& val, StepFn&& step_fn,
                 const SearchOptions& opt) {
    opt.validate();
    if (count_searched(model) == 0) throw ConfigError("search::run: the model has no Search<...> module");
    if (train.batches() == 0) throw ConfigError("search::run: the training split has no batches");
    if (val.batches() == 0)
        throw ConfigError("search::run: the held-out split has no batches (it is too small for one batch)");
    auto alphas = architecture_parameters(model);
    BasicAdam<typename M::Scalar, device_of_t<M>> alpha_adam(alphas, opt.alpha);
    // A weight optimiser that wraps others (dist::DataParallel: gradients averaged
    // across processes) wraps the alpha optimiser the same way.
    auto&& alpha_opt = detail_search::companion_optimizer(weight_opt, alpha_adam);
    seed(model, opt.seed);

    std::ofstream csv;
    if (!opt.csv.empty()) {
        csv.open(opt.csv);
        if (!csv) throw IoError(detail::concat(opt.csv, ": cannot open the gate log for writing"));
    }
    SearchResult res;
    const std::size_t total = opt.epochs * train.batches();
    std::size_t val_epoch = 0, val_i = 0, stable = 0;
    std::vector<std::size_t> last_argmax;
    const auto log = [&](std::size_t step) {
        GateSnapshot s = snapshot(model, step);
        if (csv.is_open()) {
            if (res.history.empty()) detail_search::write_csv_header(csv, s);
            detail_search::write_csv_row(csv, s);
        }
        if (opt.verbose) {
            std::ostringstream line;
            line << "search step " << step << ": loss " << res.last_train_loss << " val " << res.last_val_loss
                 << " penalty " << res.last_penalty;
            std::cerr << line.str() << '\n';
        }
        stable = (s.argmax == last_argmax) ? stable + 1 : 0;
        last_argmax = s.argmax;
        res.history.push_back(std::move(s));
    };
    val.start_epoch(0);
    std::size_t step = 0;
    for (std::size_t epoch = 0; epoch < opt.epochs && !res.stopped_early; ++epoch) {
        train.start_epoch(epoch);
        for (std::size_t i = 0; i < train.batches(); ++i, ++step) {
            GateConfig g = opt.gates;
            if (g.mode == GateMode::gumbel) {
                const double t = total > 1 ? double(step) / double(total - 1) : 1.0;
                g.tau = opt.tau_start * std::pow(opt.tau_end / opt.tau_start, t);
            }
            set_gates(model, g);
            if (step >= opt.alpha_warmup && (step - opt.alpha_warmup) % opt.alpha_every == 0 && !alphas.empty()) {
                if (val_i == val.batches()) {
                    val.start_epoch(++val_epoch);
                    val_i = 0;
                }
                const auto& vb = val.batch(val_i++);
                optimizer_step(
                    model, alpha_opt,
                    [&] {
                        // Only alpha learns here: every weight-gradient computation is skipped.
                        const GradientRoles only_alpha(architecture_only);
                        res.last_val_loss = step_fn(model, vb);
                        res.last_penalty = penalty(model, opt.penalty, step);
                        return res.last_val_loss;
                    },
                    alphas, opt.alpha_clip);
                ++res.alpha_steps;
            }
            res.last_train_loss =
                optimizer_step(model, weight_opt, [&] { return step_fn(model, train.batch(i)); }).loss;
            ++res.steps;
            if (step % opt.log_every == 0) {
                log(step);
                if (opt.early_stop && stable >= opt.early_stop) {
                    res.stopped_early = true;
                    ++step;
                    break;
                }
            }
        }
    }
    if (res.history.empty() || res.history.back().step + 1 != step) log(step);
    return res;
}

}  // namespace patchwork::search
