// A bottleneck adapter after an activation, whose output width is not known.
// expected: patchwork::Adapter<r> needs a module whose output width is known
#include "patchwork/layers/activation.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/tune.hpp"

int main() {
    patchwork::Tune<patchwork::Relu, patchwork::Adapter<4>> t;
    return 0;
}
