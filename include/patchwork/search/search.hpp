#pragma once
// Architecture search over adaptation policies, model-wide: gates, the
// parameter penalty, the first-order DARTS loop, derive and the report.
//
//   using Model = Cascade<Tune<A, Search<Frozen, Adapter<16>, FineTune>>, ...>;
//   Model model{...pre-trained stages...};
//   search::SearchOptions opts{.penalty = {.lambda = 0.5}};
//   auto result = search::run(model, train, val, step_fn, opts);
//   auto report = search::derive(model);        // argmax per module
//   std::cout << report;                       // table + the fixed C++ type
//
// Penalty. With g_mk the gate of candidate k in searched module m (the gates
// of the last forward), P_mk the trainable parameters candidate k adds and
// P_full the parameters full fine-tuning of the whole model trains:
//   R = lambda * sum_m sum_k g_mk * P_mk / P_full,   dR/dg_mk = lambda * P_mk / P_full
// and dR/dalpha follows through the gate Jacobian (gates.hpp). Frozen adds no
// parameter; the search is charged `frozen_cost(step) * P_m` for it instead
// (P_m: the module's own pre-trained parameters), a constant or a schedule,
// because a free candidate is where a parameter-penalised search collapses to.
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
#include "patchwork/policies/frozen.hpp"
#include "patchwork/policies/search.hpp"
#include "patchwork/search/gates.hpp"
#include "patchwork/train/batch.hpp"
#include "patchwork/train/clip.hpp"
#include "patchwork/train/optimizer.hpp"

namespace patchwork::search {

template <class M>
inline constexpr bool is_search_module = std::is_base_of_v<SearchModuleTag, std::remove_cvref_t<M>>;

/// f(searched module) for every searched module of `model`, in visiting order.
template <class M, class F>
void for_each_searched(M& model, F&& f) {
    for_each_module(model, [&](auto& m) {
        if constexpr (is_search_module<decltype(m)>) f(m);
    });
}

/// The role set of the alpha step (see GradientRoles).
inline constexpr unsigned architecture_only = 1u << static_cast<unsigned>(Role::architecture);

/// Number of searched modules.
template <class M>
[[nodiscard]] std::size_t count_searched(M& model) {
    std::size_t n = 0;
    for_each_searched(model, [&](auto&) { ++n; });
    return n;
}

/// Sets the gate configuration of every searched module.
template <class M>
void set_gates(M& model, const GateConfig& cfg) {
    cfg.validate();
    for_each_searched(model, [&](auto& m) { m.set_gates(cfg); });
}

/// Seeds every searched module's Gumbel noise: module i gets seed + i (via a
/// mixing constant), so a search is reproducible from one number.
template <class M>
void seed(M& model, std::uint64_t s) {
    std::uint64_t i = 0;
    for_each_searched(model, [&](auto& m) { m.seed(s * 0x9E3779B97F4A7C15ull + ++i); });
}

/// The trainable architecture weights (Role::architecture).
template <class M>
[[nodiscard]] auto architecture_parameters(M& model) {
    std::vector<Parameter<typename M::Scalar>*> out;
    model.visit([&](auto& p) {
        if (p.trainable() && p.role() == Role::architecture) out.push_back(&p);
    });
    return out;
}

/// Every other trainable parameter (the weights of the search's weight step).
template <class M>
[[nodiscard]] auto weight_parameters(M& model) {
    std::vector<Parameter<typename M::Scalar>*> out;
    model.visit([&](auto& p) {
        if (p.trainable() && p.role() != Role::architecture) out.push_back(&p);
    });
    return out;
}

/// Parameters full fine-tuning of the model would train (P_full): every
/// pre-trained parameter once; a searched module counts its base, not its
/// candidates' copies (see pretrained_parameters in core/module.hpp).
template <class M>
[[nodiscard]] std::size_t full_parameters(M& model) {
    return pretrained_parameters(model);
}

/// The cost charged to Frozen, as a fraction of the module's own pre-trained
/// parameters, over search steps: `start` at step 0, moving linearly to `end`
/// at step `steps`, then staying there (steps = 0: the constant `end`).
struct FrozenCost {
    double start = 0.0;
    double end = 0.0;
    std::size_t steps = 0;

    [[nodiscard]] static FrozenCost constant(double c) { return {c, c, 0}; }
    [[nodiscard]] static FrozenCost linear(double from, double to, std::size_t steps) { return {from, to, steps}; }

    [[nodiscard]] double operator()(std::size_t step) const noexcept {
        if (steps == 0 || step >= steps) return end;
        return start + (end - start) * double(step) / double(steps);
    }
    void validate() const {
        if (!(start >= 0) || !(end >= 0) || !std::isfinite(start) || !std::isfinite(end))
            throw ConfigError(detail::concat("search: the frozen cost must be >= 0 and finite, got ", start, " -> ",
                                             end));
    }
};

/// The parameter penalty's settings.
struct Penalty {
    double lambda = 0.0;        ///< weight of the penalty (>= 0)
    FrozenCost frozen_cost{};   ///< what choosing Frozen costs (see FrozenCost)
    std::size_t full = 0;       ///< P_full; 0 means full_parameters(model)

    void validate() const {
        if (!(lambda >= 0) || !std::isfinite(lambda))
            throw ConfigError(detail::concat("search: the penalty weight lambda must be >= 0 and finite, got ",
                                             lambda));
        frozen_cost.validate();
    }
};

/// Value of the penalty at the gates of the last forward; adds its gradient to
/// every alpha. Call after the forward (and before or after the backward).
template <class M>
double penalty(M& model, const Penalty& pen, std::size_t step) {
    pen.validate();
    if (pen.lambda == 0) return 0.0;
    const double full = double(pen.full ? pen.full : full_parameters(model));
    if (full <= 0) throw ConfigError("search: the model has no pre-trained parameters to compare the penalty with");
    const double frozen = pen.frozen_cost(step);
    double value = 0;
    for_each_searched(model, [&](auto& m) {
        using Mod = std::remove_cvref_t<decltype(m)>;
        using T = typename Mod::Scalar;
        if (m.derived()) return;
        const auto counts = m.candidate_parameters();
        const auto labels = Mod::candidate_labels();
        const auto& used = m.gate_state().used;
        if (used.size() != Mod::candidates)
            throw Error(detail::concat(detail::display_path(m.path()), ": penalty before any forward"));
        std::vector<T> dgate(Mod::candidates);
        const double base = double(m.base_parameters());
        for (std::size_t k = 0; k < Mod::candidates; ++k) {
            const double pk = labels[k] == Frozen::name() ? frozen * base : double(counts[k]);
            const double c = pen.lambda * pk / full;
            value += double(used[k]) * c;
            dgate[k] = T(c);
        }
        m.add_gate_grad(dgate);
    });
    return value;
}

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
/// gradients, adds the penalty and steps the optimisers.
template <class M, BatchSource Train, BatchSource Val, class StepFn, class WeightOpt>
SearchResult run(M& model, WeightOpt& weight_opt, Train& train, Val& val, StepFn&& step_fn,
                 const SearchOptions& opt) {
    opt.validate();
    if (count_searched(model) == 0) throw ConfigError("search::run: the model has no Search<...> module");
    if (train.batches() == 0) throw ConfigError("search::run: the training split has no batches");
    if (val.batches() == 0)
        throw ConfigError("search::run: the held-out split has no batches (it is too small for one batch)");
    auto alphas = architecture_parameters(model);
    BasicAdam<typename M::Scalar> alpha_opt(alphas, opt.alpha);
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
                zero_grad(model);
                {
                    // Only alpha learns here: every weight-gradient computation is skipped.
                    const GradientRoles only_alpha(architecture_only);
                    res.last_val_loss = step_fn(model, val.batch(val_i++));
                    res.last_penalty = penalty(model, opt.penalty, step);
                }
                if (opt.alpha_clip > 0) clip_grad_norm(alphas, opt.alpha_clip);
                alpha_opt.step();
                ++res.alpha_steps;
            }
            zero_grad(model);
            res.last_train_loss = step_fn(model, train.batch(i));
            weight_opt.step();
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

/// One searched module's outcome.
struct DerivedModule {
    std::string module;
    std::string chosen;
    std::vector<std::string> labels;
    std::vector<double> probabilities;
    std::size_t trainable = 0;  ///< trainable parameters of the derived module
};

struct DeriveReport {
    std::vector<DerivedModule> modules;
    std::size_t trainable = 0;  ///< of the whole derived model
    std::size_t full = 0;       ///< of full fine-tuning
    std::string fixed_type;     ///< the equivalent fixed C++ type (empty when none exists)
    std::string fixed_type_note;

    friend std::ostream& operator<<(std::ostream& os, const DeriveReport& r) {
        std::size_t w = 6;
        for (const auto& m : r.modules) w = std::max(w, m.module.size());
        os << std::left << std::setw(int(w)) << "module" << "  " << std::setw(16) << "chosen"
           << "  " << std::setw(12) << "trainable" << "  gates\n";
        for (const auto& m : r.modules) {
            os << std::setw(int(w)) << (m.module.empty() ? "(model)" : m.module) << "  " << std::setw(16) << m.chosen
               << "  " << std::setw(12) << m.trainable << "  ";
            for (std::size_t k = 0; k < m.labels.size(); ++k)
                os << (k ? ", " : "") << m.labels[k] << '=' << std::fixed << std::setprecision(3) << m.probabilities[k];
            os << std::defaultfloat << '\n';
        }
        os << std::right << "trainable parameters: " << r.trainable << " of " << r.full << " ("
           << std::setprecision(3) << (r.full ? 100.0 * double(r.trainable) / double(r.full) : 0.0)
           << "% of full fine-tuning)\n";
        if (!r.fixed_type.empty()) os << "fixed type: " << r.fixed_type << '\n';
        if (!r.fixed_type_note.empty()) os << r.fixed_type_note << '\n';
        return os;
    }
};

/// The C++ name of T, as the compiler spells it, with "patchwork::" dropped.
template <class T>
[[nodiscard]] std::string type_name() {
#if defined(__clang__) || defined(__GNUC__)
    std::string_view f = __PRETTY_FUNCTION__;
    const std::string_view key = "T = ";
    auto b = f.find(key);
    if (b == std::string_view::npos) return "?";
    b += key.size();
    auto e = f.find_first_of(";]", b);
    std::string s(f.substr(b, e - b));
#else
    std::string s = typeid(T).name();
#endif
    for (std::size_t p; (p = s.find("patchwork::")) != std::string::npos;) s.erase(p, 11);
    return s;
}

namespace detail_search {
/// Replaces each "Search<...>" in `s`, in order, by the next label.
inline std::string replace_searches(const std::string& s, const std::vector<std::string>& chosen, bool& ok) {
    std::string out;
    std::size_t i = 0, used = 0;
    while (i < s.size()) {
        const std::size_t p = s.find("Search<", i);
        if (p == std::string::npos) {
            out += s.substr(i);
            break;
        }
        out += s.substr(i, p - i);
        std::size_t depth = 0, j = p + 6;
        for (; j < s.size(); ++j) {
            if (s[j] == '<') ++depth;
            else if (s[j] == '>' && --depth == 0) break;
        }
        if (used >= chosen.size()) {
            ok = false;
            return {};
        }
        out += chosen[used++];
        i = j + 1;
    }
    ok = used == chosen.size();
    return out;
}
/// GCC spells Search<...> modules as SearchModule<Inner, ...> inside Tune's
/// Inner; the user wrote Tune<Inner, Search<...>>. Shorten the usual spellings.
inline std::string replace_all(const std::string& s, std::string_view from, std::string_view to) {
    std::string out;
    std::size_t i = 0;
    for (std::size_t p; (p = s.find(from, i)) != std::string::npos; i = p + from.size()) {
        out.append(s, i, p - i);
        out.append(to);
    }
    out.append(s, i, std::string::npos);
    return out;
}
inline std::string tidy(std::string s) {
    const std::pair<std::string_view, std::string_view> names[] = {
        {"BasicLinear<float>", "Linear"},
        {"BasicLayerNorm<float>", "LayerNorm"},
        {"BasicActivation<float, activation::Relu>", "Relu"},
        {"BasicActivation<float, activation::Gelu>", "Gelu"},
        {"BasicActivation<float, activation::Tanh>", "Tanh"},
        {", AdapterActivation::relu>", ">"},
        {" >", ">"},
    };
    for (const auto& [from, to] : names) s = replace_all(s, from, to);
    // Drop integer-literal suffixes GCC prints in template arguments ("32ul" -> "32").
    std::string out;
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (i > 0 && std::isdigit(static_cast<unsigned char>(s[i - 1])) && s.compare(i, 2, "ul") == 0) {
            ++i;
            continue;
        }
        out += s[i];
    }
    return out;
}
}  // namespace detail_search

namespace detail_search {
template <class M>
DeriveReport derive_with(M& model, const std::vector<std::size_t>* given) {
    DeriveReport r;
    std::vector<std::string> chosen, types;
    const std::size_t n = count_searched(model);
    if (given && given->size() != n)
        throw ConfigError(detail::concat("search::derive: ", given->size(), " choices given for ", n,
                                         " searched modules"));
    std::size_t i = 0;
    for_each_searched(model, [&](auto& m) {
        using Mod = std::remove_cvref_t<decltype(m)>;
        if (m.derived()) throw Error(detail::concat(detail::display_path(m.path()), ": already derived"));
        DerivedModule d;
        d.module = m.path();
        const auto l = Mod::candidate_labels();
        d.labels.assign(l.begin(), l.end());
        d.probabilities = m.probabilities();
        const std::size_t k =
            given ? (*given)[i]
                  : std::size_t(std::max_element(d.probabilities.begin(), d.probabilities.end()) -
                                d.probabilities.begin());
        ++i;
        m.derive(k);  // checks k
        d.chosen = d.labels[k];
        chosen.push_back(d.chosen);
        types.push_back(type_name<Mod>());
        d.trainable = trainable_count(m);
        r.modules.push_back(std::move(d));
    });
    r.trainable = trainable_count(model);
    r.full = full_parameters(model);
    bool ok = false;
    std::string t = replace_searches(type_name<M>(), chosen, ok);
    if (!ok) {
        // A Repeat holds N searched blocks under one type: runs of consecutive
        // modules of one type stand for one Search<...> in the type's spelling,
        // which can be fixed only when the whole run chose the same.
        std::vector<std::string> runs;
        bool same = true;
        for (std::size_t k = 0; k < chosen.size(); ++k) {
            if (k > 0 && types[k] == types[k - 1]) {
                same = same && chosen[k] == chosen[k - 1];
                continue;
            }
            runs.push_back(chosen[k]);
        }
        if (same) t = replace_searches(type_name<M>(), runs, ok);
    }
    if (ok) r.fixed_type = tidy(t);
    else
        r.fixed_type_note = "no single fixed type: searched modules that share one type (the blocks of a Repeat) "
                            "chose differently; the choices are listed above";
    return r;
}
}  // namespace detail_search

/// Derives the scheme: every searched module keeps its argmax candidate (of
/// softmax(alpha)), the others are freed. Returns the report, including the
/// fixed type that computes the same model (when the model's type can say it:
/// a Repeat of identical searched blocks cannot hold different choices).
template <class M>
DeriveReport derive(M& model) {
    return detail_search::derive_with(model, nullptr);
}

/// Derives a given scheme: choices[i] is the candidate kept by the i-th searched
/// module (visiting order). Hand-crafted schemes and baselines use this.
template <class M>
DeriveReport derive(M& model, const std::vector<std::size_t>& choices) {
    return detail_search::derive_with(model, &choices);
}

/// The current argmax scheme (visiting order), without deriving.
template <class M>
[[nodiscard]] std::vector<std::size_t> argmax_scheme(M& model) {
    std::vector<std::size_t> out;
    for_each_searched(model, [&](auto& m) {
        const auto p = m.probabilities();
        out.push_back(std::size_t(std::max_element(p.begin(), p.end()) - p.begin()));
    });
    return out;
}

/// Copies every parameter value of `from` into `to`, in visiting order, after
/// checking that names and shapes agree (moving a derived model into its fixed type).
template <class A, class B>
void copy_parameters(A& from, B& to) {
    std::vector<Parameter<typename A::Scalar>*> src;
    from.visit([&](auto& p) { src.push_back(&p); });
    std::size_t i = 0;
    to.visit([&](auto& p) {
        if (i >= src.size())
            throw ShapeError(detail::concat("copy_parameters: the target has more parameters than the source (",
                                            p.name(), " has no counterpart)"));
        const auto& s = *src[i++];
        if (s.name() != p.name() || !(s.value.shape() == p.value.shape()))
            throw ShapeError(detail::concat("copy_parameters: ", s.name(), " ", s.value.shape(), " does not match ",
                                            p.name(), " ", p.value.shape()));
        p.value = s.value;
    });
    if (i != src.size())
        throw ShapeError(detail::concat("copy_parameters: the source has ", src.size() - i,
                                        " more parameters than the target (first: ", src[i]->name(), ")"));
}

}  // namespace patchwork::search
