#pragma once
// Helpers of the device-module tests: random tensors, the relative error
// against the CPU, copying parameters into a device module, and the
// forward/backward comparison of a CPU and a device module with poisoned
// outputs. Include from nvcc-compiled tests only.
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/bias_only.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/frozen.hpp"
#include "patchwork/policies/lora.hpp"
#include "patchwork/policies/scale_shift.hpp"
#include "patchwork/policies/tune.hpp"
#include "patchwork/train/loss.hpp"
#include "patchwork/train/optimizer.hpp"

// The definitions of the device operations (nvcc only).
#include "patchwork/kernels/ops.cuh"
#include "patchwork/kernels/module_ops.cuh"

namespace pw = patchwork;
using pw::Cpu;
using pw::Cuda;
using pw::Shape;
using pw::Tensor;

namespace device_test {

/// On the CPU execution of the CUDA code (CI) a 256-thread block runs as 256
/// threads: the tests take smaller sizes there (still partial blocks and
/// several blocks per launch).
#ifdef PATCHWORK_CPU_CUDA
inline constexpr bool kCpu = true;
#else
inline constexpr bool kCpu = false;
#endif

template <class T>
Tensor<T> random_tensor(const Shape& s, std::mt19937& rng, double scale = 1.0) {
    Tensor<T> t(s);
    std::normal_distribution<double> nd(0.0, scale);
    for (auto& v : t) v = T(nd(rng));
    return t;
}

/// ||a - b|| / max(||a||, ||b||), and +inf when b has a NaN (an unwritten element).
template <class T>
double rel_error(const Tensor<T>& a, const Tensor<T>& b) {
    REQUIRE(a.shape() == b.shape());
    double d = 0, na = 0, nb = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        if (std::isnan(double(b[i])) || std::isnan(double(a[i]))) return INFINITY;
        d += (double(a[i]) - double(b[i])) * (double(a[i]) - double(b[i]));
        na += double(a[i]) * double(a[i]);
        nb += double(b[i]) * double(b[i]);
    }
    const double s = std::max(std::sqrt(na), std::sqrt(nb));
    return s == 0 ? 0.0 : std::sqrt(d) / s;
}

template <class T>
constexpr double tolerance() {
    return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}

template <class T>
void check_close(const Tensor<T>& cpu, const Tensor<T, Cuda>& dev, const char* what) {
    INFO(std::string(what));
    CHECK(rel_error(cpu, pw::to_host(dev)) < tolerance<T>());
}

/// Copy every parameter value of a CPU module into the same-structured device module.
template <class C, class G>
void copy_parameters(C& cpu, G& dev) {
    std::vector<Tensor<typename C::Scalar>*> src;
    cpu.visit([&](auto& p) { src.push_back(&p.value); });
    std::size_t i = 0;
    dev.visit([&](auto& p) {
        REQUIRE(i < src.size());
        pw::copy(*src[i++], p.value);
    });
    REQUIRE(i == src.size());
}

/// Compare every gradient of the two modules.
template <class C, class G>
void check_gradients(C& cpu, G& dev) {
    std::vector<const pw::Parameter<typename C::Scalar>*> src;
    cpu.visit([&](auto& p) { src.push_back(&p); });
    std::size_t i = 0;
    dev.visit([&](auto& p) {
        const auto* c = src[i++];
        REQUIRE(c->trainable() == p.trainable());
        if (p.trainable()) check_close(c->grad, p.grad, p.name().c_str());
    });
}

/// The module's forward once, then again into its poisoned output buffer.
template <class M>
const auto& poisoned_forward(M& m, const pw::tensor_of_t<M>& x) {
    const_cast<pw::tensor_of_t<M>&>(m.forward(x)).poison();
    return m.forward(x);
}

template <class C, class G>
void compare_module(C& cpu, G& dev, const Shape& in_shape, std::mt19937& rng) {
    using T = typename C::Scalar;
    copy_parameters(cpu, dev);
    const Tensor<T> x = random_tensor<T>(in_shape, rng);
    const Tensor<T, Cuda> xd(x);
    const Tensor<T>& y = cpu.forward(x);
    const Tensor<T, Cuda>& yd = poisoned_forward(dev, xd);
    check_close(y, yd, "forward");
    const Tensor<T> g = random_tensor<T>(y.shape(), rng);
    const Tensor<T, Cuda> gd(g);
    pw::zero_grad(cpu);
    pw::zero_grad(dev);
    const Tensor<T>& dx = cpu.backward(g);
    const_cast<Tensor<T, Cuda>&>(dev.backward(gd)).poison();
    pw::zero_grad(dev);
    dev.forward(xd);
    const Tensor<T, Cuda>& dxd = dev.backward(gd);
    check_close(dx, dxd, "input gradient");
    check_gradients(cpu, dev);
}

}  // namespace device_test
