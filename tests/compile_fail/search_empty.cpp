// A search with no candidate to choose from.
// expected: patchwork::Search<>: give at least one candidate
#include "patchwork/layers/linear.hpp"
#include "patchwork/search/search_module.hpp"

int main() {
    patchwork::Tune<patchwork::Linear, patchwork::Search<>> t(4, 4);
    return 0;
}
