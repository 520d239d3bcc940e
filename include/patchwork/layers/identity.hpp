#pragma once
// Identity: y = x, dL/dx = dL/dy. It holds no parameters and copies nothing:
// forward returns its input and backward its output gradient, so the caller's
// buffers must outlive their use (as for any saved input). Its width is fixed
// at construction, which lets injection policies wrap it: an Adapter around an
// Identity is the adapter alone, applied to a given tensor (architecture search
// uses this to run several patches on one shared base output). It runs on
// any device (Device = Cuda: the same, on device tensors).
#include <cstddef>
#include <string>

#include "patchwork/core/module.hpp"

namespace patchwork {

template <class T, class D = Cpu>
class BasicIdentity : public ModuleBase {
public:
    using Scalar = T;
    using Device = D;
    static constexpr const char* kind() { return "identity"; }
    static constexpr unsigned roles = 0;
    static constexpr bool fixed_width = true;

    explicit BasicIdentity(std::size_t features) : features_(features) {
        if (features == 0) throw ConfigError("identity: features must be positive");
    }

    [[nodiscard]] std::size_t out_features() const noexcept { return features_; }
    void reset_parameters(Rng&) noexcept {}
    template <class F>
    void visit(F&&) noexcept {}
    void set_path(const std::string& p) { path_ = p; }

    const Tensor<T, D>& forward(const Tensor<T, D>& x) {
        check_cols(x, features_, path_, "identity input");
        return x;
    }
    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        check_cols(dy, features_, path_, "identity output gradient");
        if (!input_grad_) return empty_;
        return dy;
    }

private:
    std::size_t features_;
    Tensor<T, D> empty_;
};

using Identity = BasicIdentity<float>;

}  // namespace patchwork
