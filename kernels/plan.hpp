#pragma once
// Host-side launch planning shared by the kernels in patchwork/kernels/*.cuh:
// tile sizes, the bottleneck buckets of the fused low-rank kernels, the row
// splits of the deterministic column reductions, workspace sizes, and the
// size checks every launcher runs before it launches anything. Plain C++ (no
// CUDA headers), so the planning is unit-tested on machines without a GPU.
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string_view>

#include "patchwork/core/error.hpp"

namespace patchwork::kernels {

/// Non-linearity between the two projections of a low-rank patch
/// (none: LoRA; relu / gelu: bottleneck adapters, as AdapterActivation).
enum class Act { none, relu, gelu };

inline constexpr unsigned kThreads = 256;       ///< threads per block of every row-tiled kernel
inline constexpr unsigned kTileRows = 32;       ///< rows per block of the fused low-rank kernels
inline constexpr unsigned kChunk = 32;          ///< reduction-dimension chunk staged in shared memory
inline constexpr unsigned kFusedRank = 64;      ///< largest bottleneck handled in one pass over a tile
inline constexpr unsigned kColTile = 32;        ///< columns per block of the column reductions
inline constexpr unsigned kReduceBlocks = 512;  ///< blocks a column reduction aims for (about 4 per SM)
inline constexpr unsigned kMinSplitRows = 64;   ///< fewest rows one block of a column reduction takes
inline constexpr unsigned kMaxCandidates = 16;  ///< most candidates one mixing kernel takes
inline constexpr unsigned kMixBlocksMax = 1024; ///< most blocks of the mixing kernels

/// Bottleneck bucket of the fused low-rank kernels: the compiled width
/// (8, 16, 32 or 64) that a rank-r patch runs with. A rank above 64 runs with
/// the 64-wide kernel in ceil(r / 64) passes over each row tile.
[[nodiscard]] constexpr unsigned lowrank_bucket(std::size_t r) noexcept {
    return r <= 8 ? 8u : r <= 16 ? 16u : r <= 32 ? 32u : 64u;
}
/// Passes over each row tile for rank r (1 up to kFusedRank: the fused path).
[[nodiscard]] constexpr std::size_t lowrank_passes(std::size_t r) noexcept {
    return r == 0 ? 0 : (r + lowrank_bucket(r) - 1) / lowrank_bucket(r);
}
[[nodiscard]] constexpr bool lowrank_fused(std::size_t r) noexcept { return r >= 1 && r <= kFusedRank; }

/// Geometry of a deterministic column reduction over N rows of width C for K
/// tasks: grid (col_tiles, K, splits); split s takes rows [s * rows_per_split,
/// (s + 1) * rows_per_split). With splits > 1 the blocks write partial sums
/// to a workspace that a second kernel adds up in split order, so the result
/// depends on the sizes only, never on scheduling.
struct ReduceGeometry {
    std::size_t col_tiles = 0;
    std::size_t splits = 0;
    std::size_t rows_per_split = 0;
};

[[nodiscard]] constexpr ReduceGeometry reduce_geometry(std::size_t n, std::size_t c, std::size_t k) noexcept {
    ReduceGeometry g;
    g.col_tiles = c == 0 ? 0 : (c + kColTile - 1) / kColTile;
    if (n == 0 || g.col_tiles == 0 || k == 0) return g;
    const std::size_t per_split = g.col_tiles * k;
    std::size_t splits = (kReduceBlocks + per_split - 1) / per_split;
    const std::size_t most = (n + kMinSplitRows - 1) / kMinSplitRows;
    if (splits > most) splits = most;
    if (splits > 65535) splits = 65535;
    if (splits == 0) splits = 1;
    g.rows_per_split = (n + splits - 1) / splits;
    g.splits = (n + g.rows_per_split - 1) / g.rows_per_split;  // no empty split
    return g;
}

/// Elements of partial sums a column reduction producing `per_task` values
/// per task needs (0 when it runs in one split and adds straight into the result).
[[nodiscard]] constexpr std::size_t reduce_partial_elems(const ReduceGeometry& g, std::size_t k,
                                                         std::size_t per_task) noexcept {
    return g.splits <= 1 ? 0 : g.splits * k * per_task;
}

/// Blocks of the mixing kernels for M elements (depends on M only, so the
/// partial sums of <g, o_k> are added in the same order on every run).
[[nodiscard]] constexpr std::size_t mix_blocks(std::size_t m) noexcept {
    const std::size_t per_block = std::size_t(kThreads) * 8;
    std::size_t b = (m + per_block - 1) / per_block;
    if (b > kMixBlocksMax) b = kMixBlocksMax;
    return b == 0 ? 1 : b;
}

/// Bytes of a workspace region of n elements of `elem` bytes, rounded up to 256 (aligned regions).
[[nodiscard]] constexpr std::size_t ws_bytes(std::size_t n, std::size_t elem) noexcept {
    return (n * elem + 255) / 256 * 256;
}

/// Workspace the low-rank backward (adapter, LoRA) needs, in bytes, for N
/// rows, input width c_in, output width c_out, rank r, K tasks, accumulation
/// type of `accum_bytes` bytes: a = act(z) and dz ([N, r] each), the partial
/// sums of both parameter-gradient reductions, and for a rank above 64 dx's
/// sum over the passes ([N, c_in]).
[[nodiscard]] constexpr std::size_t lowrank_backward_workspace_bytes(std::size_t n, std::size_t c_in,
                                                                     std::size_t c_out, std::size_t r,
                                                                     std::size_t k, std::size_t accum_bytes) noexcept {
    const ReduceGeometry up = reduce_geometry(n, c_out, k), down = reduce_geometry(n, c_in, k);
    return 2 * ws_bytes(n * r, accum_bytes) +
           ws_bytes(reduce_partial_elems(up, k, c_out * r + c_out + r), accum_bytes) +
           ws_bytes(reduce_partial_elems(down, k, c_in * r + c_in + r), accum_bytes) +
           (lowrank_passes(r) > 1 ? ws_bytes(n * c_in, accum_bytes) : 0);  // dx's sum over the passes
}

/// Workspace the low-rank forward takes from the current context: for a rank
/// above 64, y's sum over the passes ([N, c_out] in the accumulation type).
[[nodiscard]] constexpr std::size_t lowrank_forward_workspace_bytes(std::size_t n, std::size_t c_out, std::size_t r,
                                                                    std::size_t accum_bytes) noexcept {
    return lowrank_passes(r) > 1 ? ws_bytes(n * c_out, accum_bytes) : 0;
}

/// Workspace of the scale-shift backward (partial sums of dgamma and dbeta).
[[nodiscard]] constexpr std::size_t scale_shift_backward_workspace_bytes(std::size_t n, std::size_t d, std::size_t k,
                                                                         std::size_t accum_bytes) noexcept {
    return ws_bytes(reduce_partial_elems(reduce_geometry(n, d, k), k, 2 * d), accum_bytes);
}

/// Workspace of the mixing backward (per-block partial sums of <g, o_k>).
[[nodiscard]] constexpr std::size_t mix_backward_workspace_bytes(std::size_t m, std::size_t k,
                                                                 std::size_t accum_bytes) noexcept {
    return ws_bytes(mix_blocks(m) * k, accum_bytes);
}

namespace check {

/// ConfigError unless v > 0.
inline void positive(std::string_view where, std::string_view what, std::size_t v) {
    if (v == 0) throw ConfigError(patchwork::detail::concat(where, ": ", what, " must be positive, got 0"));
}
/// ConfigError when a required device pointer is null.
inline void pointer(std::string_view where, std::string_view what, const void* p) {
    if (p == nullptr) throw ConfigError(patchwork::detail::concat(where, ": ", what, " is a null device pointer"));
}
/// ShapeError unless rows x cols elements can be indexed (fits in int64 and in size_t bytes of 8).
inline void extent(std::string_view where, std::string_view what, std::size_t rows, std::size_t cols) {
    constexpr std::size_t limit = std::size_t(std::numeric_limits<std::int64_t>::max()) / 16;
    if (cols != 0 && rows > limit / cols)
        throw ShapeError(patchwork::detail::concat(where, ": ", what, " of ", rows, " x ", cols,
                                        " elements is too large to index"));
}
/// ShapeError unless a dimension fits a 32-bit int (widths, ranks, task counts index shared tiles).
inline void fits_int(std::string_view where, std::string_view what, std::size_t v) {
    if (v > std::size_t(std::numeric_limits<int>::max()))
        throw ShapeError(patchwork::detail::concat(where, ": ", what, " = ", v, " exceeds the largest supported value ",
                                        std::numeric_limits<int>::max()));
}
/// ConfigError unless the task count fits the grid (gridDim.y <= 65535).
inline void tasks(std::string_view where, std::size_t k) {
    positive(where, "the number of tasks K", k);
    if (k > 65535) throw ConfigError(patchwork::detail::concat(where, ": at most 65535 tasks are supported, got ", k));
}

}  // namespace check
}  // namespace patchwork::kernels
