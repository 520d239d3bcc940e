// bf16 is a storage type of device modules: a CPU Linear of bf16 would run
// Eigen's products through float conversions element by element.
// expected: patchwork::Parameter: bf16 is a storage type of device modules (Device = Cuda)
#include "patchwork/layers/linear.hpp"

int main() {
    patchwork::BasicLinear<patchwork::bf16> layer(4, 2);
    return layer.in_features() == 4 ? 0 : 1;
}
