#pragma once
// Optional oneDNN backend of the float convolutions (meson option `dnnl`,
// which defines PATCHWORK_USE_DNNL and links libdnnl). Without it this header
// declares nothing and BasicConv2d uses its own kernels (tiled im2col + GEMM,
// depthwise window sums). With it, BasicConv2d<float> runs dense, grouped and
// depthwise convolutions here, except where oneDNN has only reference kernels
// for the shape (Conv::usable), where its output size needs a negative padding
// (below), and a depthwise convolution in a mixed-task batch (per-task filters,
// which only the native kernels apply per segment).
//
//
// oneDNN computes the same function as layers/conv2d.hpp, with the same
// tensors in place (no layout copies of the activations):
//   x  [N, H, W, C_in]          NHWC, oneDNN's logical dims {N, C_in, H, W}, tag nhwc
//   W  [C_out, k, k, C_in / G]  tag ohwi (G = 1) or gohwi ({G, C_out/G, C_in/G, k, k})
//   y  [N, Ho, Wo, C_out]       tag nhwc
// The weights go through a reorder into the layout the primitive prefers (a
// few KiB, once per call); the weight gradient comes back through the inverse
// reorder and is added to the parameter's gradient (oneDNN overwrites its
// outputs, patchwork's gradients accumulate).
//
// Padding: oneDNN wants the bottom/right padding that makes its output size
// exact, p_r = (Ho - 1) s + k - H - p (<= p; rows a strided window never reaches
// are simply not padded). A negative p_r (a stride that skips input rows
// without padding) is left to the native path.
//
// Threads: oneDNN (Debian's build uses OpenMP) runs on omp_get_max_threads()
// threads. Its forward and input gradient are sums over taps and channels of
// one output element, the same on any thread count. Its weight and bias
// gradients are sums over all pixels that oneDNN splits between threads: the
// same bits from run to run on the same number of threads, but their rounding
// may change with the thread count (the native path's does not). Calls must
// not come from inside an OpenMP parallel region.
#if defined(PATCHWORK_USE_DNNL)

#include <cstddef>
#include <memory>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>

namespace patchwork::ops::dnnl_backend {

/// The process's oneDNN CPU engine.
inline dnnl::engine& engine() {
    static dnnl::engine e(dnnl::engine::kind::cpu, 0);
    return e;
}

/// The stream convolutions run on (oneDNN's CPU streams execute synchronously;
/// one per calling thread, so that layers on different threads never share one).
inline dnnl::stream& stream() {
    thread_local dnnl::stream s(engine());
    return s;
}

/// Everything a convolution primitive depends on.
struct ConvShape {
    std::size_t batch = 0, h = 0, w = 0, in = 0, out = 0, kernel = 0, stride = 1, padding = 0, groups = 1, ho = 0,
                wo = 0;
    bool operator==(const ConvShape&) const = default;

    [[nodiscard]] long pad_r(std::size_t in_extent, std::size_t out_extent) const noexcept {
        return long((out_extent - 1) * stride + kernel) - long(in_extent) - long(padding);
    }
    /// oneDNN can take it: exact output sizes with non-negative padding.
    [[nodiscard]] bool supported() const noexcept { return pad_r(h, ho) >= 0 && pad_r(w, wo) >= 0; }
};

/// One convolution's oneDNN primitives for one input shape, built on first use.
class Conv {
public:
    using tag = dnnl::memory::format_tag;
    using dt = dnnl::memory::data_type;
    using dims = dnnl::memory::dims;

    explicit Conv(const ConvShape& s) : s_(s) {
        const auto d = [](std::size_t v) { return dnnl::memory::dim(v); };
        src_md_ = dnnl::memory::desc({d(s.batch), d(s.in), d(s.h), d(s.w)}, dt::f32, tag::nhwc);
        dst_md_ = dnnl::memory::desc({d(s.batch), d(s.out), d(s.ho), d(s.wo)}, dt::f32, tag::nhwc);
        user_w_md_ = s.groups == 1
                         ? dnnl::memory::desc({d(s.out), d(s.in), d(s.kernel), d(s.kernel)}, dt::f32, tag::ohwi)
                         : dnnl::memory::desc({d(s.groups), d(s.out / s.groups), d(s.in / s.groups), d(s.kernel),
                                               d(s.kernel)},
                                              dt::f32, tag::gohwi);
        any_w_md_ = dnnl::memory::desc(user_w_md_.dims(), dt::f32, tag::any);
        bias_md_ = dnnl::memory::desc({d(s.out)}, dt::f32, tag::x);
        strides_ = {d(s.stride), d(s.stride)};
        pad_l_ = {d(s.padding), d(s.padding)};
        pad_r_ = {s.pad_r(s.h, s.ho), s.pad_r(s.w, s.wo)};
    }

    [[nodiscard]] const ConvShape& shape() const noexcept { return s_; }

    /// oneDNN has optimised (not reference) kernels for this shape in all three
    /// directions; decided once, on the first call. Where it does not (e.g. some
    /// channel multipliers of depthwise convolutions), patchwork's own kernels are faster.
    [[nodiscard]] bool usable() {
        if (usable_ < 0) {
            usable_ = 0;
            if (!s_.supported()) return false;
            try {
                fwd_bias_ = std::make_unique<Forward>(forward_pd(true));
                prepare_backward_data();
                prepare_backward_weights(true);
            } catch (const dnnl::error&) {
                return false;  // no implementation at all: the native path
            }
            const auto optimised = [](const char* impl) { return std::string_view(impl).substr(0, 3) != "ref"; };
            usable_ = optimised(fwd_bias_->pd.impl_info_str()) && optimised(bwd_data_->pd.impl_info_str()) &&
                      optimised(bwd_w_bias_->pd.impl_info_str());
        }
        return usable_ == 1;
    }

    /// y = conv(x, W) (+ b when b is not null).
    void forward(const float* x, const float* w, const float* b, float* y) {
        auto& fwd = b != nullptr ? fwd_bias_ : fwd_;
        if (!fwd) fwd = std::make_unique<Forward>(forward_pd(b != nullptr));
        const float* wp = to_primitive_weights(w, fwd->pd.weights_desc(), fwd_w_);
        dnnl::memory src(src_md_, engine(), const_cast<float*>(x)), dst(dst_md_, engine(), y);
        dnnl::memory wm(fwd->pd.weights_desc(), engine(), const_cast<float*>(wp));
        std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, dst}};
        if (b != nullptr) args.emplace(DNNL_ARG_BIAS, dnnl::memory(bias_md_, engine(), const_cast<float*>(b)));
        fwd->prim.execute(stream(), args);
        stream().wait();
    }

    /// dx = the input gradient of dy (overwritten).
    void backward_data(const float* dy, const float* w, float* dx) {
        prepare_backward_data();
        const float* wp = to_primitive_weights(w, bwd_data_->pd.weights_desc(), bwd_w_);
        dnnl::memory diff_src(src_md_, engine(), dx), diff_dst(dst_md_, engine(), const_cast<float*>(dy));
        dnnl::memory wm(bwd_data_->pd.weights_desc(), engine(), const_cast<float*>(wp));
        bwd_data_->prim.execute(stream(), {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wm},
                                           {DNNL_ARG_DIFF_SRC, diff_src}});
        stream().wait();
    }

    /// dw = sum over this shape's pixels of the weight gradient, written in
    /// patchwork's layout [C_out, k, k, C_in / G] (overwritten); db (if not
    /// null) the bias gradient (overwritten).
    void backward_weights(const float* x, const float* dy, float* dw, float* db) {
        auto& bwd = prepare_backward_weights(db != nullptr);
        const bool same = bwd->pd.diff_weights_desc() == user_w_md_;
        if (!same) bwd->staging.resize(bwd->pd.diff_weights_desc().get_size() / sizeof(float));
        dnnl::memory src(src_md_, engine(), const_cast<float*>(x)), diff_dst(dst_md_, engine(), const_cast<float*>(dy));
        dnnl::memory user_dw(user_w_md_, engine(), dw);
        dnnl::memory prim_dw = same ? user_dw : dnnl::memory(bwd->pd.diff_weights_desc(), engine(), bwd->staging.data());
        std::unordered_map<int, dnnl::memory> args{
            {DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, prim_dw}};
        if (db != nullptr) args.emplace(DNNL_ARG_DIFF_BIAS, dnnl::memory(bias_md_, engine(), db));
        bwd->prim.execute(stream(), args);
        if (!same) dnnl::reorder(prim_dw, user_dw).execute(stream(), prim_dw, user_dw);
        stream().wait();
    }

private:
    struct Forward {
        explicit Forward(const dnnl::convolution_forward::primitive_desc& p) : pd(p), prim(p) {}
        dnnl::convolution_forward::primitive_desc pd;
        dnnl::convolution_forward prim;
    };
    struct BackwardData {
        dnnl::convolution_backward_data::primitive_desc pd;
        dnnl::convolution_backward_data prim;
    };
    struct BackwardWeights {
        dnnl::convolution_backward_weights::primitive_desc pd;
        dnnl::convolution_backward_weights prim;
        std::vector<float> staging;  ///< the gradient in the primitive's layout, when it differs
    };

    void prepare_backward_data() {
        if (bwd_data_) return;
        const auto hint = forward_pd(false);
        const dnnl::convolution_backward_data::desc desc(dnnl::algorithm::convolution_direct, src_md_, any_w_md_,
                                                         dst_md_, strides_, pad_l_, pad_r_);
        auto pd = dnnl::convolution_backward_data::primitive_desc(desc, engine(), hint);
        bwd_data_ = std::make_unique<BackwardData>(BackwardData{pd, dnnl::convolution_backward_data(pd)});
    }

    std::unique_ptr<BackwardWeights>& prepare_backward_weights(bool with_bias) {
        auto& bwd = with_bias ? bwd_w_bias_ : bwd_w_nobias_;
        if (bwd) return bwd;
        const auto hint = forward_pd(with_bias);
        const auto desc = with_bias ? dnnl::convolution_backward_weights::desc(
                                          dnnl::algorithm::convolution_direct, src_md_, any_w_md_, bias_md_, dst_md_,
                                          strides_, pad_l_, pad_r_)
                                    : dnnl::convolution_backward_weights::desc(dnnl::algorithm::convolution_direct,
                                                                               src_md_, any_w_md_, dst_md_, strides_,
                                                                               pad_l_, pad_r_);
        auto pd = dnnl::convolution_backward_weights::primitive_desc(desc, engine(), hint);
        bwd = std::make_unique<BackwardWeights>(BackwardWeights{pd, dnnl::convolution_backward_weights(pd), {}});
        return bwd;
    }

    [[nodiscard]] dnnl::convolution_forward::primitive_desc forward_pd(bool with_bias) const {
        const auto desc = with_bias ? dnnl::convolution_forward::desc(
                                          dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                                          src_md_, any_w_md_, bias_md_, dst_md_, strides_, pad_l_, pad_r_)
                                    : dnnl::convolution_forward::desc(
                                          dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                                          src_md_, any_w_md_, dst_md_, strides_, pad_l_, pad_r_);
        return dnnl::convolution_forward::primitive_desc(desc, engine());
    }

    /// w in the layout `md`: w itself when it already is, else a reorder into `buf`.
    const float* to_primitive_weights(const float* w, const dnnl::memory::desc& md, std::vector<float>& buf) {
        if (md == user_w_md_) return w;
        buf.resize(md.get_size() / sizeof(float));
        dnnl::memory from(user_w_md_, engine(), const_cast<float*>(w)), to(md, engine(), buf.data());
        dnnl::reorder(from, to).execute(stream(), from, to);
        return buf.data();
    }

    ConvShape s_;
    dnnl::memory::desc src_md_, dst_md_, user_w_md_, any_w_md_, bias_md_;
    dims strides_, pad_l_, pad_r_;
    std::unique_ptr<Forward> fwd_, fwd_bias_;
    std::unique_ptr<BackwardData> bwd_data_;
    std::unique_ptr<BackwardWeights> bwd_w_bias_, bwd_w_nobias_;
    std::vector<float> fwd_w_, bwd_w_;
    int usable_ = -1;  ///< -1 not decided yet, else 0 or 1
};

/// A layer's Conv objects, one per input shape seen recently. Copying a layer
/// copies no primitives (the copy builds its own on first use).
class ConvCache {
public:
    ConvCache() = default;
    ConvCache(const ConvCache&) {}
    ConvCache& operator=(const ConvCache&) {
        entries_.clear();
        return *this;
    }
    ConvCache(ConvCache&&) noexcept = default;
    ConvCache& operator=(ConvCache&&) noexcept = default;

    /// The Conv for shape s, built on first use; the cache keeps the last few shapes.
    Conv& get(const ConvShape& s) {
        for (auto& e : entries_)
            if (e->shape() == s) return *e;
        if (entries_.size() == max_entries) entries_.erase(entries_.begin());
        entries_.push_back(std::make_unique<Conv>(s));
        return *entries_.back();
    }

private:
    static constexpr std::size_t max_entries = 8;
    std::vector<std::unique_ptr<Conv>> entries_;
};

}  // namespace patchwork::ops::dnnl_backend

#endif  // PATCHWORK_USE_DNNL
