#pragma once
// Multi-head self-attention with a key-padding mask.
//
// Input x: [B, T, D], D = H heads of width d = D / H. The query, key and value
// projections are ordinary modules (a Linear, or a Linear under any policy):
//   Q = query(x), K = key(x), V = value(x)                       each [B, T, D]
// For sequence b and head h, with Q_bh, K_bh, V_bh the [T, d] column blocks
// h*d .. h*d+d-1 of the rows of sequence b (strided views, no copies):
//   S = c Q_bh K_bh^T,  c = 1 / sqrt(d)                             [T, T]
//   P_ij = exp(S_ij) / sum_{k real} exp(S_ik)   for real keys j, P_ij = 0 for padded keys
//   C_bh = P V_bh                                                   [T, d]
// and the output is C: [B, T, D], the heads side by side (the layer's output
// projection is applied by the caller, BertLayer). Padded keys get exactly
// zero weight, so a padded position never changes a real one; padded query
// rows are computed like real ones and must be ignored downstream (pooling
// does, through the mask).
//
// Optional dropout on P while training (rate p, own seeded generator):
// P' = P * M / (1 - p), C = P' V.
//
// Backward, with G = dL/dC_bh [T, d]:
//   dV_bh = P'^T G                                                  [T, d]
//   dP'   = G V_bh^T,  dP = dP' * M / (1 - p)                       [T, T]
//   softmax per row i: dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik)  (zero where P_ij = 0)
//   dQ_bh = c dS K_bh,  dK_bh = c dS^T Q_bh
//   dL/dx = query.backward(dQ) + key.backward(dK) + value.backward(dV)
// A projection's backward runs only when it holds a trainable parameter or
// the input gradient is wanted; dS is computed only when the query or the
// key projection needs it.
//
// The mask. `forward` reads the mask of the enclosing AttentionMask scope
// (none: every key is real). BertModel::forward opens that scope from its
// TokenBatch; code that runs layers directly opens it itself:
//   { pw::AttentionMask scope(batch.mask, batch.batch, batch.tokens); layer.forward(x); }
// The module copies the mask at forward, so backward needs no scope. A
// sequence without any real token is an error.
//
// Device = Cuda (the device of the projections: BasicLinear<T, Cuda>, under
// any policy that runs on the device) computes the same products with the
// heads apart, [B, H, T, d] (cuda::split_heads, a permutation), so that every
// (sequence, head) block is one matrix of a strided-batched GEMM:
//   S = Q_h K_h^T (batched), P = masked_softmax(c S) (one fused kernel: the
//   mask uploaded at each forward; padded keys get exactly 0), P' = P * M
//   (the dropout factors drawn on the host by the same generator as on the
//   CPU, so both draw the same masks), C_h = P' V_h (batched), C = merge(C_h).
// Backward, the formulas above in the same order: dV_h = P'^T G_h, dP' = G_h
// V_h^T, dP = dP' * M, dS by the softmax kernel's backward (in place), dQ_h =
// c dS K_h and dK_h = c dS^T Q_h (batched GEMMs with alpha = c), each merged
// back to [B, T, D] for its projection. The parameters are the projections'
// own, so values copy between CPU and device modules.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "patchwork/core/mixed_batch.hpp"
#include "patchwork/core/module.hpp"
#include "patchwork/ops/cuda_attention_ops.hpp"
#include "patchwork/ops/cuda_ops.hpp"
#include "patchwork/ops/gemm.hpp"

namespace patchwork {

namespace detail {
struct MaskView {
    const std::int32_t* data = nullptr;  ///< [batch * tokens], nonzero = real; nullptr = no mask
    std::size_t batch = 0, tokens = 0;
};
inline MaskView& current_attention_mask() noexcept {
    thread_local MaskView view;
    return view;
}
}  // namespace detail

/// While alive, attention modules on this thread use `mask` ([batch, tokens],
/// 1 = real token, 0 = padding; empty = all real) as their key-padding mask.
/// The mask must outlive the scope. Scopes nest; the innermost wins.
class AttentionMask {
public:
    AttentionMask(std::span<const std::int32_t> mask, std::size_t batch, std::size_t tokens)
        : saved_(detail::current_attention_mask()) {
        if (!mask.empty() && mask.size() != batch * tokens)
            throw ShapeError(detail::concat("AttentionMask: ", mask.size(), " mask entries for a batch of ", batch,
                                            " x ", tokens));
        detail::current_attention_mask() = {mask.empty() ? nullptr : mask.data(), batch, tokens};
    }
    ~AttentionMask() { detail::current_attention_mask() = saved_; }
    AttentionMask(const AttentionMask&) = delete;
    AttentionMask& operator=(const AttentionMask&) = delete;

private:
    detail::MaskView saved_;
};

template <class T, class Query, class Key, class Value>
class BasicSelfAttention : public ModuleBase {
    static_assert(Module<Query> && Module<Key> && Module<Value>,
                  "patchwork::SelfAttention: the query, key and value projections must be modules");
    static_assert(std::is_same_v<device_of_t<Query>, device_of_t<Key>> &&
                      std::is_same_v<device_of_t<Query>, device_of_t<Value>>,
                  "patchwork::SelfAttention: the query, key and value projections must run on one device");

public:
    using Scalar = T;
    using Device = device_of_t<Query>;
    static constexpr const char* kind() { return "attention"; }
    static constexpr unsigned roles = Query::roles | Key::roles | Value::roles;
    static constexpr bool fixed_width = true;

    BasicSelfAttention(std::size_t width, std::size_t heads, double dropout = 0.0, std::uint64_t seed = 0x5eed)
        : query(width, width), key(width, width), value(width, width), width_(width), heads_(heads),
          head_dim_(heads ? width / heads : 0), rng_(seed) {
        if (heads == 0 || width == 0 || width % heads != 0)
            throw ConfigError(detail::concat("attention: width ", width, " is not a positive multiple of ", heads,
                                             " heads"));
        set_dropout(dropout);
        set_path("");
    }

    Query query;
    Key key;
    Value value;

    [[nodiscard]] std::size_t out_features() const noexcept { return width_; }
    [[nodiscard]] std::size_t heads() const noexcept { return heads_; }
    void set_dropout(double rate) {
        if (!(rate >= 0.0 && rate < 1.0))
            throw ConfigError(detail::concat(detail::display_path(path_), ": attention dropout must be in [0, 1), got ", rate));
        rate_ = rate;
    }
    void set_training(bool on) noexcept { training_ = on; }
    /// Restart the dropout generator: the next forward draws the masks a new
    /// module with this seed would (reproducible runs; a fixed mask for checks).
    void set_dropout_seed(std::uint64_t seed) noexcept { rng_ = Rng(seed); }
    /// The attention weights P of the last forward, [B, H, T, T] (zero at padded keys).
    [[nodiscard]] const Tensor<T, Device>& probabilities() const noexcept { return probs_; }

    const Tensor<T, Device>& forward(const Tensor<T, Device>& x) {
        if (x.rank() != 3 || x.cols() != width_ || x.empty())
            throw_shape_error(path_, "attention input [batch, tokens, features]", Shape{x.rank() ? x.dim(0) : 0, 0, width_},
                              x.shape());
        const bool masked = read_mask(x.dim(0), x.dim(1));
        if constexpr (std::is_same_v<Device, Cuda>) return device_forward(x, masked);
        else return cpu_forward(x);
    }

    const Tensor<T, Device>& backward(const Tensor<T, Device>& dctx) {
        check_same_shape(dctx, ctx_.shape(), path_, "attention output gradient");
        need_q_ = input_grad_ || any_trainable(query);
        need_k_ = input_grad_ || any_trainable(key);
        need_v_ = input_grad_ || any_trainable(value);
        if constexpr (std::is_same_v<Device, Cuda>) device_backward(dctx);
        else cpu_backward(dctx);
        bool first = true;
        const auto accumulate = [&](auto& proj, bool needed, const Tensor<T, Device>& g) {
            if (!needed) return;
            proj.set_input_grad(input_grad_);
            const Tensor<T, Device>& dx = proj.backward(g);
            if (!input_grad_) return;
            if (first) {
                dx_ = dx;
                first = false;
            } else if constexpr (std::is_same_v<Device, Cuda>) {
                cuda::axpy(T(1), dx, dx_, path_);
            } else {
                dx_.vector() += dx.vector();
            }
        };
        accumulate(query, need_q_, dq_);
        accumulate(key, need_k_, dk_);
        accumulate(value, need_v_, dv_);
        if (!input_grad_) dx_.clear();
        return dx_;
    }

    template <class F>
    void visit(F&& f) {
        query.visit(f);
        key.visit(f);
        value.visit(f);
    }
    template <class F>
    void visit_children(F&& f) {
        f(query);
        f(key);
        f(value);
    }
    void reset_parameters(Rng& rng) {
        query.reset_parameters(rng);
        key.reset_parameters(rng);
        value.reset_parameters(rng);
    }
    void set_path(const std::string& p) {
        path_ = p;
        query.set_path(child_path("query"));
        key.set_path(child_path("key"));
        value.set_path(child_path("value"));
    }

private:
    /// The dropout factors of this forward, m / (1 - p) per weight (host; the CPU and device draw alike).
    void draw_dropout(Tensor<T>& factor, const Shape& shape) {
        factor.resize(shape);
        const T keep = T(1.0 / (1.0 - rate_));
        const std::uint64_t threshold = std::uint64_t(rate_ * 18446744073709551616.0);
        for (std::size_t i = 0; i < factor.size(); ++i) factor[i] = rng_.next() < threshold ? T(0) : keep;
    }

    const Tensor<T, Cuda>& device_forward(const Tensor<T, Cuda>& x, bool masked) {
        const std::size_t B = x.dim(0), L = x.dim(1), H = heads_, d = head_dim_;
        if (masked) mask_dev_.upload(std::span<const int>(real_.data(), real_.size()), path_);
        cuda::split_heads(query.forward(x), H, qh_, path_);
        cuda::split_heads(key.forward(x), H, kh_, path_);
        cuda::split_heads(value.forward(x), H, vh_, path_);
        probs_.resize(Shape{B, H, L, L});
        cuda::gemm_batched(false, true, T(1), qh_, kh_, T(0), probs_, path_);  // S = Q_h K_h^T
        cuda::masked_softmax_forward(probs_, masked ? mask_dev_.data() : nullptr, 1.0 / std::sqrt(double(d)),
                                     probs_, path_);
        dropped_now_ = training_ && rate_ > 0.0;
        if (dropped_now_) {
            draw_dropout(factor_host_, probs_.shape());
            factor_.resize(probs_.shape());
            cuda::upload_elements(factor_.data(), factor_host_.data(), factor_.size(), path_);
            cuda::multiply(probs_, factor_, dropped_, path_);
        }
        heads_out_.resize(Shape{B, H, L, d});
        cuda::gemm_batched(false, false, T(1), dropped_now_ ? dropped_ : probs_, vh_, T(0), heads_out_, path_);
        cuda::merge_heads(heads_out_, ctx_, path_);
        return ctx_;
    }

    void device_backward(const Tensor<T, Cuda>& dctx) {
        const T c = T(1.0 / std::sqrt(double(head_dim_)));
        cuda::split_heads(dctx, heads_, gh_, path_);
        heads_out_.resize(vh_.shape());
        if (need_v_) {  // dV_h = P'^T G_h
            cuda::gemm_batched(true, false, T(1), dropped_now_ ? dropped_ : probs_, gh_, T(0), heads_out_, path_);
            cuda::merge_heads(heads_out_, dv_, path_);
        }
        if (!need_q_ && !need_k_) return;
        ds_.resize(probs_.shape());
        cuda::gemm_batched(false, true, T(1), gh_, vh_, T(0), ds_, path_);  // dP' = G_h V_h^T
        if (dropped_now_) cuda::multiply(ds_, factor_, ds_, path_);      // dP = dP' * M / (1 - p)
        cuda::masked_softmax_backward(probs_, ds_, ds_, path_);             // dS
        if (need_q_) {  // dQ_h = c dS K_h
            cuda::gemm_batched(false, false, c, ds_, kh_, T(0), heads_out_, path_);
            cuda::merge_heads(heads_out_, dq_, path_);
        }
        if (need_k_) {  // dK_h = c dS^T Q_h
            cuda::gemm_batched(true, false, c, ds_, qh_, T(0), heads_out_, path_);
            cuda::merge_heads(heads_out_, dk_, path_);
        }
    }

    const Tensor<T>& cpu_forward(const Tensor<T>& x) {
        const std::size_t B = x.dim(0), L = x.dim(1), D = width_, H = heads_, d = head_dim_;
        const Tensor<T>& q = query.forward(x);
        const Tensor<T>& k = key.forward(x);
        const Tensor<T>& v = value.forward(x);
        q_ = q;
        k_ = k;
        v_ = v;
        dropped_now_ = training_ && rate_ > 0.0;
        probs_.resize(Shape{B, H, L, L});
        if (dropped_now_) {
            draw_dropout(factor_, probs_.shape());
            dropped_.resize(probs_.shape());
        }
        ctx_.resize(Shape{B, L, D});
        const T c = T(1.0 / std::sqrt(double(d)));
        for_rows(B * H, L * L * d, [&](std::size_t bh) {
            const std::size_t b = bh / H, h = bh % H;
            const std::size_t off = b * L * D + h * d;
            const CStrided Qm(q.data() + off, Eigen::Index(L), Eigen::Index(d), Eigen::OuterStride<>(Eigen::Index(D)));
            const CStrided Km(k.data() + off, Eigen::Index(L), Eigen::Index(d), Eigen::OuterStride<>(Eigen::Index(D)));
            const CStrided Vm(v.data() + off, Eigen::Index(L), Eigen::Index(d), Eigen::OuterStride<>(Eigen::Index(D)));
            Mat P(probs_.data() + bh * L * L, Eigen::Index(L), Eigen::Index(L));
            P.noalias() = Qm * Km.transpose();
            const std::int32_t* keep = real_.data() + b * L;
            for (std::size_t i = 0; i < L; ++i) {
                T* row = P.data() + i * L;
                T m = -std::numeric_limits<T>::infinity();
                for (std::size_t j = 0; j < L; ++j)
                    if (keep[j]) m = std::max(m, row[j] * c);
                T sum = 0;
                for (std::size_t j = 0; j < L; ++j) {
                    const T e = keep[j] ? std::exp(row[j] * c - m) : T(0);
                    row[j] = e;
                    sum += e;
                }
                const T inv = T(1) / sum;
                for (std::size_t j = 0; j < L; ++j) row[j] *= inv;
            }
            Strided Cm(ctx_.data() + off, Eigen::Index(L), Eigen::Index(d), Eigen::OuterStride<>(Eigen::Index(D)));
            if (dropped_now_) {
                Mat Pd(dropped_.data() + bh * L * L, Eigen::Index(L), Eigen::Index(L));
                const CMat F(factor_.data() + bh * L * L, Eigen::Index(L), Eigen::Index(L));
                Pd = P.cwiseProduct(F);
                Cm.noalias() = Pd * Vm;
            } else {
                Cm.noalias() = P * Vm;
            }
        });
        return ctx_;
    }

    void cpu_backward(const Tensor<T>& dctx) {
        const std::size_t B = ctx_.dim(0), L = ctx_.dim(1), D = width_, H = heads_, d = head_dim_;
        const bool need_q = need_q_, need_k = need_k_, need_v = need_v_;
        const Shape s{B, L, D};
        const Tensor<T>& q = q_.get(s, path_, "query projection");
        const Tensor<T>& k = k_.get(s, path_, "key projection");
        const Tensor<T>& v = v_.get(s, path_, "value projection");
        if (need_q) dq_.resize(s);
        if (need_k) dk_.resize(s);
        if (need_v) dv_.resize(s);
        if (need_q || need_k) ds_.resize(probs_.shape());
        const T c = T(1.0 / std::sqrt(double(d)));
        for_rows(B * H, L * L * d, [&](std::size_t bh) {
            const std::size_t b = bh / H, h = bh % H;
            const std::size_t off = b * L * D + h * d;
            const auto strided = [&](const T* p) {
                return CStrided(p + off, Eigen::Index(L), Eigen::Index(d), Eigen::OuterStride<>(Eigen::Index(D)));
            };
            const auto out = [&](Tensor<T>& t) {
                return Strided(t.data() + off, Eigen::Index(L), Eigen::Index(d), Eigen::OuterStride<>(Eigen::Index(D)));
            };
            const CStrided G = strided(dctx.data());
            const CMat P(probs_.data() + bh * L * L, Eigen::Index(L), Eigen::Index(L));
            if (need_v) {
                if (dropped_now_) {
                    const CMat Pd(dropped_.data() + bh * L * L, Eigen::Index(L), Eigen::Index(L));
                    out(dv_).noalias() = Pd.transpose() * G;
                } else {
                    out(dv_).noalias() = P.transpose() * G;
                }
            }
            if (!need_q && !need_k) return;
            Mat dS(ds_.data() + bh * L * L, Eigen::Index(L), Eigen::Index(L));
            dS.noalias() = G * strided(v.data()).transpose();  // dP'
            if (dropped_now_)
                dS = dS.cwiseProduct(CMat(factor_.data() + bh * L * L, Eigen::Index(L), Eigen::Index(L)));
            for (std::size_t i = 0; i < L; ++i) {
                T* g = dS.data() + i * L;
                const T* p = P.data() + i * L;
                T dot = 0;
                for (std::size_t j = 0; j < L; ++j) dot += p[j] * g[j];
                for (std::size_t j = 0; j < L; ++j) g[j] = p[j] * (g[j] - dot);
            }
            if (need_q) out(dq_).noalias() = c * (dS * strided(k.data()));
            if (need_k) out(dk_).noalias() = c * (dS.transpose() * strided(q.data()));
        });
    }

    // Per-(sequence, head) blocks start at any element offset: unaligned maps.
    using Mat = Eigen::Map<RowMatrix<T>>;
    using CMat = Eigen::Map<const RowMatrix<T>>;
    using Strided = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;
    using CStrided = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;

    /// Copies the current mask into real_ (1 real, 0 padded); false when there is none (all real).
    bool read_mask(std::size_t B, std::size_t L) {
        const detail::MaskView& m = detail::current_attention_mask();
        real_.assign(B * L, 1);
        if (m.data == nullptr) return false;
        if (m.batch != B || m.tokens != L)
            throw ShapeError(detail::concat(detail::display_path(path_), ": the attention mask is ", m.batch, " x ",
                                            m.tokens, " but the input has ", B, " sequences of ", L, " tokens"));
        for (std::size_t b = 0; b < B; ++b) {
            bool any = false;
            for (std::size_t t = 0; t < L; ++t) {
                real_[b * L + t] = m.data[b * L + t] != 0;
                any = any || real_[b * L + t];
            }
            if (!any)
                throw ShapeError(detail::concat(detail::display_path(path_), ": sequence ", b,
                                                " of the batch has no real token in its attention mask"));
        }
        return true;
    }

    std::size_t width_, heads_, head_dim_;
    double rate_ = 0.0;
    bool training_ = true, dropped_now_ = false;
    bool need_q_ = false, need_k_ = false, need_v_ = false;  ///< which projections the backward feeds
    Rng rng_;
    std::vector<std::int32_t> real_;  ///< the mask of the last forward, [B * T]
    Saved<T> q_, k_, v_;              ///< the projections' outputs (CPU)
    Tensor<T, Device> probs_, factor_, dropped_, ctx_, ds_, dq_, dk_, dv_, dx_;
    // Device only: the heads apart ([B, H, T, d]) and the host copy of the dropout factors.
    Tensor<T, Device> qh_, kh_, vh_, gh_, heads_out_;
    Tensor<T> factor_host_;
    index_storage_t<Device> mask_dev_;
};

}  // namespace patchwork
