// A factorised weight on a layer that has no weight matrix.
// expected: patchwork::OverParam applies only to a Linear layer
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/policies/over_param.hpp"
#include "patchwork/policies/tune.hpp"

int main() {
    patchwork::Tune<patchwork::LayerNorm, patchwork::OverParam<>> t(4);
    return 0;
}
