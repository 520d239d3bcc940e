#pragma once
// search::derive: the end of a search. Keeps one candidate per searched
// module (the argmax of its architecture weights, or given choices), frees the
// others, and reports the choices with the equivalent fixed C++ type;
// copy_parameters moves the weights into a model of that type.
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

namespace patchwork::search {
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
    else if (type_name<M>().find("Search<") == std::string::npos)
        r.fixed_type_note = "no fixed type spelled here: the searches are named inside a spec (for example a BERT "
                            "spec's layer slot), not in the model's type; write the spec with the chosen policies "
                            "listed above";
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
/// checking that names and shapes agree (moving a derived model into its fixed
/// type). The two may live on different devices (a search on the GPU, the
/// fixed model on the CPU, or the other way round), and hold different
/// element types (an fp32 checkpoint into a bf16 device model: values are
/// converted, to bf16 with round-to-nearest-even; bf16 to float is exact).
template <class A, class B>
void copy_parameters(A& from, B& to) {
    std::vector<Parameter<typename A::Scalar, device_of_t<A>>*> src;
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
        using From = typename std::decay_t<decltype(s.value)>::Scalar;
        using To = typename std::decay_t<decltype(p.value)>::Scalar;
        if constexpr (!std::is_same_v<From, To>) {
            // Through the host, converted there.
            Tensor<To> converted;
            if constexpr (std::is_same_v<device_of_t<A>, Cpu>) converted = cast<To>(s.value);
            else converted = cast<To>(to_host(s.value));
            if constexpr (std::is_same_v<device_of_t<B>, Cpu>) p.value = std::move(converted);
            else copy(converted, p.value);
        } else if constexpr (std::is_same_v<device_of_t<A>, device_of_t<B>>) {
            p.value = s.value;
        } else {
            copy(s.value, p.value);
        }
    });
    if (i != src.size())
        throw ShapeError(detail::concat("copy_parameters: the source has ", src.size() - i,
                                        " more parameters than the target (first: ", src[i]->name(), ")"));
}

}  // namespace patchwork::search
