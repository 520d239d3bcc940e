#pragma once
// Dropout with its own seeded generator (inverted dropout).
//
// While training with rate p > 0: m_i ~ Bernoulli(1 - p) drawn per element,
//   y_i = x_i m_i / (1 - p)
// so E[y] = x. In evaluation (set_training(false)) or with p = 0 it is the
// identity and returns its input unchanged (no copy).
//
// Backward: dL/dx_i = dL/dy_i m_i / (1 - p) (the same mask, saved as the
// factor m_i / (1 - p)); the identity passes dy through.
//
// Device = Cuda: the mask is drawn on the host by the same generator, in the
// same order, as on the CPU (a CPU and a device module with one seed drop the
// same elements), uploaded as the factors, and y = x * factor, dx = dy *
// factor run as element-wise kernels (cuda::multiply).
//
// Rate 0 is the default: adaptation with small patches is usually run without
// dropout, and a step then depends on its inputs alone (BERT's pre-training
// rate 0.1 is available through set_rate or the model's options).
#include <cstdint>
#include <string>
#include <type_traits>

#include "patchwork/core/module.hpp"
#include "patchwork/ops/cuda_attention_ops.hpp"
#include "patchwork/ops/cuda_ops.hpp"

namespace patchwork {

template <class T, class D = Cpu>
class BasicDropout : public ModuleBase {
public:
    using Scalar = T;
    using Device = D;
    static constexpr const char* kind() { return "dropout"; }
    static constexpr unsigned roles = 0;
    static constexpr bool fixed_width = false;

    explicit BasicDropout(double rate = 0.0, std::uint64_t seed = 0x5eed) : rng_(seed) { set_rate(rate); }

    [[nodiscard]] std::size_t out_features() const noexcept { return 0; }
    void reset_parameters(Rng&) noexcept {}
    template <class F>
    void visit(F&&) noexcept {}
    void set_path(const std::string& p) { path_ = p; }

    void set_rate(double rate) {
        if (!(rate >= 0.0 && rate < 1.0))
            throw ConfigError(detail::concat(detail::display_path(path_), ": dropout rate must be in [0, 1), got ", rate));
        rate_ = rate;
    }
    [[nodiscard]] double rate() const noexcept { return rate_; }
    void set_training(bool on) noexcept { training_ = on; }
    [[nodiscard]] bool training() const noexcept { return training_; }
    /// Restart the mask sequence from `seed`.
    void seed(std::uint64_t seed) { rng_ = Rng(seed); }
    /// True when forward applies a mask (training with a positive rate).
    [[nodiscard]] bool active() const noexcept { return training_ && rate_ > 0.0; }

    const Tensor<T, D>& forward(const Tensor<T, D>& x) {
        if (x.empty()) throw_shape_error(path_, "dropout input", Shape{1}, x.shape());
        applied_ = active();
        shape_ = x.shape();
        if (!applied_) return x;
        Tensor<T>& factor = host_factor();
        factor.resize(x.shape());
        const T keep = T(1.0 / (1.0 - rate_));
        const std::uint64_t threshold = std::uint64_t(rate_ * 18446744073709551616.0);  // rate * 2^64
        for (std::size_t i = 0; i < x.size(); ++i) factor[i] = rng_.next() < threshold ? T(0) : keep;
        if constexpr (std::is_same_v<D, Cuda>) {
            factor_.resize(x.shape());
            cuda::upload_elements(factor_.data(), factor.data(), factor.size(), path_);
            cuda::multiply(x, factor_, y_, path_);
        } else {
            y_.resize(x.shape());
            y_.vector() = x.vector().cwiseProduct(factor_.vector());
        }
        return y_;
    }

    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        check_same_shape(dy, shape_, path_, "dropout output gradient");
        if (!input_grad_) {
            dx_.clear();
            return dx_;
        }
        if (!applied_) return dy;
        if constexpr (std::is_same_v<D, Cuda>) {
            cuda::multiply(dy, factor_, dx_, path_);
        } else {
            dx_.resize(dy.shape());
            dx_.vector() = dy.vector().cwiseProduct(factor_.vector());
        }
        return dx_;
    }

private:
    /// Where the mask is drawn: the factors themselves on the CPU, their host copy on the device.
    Tensor<T>& host_factor() {
        if constexpr (std::is_same_v<D, Cuda>) return factor_host_;
        else return factor_;
    }

    double rate_ = 0.0;
    bool training_ = true;
    bool applied_ = false;
    Rng rng_;
    Shape shape_;
    Tensor<T, D> factor_, y_, dx_;
    Tensor<T> factor_host_;  ///< device only: the factors drawn on the host, uploaded into factor_
};

using Dropout = BasicDropout<float>;

}  // namespace patchwork
