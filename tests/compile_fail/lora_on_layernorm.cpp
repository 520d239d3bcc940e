// A low-rank weight update on a layer that has no weight matrix.
// expected: patchwork::LoRA<r> applies only to a Linear layer
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/policies/lora.hpp"
#include "patchwork/policies/tune.hpp"

int main() {
    patchwork::Tune<patchwork::LayerNorm, patchwork::LoRA<8>> t(4);
    return 0;
}
