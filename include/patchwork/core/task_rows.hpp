#pragma once
// The device side of a mixed-task batch (core/mixed_batch.hpp): which task each
// row belongs to, as the fused patch kernels take it, and the one operation
// the batch itself queues, stacking per-task parameters and adding stacked
// gradients back. Declarations only (no CUDA header is needed to read them);
// slice_moves is defined in kernels/ops.cuh with the other device operations
// (ops/cuda_ops.hpp), which take TaskRows.
#include <cstddef>
#include <span>
#include <string_view>

namespace patchwork::cuda {

/// The rows of a mixed-task batch, for a patch applied per row: matrix row r
/// of the module's tensors belongs to task task[r] (device int32, values in
/// [0, tasks)), and each per-task parameter is stacked along a leading axis
/// [tasks, ...]. The default (task == nullptr) is one task, unstacked.
struct TaskRows {
    const int* task = nullptr;
    std::size_t tasks = 1;
    [[nodiscard]] bool mixed() const noexcept { return task != nullptr; }
};

/// One move of slice_moves: dst[i] = (add ? dst[i] : 0) + sum over c = 0, 1, ...,
/// count - 1 (in that order) of src[c stride + i], for i < n (device pointers).
template <class T>
struct SliceMove {
    const T* src = nullptr;
    T* dst = nullptr;
    std::size_t n = 0, count = 1, stride = 0;
    int add = 0;
};

/// Every move of `moves` in one launch on the current stream (the moves are
/// copied to the device first). Moves must not write one destination twice;
/// the sums run in a fixed order, so results are reproducible.
template <class T>
void slice_moves(std::span<const SliceMove<T>> moves, std::string_view where);

}  // namespace patchwork::cuda
