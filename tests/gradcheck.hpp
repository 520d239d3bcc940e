#pragma once
// Finite-difference gradient check for any module, in double precision.
//
// The scalar probed is L(x, theta) = sum(forward(x) * R) for a fixed random R,
// so dL/dy = R. The analytic gradients come from one backward(R); the numeric
// ones from central differences (L(v + h) - L(v - h)) / 2h for every element of
// the input and of every trainable parameter. The error of a tensor is
// ||analytic - numeric|| / max(||analytic||, ||numeric||), which stays
// meaningful where individual entries are tiny.
#include <algorithm>
#include <cmath>
#include <map>
#include <string>

#include <doctest/doctest.h>

#include "patchwork/core/module.hpp"
#include "patchwork/core/random.hpp"

namespace patchwork::testing {

struct GradcheckReport {
    std::map<std::string, double> error;  ///< "input" and each trainable parameter name
    double worst() const {
        double w = 0;
        for (auto& [k, v] : error) w = std::max(w, v);
        return w;
    }
};

inline double relative_error(const Tensor<double>& a, const Tensor<double>& n) {
    double diff = 0, na = 0, nn = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        diff += (a[i] - n[i]) * (a[i] - n[i]);
        na += a[i] * a[i];
        nn += n[i] * n[i];
    }
    const double scale = std::max(std::sqrt(na), std::sqrt(nn));
    return scale == 0 ? 0.0 : std::sqrt(diff) / scale;
}

/// Give every parameter (trainable or not) a random value, so zero-initialised
/// parts (an adapter's up-projection, LoRA's B) do not hide gradient errors.
template <class M>
void randomize_parameters(M& m, Rng& rng, double scale = 0.5) {
    m.visit([&](Parameter<double>& p) { init::normal(p.value, rng, 0.0, scale); });
}

template <class M>
double probe_loss(M& m, const Tensor<double>& x, const Tensor<double>& r) {
    const auto& y = m.forward(x);
    double s = 0;
    for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * r[i];
    return s;
}

/// Checks input and trainable-parameter gradients of `m` at a random input of `in_shape`.
template <class M>
GradcheckReport gradcheck(M& m, const Shape& in_shape, std::uint64_t seed = 1, double h = 1e-6) {
    Rng rng(seed);
    Tensor<double> x(in_shape);
    init::normal(x, rng, 0.0, 1.0);

    const Tensor<double> y = m.forward(x);
    Tensor<double> r(y.shape());
    init::normal(r, rng, 0.0, 1.0);

    zero_grad(m);
    m.set_input_grad(true);
    m.forward(x);
    const Tensor<double> dx = m.backward(r);

    GradcheckReport report;
    REQUIRE(dx.shape() == x.shape());
    Tensor<double> num(x.shape());
    for (std::size_t i = 0; i < x.size(); ++i) {
        const double v = x[i];
        x[i] = v + h;
        const double lp = probe_loss(m, x, r);
        x[i] = v - h;
        const double lm = probe_loss(m, x, r);
        x[i] = v;
        num[i] = (lp - lm) / (2 * h);
    }
    report.error["input"] = relative_error(dx, num);

    m.visit([&](Parameter<double>& p) {
        if (!p.trainable()) return;
        const Tensor<double> analytic = p.grad;
        Tensor<double> numeric(p.value.shape());
        for (std::size_t i = 0; i < p.value.size(); ++i) {
            const double v = p.value[i];
            p.value[i] = v + h;
            const double lp = probe_loss(m, x, r);
            p.value[i] = v - h;
            const double lm = probe_loss(m, x, r);
            p.value[i] = v;
            numeric[i] = (lp - lm) / (2 * h);
        }
        report.error[p.name()] = relative_error(analytic, numeric);
    });
    return report;
}

/// Runs gradcheck and asserts every error is below `tolerance`, naming the tensor.
template <class M>
void check_gradients(M& m, const Shape& in_shape, double tolerance = 1e-6, std::uint64_t seed = 1) {
    const auto report = gradcheck(m, in_shape, seed);
    for (const auto& entry : report.error) {
        const std::string& name = entry.first;
        const double err = entry.second;
        INFO("gradient of ", name, ": relative error ", err);
        CHECK(err < tolerance);
    }
}

}  // namespace patchwork::testing
