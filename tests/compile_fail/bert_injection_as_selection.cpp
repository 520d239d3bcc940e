// An injection policy given to the whole BERT model, where only selection
// policies go (injection policies go on the encoder's slots).
// expected: put injection policies on the encoder's slots
#include "patchwork/policies/lora.hpp"
#include "patchwork/transformer/bert.hpp"

int main() {
    patchwork::BertModel<patchwork::BertEncoder<>, patchwork::LoRA<8>> model(patchwork::BertConfig{});
    return 0;
}
