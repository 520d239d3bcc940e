#pragma once
// The backward pass shared by every chain of modules (Sequential, Repeat,
// Cascade). Children run last to first; a child before the first one holding
// a trainable parameter is skipped entirely when the chain's own input
// gradient is not wanted, and the first trainable child is told not to
// compute its input gradient. With a frozen body and a trainable head this
// makes backward cost only the head. After each child's backward the
// parameters it visits are reported to any gradient-ready observer
// (core/gradient_ready.hpp), so data-parallel training can start reducing them.
#include <cstddef>

#include "patchwork/core/gradient_ready.hpp"
#include "patchwork/core/tensor.hpp"

namespace patchwork::detail {

/// `has_trainable(i)`: child i holds a trainable parameter.
/// `set_input_grad(i, on)`: tell child i whether its input gradient is needed.
/// `backward(i, dy)`: run child i's backward, returning its input gradient.
/// `visit_child(i, f)`: call f(parameter) for each parameter of child i.
template <class T, class D, class HasTrainable, class SetInputGrad, class Backward, class VisitChild>
const Tensor<T, D>& chain_backward(std::size_t n, bool want_input_grad, const Tensor<T, D>& dy,
                                   const Tensor<T, D>& empty, HasTrainable&& has_trainable,
                                   SetInputGrad&& set_input_grad, Backward&& backward, VisitChild&& visit_child) {
    std::size_t stop = 0;
    if (!want_input_grad) {
        stop = n;
        for (std::size_t i = 0; i < n; ++i)
            if (has_trainable(i)) {
                stop = i;
                break;
            }
    }
    const Tensor<T, D>* g = &dy;
    for (std::size_t i = n; i-- > stop;) {
        set_input_grad(i, want_input_grad || i > stop);
        g = &backward(i, *g);
        report_gradients_ready([&](auto&& f) { visit_child(i, f); });
    }
    return want_input_grad ? *g : empty;
}

}  // namespace patchwork::detail
