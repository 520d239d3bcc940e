#pragma once
// Tensor-level wrappers of the fused patch kernels, declared in
// patchwork/ops/cuda_ops.hpp: what the adapter, scale-shift and LoRA policy
// modules run when their Device is Cuda. They check shapes (naming the module
// path), then call the raw-pointer launchers of adapter.cuh, scale_shift.cuh
// and multitask.cuh (one task), and what a searched module runs (mix.cuh). For float and double the kernels' gradient
// type accum_t<T> is T, so parameter gradients accumulate straight into the
// parameters' gradient tensors. Backward scratch memory is the current
// context's workspace (cuda::Context::workspace).
#include <string_view>

#include "patchwork/cuda/device_tensor.hpp"
#include "patchwork/kernels/adapter.cuh"
#include "patchwork/kernels/mix.cuh"
#include "patchwork/kernels/multitask.cuh"
#include "patchwork/kernels/scale_shift.cuh"
#include "patchwork/ops/cuda_ops.hpp"

namespace patchwork::cuda {

namespace detail {
template <class T>
void expect_shape(const Tensor<T, Cuda>& t, const Shape& want, std::string_view where, const char* what) {
    if (!(t.shape() == want))
        throw ShapeError(patchwork::detail::concat(where, ": ", what, ": expected ", want, ", got ", t.shape()));
}
template <class T>
T* data_or_null(Tensor<T, Cuda>* t) {
    return t == nullptr ? nullptr : t->data();
}
/// The shape a parameter of shape `one` has for `rows`: `one` itself, or stacked [tasks, one...] for mixed rows.
inline Shape stacked_shape(const Shape& one, TaskRows rows) { return rows.mixed() ? one.prepended(rows.tasks) : one; }
}  // namespace detail

template <class T>
void adapter_forward(const Tensor<T, Cuda>& h, const Tensor<T, Cuda>& down_w, const Tensor<T, Cuda>& down_b,
                     const Tensor<T, Cuda>& up_w, const Tensor<T, Cuda>& up_b, bool gelu, Tensor<T, Cuda>& y,
                     Tensor<compute_t<T>, Cuda>& z, std::string_view where, TaskRows rows) {
    const std::size_t n = h.rows(), d = h.cols(), r = down_w.rows() / rows.tasks;
    detail::expect_shape(down_w, detail::stacked_shape(Shape{r, d}, rows), where, "adapter down-projection");
    detail::expect_shape(down_b, detail::stacked_shape(Shape{r}, rows), where, "adapter down-projection bias");
    detail::expect_shape(up_w, detail::stacked_shape(Shape{d, r}, rows), where, "adapter up-projection");
    detail::expect_shape(up_b, detail::stacked_shape(Shape{d}, rows), where, "adapter up-projection bias");
    y.resize(h.shape());
    z.resize(Shape{n, r});
    if (!rows.mixed()) {
        kernels::adapter_forward<kernels::device_t<T>>(kernels::dev(h.data()), n, d, r, kernels::dev(down_w.data()), kernels::dev(down_b.data()), kernels::dev(up_w.data()), kernels::dev(up_b.data()),
                                    kernels::adapter_act(gelu), kernels::dev(y.data()), z.data(), where);
        return;
    }
    kernels::detail::lowrank_forward<kernels::device_t<T>>(kernels::adapter_act(gelu), kernels::dev(h.data()), kernels::dev(h.data()), rows.task,
                                        {n, d, d, r, rows.tasks}, kernels::dev(down_w.data()), kernels::dev(down_b.data()), kernels::dev(up_w.data()),
                                        kernels::dev(up_b.data()), kernels::accum_t<kernels::device_t<T>>(1), kernels::dev(y.data()), z.data(), where);
}

template <class T>
void adapter_backward(const Tensor<T, Cuda>& h, const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& down_w,
                      const Tensor<T, Cuda>& up_w, bool gelu, const Tensor<compute_t<T>, Cuda>& z, Tensor<T, Cuda>* dh,
                      Tensor<compute_t<T>, Cuda>* d_down_w, Tensor<compute_t<T>, Cuda>* d_down_b,
                      Tensor<compute_t<T>, Cuda>* d_up_w, Tensor<compute_t<T>, Cuda>* d_up_b, std::string_view where,
                      TaskRows rows) {
    const std::size_t n = h.rows(), d = h.cols(), r = down_w.rows() / rows.tasks;
    detail::expect_shape(g, h.shape(), where, "adapter output gradient");
    detail::expect_shape(z, Shape{n, r}, where, "adapter saved bottleneck");
    detail::expect_shape(up_w, detail::stacked_shape(Shape{d, r}, rows), where, "adapter up-projection");
    if (d_down_w != nullptr) detail::expect_shape(*d_down_w, down_w.shape(), where, "adapter down-projection gradient");
    if (d_down_b != nullptr)
        detail::expect_shape(*d_down_b, detail::stacked_shape(Shape{r}, rows), where, "adapter down-projection bias gradient");
    if (d_up_w != nullptr) detail::expect_shape(*d_up_w, up_w.shape(), where, "adapter up-projection gradient");
    if (d_up_b != nullptr)
        detail::expect_shape(*d_up_b, detail::stacked_shape(Shape{d}, rows), where, "adapter up-projection bias gradient");
    if (dh != nullptr) dh->resize(h.shape());
    kernels::detail::lowrank_backward<kernels::device_t<T>>(kernels::adapter_act(gelu), kernels::dev(h.data()), kernels::dev(g.data()), kernels::dev(g.data()), rows.task,
                                         {n, d, d, r, rows.tasks}, kernels::dev(down_w.data()), kernels::dev(up_w.data()), kernels::accum_t<kernels::device_t<T>>(1), z.data(),
                                         kernels::dev(detail::data_or_null(dh)),
                                         {detail::data_or_null(d_down_w), detail::data_or_null(d_down_b),
                                          detail::data_or_null(d_up_w), detail::data_or_null(d_up_b)},
                                         {}, where);
}

template <class T>
void scale_shift_forward(const Tensor<T, Cuda>& h, const Tensor<T, Cuda>& scale, const Tensor<T, Cuda>& shift,
                         Tensor<T, Cuda>& y, std::string_view where, TaskRows rows) {
    detail::expect_shape(scale, detail::stacked_shape(Shape{h.cols()}, rows), where, "scale");
    detail::expect_shape(shift, detail::stacked_shape(Shape{h.cols()}, rows), where, "shift");
    y.resize(h.shape());
    kernels::detail::scale_shift_forward<kernels::device_t<T>>(kernels::dev(h.data()), rows.task, h.rows(), h.cols(), rows.tasks, kernels::dev(scale.data()),
                                            kernels::dev(shift.data()), kernels::dev(y.data()), where);
}

template <class T>
void scale_shift_backward(const Tensor<T, Cuda>& h, const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& scale,
                          Tensor<T, Cuda>* dh, Tensor<compute_t<T>, Cuda>* dscale,
                          Tensor<compute_t<T>, Cuda>* dshift, std::string_view where, TaskRows rows) {
    detail::expect_shape(g, h.shape(), where, "scale_shift output gradient");
    detail::expect_shape(scale, detail::stacked_shape(Shape{h.cols()}, rows), where, "scale");
    if (dscale != nullptr) detail::expect_shape(*dscale, scale.shape(), where, "scale gradient");
    if (dshift != nullptr) detail::expect_shape(*dshift, scale.shape(), where, "shift gradient");
    if (dh != nullptr) dh->resize(h.shape());
    kernels::detail::scale_shift_backward<kernels::device_t<T>>(kernels::dev(h.data()), kernels::dev(g.data()), rows.task, h.rows(), h.cols(), rows.tasks,
                                             kernels::dev(scale.data()), kernels::dev(detail::data_or_null(dh)), detail::data_or_null(dscale),
                                             detail::data_or_null(dshift), {}, where);
}

template <class T>
void lora_forward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& base, const Tensor<T, Cuda>& a,
                  const Tensor<T, Cuda>& b, double s, Tensor<T, Cuda>& y, Tensor<compute_t<T>, Cuda>& u, std::string_view where,
                  TaskRows rows) {
    const std::size_t n = x.rows(), in = x.cols(), out = base.cols(), r = a.rows() / rows.tasks;
    detail::expect_shape(a, detail::stacked_shape(Shape{r, in}, rows), where, "LoRA factor A");
    detail::expect_shape(b, detail::stacked_shape(Shape{out, r}, rows), where, "LoRA factor B");
    if (base.rows() != n)
        throw ShapeError(patchwork::detail::concat(where, ": LoRA base output ", base.shape(), " for input ",
                                                   x.shape()));
    y.resize(base.shape());
    u.resize(Shape{n, r});
    // The task ids are trusted (see cuda_ops.hpp): the detail launcher, without multitask.cuh's check.
    kernels::detail::lowrank_forward<kernels::device_t<T>>(kernels::Act::none, kernels::dev(x.data()), kernels::dev(base.data()), rows.task,
                                        {n, in, out, r, rows.tasks}, kernels::dev(a.data()), nullptr, kernels::dev(b.data()), nullptr, kernels::accum_t<kernels::device_t<T>>(s),
                                        kernels::dev(y.data()), u.data(), where);
}

template <class T>
void lora_backward(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& base_dx,
                   const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, double s, const Tensor<compute_t<T>, Cuda>& u,
                   Tensor<T, Cuda>* dx, Tensor<compute_t<T>, Cuda>* da, Tensor<compute_t<T>, Cuda>* db,
                   std::string_view where, TaskRows rows) {
    const std::size_t n = x.rows(), in = x.cols(), out = g.cols(), r = a.rows() / rows.tasks;
    detail::expect_shape(u, Shape{n, r}, where, "LoRA saved projection");
    detail::expect_shape(b, detail::stacked_shape(Shape{out, r}, rows), where, "LoRA factor B");
    if (da != nullptr) detail::expect_shape(*da, a.shape(), where, "LoRA factor A gradient");
    if (db != nullptr) detail::expect_shape(*db, b.shape(), where, "LoRA factor B gradient");
    if (!base_dx.empty()) detail::expect_shape(base_dx, x.shape(), where, "LoRA base input gradient");
    if (dx != nullptr) dx->resize(x.shape());
    kernels::detail::lowrank_backward<kernels::device_t<T>>(kernels::Act::none, kernels::dev(x.data()), kernels::dev(g.data()),
                                         base_dx.empty() ? nullptr : kernels::dev(base_dx.data()), rows.task,
                                         {n, in, out, r, rows.tasks}, kernels::dev(a.data()), kernels::dev(b.data()), kernels::accum_t<kernels::device_t<T>>(s), u.data(),
                                         kernels::dev(detail::data_or_null(dx)),
                                         {detail::data_or_null(da), nullptr, detail::data_or_null(db), nullptr}, {},
                                         where);
}

template <class T>
void search_mix_forward(const Tensor<compute_t<T>, Cuda>& alpha, const Tensor<compute_t<T>, Cuda>* noise, double tau,
                        bool hard, const Tensor<T, Cuda>* const* candidates, Tensor<T, Cuda>& y,
                        Tensor<compute_t<T>, Cuda>& soft, Tensor<compute_t<T>, Cuda>& used, std::string_view where) {
    using E = kernels::device_t<T>;
    const std::size_t k = alpha.size();
    kernels::detail::check_mix(k, 1, where);
    const Shape& shape = candidates[0]->shape();
    const E* ptrs[kernels::kMaxCandidates];
    for (std::size_t j = 0; j < k; ++j) {
        if (!(candidates[j]->shape() == shape))
            throw ShapeError(patchwork::detail::concat(where, ": candidate ", j, " output ", candidates[j]->shape(),
                                                       " does not match candidate 0's ", shape));
        ptrs[j] = kernels::dev(candidates[j]->data());
    }
    if (noise != nullptr) detail::expect_shape(*noise, alpha.shape(), where, "gate noise");
    y.resize(shape);
    soft.resize(alpha.shape());
    used.resize(alpha.shape());
    const kernels::MixGates<kernels::accum_t<E>> gates{noise != nullptr ? noise->data() : nullptr, tau, hard};
    kernels::mix_forward<E>(alpha.data(), k, gates, ptrs, y.size(), kernels::dev(y.data()), soft.data(), used.data(),
                            where);
}

template <class T>
void search_mix_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>* const* candidates,
                         const Tensor<compute_t<T>, Cuda>& soft, const Tensor<compute_t<T>, Cuda>& used,
                         const Tensor<compute_t<T>, Cuda>* noise, double tau, Tensor<T, Cuda>* const* d_candidates,
                         Tensor<compute_t<T>, Cuda>* alpha_grad, std::string_view where) {
    using E = kernels::device_t<T>;
    const std::size_t k = used.size();
    kernels::detail::check_mix(k, 1, where);
    const E* ptrs[kernels::kMaxCandidates];
    E* dptrs[kernels::kMaxCandidates];
    for (std::size_t j = 0; j < k; ++j) {
        detail::expect_shape(*candidates[j], g.shape(), where, "candidate output (against the output gradient)");
        ptrs[j] = kernels::dev(candidates[j]->data());
        dptrs[j] = nullptr;
        if (d_candidates != nullptr && d_candidates[j] != nullptr) {
            d_candidates[j]->resize(g.shape());
            dptrs[j] = kernels::dev(d_candidates[j]->data());
        }
    }
    if (alpha_grad != nullptr) detail::expect_shape(*alpha_grad, used.shape(), where, "alpha gradient");
    const kernels::MixGates<kernels::accum_t<E>> gates{noise != nullptr ? noise->data() : nullptr, tau, false};
    kernels::mix_backward<E>(kernels::dev(g.data()), g.size(), ptrs, k, soft.data(), used.data(), gates, dptrs,
                             detail::data_or_null(alpha_grad), where);
}

template <class T>
void search_gate_backward(const Tensor<T, Cuda>& dgate, const Tensor<T, Cuda>& soft, double tau, bool noisy,
                          Tensor<T, Cuda>& alpha_grad, std::string_view where) {
    detail::expect_shape(dgate, soft.shape(), where, "gate gradient");
    detail::expect_shape(alpha_grad, soft.shape(), where, "alpha gradient");
    // Only whether noise was used and tau matter here (the noise values do not).
    const kernels::MixGates<T> gates{noisy ? dgate.data() : nullptr, tau, false};
    kernels::mix_gate_backward<T>(dgate.data(), soft.size(), soft.data(), gates, alpha_grad.data(), where);
}

}  // namespace patchwork::cuda
