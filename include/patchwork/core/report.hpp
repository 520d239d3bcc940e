#pragma once
// parameter_report(model): total and trainable parameters per module and in
// all, with the trainable share as a percentage of full fine-tuning (the
// count of pre-trained parameters, i.e. what FineTune on everything trains).
#include <algorithm>
#include <cstddef>
#include <iomanip>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "patchwork/core/module.hpp"

namespace patchwork {

struct ParameterReport {
    struct Row {
        std::string module;      ///< dotted module path ("stage0.linear2", "stage0.linear2.lora")
        std::size_t total = 0;
        std::size_t trainable = 0;
        bool injected = false;   ///< parameters added by a policy
    };
    std::vector<Row> rows;
    std::size_t total = 0;       ///< every parameter, pre-trained and injected
    std::size_t trainable = 0;
    std::size_t pretrained = 0;  ///< the parameters full fine-tuning would train

    /// Trainable parameters as a percentage of full fine-tuning.
    [[nodiscard]] double percent_of_full() const {
        return pretrained ? 100.0 * double(trainable) / double(pretrained) : 0.0;
    }
};

template <class M>
[[nodiscard]] ParameterReport parameter_report(M& model) {
    ParameterReport r;
    model.visit([&](auto& p) {
        const std::string& name = p.name();
        const auto dot = name.rfind('.');
        std::string module = dot == std::string::npos ? std::string("<root>") : name.substr(0, dot);
        if (r.rows.empty() || r.rows.back().module != module) r.rows.push_back({module, 0, 0, is_injected(p.role())});
        auto& row = r.rows.back();
        row.total += p.size();
        row.trainable += p.trainable() ? p.size() : 0;
        r.total += p.size();
        r.trainable += p.trainable() ? p.size() : 0;
    });
    r.pretrained = pretrained_parameters(model);
    return r;
}

inline std::ostream& operator<<(std::ostream& os, const ParameterReport& r) {
    std::size_t width = 6;
    for (const auto& row : r.rows) width = std::max(width, row.module.size());
    const auto pct = [&](std::size_t n) {
        std::ostringstream s;
        s << std::fixed << std::setprecision(n * 1000 >= r.pretrained ? 2 : 4)
          << (r.pretrained ? 100.0 * double(n) / double(r.pretrained) : 0.0) << '%';
        return s.str();
    };
    const auto line = [&](const std::string& name, std::size_t total, std::size_t trainable) {
        os << std::left << std::setw(int(width)) << name << "  " << std::right << std::setw(12) << total << "  "
           << std::setw(12) << trainable << "  " << std::setw(10) << pct(trainable) << '\n';
    };
    os << std::left << std::setw(int(width)) << "module" << "  " << std::right << std::setw(12) << "parameters"
       << "  " << std::setw(12) << "trainable" << "  " << std::setw(10) << "% of full" << '\n';
    for (const auto& row : r.rows) line(row.module, row.total, row.trainable);
    os << std::string(width + 40, '-') << '\n';
    line("total", r.total, r.trainable);
    os << "full fine-tuning would train " << r.pretrained << " parameters; this model trains " << r.trainable << " ("
       << pct(r.trainable) << ")\n";
    return os;
}

}  // namespace patchwork
