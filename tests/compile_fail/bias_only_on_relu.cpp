// BitFit on an activation, which has no bias to tune.
// expected: patchwork::BiasOnly (BitFit) needs a module with bias parameters
#include "patchwork/layers/activation.hpp"
#include "patchwork/policies/bias_only.hpp"
#include "patchwork/policies/tune.hpp"

int main() {
    patchwork::Tune<patchwork::Relu, patchwork::BiasOnly> t;
    return 0;
}
