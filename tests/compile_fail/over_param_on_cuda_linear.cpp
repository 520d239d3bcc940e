// Over-parameterised training of a Linear that runs on the GPU: OverParam is
// a CPU module (its expanded factors have no device kernels).
// expected: patchwork::Tune: on Device = Cuda the policies are Frozen, FineTune, BiasOnly, NormPatch
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/over_param.hpp"
#include "patchwork/policies/tune.hpp"

int main() {
    using T = patchwork::Tune<patchwork::BasicLinear<float, patchwork::Cuda>, patchwork::OverParam<>>;
    return sizeof(T) > 0 ? 0 : 1;
}
