// Latency of the stitched allocator's cached path, measured in C++ (no Python in the timed region).
#pragma once

#include <cstddef>

#include "gmlake/stitch_allocator.h"

namespace glake::bench {

/// Median nanoseconds of one malloc+free pair of `size` bytes on `a` (cached path), over `iters`.
double measure_alloc_free_ns(gmlake::StitchAllocator& a, std::size_t size, int iters);

}  // namespace glake::bench
