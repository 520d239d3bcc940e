#pragma once
// One optimisation step, written once and shared by fit (train/trainer.hpp),
// fit_multitask (multitask/train.hpp) and search::run (search/loop.hpp):
//
//   zero_grad(model)
//   opt.begin_step()                        when the optimiser has it (dist::DataParallel:
//                                           gradients may be sent during backward)
//   loss = body()                           forward, loss and backward
//   opt.reduce_gradients()                  when the optimiser has it (dist::DataParallel:
//                                           the gradients averaged across ranks)
//   norm = clip_grad_norm(params, clip)     when clip > 0 (the norm before clipping)
//   opt.step()
//
// optimizer_step() takes the body as a callable; train_step() is the usual
// body for a model with one output:
//
//   y = forward()                           e.g. model.forward(x) or model.forward(x, task)
//   L = loss_fn(y)                          a Loss<T>: value and dL/dy
//   checks: L finite, dL/dy shaped as y     (a clear Error otherwise, before any update)
//   model.backward(dL/dy)
//
// InputGradientOff switches the model's input gradient off for a scope (the
// first layer of a model never needs dL/dx, so its dX product is skipped) and
// restores the caller's setting on every exit, exceptions included.
#include <cmath>
#include <concepts>
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/module.hpp"
#include "patchwork/core/parameter.hpp"
#include "patchwork/core/tensor.hpp"
#include "patchwork/train/clip.hpp"
#include "patchwork/train/loss.hpp"

namespace patchwork {

/// The model's input gradient off while this object lives; the setting it
/// had before is restored by the destructor (also when an exception leaves
/// the scope).
template <class M>
class InputGradientOff {
public:
    explicit InputGradientOff(M& model) : model_(model) {
        if constexpr (requires { { model.input_grad() } -> std::convertible_to<bool>; })
            before_ = model.input_grad();
        model_.set_input_grad(false);
    }
    ~InputGradientOff() { model_.set_input_grad(before_); }
    InputGradientOff(const InputGradientOff&) = delete;
    InputGradientOff& operator=(const InputGradientOff&) = delete;

private:
    M& model_;
    bool before_ = true;
};

namespace detail {
/// The hook between backward and the update: an optimiser that reduces
/// gradients across processes (dist::DataParallel) does it here, so clipping
/// sees the averaged gradient.
template <class O>
void before_update(O& opt) {
    if constexpr (requires { opt.reduce_gradients(); }) opt.reduce_gradients();
}
/// The hook before forward and backward: such an optimiser may start sending
/// gradients while backward runs (only within a step it was told about).
template <class O>
void before_backward(O& opt) {
    if constexpr (requires { opt.begin_step(); }) opt.begin_step();
}
}  // namespace detail

/// What one step did.
struct StepResult {
    double loss = 0;       ///< the loss value the body returned
    double grad_norm = 0;  ///< global gradient norm before clipping; 0 when not clipping
};

/// zero_grad(model); loss = body(); opt.reduce_gradients() if it exists; clip `clip_params` to `clip_norm` (when
/// > 0); opt.step(). `body` runs forward, loss and backward and returns the
/// loss value.
template <class M, class O, class Body, class P>
StepResult optimizer_step(M& model, O& opt, Body&& body, const std::vector<P*>& clip_params, double clip_norm) {
    zero_grad(model);
    detail::before_backward(opt);
    StepResult r;
    r.loss = double(std::forward<Body>(body)());
    detail::before_update(opt);
    if (clip_norm > 0) r.grad_norm = clip_grad_norm(clip_params, clip_norm);
    opt.step();
    return r;
}

/// optimizer_step without clipping.
template <class M, class O, class Body>
StepResult optimizer_step(M& model, O& opt, Body&& body) {
    zero_grad(model);
    detail::before_backward(opt);
    StepResult r;
    r.loss = double(std::forward<Body>(body)());
    detail::before_update(opt);
    opt.step();
    return r;
}

namespace detail {
/// The body of train_step: y = forward(); L = loss_fn(y); the checks; model.backward(dL/dy).
template <class M, class Forward, class LossFn, class Describe>
double forward_loss_backward(M& model, Forward& forward, LossFn& loss_fn, const char* who, Describe& bad_loss) {
    const auto& y = forward();
    auto loss = loss_fn(y);
    if (!std::isfinite(double(loss.value))) throw Error(bad_loss(double(loss.value)));
    if (!(loss.grad.shape() == y.shape()))
        throw ShapeError(detail::concat(who, ": the loss gradient ", loss.grad.shape(),
                                        " does not match the model output ", y.shape()));
    model.backward(loss.grad);
    return double(loss.value);
}
}  // namespace detail

/// One training step of `model` with `opt`: zero_grad, y = forward(),
/// L = loss_fn(y) (checked: finite, gradient shaped as y), backward, clipping of
/// `clip_params` when clip_norm > 0, opt.step(). `who` names the caller in
/// errors; `bad_loss(value)` returns the message for a non-finite loss (it
/// says where: epoch, step, task).
template <class M, class O, class Forward, class LossFn, class Describe, class P>
StepResult train_step(M& model, O& opt, Forward&& forward, LossFn&& loss_fn, const char* who, Describe&& bad_loss,
                      const std::vector<P*>& clip_params, double clip_norm) {
    return optimizer_step(
        model, opt, [&] { return detail::forward_loss_backward(model, forward, loss_fn, who, bad_loss); },
        clip_params, clip_norm);
}

}  // namespace patchwork
