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
// Rate 0 is the default: adaptation with small patches is usually run without
// dropout, and a step then depends on its inputs alone (BERT's pre-training
// rate 0.1 is available through set_rate or the model's options).
#include <cstdint>
#include <string>

#include "patchwork/core/module.hpp"

namespace patchwork {

template <class T>
class BasicDropout : public ModuleBase {
public:
    using Scalar = T;
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

    const Tensor<T>& forward(const Tensor<T>& x) {
        if (x.empty()) throw_shape_error(path_, "dropout input", Shape{1}, x.shape());
        applied_ = active();
        shape_ = x.shape();
        if (!applied_) return x;
        factor_.resize(x.shape());
        y_.resize(x.shape());
        const T keep = T(1.0 / (1.0 - rate_));
        const std::uint64_t threshold = std::uint64_t(rate_ * 18446744073709551616.0);  // rate * 2^64
        for (std::size_t i = 0; i < x.size(); ++i) factor_[i] = rng_.next() < threshold ? T(0) : keep;
        y_.vector() = x.vector().cwiseProduct(factor_.vector());
        return y_;
    }

    const Tensor<T>& backward(const Tensor<T>& dy) {
        check_same_shape(dy, shape_, path_, "dropout output gradient");
        if (!input_grad_) {
            dx_.clear();
            return dx_;
        }
        if (!applied_) return dy;
        dx_.resize(dy.shape());
        dx_.vector() = dy.vector().cwiseProduct(factor_.vector());
        return dx_;
    }

private:
    double rate_ = 0.0;
    bool training_ = true;
    bool applied_ = false;
    Rng rng_;
    Shape shape_;
    Tensor<T> factor_, y_, dx_;
};

using Dropout = BasicDropout<float>;

}  // namespace patchwork
