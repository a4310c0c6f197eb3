// Part of fxquant's native library: one loop over independent blocks, on `threads` OpenMP threads only when
// `parallel` holds. A serial call never enters an OpenMP region: `#pragma omp parallel ... if (false)` still builds
// a team of one, ~0.6 us per call, which is most of the cost of a kernel call on a small tensor.
#pragma once
#include <omp.h>

#include <cstdint>

namespace fxq {

template <typename F>
void for_each_block(std::int64_t blocks, bool parallel, int threads, F&& body) {
  if (!parallel || threads <= 1 || blocks <= 1) {
    for (std::int64_t b = 0; b < blocks; ++b) body(b);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (std::int64_t b = 0; b < blocks; ++b) body(b);
}

}  // namespace fxq
