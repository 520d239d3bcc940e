// A scale-and-bias patch on a layer with no normalisation parameters.
// expected: patchwork::NormPatch needs a module with a normalisation layer
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/norm_patch.hpp"
#include "patchwork/policies/tune.hpp"

int main() {
    patchwork::Tune<patchwork::Linear, patchwork::NormPatch> t(4, 4);
    return 0;
}
