// The one thread scheduler of the CPU kernels (qgemm.cpp, solver.cpp).
//
// Unlike at::parallel_for's static split, workers pull chunks from a shared counter: when a thread is
// descheduled (a busy or shared machine), the others take over its work instead of waiting for it.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace qk::cpu {

// T workers (one at::parallel_for region) take chunks [a, a + size(a)) of [0, n) until none is left.
template <typename Size, typename F>
void pull_chunks(int64_t n, int64_t T, const Size& size, const F& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, T, 1, [&](int64_t, int64_t) {
    int64_t a = next.load(std::memory_order_relaxed);
    while (a < n) {
      const int64_t b = std::min(n, a + size(a));
      if (next.compare_exchange_weak(a, b, std::memory_order_relaxed)) {
        fn(a, b);
        a = next.load(std::memory_order_relaxed);
      }
    }
  });
}

// fn(a, b) over [0, n) for the qgemm kernels: inline when the work is one chunk, one thread, or already
// inside a parallel region (small layers: no fork/join). Chunks are guided: a quarter of the remaining
// share per thread, at least `grain`, a multiple of `align`, so the threads finish together; each chunk
// is a contiguous range (one linear stream through the packed weights).
template <typename F>
void dynamic_for(int64_t n, int64_t grain, const F& fn, int64_t align = 4) {
  const int64_t T = at::get_num_threads();
  if (n <= grain || T == 1 || at::in_parallel_region()) {
    if (n > 0) fn(0, n);
    return;
  }
  // at most an even share per thread (a 36-tile decode GEMV split 28 + 8 runs at the speed of the 28)
  grain = std::min<int64_t>(std::max<int64_t>(grain, 1), (n + T - 1) / T);
  grain = (grain + align - 1) / align * align;
  pull_chunks(n, T, [&](int64_t a) { return std::max(grain, ((n - a) / (4 * T) + align - 1) / align * align); }, fn);
}

// f(i) for each of n big independent work items (the solvers' row chunks, each running whole blocked
// GEMMs), one at a time, always inside one parallel region (also for n = 1: the work items' BLAS calls
// then run single-threaded, as they always have).
template <typename F>
void dynamic_each(int64_t n, const F& f) {
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  pull_chunks(n, T, [](int64_t) { return int64_t{1}; }, [&](int64_t a, int64_t) { f(a); });
}

}  // namespace qk::cpu
