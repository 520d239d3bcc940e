// LoRA put on a BERT layer's LayerNorm slot instead of a projection.
// expected: patchwork::LoRA<r> applies only to a Linear layer
#include "patchwork/policies/lora.hpp"
#include "patchwork/policies/tune.hpp"
#include "patchwork/transformer/bert.hpp"

struct Spec : patchwork::bert::Plain {
    template <class N>
    using attention_norm = patchwork::Tune<N, patchwork::LoRA<8>>;
};

int main() {
    patchwork::BertModel<patchwork::BertEncoder<Spec>> model(patchwork::BertConfig{});
    return 0;
}
