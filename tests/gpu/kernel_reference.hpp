#pragma once
// Plain C++ references (double, loops, no CUDA) of the math of every kernel
// in patchwork/kernels/*.cuh. host_kernel_reference.cpp checks them against
// the CPU modules and by finite differences; test_kernels.cu checks the
// kernels against them.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "patchwork/kernels/plan.hpp"

namespace patchwork::kernels::ref {

using Vec = std::vector<double>;

inline double act_value(Act f, double z) {
    switch (f) {
        case Act::relu: return z > 0 ? z : 0;
        case Act::gelu: return z * 0.5 * (1 + std::erf(z / std::sqrt(2.0)));
        default: return z;
    }
}
inline double act_grad(Act f, double g, double z) {
    switch (f) {
        case Act::relu: return z > 0 ? g : 0;
        case Act::gelu: {
            const double cdf = 0.5 * (1 + std::erf(z / std::sqrt(2.0)));
            const double pdf = std::exp(-0.5 * z * z) / std::sqrt(2 * 3.14159265358979323846);
            return g * (cdf + z * pdf);
        }
        default: return g;
    }
}

/// Sizes of a low-rank patch: n rows, c_in, c_out, rank r, k tasks.
struct Dims {
    std::size_t n = 0, c_in = 0, c_out = 0, r = 0, k = 1;
};

/// Task of row i (0 without task ids; -1 when outside [0, k): the row is skipped).
inline int task_of(const std::vector<int>* task, std::size_t i, std::size_t k) {
    if (task == nullptr) return 0;
    const int t = (*task)[i];
    return t >= 0 && std::size_t(t) < k ? t : -1;
}

/// y = res + s act(x W1_t^T + b1_t) W2_t^T + b2_t; z receives the pre-activation. res, b1, b2 may be empty.
/// Rows with an invalid task keep y's previous value.
inline void lowrank_forward(Act f, const Dims& d, const Vec& x, const Vec& res, const std::vector<int>* task,
                            const Vec& w1, const Vec& b1, const Vec& w2, const Vec& b2, double s, Vec& y, Vec& z) {
    y.resize(d.n * d.c_out);
    z.resize(d.n * d.r);
    Vec a(d.r);
    for (std::size_t i = 0; i < d.n; ++i) {
        const int t = task_of(task, i, d.k);
        if (t < 0) continue;
        for (std::size_t j = 0; j < d.r; ++j) {
            double v = b1.empty() ? 0.0 : b1[t * d.r + j];
            for (std::size_t c = 0; c < d.c_in; ++c) v += x[i * d.c_in + c] * w1[(t * d.r + j) * d.c_in + c];
            z[i * d.r + j] = v;
            a[j] = act_value(f, v);
        }
        for (std::size_t c = 0; c < d.c_out; ++c) {
            double v = 0;
            for (std::size_t j = 0; j < d.r; ++j) v += a[j] * w2[(t * d.c_out + c) * d.r + j];
            y[i * d.c_out + c] = (res.empty() ? 0.0 : res[i * d.c_out + c]) + (b2.empty() ? 0.0 : b2[t * d.c_out + c]) + s * v;
        }
    }
}

/// Gradients of a low-rank patch (added into; empty vectors are not computed).
struct Grads {
    Vec w1, b1, w2, b2;
};

/// dx = dres + dz W1_t with dz = (s g W2_t) * act'(z); parameter gradients +=.
inline void lowrank_backward(Act f, const Dims& d, const Vec& x, const Vec& g, const Vec& dres,
                             const std::vector<int>* task, const Vec& w1, const Vec& w2, double s, const Vec& z,
                             Vec* dx, Grads& gr) {
    if (dx != nullptr) dx->resize(d.n * d.c_in);
    Vec dz(d.r);
    for (std::size_t i = 0; i < d.n; ++i) {
        const int t = task_of(task, i, d.k);
        if (t < 0) continue;
        for (std::size_t j = 0; j < d.r; ++j) {
            double v = 0;
            for (std::size_t c = 0; c < d.c_out; ++c) v += g[i * d.c_out + c] * w2[(t * d.c_out + c) * d.r + j];
            const double zz = z[i * d.r + j];
            dz[j] = act_grad(f, s * v, zz);
            const double a = act_value(f, zz);
            if (!gr.w2.empty())
                for (std::size_t c = 0; c < d.c_out; ++c) gr.w2[(t * d.c_out + c) * d.r + j] += s * g[i * d.c_out + c] * a;
            if (!gr.b1.empty()) gr.b1[t * d.r + j] += dz[j];
            if (!gr.w1.empty())
                for (std::size_t c = 0; c < d.c_in; ++c) gr.w1[(t * d.r + j) * d.c_in + c] += dz[j] * x[i * d.c_in + c];
        }
        if (!gr.b2.empty())
            for (std::size_t c = 0; c < d.c_out; ++c) gr.b2[t * d.c_out + c] += g[i * d.c_out + c];
        if (dx != nullptr)
            for (std::size_t c = 0; c < d.c_in; ++c) {
                double v = dres.empty() ? 0.0 : dres[i * d.c_in + c];
                for (std::size_t j = 0; j < d.r; ++j) v += dz[j] * w1[(t * d.r + j) * d.c_in + c];
                (*dx)[i * d.c_in + c] = v;
            }
    }
}

/// Adapter: x = res = h, s = 1.
inline void adapter_forward(Act f, const Dims& d, const Vec& h, const std::vector<int>* task, const Vec& dw,
                            const Vec& db, const Vec& uw, const Vec& ub, Vec& y, Vec& z) {
    lowrank_forward(f, d, h, h, task, dw, db, uw, ub, 1.0, y, z);
}
inline void adapter_backward(Act f, const Dims& d, const Vec& h, const Vec& g, const std::vector<int>* task,
                             const Vec& dw, const Vec& uw, const Vec& z, Vec* dh, Grads& gr) {
    lowrank_backward(f, d, h, g, g, task, dw, uw, 1.0, z, dh, gr);
}

/// y = gamma_t * h + beta_t.
inline void scale_shift_forward(std::size_t n, std::size_t dd, std::size_t k, const Vec& h,
                                const std::vector<int>* task, const Vec& gamma, const Vec& beta, Vec& y) {
    y.resize(n * dd);
    for (std::size_t i = 0; i < n; ++i) {
        const int t = task_of(task, i, k);
        if (t < 0) continue;
        for (std::size_t c = 0; c < dd; ++c) y[i * dd + c] = gamma[t * dd + c] * h[i * dd + c] + beta[t * dd + c];
    }
}
inline void scale_shift_backward(std::size_t n, std::size_t dd, std::size_t k, const Vec& h, const Vec& g,
                                 const std::vector<int>* task, const Vec& gamma, Vec* dh, Vec& dgamma, Vec& dbeta) {
    if (dh != nullptr) dh->resize(n * dd);
    for (std::size_t i = 0; i < n; ++i) {
        const int t = task_of(task, i, k);
        if (t < 0) continue;
        for (std::size_t c = 0; c < dd; ++c) {
            const double gv = g[i * dd + c];
            if (dh != nullptr) (*dh)[i * dd + c] = gv * gamma[t * dd + c];
            if (!dgamma.empty()) dgamma[t * dd + c] += gv * h[i * dd + c];
            if (!dbeta.empty()) dbeta[t * dd + c] += gv;
        }
    }
}

/// Gate values: soft p and used w (one-hot on the first maximum of p when hard).
/// noise empty: softmax (tau ignored); otherwise Gumbel-softmax with temperature tau.
struct GateValues {
    Vec soft, used;
    double inv_tau = 1;
};
inline GateValues gates(const Vec& alpha, const Vec& noise, double tau, bool hard) {
    GateValues gv;
    const std::size_t k = alpha.size();
    gv.inv_tau = noise.empty() ? 1.0 : 1.0 / tau;
    gv.soft.resize(k);
    double zmax = -std::numeric_limits<double>::infinity();
    for (std::size_t i = 0; i < k; ++i) {
        gv.soft[i] = (alpha[i] + (noise.empty() ? 0.0 : noise[i])) * gv.inv_tau;
        zmax = std::max(zmax, gv.soft[i]);
    }
    double sum = 0;
    for (auto& v : gv.soft) sum += (v = std::exp(v - zmax));
    for (auto& v : gv.soft) v /= sum;
    gv.used = gv.soft;
    if (hard) {
        const std::size_t best = std::size_t(std::max_element(gv.soft.begin(), gv.soft.end()) - gv.soft.begin());
        std::fill(gv.used.begin(), gv.used.end(), 0.0);
        gv.used[best] = 1;
    }
    return gv;
}

/// out = sum_k used_k o_k (cands: k vectors of m).
inline Vec mix_forward(const GateValues& gv, const std::vector<Vec>& cands) {
    Vec out(cands.at(0).size(), 0.0);
    for (std::size_t j = 0; j < cands.size(); ++j)
        if (gv.used[j] != 0)
            for (std::size_t i = 0; i < out.size(); ++i) out[i] += gv.used[j] * cands[j][i];
    return out;
}
/// dcand_k = used_k g; alpha_grad += inv_tau p_i (<g, o_i> - sum_j p_j <g, o_j>).
inline void mix_backward(const GateValues& gv, const std::vector<Vec>& cands, const Vec& g, std::vector<Vec>& dcands,
                         Vec& alpha_grad) {
    const std::size_t k = cands.size();
    Vec dgate(k, 0.0);
    dcands.assign(k, Vec(g.size()));
    for (std::size_t j = 0; j < k; ++j)
        for (std::size_t i = 0; i < g.size(); ++i) {
            dgate[j] += g[i] * cands[j][i];
            dcands[j][i] = gv.used[j] * g[i];
        }
    double dot = 0;
    for (std::size_t j = 0; j < k; ++j) dot += gv.soft[j] * dgate[j];
    for (std::size_t i = 0; i < k; ++i) alpha_grad[i] += gv.inv_tau * gv.soft[i] * (dgate[i] - dot);
}

}  // namespace patchwork::kernels::ref
