#pragma once
// Splitting element-wise and row-wise loops across threads.
//
// When the translation unit is compiled with OpenMP (`-Dopenmp=enabled`, or
// `-fopenmp` in a consumer's flags), a loop whose total work reaches
// `parallel_threshold` elements runs as an OpenMP `parallel for` with a static
// schedule; smaller loops, and every loop without OpenMP, run on the calling
// thread. The threshold keeps the fork/join cost (a few microseconds) away from
// the small tensors of batch-64 steps, where it would dominate.
//
// Work is split over whole rows (for_rows) or over contiguous chunks
// (for_range), so each thread writes a disjoint part of the output and the
// result does not depend on the number of threads.
#include <algorithm>
#include <cstddef>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace patchwork {

/// Loops with at least this many elements of work may run on several threads.
inline constexpr std::size_t parallel_threshold = std::size_t(1) << 15;

/// Calls f(r) for r in [0, rows); `row_cost` is the work per row in elements.
template <class F>
void for_rows(std::size_t rows, std::size_t row_cost, F&& f) {
#if defined(_OPENMP)
    const bool split = rows > 1 && rows * row_cost >= parallel_threshold && !omp_in_parallel();
#pragma omp parallel for schedule(static) if (split)
    for (std::ptrdiff_t r = 0; r < std::ptrdiff_t(rows); ++r) f(std::size_t(r));
#else
    (void)row_cost;
    for (std::size_t r = 0; r < rows; ++r) f(r);
#endif
}

/// Calls f(begin, end) on disjoint contiguous chunks covering [0, n).
template <class F>
void for_range(std::size_t n, F&& f) {
#if defined(_OPENMP)
    if (n >= parallel_threshold && !omp_in_parallel()) {
#pragma omp parallel
        {
            const std::size_t threads = std::size_t(omp_get_num_threads());
            const std::size_t t = std::size_t(omp_get_thread_num());
            // Chunks rounded to 16 elements so that threads do not share cache lines.
            const std::size_t chunk = ((n + threads - 1) / threads + 15) / 16 * 16;
            const std::size_t begin = std::min(n, t * chunk), end = std::min(n, begin + chunk);
            if (begin < end) f(begin, end);
        }
        return;
    }
#endif
    if (n > 0) f(std::size_t(0), n);
}

}  // namespace patchwork
