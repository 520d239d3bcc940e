#pragma once
// Seeded random numbers and weight initialisers. Every initialiser takes the
// generator explicitly, so a run is reproducible from its seed alone.
#include <cmath>
#include <cstdint>
#include <random>
#include <type_traits>

#include "patchwork/core/tensor.hpp"

namespace patchwork {

/// The library's generator: a 64-bit Mersenne twister with an explicit seed.
class Rng {
public:
    explicit Rng(std::uint64_t seed = 0x5eed) : engine_(seed) {}
    double uniform(double lo = 0.0, double hi = 1.0) { return std::uniform_real_distribution<double>(lo, hi)(engine_); }
    double normal(double mean = 0.0, double stddev = 1.0) {
        return std::normal_distribution<double>(mean, stddev)(engine_);
    }
    std::uint64_t next() { return engine_(); }
    std::mt19937_64& engine() noexcept { return engine_; }

private:
    std::mt19937_64 engine_;
};

/// The generator modules use when they are constructed without one. Seed it
/// with manual_seed() for a reproducible model; construction order matters.
inline Rng& default_rng() {
    thread_local Rng rng;
    return rng;
}
inline void manual_seed(std::uint64_t seed) { default_rng() = Rng(seed); }

namespace init {

template <class T>
void uniform(Tensor<T>& t, Rng& rng, double lo, double hi) {
    for (auto& v : t) v = T(rng.uniform(lo, hi));
}

template <class T>
void normal(Tensor<T>& t, Rng& rng, double mean, double stddev) {
    for (auto& v : t) v = T(rng.normal(mean, stddev));
}

/// He/Kaiming uniform for a [fan_out, fan_in] weight: U(-b, b), b = sqrt(6 / fan_in) * gain / sqrt(2).
/// With the default gain sqrt(2) (for ReLU) the variance is 2 / fan_in.
template <class T>
void kaiming_uniform(Tensor<T>& t, Rng& rng, std::size_t fan_in, double gain = std::sqrt(2.0)) {
    const double bound = gain * std::sqrt(3.0 / double(fan_in));
    uniform(t, rng, -bound, bound);
}

/// Glorot/Xavier uniform: U(-b, b), b = sqrt(6 / (fan_in + fan_out)).
template <class T>
void xavier_uniform(Tensor<T>& t, Rng& rng, std::size_t fan_in, std::size_t fan_out) {
    const double bound = std::sqrt(6.0 / double(fan_in + fan_out));
    uniform(t, rng, -bound, bound);
}

/// Runs `draw(host_tensor)` for `t` wherever it lives: on the CPU it draws
/// into t itself; for a device tensor it draws the same values into a host
/// tensor of t's shape and copies them over, so a device model starts from
/// the CPU model's weights for the same seed.
template <class T, class D, class Draw>
void on_host(Tensor<T, D>& t, Draw&& draw) {
    if constexpr (std::is_same_v<D, Cpu>) {
        draw(t);
    } else {
        Tensor<T> host(t.shape());
        draw(host);
        copy(host, t);
    }
}

}  // namespace init
}  // namespace patchwork
