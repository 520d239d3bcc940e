// A LoRA candidate in a search over a whole block: LoRA needs a Linear.
// expected: patchwork::Search: the LoRA<r> candidate applies only to a Linear layer
#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/frozen.hpp"
#include "patchwork/search/search_module.hpp"

int main() {
    using Block = patchwork::Sequential<patchwork::Linear, patchwork::Relu>;
    patchwork::Tune<Block, patchwork::Search<patchwork::Frozen, patchwork::LoRA<8>>> t(patchwork::Linear(4, 4),
                                                                                      patchwork::Relu{});
    return 0;
}
