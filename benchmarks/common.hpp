#pragma once
// What every benchmark program shares: the thread count (BENCH_THREADS,
// default 2, handed to Eigen; OpenBLAS reads OPENBLAS_NUM_THREADS, which
// scripts/bench sets to the same value), a description of the build, random
// inputs, and the median of a list of timings.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "patchwork/core/random.hpp"
#include "patchwork/core/tensor.hpp"

namespace bench {

/// BENCH_THREADS (default 2), also given to Eigen's OpenMP parallel products.
inline int configure_threads() {
    int n = 2;
    if (const char* s = std::getenv("BENCH_THREADS")) n = std::max(1, std::atoi(s));
    Eigen::setNbThreads(n);
    return n;
}

inline const char* blas_name() {
#ifdef EIGEN_USE_BLAS
    return "openblas";
#else
    return "eigen";
#endif
}

/// Compiler, SIMD, BLAS and thread settings of this build, one line.
inline std::string build_info(int threads) {
    std::ostringstream os;
    os << "compiler=";
#if defined(__clang__)
    os << "clang-" << __clang_major__ << "." << __clang_minor__;
#elif defined(__GNUC__)
    os << "gcc-" << __GNUC__ << "." << __GNUC_MINOR__;
#else
    os << "unknown";
#endif
    os << " eigen=" << EIGEN_WORLD_VERSION << "." << EIGEN_MAJOR_VERSION << "." << EIGEN_MINOR_VERSION
       << " simd=\"" << Eigen::SimdInstructionSetsInUse() << "\"";
#if defined(__AVX2__)
    os << " avx2=yes";
#else
    os << " avx2=no";
#endif
#if defined(__FMA__)
    os << " fma=yes";
#else
    os << " fma=no";
#endif
    os << " gemm=" << blas_name();
#ifdef _OPENMP
    os << " openmp=yes";
#else
    os << " openmp=no";
#endif
    os << " threads=" << threads << " eigen_threads=" << Eigen::nbThreads();
    if (const char* s = std::getenv("OPENBLAS_NUM_THREADS")) os << " OPENBLAS_NUM_THREADS=" << s;
    return os.str();
}

/// A tensor of the given shape with values uniform in [-1, 1).
inline patchwork::Tensor<float> random_tensor(const patchwork::Shape& shape, std::uint64_t seed) {
    patchwork::Tensor<float> t(shape);
    patchwork::Rng rng(seed);
    patchwork::init::uniform(t, rng, -1.0, 1.0);
    return t;
}

/// The comma-separated items of `s`, empty items dropped.
inline std::vector<std::string> split(const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    for (std::string item; std::getline(ss, item, ',');)
        if (!item.empty()) out.push_back(item);
    return out;
}

/// Quantile q in [0, 1] of the values (sorted copy, nearest rank).
inline double quantile(std::vector<double> v, double q) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    const auto i = static_cast<std::size_t>(q * double(v.size() - 1) + 0.5);
    return v[std::min(i, v.size() - 1)];
}

/// Median: the mean of the two middle values for an even count.
inline double median(std::vector<double> v) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace bench
