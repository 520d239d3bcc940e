// bf16 storage covers the transformer path; the convolution family (here a
// device BatchNorm2d) takes float or double.
// expected: patchwork::BatchNorm2d: bf16 storage covers the transformer path
#include "patchwork/layers/batch_norm.hpp"

int main() {
    using BN = patchwork::BasicBatchNorm2d<patchwork::bf16, patchwork::Cuda>;
    return sizeof(BN) > 0 ? 0 : 1;
}
