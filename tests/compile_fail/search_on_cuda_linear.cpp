// Architecture search around a Linear that runs on the GPU: the searched
// module is a CPU module (its fused mixing kernel is in patchwork/kernels/mix.cuh).
// expected: patchwork::Tune: on Device = Cuda the policies are Frozen, FineTune, BiasOnly, NormPatch
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/search/search_module.hpp"
#include "patchwork/policies/tune.hpp"

int main() {
    using T = patchwork::Tune<patchwork::BasicLinear<float, patchwork::Cuda>,
                              patchwork::Search<patchwork::Frozen, patchwork::Adapter<4>>>;
    return sizeof(T) > 0 ? 0 : 1;
}
