#pragma once
// BERT: embeddings, the post-LN transformer layer, the encoder, pooling and
// the model, with every projection a slot a policy can target.
//
// Shapes: token ids [B, T] (TokenBatch), hidden states [B, T, D].
//
// Embeddings (BertEmbeddings):
//   e_bt = W_word[id_bt] + W_pos[t] + W_type[type_bt],  h0 = LayerNorm(e) (then dropout)
//   backward: de = LayerNorm.backward(dh0); each table scatter-adds de (layers/embedding.hpp).
//
// Layer (BertLayer), post-LN as in BERT:
//   a  = Attention(x)                              (layers/attention.hpp, heads side by side)
//   r1 = x + Dropout(AttentionOutput(a)),          h1 = AttentionNorm(r1)
//   f  = Dropout(Output(GELU(Intermediate(h1)))),  r2 = h1 + f,   y = OutputNorm(r2)
// Backward, with g = dL/dy (each module's own backward derived in its header):
//   g_r2 = OutputNorm.backward(g)
//   g_h1 = g_r2 + Intermediate.backward(GELU.backward(Output.backward(Dropout.backward(g_r2))))
//   g_r1 = AttentionNorm.backward(g_h1)
//   dL/dx = g_r1 + Attention.backward(AttentionOutput.backward(Dropout.backward(g_r1)))
// (the residuals add the gradient that bypasses each branch). When the layer's
// input gradient is not wanted, the pass stops at the first sub-module that
// holds a trainable parameter, and a branch without trainable parameters and
// without anything trainable before it is skipped (chain_backward's rule,
// applied to the layer's two residual branches).
//
// Which policy each projection gets is the layer's type, through a spec:
//   struct Spec : pw::bert::Plain {
//       template <class L> using query = pw::Tune<L, pw::LoRA<8, 16>>;
//       template <class L> using value = pw::Tune<L, pw::LoRA<8, 16>>;
//   };
// Slots: query, key, value, attention_output, intermediate, output (Linear),
// attention_norm, output_norm (LayerNorm) and layer (the whole BertLayer).
// Plain leaves each as it is. Selection (BiasOnly, NormPatch, FineTune) is
// given to the model (BertModel<Encoder, Selection...>) or by a Tune around a
// slot, a layer or the encoder; the innermost decision wins.
//
// Device: BertLayer<Spec, T, Cuda>, BertEncoder<Spec, T, Cuda>,
// BertEmbeddings<T, Cuda> and BertModel<BertEncoder<Spec, T, Cuda>> run the
// same formulas on the GPU: every slot becomes the device module
// (BasicLinear<T, Cuda>, BasicLayerNorm<T, Cuda>, under the spec's policies,
// which must run on the device: LoRA, Adapter, ScaleShift and the selections
// do), attention and embeddings use kernels/attention.cuh, and the residual
// sums are element-wise kernels. The parameters, their names and their visit
// order are the CPU model's, so values copy between the two (copy_parameters).
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "patchwork/compose/chain.hpp"
#include "patchwork/core/module.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/attention.hpp"
#include "patchwork/layers/dropout.hpp"
#include "patchwork/layers/embedding.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/ops/cuda_attention_ops.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/lora.hpp"
#include "patchwork/policies/policy.hpp"
#include "patchwork/policies/tune.hpp"

namespace patchwork {

/// The architecture of a BERT encoder (Hugging Face's BertConfig fields).
struct BertConfig {
    std::size_t vocab_size = 30522;
    std::size_t hidden_size = 768;
    std::size_t num_hidden_layers = 12;
    std::size_t num_attention_heads = 12;
    std::size_t intermediate_size = 3072;
    std::size_t max_position_embeddings = 512;
    std::size_t type_vocab_size = 2;
    double layer_norm_eps = 1e-12;
    /// Dropout rates the model is built with (0: off). A checkpoint's own rates
    /// (0.1 for BERT) are applied by the loader only when asked (hf_checkpoint.hpp).
    double hidden_dropout_prob = 0.0;
    double attention_probs_dropout_prob = 0.0;
    std::int32_t pad_token_id = 0;
    std::uint64_t dropout_seed = 0x5eed;

    /// Throws ConfigError when the sizes do not describe a model.
    void check() const {
        const auto bad = [](const std::string& what) { throw ConfigError("bert config: " + what); };
        if (!vocab_size || !hidden_size || !num_hidden_layers || !num_attention_heads || !intermediate_size ||
            !max_position_embeddings || !type_vocab_size)
            bad("every size must be positive");
        if (hidden_size % num_attention_heads)
            bad(detail::concat("hidden_size ", hidden_size, " is not a multiple of num_attention_heads ",
                               num_attention_heads));
        if (!(layer_norm_eps > 0)) bad(detail::concat("layer_norm_eps must be positive, got ", layer_norm_eps));
    }
};

namespace bert {

/// Every slot as in the checkpoint: no policy of its own.
struct Plain {
    template <class L>
    using query = L;
    template <class L>
    using key = L;
    template <class L>
    using value = L;
    template <class L>
    using attention_output = L;
    template <class L>
    using intermediate = L;
    template <class L>
    using output = L;
    template <class N>
    using attention_norm = N;
    template <class N>
    using output_norm = N;
    template <class B>
    using layer = B;
};

/// LoRA on the query and value projections (PEFT's default target modules for BERT).
template <std::size_t Rank, std::size_t Alpha = Rank>
struct LoRAQueryValue : Plain {
    template <class L>
    using query = Tune<L, LoRA<Rank, Alpha>>;
    template <class L>
    using value = Tune<L, LoRA<Rank, Alpha>>;
};

/// Spec S with LoRA on the query and value projections: what
/// Tune<BertLayer<S>, LoRA<Rank, Alpha>> builds (the layer's LoRA targets, as
/// PEFT's default for BERT), e.g. a LoRA candidate of a search over layers.
/// S's query and value slots must be plain.
template <class S, std::size_t Rank, std::size_t Alpha = Rank>
struct WithLoRA : S {
    static_assert(std::is_same_v<typename S::template query<BasicLinear<float>>, BasicLinear<float>> &&
                      std::is_same_v<typename S::template value<BasicLinear<float>>, BasicLinear<float>>,
                  "patchwork::LoRA<r> on a BertLayer targets its query and value projections, so the layer's spec "
                  "must leave those two slots plain");
    template <class L>
    using query = Tune<L, LoRA<Rank, Alpha>>;
    template <class L>
    using value = Tune<L, LoRA<Rank, Alpha>>;
};

/// Houlsby adapters: one after the attention output projection, one after the
/// feed-forward output, each before its residual sum and LayerNorm.
template <std::size_t Bottleneck, AdapterActivation Act = AdapterActivation::gelu>
struct Houlsby : Plain {
    template <class L>
    using attention_output = Tune<L, Adapter<Bottleneck, Act>>;
    template <class L>
    using output = Tune<L, Adapter<Bottleneck, Act>>;
};

/// Pfeiffer adapters: one after the feed-forward output only.
template <std::size_t Bottleneck, AdapterActivation Act = AdapterActivation::relu>
struct Pfeiffer : Plain {
    template <class L>
    using output = Tune<L, Adapter<Bottleneck, Act>>;
};

}  // namespace bert

namespace detail {
/// out = a + b (a residual sum) on the tensors' device.
template <class T, class D>
void residual_sum(const Tensor<T, D>& a, const Tensor<T, D>& b, Tensor<T, D>& out, const std::string& where) {
    if constexpr (std::is_same_v<D, Cuda>) {
        cuda::add(a, b, out, where);
    } else {
        out.resize(a.shape());
        out.vector() = a.vector() + b.vector();
    }
}
}  // namespace detail

template <class Spec = bert::Plain, class T = float, class D = Cpu>
class BertLayer : public ModuleBase {
public:
    using Scalar = T;
    using Device = D;
    using Lin = BasicLinear<T, D>;
    using Norm = BasicLayerNorm<T, D>;
    using Query = typename Spec::template query<Lin>;
    using Key = typename Spec::template key<Lin>;
    using Value = typename Spec::template value<Lin>;
    using AttentionOutput = typename Spec::template attention_output<Lin>;
    using Intermediate = typename Spec::template intermediate<Lin>;
    using Output = typename Spec::template output<Lin>;
    using AttentionNorm = typename Spec::template attention_norm<Norm>;
    using OutputNorm = typename Spec::template output_norm<Norm>;
    using Attention = BasicSelfAttention<T, Query, Key, Value>;

    static constexpr const char* kind() { return "bert_layer"; }
    static constexpr unsigned roles = Attention::roles | AttentionOutput::roles | Intermediate::roles |
                                      Output::roles | AttentionNorm::roles | OutputNorm::roles;
    static constexpr bool fixed_width = true;

    explicit BertLayer(const BertConfig& c)
        : attention(c.hidden_size, c.num_attention_heads, c.attention_probs_dropout_prob, c.dropout_seed),
          attention_output(c.hidden_size, c.hidden_size), attention_dropout(c.hidden_dropout_prob, c.dropout_seed + 1),
          attention_norm(c.hidden_size, c.layer_norm_eps), intermediate(c.hidden_size, c.intermediate_size),
          output(c.intermediate_size, c.hidden_size), output_dropout(c.hidden_dropout_prob, c.dropout_seed + 2),
          output_norm(c.hidden_size, c.layer_norm_eps), config_(c), width_(c.hidden_size) {
        c.check();
        set_path("");
    }

    /// The same layer under another spec, with `other`'s pre-trained weights
    /// (every parameter no policy injected, in visit order; what a policy of
    /// this spec injects starts fresh). Tune<BertLayer<S>, LoRA<r, a>> is built
    /// this way from a BertLayer<S>.
    template <class OtherSpec>
        requires(!std::is_same_v<OtherSpec, Spec>)
    explicit BertLayer(const BertLayer<OtherSpec, T, D>& other) : BertLayer(other.config()) {
        copy_pretrained_from(const_cast<BertLayer<OtherSpec, T, D>&>(other));
    }

    /// This layer with LoRA on its query and value projections (LoRA<Rank, Alpha>'s
    /// module for a BertLayer, policies/lora.hpp). Both slots must be plain.
    template <std::size_t Rank, std::size_t Alpha>
    using with_lora = BertLayer<bert::WithLoRA<Spec, Rank, Alpha>, T, D>;

    [[nodiscard]] const BertConfig& config() const noexcept { return config_; }

    /// Copies the values of `other`'s pre-trained parameters (those no policy
    /// injected) into this layer's, pairing them in visit order; the names
    /// relative to each layer and the shapes must match.
    template <class OtherSpec>
    void copy_pretrained_from(BertLayer<OtherSpec, T, D>& other) {
        std::vector<Parameter<T, D>*> src;
        other.visit([&](Parameter<T, D>& p) {
            if (!is_injected(p.role())) src.push_back(&p);
        });
        std::size_t i = 0;
        visit([&](Parameter<T, D>& p) {
            if (is_injected(p.role())) return;
            if (i >= src.size())
                throw ConfigError(detail::concat(detail::display_path(path_), ": copying a layer's weights, ",
                                                 p.name(), " has no counterpart"));
            Parameter<T, D>& q = *src[i++];
            if (q.value.shape() != p.value.shape() ||
                relative_name(q.name(), other.path()) != relative_name(p.name(), path_))
                throw ShapeError(detail::concat(detail::display_path(path_), ": copying a layer's weights, ",
                                                p.name(), " ", p.value.shape(), " meets ", q.name(), " ",
                                                q.value.shape()));
            p.value = q.value;
        });
        if (i != src.size())
            throw ConfigError(detail::concat(detail::display_path(path_), ": copying a layer's weights, ",
                                             src.size() - i, " of the source's parameters have no counterpart"));
    }

    Attention attention;
    AttentionOutput attention_output;
    BasicDropout<T, D> attention_dropout;
    AttentionNorm attention_norm;
    Intermediate intermediate;
    BasicGelu<T, D> gelu;
    Output output;
    BasicDropout<T, D> output_dropout;
    OutputNorm output_norm;

    [[nodiscard]] std::size_t out_features() const noexcept { return width_; }

    const Tensor<T, D>& forward(const Tensor<T, D>& x) {
        if (x.rank() != 3 || x.cols() != width_ || x.empty())
            throw_shape_error(path_, "bert layer input [batch, tokens, features]",
                              Shape{x.rank() ? x.dim(0) : 0, x.rank() > 1 ? x.dim(1) : 0, width_}, x.shape());
        const Tensor<T, D>& a = attention.forward(x);
        const Tensor<T, D>& o = attention_dropout.forward(attention_output.forward(a));
        detail::residual_sum(x, o, r1_, path_);
        const Tensor<T, D>& h1 = attention_norm.forward(r1_);
        const Tensor<T, D>& f = output_dropout.forward(output.forward(gelu.forward(intermediate.forward(h1))));
        detail::residual_sum(h1, f, r2_, path_);
        return output_norm.forward(r2_);
    }

    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        // Sub-modules in forward order: attention, attention_output, attention_norm,
        // intermediate, output, output_norm. need[i]: some gradient is wanted below module i.
        const bool t[6] = {any_trainable(attention), any_trainable(attention_output), any_trainable(attention_norm),
                           any_trainable(intermediate), any_trainable(output), any_trainable(output_norm)};
        bool need[6];
        need[0] = input_grad_;
        for (int i = 1; i < 6; ++i) need[i] = need[i - 1] || t[i - 1];
        if (!need[5] && !t[5]) return done();
        output_norm.set_input_grad(need[5]);
        const Tensor<T, D>& g_r2 = output_norm.backward(dy);
        if (!need[5]) return done();
        // Feed-forward branch: run while it holds a trainable part or the gradient must reach h1.
        const Tensor<T, D>* g_h1_ffn = nullptr;
        if (t[4] || t[3] || need[3]) {
            output.set_input_grad(t[3] || need[3]);
            const Tensor<T, D>& g_f = output.backward(output_dropout.backward(g_r2));
            if (t[3] || need[3]) {
                intermediate.set_input_grad(need[3]);
                g_h1_ffn = &intermediate.backward(gelu.backward(g_f));
            }
        }
        if (!need[3]) return done();
        detail::residual_sum(g_r2, *g_h1_ffn, g_h1_, path_);
        attention_norm.set_input_grad(need[2]);
        const Tensor<T, D>& g_r1 = attention_norm.backward(g_h1_);
        if (!need[2]) return done();
        attention_output.set_input_grad(need[1]);
        const Tensor<T, D>& g_a = attention_output.backward(attention_dropout.backward(g_r1));
        if (!need[1]) return done();
        attention.set_input_grad(input_grad_);
        const Tensor<T, D>& g_x = attention.backward(g_a);
        if (!input_grad_) return done();
        detail::residual_sum(g_r1, g_x, dx_, path_);
        return dx_;
    }

    template <class F>
    void visit(F&& f) {
        attention.visit(f);
        attention_output.visit(f);
        attention_norm.visit(f);
        intermediate.visit(f);
        output.visit(f);
        output_norm.visit(f);
    }
    template <class F>
    void visit_children(F&& f) {
        f(attention);
        f(attention_output);
        f(attention_dropout);
        f(attention_norm);
        f(intermediate);
        f(gelu);
        f(output);
        f(output_dropout);
        f(output_norm);
    }
    void reset_parameters(Rng& rng) {
        attention.reset_parameters(rng);
        attention_output.reset_parameters(rng);
        attention_norm.reset_parameters(rng);
        intermediate.reset_parameters(rng);
        output.reset_parameters(rng);
        output_norm.reset_parameters(rng);
    }
    void set_path(const std::string& p) {
        path_ = p;
        attention.set_path(child_path("attention"));
        attention_output.set_path(child_path("attention_output"));
        attention_dropout.set_path(child_path("attention_dropout"));
        attention_norm.set_path(child_path("attention_norm"));
        intermediate.set_path(child_path("intermediate"));
        gelu.set_path(child_path("gelu"));
        output.set_path(child_path("output"));
        output_dropout.set_path(child_path("output_dropout"));
        output_norm.set_path(child_path("output_norm"));
    }

private:
    const Tensor<T, D>& done() {
        dx_.clear();
        return dx_;
    }
    static std::string relative_name(const std::string& name, const std::string& path) {
        if (path.empty()) return name;
        return name.compare(0, path.size() + 1, path + ".") == 0 ? name.substr(path.size() + 1) : name;
    }

    BertConfig config_;
    std::size_t width_;
    Tensor<T, D> r1_, r2_, g_h1_, dx_;
};

/// N BertLayers (N from the config), each of type Spec::layer<BertLayer<Spec, T, D>>.
template <class Spec = bert::Plain, class T = float, class D = Cpu>
class BertEncoder : public ModuleBase {
public:
    using Scalar = T;
    using Device = D;
    using Layer = typename Spec::template layer<BertLayer<Spec, T, D>>;
    static_assert(Module<Layer>, "patchwork::BertEncoder: Spec::layer<BertLayer> must be a module");
    static constexpr const char* kind() { return "bert_encoder"; }
    static constexpr unsigned roles = Layer::roles;
    static constexpr bool fixed_width = true;

    explicit BertEncoder(const BertConfig& c) : width_(c.hidden_size) {
        c.check();
        layers_.reserve(c.num_hidden_layers);
        for (std::size_t i = 0; i < c.num_hidden_layers; ++i) layers_.emplace_back(c);
        set_path("");
    }

    [[nodiscard]] std::size_t size() const noexcept { return layers_.size(); }
    [[nodiscard]] Layer& layer(std::size_t i) { return layers_.at(i); }
    [[nodiscard]] const Layer& layer(std::size_t i) const { return layers_.at(i); }
    [[nodiscard]] std::size_t out_features() const noexcept { return width_; }

    const Tensor<T, D>& forward(const Tensor<T, D>& x) {
        const Tensor<T, D>* cur = &x;
        for (auto& l : layers_) cur = &l.forward(*cur);
        return *cur;
    }
    const Tensor<T, D>& backward(const Tensor<T, D>& dy) {
        return detail::chain_backward<T>(
            layers_.size(), input_grad_, dy, empty_, [&](std::size_t i) { return any_trainable(layers_[i]); },
            [&](std::size_t i, bool on) { layers_[i].set_input_grad(on); },
            [&](std::size_t i, const Tensor<T, D>& g) -> const Tensor<T, D>& { return layers_[i].backward(g); },
            [&](std::size_t i, auto& f) { layers_[i].visit(f); });
    }

    template <class F>
    void visit(F&& f) {
        for (auto& l : layers_) l.visit(f);
    }
    template <class F>
    void visit_children(F&& f) {
        for (auto& l : layers_) f(l);
    }
    void reset_parameters(Rng& rng) {
        for (auto& l : layers_) l.reset_parameters(rng);
    }
    void set_path(const std::string& p) {
        path_ = p;
        for (std::size_t i = 0; i < layers_.size(); ++i) layers_[i].set_path(child_path("layer" + std::to_string(i)));
    }

private:
    std::size_t width_;
    std::vector<Layer> layers_;
    Tensor<T, D> empty_;
};

/// Word, position and token-type embeddings, summed, then LayerNorm and dropout.
template <class T = float, class D = Cpu>
class BertEmbeddings : public ModuleBase {
public:
    using Scalar = T;
    using Device = D;
    static constexpr const char* kind() { return "bert_embeddings"; }

    explicit BertEmbeddings(const BertConfig& c)
        : word(c.vocab_size, c.hidden_size), position(c.max_position_embeddings, c.hidden_size),
          token_type(c.type_vocab_size, c.hidden_size), norm(c.hidden_size, c.layer_norm_eps),
          dropout(c.hidden_dropout_prob, c.dropout_seed + 3) {
        set_path("");
    }

    BasicEmbedding<T, D> word, position, token_type;
    BasicLayerNorm<T, D> norm;
    BasicDropout<T, D> dropout;

    [[nodiscard]] std::size_t out_features() const noexcept { return norm.out_features(); }

    const Tensor<T, D>& forward(const TokenBatch& in) {
        in.check(path_);
        const std::size_t B = in.batch, L = in.tokens;
        if (L > position.entries())
            throw ShapeError(detail::concat(detail::display_path(path_), ": ", L, " tokens per sequence, but the model has ",
                                            position.entries(), " positions"));
        word.check_ids(in.ids, "token id");
        types_.assign(in.token_types.begin(), in.token_types.end());
        if (types_.empty()) types_.assign(B * L, 0);
        token_type.check_ids(types_, "token type");
        ids_.assign(in.ids.begin(), in.ids.end());
        positions_.resize(B * L);
        for (std::size_t i = 0; i < B * L; ++i) positions_[i] = std::int32_t(i % L);
        sum_.resize(Shape{B, L, out_features()});
        sum_.zero();
        word.gather_add(ids_, sum_);
        position.gather_add(positions_, sum_);
        token_type.gather_add(types_, sum_);
        return dropout.forward(norm.forward(sum_));
    }

    /// Scatter-adds into the trainable tables and trains the LayerNorm; no input gradient (ids).
    void backward(const Tensor<T, D>& dy) {
        const bool tables = any_trainable(word) || any_trainable(position) || any_trainable(token_type);
        if (!tables && !any_trainable(norm)) return;
        norm.set_input_grad(tables);
        const Tensor<T, D>& de = norm.backward(dropout.backward(dy));
        if (!tables) return;
        word.scatter_add(ids_, de);
        position.scatter_add(positions_, de);
        token_type.scatter_add(types_, de);
    }

    template <class F>
    void visit(F&& f) {
        word.visit(f);
        position.visit(f);
        token_type.visit(f);
        norm.visit(f);
    }
    template <class F>
    void visit_children(F&& f) {
        f(word);
        f(position);
        f(token_type);
        f(norm);
        f(dropout);
    }
    void reset_parameters(Rng& rng) {
        word.reset_parameters(rng);
        position.reset_parameters(rng);
        token_type.reset_parameters(rng);
        norm.reset_parameters(rng);
    }
    void set_path(const std::string& p) {
        path_ = p;
        word.set_path(child_path("word"));
        position.set_path(child_path("position"));
        token_type.set_path(child_path("token_type"));
        norm.set_path(child_path("norm"));
        dropout.set_path(child_path("dropout"));
    }

private:
    std::vector<std::int32_t> ids_, types_, positions_;
    Tensor<T, D> sum_;
};

enum class Pooling { mean, cls };

/// Sentence vectors from hidden states [B, T, D] and the key-padding mask: [B, D].
///   mean: p_b = (1 / n_b) sum_{t real} h_bt      dL/dh_bt = dL/dp_b / n_b for real t, 0 for padding
///   cls:  p_b = h_b0                              dL/dh_b0 = dL/dp_b, 0 elsewhere
/// (n_b: the number of real tokens of sequence b; both are linear in h, so the
/// backward is the same weights w_bt applied to dL/dp_b.)
/// forward(h, batch) uses the batch's mask. The pooler is also a parameter-free
/// module: forward(h) uses the mask of the innermost AttentionMask scope (none:
/// every token is real), so it can end a backbone, e.g.
/// `Sequential<BertEncoder<...>, Pooler>` inside a MultiTask, which hands its
/// backbone the mask rows of the rows it runs.
/// Device = Cuda: the weights w_bt are computed on the host, as here, and
/// uploaded as [B, 1, T]; then p_b = w_b h_b ([1, T] x [T, D]) and dL/dh_b =
/// w_b^T dL/dp_b ([T, 1] x [1, D]) are strided-batched GEMMs over b.
template <class T = float, class Dev = Cpu>
class BasicPooler : public detail::ParameterFreeModule {
public:
    using Scalar = T;
    using Device = Dev;
    static constexpr const char* kind() { return "pooler"; }

    explicit BasicPooler(Pooling mode = Pooling::mean) : mode_(mode) {}

    const Tensor<T, Dev>& forward(const Tensor<T, Dev>& h, const TokenBatch& in) {
        if (h.rank() != 3 || h.dim(0) != in.batch || h.dim(1) != in.tokens)
            throw_shape_error(where(), "hidden states [batch, tokens, features]",
                              Shape{in.batch, in.tokens, h.rank() ? h.cols() : 0}, h.shape());
        AttentionMask scope(in.mask, in.batch, in.tokens);
        return forward(h);
    }

    const Tensor<T, Dev>& forward(const Tensor<T, Dev>& h) {
        if (h.rank() != 3)
            throw ShapeError(detail::concat(where(), ": hidden states must be [batch, tokens, features], got ",
                                            h.shape()));
        const std::size_t B = h.dim(0), L = h.dim(1), D = h.cols();
        const detail::MaskView mask = detail::current_attention_mask();
        if (mask.data != nullptr && (mask.batch != B || mask.tokens != L))
            throw ShapeError(detail::concat(where(), ": the attention mask is ", mask.batch, " x ", mask.tokens,
                                            ", the hidden states are ", h.shape()));
        const auto real = [&](std::size_t b, std::size_t t) { return mask.data == nullptr || mask.data[b * L + t] != 0; };
        weights_.assign(B * L, T(0));
        counts_.assign(B, 0);
        for (std::size_t b = 0; b < B; ++b) {
            if (mode_ == Pooling::cls) {
                weights_[b * L] = T(1);
                continue;
            }
            for (std::size_t t = 0; t < L; ++t) counts_[b] += real(b, t) ? 1 : 0;
            if (counts_[b] == 0) throw ShapeError(detail::concat(where(), ": sequence ", b, " has no real token"));
            for (std::size_t t = 0; t < L; ++t)
                if (real(b, t)) weights_[b * L + t] = T(1) / T(counts_[b]);
        }
        shape_ = h.shape();
        if constexpr (std::is_same_v<Dev, Cuda>) {
            weights_dev_.resize(Shape{B, 1, L});
            cuda::upload_elements(weights_dev_.data(), weights_.data(), weights_.size(), where());
            y_.resize(Shape{B, 1, D});
            cuda::gemm_batched(false, false, T(1), weights_dev_, h, T(0), y_, where());  // p_b = w_b h_b
            y_.reshape(Shape{B, D});
        } else {
            // HF's mean pooling sums h * mask and then divides by the count; so does this.
            y_.resize(Shape{B, D});
            y_.zero();
            for (std::size_t b = 0; b < B; ++b) {
                auto yb = y_.matrix().row(Eigen::Index(b));
                for (std::size_t t = 0; t < L; ++t)
                    if (weights_[b * L + t] != T(0))
                        yb += Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>(h.data() + (b * L + t) * D, Eigen::Index(D)).transpose();
                if (mode_ == Pooling::mean) yb /= T(counts_[b]);
            }
        }
        return y_;
    }

    const Tensor<T, Dev>& backward(const Tensor<T, Dev>& dy) {
        if (shape_.rank() != 3) throw Error(where() + ": backward needs a forward first");
        const std::size_t B = shape_[0], L = shape_[1], D = shape_[2];
        check_same_shape(dy, Shape{B, D}, where(), "pooled gradient");
        if (!input_grad_) return empty_;
        dh_.resize(shape_);
        if constexpr (std::is_same_v<Dev, Cuda>) {
            dy3_ = dy;
            dy3_.reshape(Shape{B, 1, D});
            cuda::gemm_batched(true, false, T(1), weights_dev_, dy3_, T(0), dh_, where());  // dh_b = w_b^T dp_b
        } else {
            for (std::size_t r = 0; r < B * L; ++r)
                Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>>(dh_.data() + r * D, Eigen::Index(D)) =
                    weights_[r] * Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>(dy.data() + (r / L) * D, Eigen::Index(D));
        }
        return dh_;
    }

private:
    [[nodiscard]] std::string where() const { return path_.empty() ? std::string("pooler") : path_; }

    Pooling mode_;
    Shape shape_;
    std::vector<T> weights_;
    std::vector<std::size_t> counts_;
    Tensor<T, Dev> y_, dh_, empty_;
    Tensor<T, Dev> weights_dev_, dy3_;  ///< device only: w as [B, 1, T], dL/dp as [B, 1, D]
};

using Pooler = BasicPooler<float>;

/// Embeddings and an encoder (BertEncoder<Spec, T>, or a Tune around one).
/// `Selection...` (FineTune, BiasOnly, NormPatch, Frozen) applies to every
/// pre-trained parameter no inner policy decided, embeddings included, like a
/// Tune around the whole model; with none listed they are frozen.
template <class Encoder = BertEncoder<>, class... Selection>
class BertModel : public ModuleBase {
    static_assert((SelectionPolicy<Selection> && ...),
                  "patchwork::BertModel<Encoder, Selection...>: Selection must be selection policies (Frozen, "
                  "FineTune, BiasOnly, NormPatch); put injection policies on the encoder's slots");

    BertConfig config_;

public:
    using Scalar = typename Encoder::Scalar;
    using T = Scalar;
    using Device = device_of_t<Encoder>;
    using D = Device;
    static constexpr const char* kind() { return "bert"; }

    explicit BertModel(const BertConfig& c) : config_(c), embeddings(c), encoder(c) {
        c.check();
        visit([](Parameter<T, D>& p) {
            if (is_injected(p.role()) || p.policy_decided()) return;
            p.set_trainable((detail::selects<Selection>(p.role()) || ...));
            p.mark_policy_decided();
        });
        set_path("");
    }

    BertEmbeddings<T, D> embeddings;
    Encoder encoder;

    /// Marks every pre-trained parameter as decided (see renew_decisions).
    void remark_decided() {
        visit([](Parameter<T, D>& p) {
            if (!is_injected(p.role())) p.mark_policy_decided();
        });
    }

    [[nodiscard]] const BertConfig& config() const noexcept { return config_; }
    [[nodiscard]] std::size_t out_features() const noexcept { return config_.hidden_size; }

    /// Last hidden states [B, T, D]. Padded positions hold values that depend
    /// on the padding; only real positions are meaningful.
    const Tensor<T, D>& forward(const TokenBatch& in) {
        in.check(path_);
        AttentionMask scope(in.mask, in.batch, in.tokens);
        return encoder.forward(embeddings.forward(in));
    }
    /// Accumulates the gradients of trainable parameters from dL/d(hidden states).
    void backward(const Tensor<T, D>& dh) {
        const bool emb = any_trainable(embeddings);
        encoder.set_input_grad(emb);
        const Tensor<T, D>& de = encoder.backward(dh);
        if (emb) embeddings.backward(de);
    }

    template <class F>
    void visit(F&& f) {
        embeddings.visit(f);
        encoder.visit(f);
    }
    template <class F>
    void visit_children(F&& f) {
        f(embeddings);
        f(encoder);
    }
    void reset_parameters(Rng& rng) {
        embeddings.reset_parameters(rng);
        encoder.reset_parameters(rng);
    }
    void set_path(const std::string& p) {
        path_ = p;
        embeddings.set_path(child_path("embeddings"));
        encoder.set_path(child_path("encoder"));
    }
};

}  // namespace patchwork
