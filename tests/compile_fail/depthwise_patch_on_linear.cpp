// A depthwise patch on a layer with no depthwise filters.
// expected: patchwork::DepthwisePatch needs a module with a depthwise convolution
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/depthwise_patch.hpp"
#include "patchwork/policies/tune.hpp"

int main() {
    patchwork::Tune<patchwork::Linear, patchwork::DepthwisePatch> t(4, 4);
    return 0;
}
