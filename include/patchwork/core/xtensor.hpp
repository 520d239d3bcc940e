#pragma once
// xtensor view of a CPU tensor, over the same memory. Kept out of tensor.hpp
// because xtensor is heavy to compile and most translation units never need it.
#include <vector>

#include <xtensor/xadapt.hpp>

#include "patchwork/core/tensor.hpp"

namespace patchwork {

/// An xtensor adaptor over the tensor's elements (no copy, no ownership).
template <class T>
auto xt(Tensor<T>& t) {
    std::vector<std::size_t> shape(t.shape().begin(), t.shape().end());
    return ::xt::adapt(t.data(), t.size(), ::xt::no_ownership(), shape);
}

template <class T>
auto xt(const Tensor<T>& t) {
    std::vector<std::size_t> shape(t.shape().begin(), t.shape().end());
    return ::xt::adapt(t.data(), t.size(), ::xt::no_ownership(), shape);
}

}  // namespace patchwork
