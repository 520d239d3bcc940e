// An adapter module around a Linear that runs on the GPU: injection policies
// are CPU modules; on the device the fused kernels take their place.
// expected: patchwork::Tune: a module on Device = Cuda takes only selection policies
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/tune.hpp"

int main() {
    using T = patchwork::Tune<patchwork::BasicLinear<float, patchwork::Cuda>, patchwork::Adapter<4>>;
    return sizeof(T) > 0 ? 0 : 1;
}
