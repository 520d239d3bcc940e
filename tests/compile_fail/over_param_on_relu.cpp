// A factorised weight on an activation, which has no parameters at all.
// expected: patchwork::OverParam applies only to a Linear layer
#include "patchwork/layers/activation.hpp"
#include "patchwork/policies/over_param.hpp"
#include "patchwork/policies/tune.hpp"

int main() {
    patchwork::Tune<patchwork::Relu, patchwork::OverParam<patchwork::SharedFactor, patchwork::TaskFactor>> t;
    return 0;
}
