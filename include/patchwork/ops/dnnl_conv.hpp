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
// The C API (dnnl.h) is used rather than dnnl.hpp: the C++ header alone costs
// every translation unit that includes a convolution 1.6 s of compile time
// (measured, g++ 12 -O1), the C one 0.05 s.
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
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <oneapi/dnnl/dnnl.h>

#include "patchwork/core/error.hpp"

namespace patchwork::ops::dnnl_backend {

namespace detail {

/// Throws patchwork::Error naming the oneDNN call that failed.
inline void check(dnnl_status_t status, const char* what) {
    if (status != dnnl_success)
        throw Error(std::string("oneDNN: ") + what + " failed (dnnl_status_t " + std::to_string(int(status)) + ")");
}

/// An owned oneDNN handle (a pointer to one of its opaque structs), destroyed
/// by a `Destroy` functor.
template <class H, class Destroy>
class Handle {
public:
    Handle() = default;
    explicit Handle(H h) noexcept : h_(h) {}
    Handle(Handle&& o) noexcept : h_(o.release()) {}
    Handle& operator=(Handle&& o) noexcept {
        if (this != &o) {
            reset();
            h_ = o.release();
        }
        return *this;
    }
    Handle(const Handle&) = delete;
    Handle& operator=(const Handle&) = delete;
    ~Handle() { reset(); }

    [[nodiscard]] H get() const noexcept { return h_; }
    [[nodiscard]] explicit operator bool() const noexcept { return h_ != nullptr; }
    H release() noexcept {
        H h = h_;
        h_ = nullptr;
        return h;
    }
    void reset() noexcept {
        if (h_ != nullptr) Destroy{}(h_);
        h_ = nullptr;
    }

private:
    H h_ = nullptr;
};

struct DestroyPrimitiveDesc {
    void operator()(dnnl_primitive_desc_t p) const noexcept { dnnl_primitive_desc_destroy(p); }
};
struct DestroyPrimitive {
    void operator()(dnnl_primitive_t p) const noexcept { dnnl_primitive_destroy(p); }
};
struct DestroyMemory {
    void operator()(dnnl_memory_t p) const noexcept { dnnl_memory_destroy(p); }
};
struct DestroyStream {
    void operator()(dnnl_stream_t p) const noexcept { dnnl_stream_destroy(p); }
};
using PrimitiveDesc = Handle<dnnl_primitive_desc_t, DestroyPrimitiveDesc>;
using PrimitiveHandle = Handle<dnnl_primitive_t, DestroyPrimitive>;
using Memory = Handle<dnnl_memory_t, DestroyMemory>;
using Stream = Handle<dnnl_stream_t, DestroyStream>;

}  // namespace detail

/// The process's oneDNN CPU engine (never destroyed: layers may outlive static destruction order).
inline dnnl_engine_t engine() {
    static const dnnl_engine_t e = [] {
        dnnl_engine_t made = nullptr;
        detail::check(dnnl_engine_create(&made, dnnl_cpu, 0), "dnnl_engine_create");
        return made;
    }();
    return e;
}

/// The stream convolutions run on (oneDNN's CPU streams execute synchronously;
/// one per calling thread, so that layers on different threads never share one).
inline dnnl_stream_t stream() {
    thread_local const detail::Stream s = [] {
        dnnl_stream_t made = nullptr;
        detail::check(dnnl_stream_create(&made, engine(), dnnl_stream_default_flags), "dnnl_stream_create");
        return detail::Stream(made);
    }();
    return s.get();
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

/// A primitive with its descriptor, executed on the caller's buffers (no
/// copies) through memory objects made on the first call and pointed at the
/// new buffers on the next ones (no allocation per call).
class Primitive {
public:
    Primitive() = default;
    explicit Primitive(detail::PrimitiveDesc pd) : pd_(std::move(pd)) {
        dnnl_primitive_t p = nullptr;
        detail::check(dnnl_primitive_create(&p, pd_.get()), "dnnl_primitive_create");
        prim_ = detail::PrimitiveHandle(p);
    }
    [[nodiscard]] explicit operator bool() const noexcept { return bool(prim_); }
    [[nodiscard]] const_dnnl_primitive_desc_t pd() const noexcept { return pd_.get(); }
    [[nodiscard]] const dnnl_memory_desc_t& md(dnnl_query_t what) const {
        return *dnnl_primitive_desc_query_md(pd_.get(), what, 0);
    }
    [[nodiscard]] std::string_view impl() const {
        const char* name = nullptr;
        detail::check(dnnl_primitive_desc_query(pd_.get(), dnnl_query_impl_info_str, 0, &name),
                      "dnnl_primitive_desc_query");
        return name != nullptr ? std::string_view(name) : std::string_view("ref");
    }

    struct Arg {
        int kind;
        const dnnl_memory_desc_t* md;
        const void* data;
    };
    /// Runs the primitive on the given buffers (each described by md) and
    /// waits. Every call must pass the same argument kinds and descriptors.
    void execute(std::initializer_list<Arg> args) {
        if (args.size() > max_args) throw Error("oneDNN: more arguments than a convolution has");
        if (args_ != args.size())
            for (std::size_t i = 0; i < max_args; ++i) memory_[i].reset();
        args_ = args.size();
        std::size_t i = 0;
        for (const Arg& a : args) {
            if (!memory_[i]) {
                dnnl_memory_t m = nullptr;
                detail::check(dnnl_memory_create(&m, a.md, engine(), const_cast<void*>(a.data)), "dnnl_memory_create");
                memory_[i] = detail::Memory(m);
                exec_[i] = {a.kind, m};
            } else {
                if (exec_[i].arg != a.kind) throw Error("oneDNN: a primitive executed with other arguments than before");
                detail::check(dnnl_memory_set_data_handle(memory_[i].get(), const_cast<void*>(a.data)),
                              "dnnl_memory_set_data_handle");
            }
            ++i;
        }
        detail::check(dnnl_primitive_execute(prim_.get(), stream(), int(args_), exec_),
                      "dnnl_primitive_execute");
        detail::check(dnnl_stream_wait(stream()), "dnnl_stream_wait");
    }

private:
    detail::PrimitiveDesc pd_;
    detail::PrimitiveHandle prim_;
    // One memory object per argument, kept between calls. (Fixed arrays: nvcc 13's
    // front end fails on a std::vector of dnnl_exec_arg_t, a typedef'd unnamed struct.)
    static constexpr std::size_t max_args = 4;
    detail::Memory memory_[max_args];
    dnnl_exec_arg_t exec_[max_args]{};
    std::size_t args_ = 0;
};

/// One convolution's oneDNN primitives for one input shape, built on first use.
class Conv {
public:
    explicit Conv(const ConvShape& s) : s_(s) {
        const auto d = [](std::size_t v) { return dnnl_dim_t(v); };
        const dnnl_dims_t src{d(s.batch), d(s.in), d(s.h), d(s.w)}, dst{d(s.batch), d(s.out), d(s.ho), d(s.wo)};
        detail::check(dnnl_memory_desc_init_by_tag(&src_md_, 4, src, dnnl_f32, dnnl_nhwc), "memory desc (src)");
        detail::check(dnnl_memory_desc_init_by_tag(&dst_md_, 4, dst, dnnl_f32, dnnl_nhwc), "memory desc (dst)");
        if (s.groups == 1) {
            const dnnl_dims_t w{d(s.out), d(s.in), d(s.kernel), d(s.kernel)};
            detail::check(dnnl_memory_desc_init_by_tag(&user_w_md_, 4, w, dnnl_f32, dnnl_ohwi), "memory desc (W)");
            detail::check(dnnl_memory_desc_init_by_tag(&any_w_md_, 4, w, dnnl_f32, dnnl_format_tag_any),
                          "memory desc (W)");
        } else {
            const dnnl_dims_t w{d(s.groups), d(s.out / s.groups), d(s.in / s.groups), d(s.kernel), d(s.kernel)};
            detail::check(dnnl_memory_desc_init_by_tag(&user_w_md_, 5, w, dnnl_f32, dnnl_gohwi), "memory desc (W)");
            detail::check(dnnl_memory_desc_init_by_tag(&any_w_md_, 5, w, dnnl_f32, dnnl_format_tag_any),
                          "memory desc (W)");
        }
        const dnnl_dims_t b{d(s.out)};
        detail::check(dnnl_memory_desc_init_by_tag(&bias_md_, 1, b, dnnl_f32, dnnl_x), "memory desc (bias)");
        strides_[0] = strides_[1] = d(s.stride);
        pad_l_[0] = pad_l_[1] = d(s.padding);
        pad_r_[0] = s.pad_r(s.h, s.ho);
        pad_r_[1] = s.pad_r(s.w, s.wo);
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
                prepare_forward(true);
                prepare_backward_data();
                prepare_backward_weights(true);
            } catch (const Error&) {
                return false;  // no implementation at all: the native path
            }
            const auto optimised = [](std::string_view impl) { return impl.substr(0, 3) != "ref"; };
            usable_ = optimised(fwd_bias_.impl()) && optimised(bwd_data_.impl()) && optimised(bwd_w_bias_.impl());
        }
        return usable_ == 1;
    }

    /// y = conv(x, W) (+ b when b is not null).
    void forward(const float* x, const float* w, const float* b, float* y) {
        Primitive& fwd = prepare_forward(b != nullptr);
        const dnnl_memory_desc_t& wmd = fwd.md(dnnl_query_weights_md);
        const float* wp = to_primitive_weights(w, wmd, fwd_w_);
        if (b != nullptr)
            fwd.execute({{DNNL_ARG_SRC, &src_md_, x}, {DNNL_ARG_WEIGHTS, &wmd, wp}, {DNNL_ARG_BIAS, &bias_md_, b},
                         {DNNL_ARG_DST, &dst_md_, y}});
        else
            fwd.execute({{DNNL_ARG_SRC, &src_md_, x}, {DNNL_ARG_WEIGHTS, &wmd, wp}, {DNNL_ARG_DST, &dst_md_, y}});
    }

    /// dx = the input gradient of dy (overwritten).
    void backward_data(const float* dy, const float* w, float* dx) {
        prepare_backward_data();
        const dnnl_memory_desc_t& wmd = bwd_data_.md(dnnl_query_weights_md);
        const float* wp = to_primitive_weights(w, wmd, bwd_data_w_);
        bwd_data_.execute({{DNNL_ARG_DIFF_DST, &dst_md_, dy}, {DNNL_ARG_WEIGHTS, &wmd, wp},
                           {DNNL_ARG_DIFF_SRC, &src_md_, dx}});
    }

    /// dw = sum over this shape's pixels of the weight gradient, written in
    /// patchwork's layout [C_out, k, k, C_in / G] (overwritten); db (if not
    /// null) the bias gradient (overwritten).
    void backward_weights(const float* x, const float* dy, float* dw, float* db) {
        Primitive& bwd = prepare_backward_weights(db != nullptr);
        const dnnl_memory_desc_t& dwmd = bwd.md(dnnl_query_diff_weights_md);
        const bool same = dnnl_memory_desc_equal(&dwmd, &user_w_md_) != 0;
        if (!same) staging_.resize(dnnl_memory_desc_get_size(&dwmd) / sizeof(float));
        float* target = same ? dw : staging_.data();
        if (db != nullptr)
            bwd.execute({{DNNL_ARG_SRC, &src_md_, x}, {DNNL_ARG_DIFF_DST, &dst_md_, dy},
                         {DNNL_ARG_DIFF_WEIGHTS, &dwmd, target}, {DNNL_ARG_DIFF_BIAS, &bias_md_, db}});
        else
            bwd.execute({{DNNL_ARG_SRC, &src_md_, x}, {DNNL_ARG_DIFF_DST, &dst_md_, dy},
                         {DNNL_ARG_DIFF_WEIGHTS, &dwmd, target}});
        if (!same) reorder(dwmd, staging_.data(), user_w_md_, dw, to_user_);
    }

private:
    Primitive& prepare_forward(bool with_bias) {
        Primitive& fwd = with_bias ? fwd_bias_ : fwd_;
        if (fwd) return fwd;
        dnnl_convolution_desc_t desc;
        detail::check(dnnl_convolution_forward_desc_init(&desc, dnnl_forward_training, dnnl_convolution_direct,
                                                         &src_md_, &any_w_md_, with_bias ? &bias_md_ : nullptr,
                                                         &dst_md_, strides_, pad_l_, pad_r_),
                      "convolution forward descriptor");
        fwd = Primitive(create_pd(&desc, nullptr, "convolution forward"));
        return fwd;
    }

    void prepare_backward_data() {
        if (bwd_data_) return;
        const Primitive& hint = prepare_forward(false);
        dnnl_convolution_desc_t desc;
        detail::check(dnnl_convolution_backward_data_desc_init(&desc, dnnl_convolution_direct, &src_md_, &any_w_md_,
                                                               &dst_md_, strides_, pad_l_, pad_r_),
                      "convolution backward data descriptor");
        bwd_data_ = Primitive(create_pd(&desc, hint.pd(), "convolution backward data"));
    }

    Primitive& prepare_backward_weights(bool with_bias) {
        Primitive& bwd = with_bias ? bwd_w_bias_ : bwd_w_;
        if (bwd) return bwd;
        const Primitive& hint = prepare_forward(with_bias);
        dnnl_convolution_desc_t desc;
        detail::check(dnnl_convolution_backward_weights_desc_init(&desc, dnnl_convolution_direct, &src_md_,
                                                                  &any_w_md_, with_bias ? &bias_md_ : nullptr,
                                                                  &dst_md_, strides_, pad_l_, pad_r_),
                      "convolution backward weights descriptor");
        bwd = Primitive(create_pd(&desc, hint.pd(), "convolution backward weights"));
        return bwd;
    }

    static detail::PrimitiveDesc create_pd(const void* desc, const_dnnl_primitive_desc_t hint, const char* what) {
        dnnl_primitive_desc_t pd = nullptr;
        detail::check(dnnl_primitive_desc_create(&pd, desc, nullptr, engine(), hint),
                      (std::string(what) + " primitive descriptor").c_str());
        return detail::PrimitiveDesc(pd);
    }

    /// to = from in another layout, through a reorder primitive kept in `cache`.
    static void reorder(const dnnl_memory_desc_t& from_md, const float* from, const dnnl_memory_desc_t& to_md,
                        float* to, Primitive& cache) {
        if (!cache) {
            dnnl_primitive_desc_t pd = nullptr;
            detail::check(dnnl_reorder_primitive_desc_create(&pd, &from_md, engine(), &to_md, engine(), nullptr),
                          "reorder primitive descriptor");
            cache = Primitive(detail::PrimitiveDesc(pd));
        }
        cache.execute({{DNNL_ARG_FROM, &from_md, from}, {DNNL_ARG_TO, &to_md, to}});
    }

    /// w in the layout `md`: w itself when it already is, else a reorder into `buf`.
    const float* to_primitive_weights(const float* w, const dnnl_memory_desc_t& md, std::vector<float>& buf) {
        if (dnnl_memory_desc_equal(&md, &user_w_md_) != 0) return w;
        buf.resize(dnnl_memory_desc_get_size(&md) / sizeof(float));
        Primitive& cache = &buf == &fwd_w_ ? to_fwd_ : to_bwd_;
        reorder(user_w_md_, w, md, buf.data(), cache);
        return buf.data();
    }

    ConvShape s_;
    dnnl_memory_desc_t src_md_{}, dst_md_{}, user_w_md_{}, any_w_md_{}, bias_md_{};
    dnnl_dims_t strides_{}, pad_l_{}, pad_r_{};
    Primitive fwd_, fwd_bias_, bwd_data_, bwd_w_, bwd_w_bias_;
    Primitive to_fwd_, to_bwd_, to_user_;  ///< weight reorders (only where the layouts differ)
    std::vector<float> fwd_w_, bwd_data_w_, staging_;  ///< weights in the primitives' layouts, the gradient in its own
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
