#include "bench/alloc_bench.h"

#include <algorithm>
#include <chrono>
#include <vector>

namespace glake::bench {

double measure_alloc_free_ns(gmlake::StitchAllocator& a, std::size_t size, int iters) {
  if (iters <= 0) throw InvalidArgumentError("measure_alloc_free_ns: iters must be positive");
  a.free(a.malloc(size));  // warm: the block is cached from here on
  std::vector<double> ns;
  ns.reserve(iters);
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    a.free(a.malloc(size));
    ns.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(ns.begin(), ns.begin() + ns.size() / 2, ns.end());
  return ns[ns.size() / 2];
}

}  // namespace glake::bench
