#pragma once
// The example model of the benchmarks, the same network examples/transfer
// adapts (keep the two identical):
//
//   body = Linear(784, 256), LayerNorm(256), ReLU, Linear(256, 256), LayerNorm(256), ReLU
//   head = Linear(256, 5)
//
// and the three ways of training it that the benchmarks time:
//
//   AdapterModel   Tune<Body, Adapter<32>> + head: body frozen, a 256->32->256
//                  bottleneck adapter after it, adapter and head train
//   LoraModel      each body Linear as Tune<Linear, LoRA<8, 16>>, the whole body under
//                  Tune<..., Frozen> (LayerNorms frozen) + head: LoRA factors and
//                  head train
//   FineTuneModel  Tune<Body, FineTune> + head: everything trains
//
// benchmarks/torch_step.py builds the same three in PyTorch (+ peft for LoRA).
#include <cstddef>
#include <string_view>

#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/frozen.hpp"
#include "patchwork/policies/lora.hpp"
#include "patchwork/policies/tune.hpp"

namespace bench {

namespace pw = patchwork;

inline constexpr std::size_t kIn = 784, kHidden = 256, kClasses = 5, kRank = 8, kLoraAlpha = 16, kBottleneck = 32;

using Body = pw::Sequential<pw::Linear, pw::LayerNorm, pw::Relu, pw::Linear, pw::LayerNorm, pw::Relu>;
using LoraLinear = pw::Tune<pw::Linear, pw::LoRA<kRank, kLoraAlpha>>;  // as examples/transfer: r 8, alpha 16
using LoraBody = pw::Sequential<LoraLinear, pw::LayerNorm, pw::Relu, LoraLinear, pw::LayerNorm, pw::Relu>;

inline Body make_body() {
    return Body(pw::Linear(kIn, kHidden), pw::LayerNorm(kHidden), pw::Relu{}, pw::Linear(kHidden, kHidden),
                pw::LayerNorm(kHidden), pw::Relu{});
}

using AdapterModel = pw::Sequential<pw::Tune<Body, pw::Adapter<kBottleneck>>, pw::Linear>;
using LoraModel = pw::Sequential<pw::Tune<LoraBody, pw::Frozen>, pw::Linear>;
using FineTuneModel = pw::Sequential<pw::Tune<Body, pw::FineTune>, pw::Linear>;

// The input gradient of the whole model is never needed (the input is data):
// switching it off lets the frozen prefix skip its backward, as autograd does
// for an input that does not require grad.
inline AdapterModel make_adapter_model() {
    AdapterModel m(pw::Tune<Body, pw::Adapter<kBottleneck>>(make_body()), pw::Linear(kHidden, kClasses));
    m.set_input_grad(false);
    return m;
}

inline LoraModel make_lora_model() {
    LoraModel m(pw::Tune<LoraBody, pw::Frozen>(LoraBody(LoraLinear(kIn, kHidden), pw::LayerNorm(kHidden), pw::Relu{},
                                                        LoraLinear(kHidden, kHidden), pw::LayerNorm(kHidden),
                                                        pw::Relu{})),
                pw::Linear(kHidden, kClasses));
    m.set_input_grad(false);
    return m;
}

inline FineTuneModel make_finetune_model() {
    FineTuneModel m(pw::Tune<Body, pw::FineTune>(make_body()), pw::Linear(kHidden, kClasses));
    m.set_input_grad(false);
    return m;
}

/// Call f(model, name) with a freshly built model of the named policy
/// ("adapter", "lora" or "finetune"); returns false for an unknown name.
template <class F>
bool with_model(std::string_view policy, F&& f) {
    if (policy == "adapter") {
        auto m = make_adapter_model();
        f(m, policy);
    } else if (policy == "lora") {
        auto m = make_lora_model();
        f(m, policy);
    } else if (policy == "finetune") {
        auto m = make_finetune_model();
        f(m, policy);
    } else {
        return false;
    }
    return true;
}

}  // namespace bench
