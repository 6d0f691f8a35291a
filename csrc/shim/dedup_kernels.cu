// The GPU side of dedup's content operations (dedup_content.h), compiled to PTX at build time and
// embedded in the shim, which loads it with cuModuleLoadData. Both kernels take their chunk addresses by
// value (dedup_digest.h) and run n * blocks_per_chunk blocks of kThreads threads: block b serves chunk
// b / blocks_per_chunk, and the threads serving one chunk stride over it together, 16 bytes each per
// step (coalesced ulonglong2 loads), with a scalar pass for the last word of an odd count or for a chunk
// not 16-byte aligned.

#include "shim/dedup_digest.h"

namespace glake::shim::dedup {
namespace {

/// The sum of `v` over the warp, in every lane.
__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

/// Where this thread starts within its chunk and how far it steps, in 16-byte (or, in the scalar pass, 8-byte) units.
struct Slice {
  unsigned long long first;
  unsigned long long stride;
};

__device__ __forceinline__ Slice slice(unsigned blocks_per_chunk) {
  return {static_cast<unsigned long long>(blockIdx.x % blocks_per_chunk) * kThreads + threadIdx.x,
          static_cast<unsigned long long>(blocks_per_chunk) * kThreads};
}

}  // namespace
}  // namespace glake::shim::dedup

using namespace glake::shim::dedup;

/// out[2 * c + l] += lane l of the digest of chunk c (dedup_digest.h): each thread sums x[i] * w(i, l) over
/// its words, then the block adds its sums to out (wrapping addition: any order gives the same lanes).
extern "C" __global__ void __launch_bounds__(kThreads) glake_dedup_hash(const HashParams p) {
  const unsigned chunk = blockIdx.x / p.blocks_per_chunk;
  const unsigned long long base = p.ptr[chunk];
  const unsigned long long words = p.chunk_bytes / 8;
  const Slice s = slice(p.blocks_per_chunk);
  unsigned long long sum0 = 0, sum1 = 0;
  unsigned long long scalar_from = 0;  // the first word the scalar pass covers
  if (base % 16 == 0) {
    const auto* v = reinterpret_cast<const ulonglong2*>(base);
#pragma unroll 4
    for (unsigned long long j = s.first; j < words / 2; j += s.stride) {
      const ulonglong2 x = __ldcs(v + j);
      sum0 += x.x * weight(2 * j, 0) + x.y * weight(2 * j + 1, 0);
      sum1 += x.x * weight(2 * j, 1) + x.y * weight(2 * j + 1, 1);
    }
    scalar_from = words & ~1ull;
  }
  const auto* w = reinterpret_cast<const unsigned long long*>(base);
  for (unsigned long long i = scalar_from + s.first; i < words; i += s.stride) {
    const unsigned long long x = __ldcs(w + i);
    sum0 += x * weight(i, 0);
    sum1 += x * weight(i, 1);
  }

  __shared__ unsigned long long partial[2][kThreads / 32];
  sum0 = warp_sum(sum0);
  sum1 = warp_sum(sum1);
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    partial[0][warp] = sum0;
    partial[1][warp] = sum1;
  }
  __syncthreads();
  if (warp == 0) {
    sum0 = warp_sum(lane < kThreads / 32 ? partial[0][lane] : 0);
    sum1 = warp_sum(lane < kThreads / 32 ? partial[1][lane] : 0);
    if (lane == 0) {
      auto* out = reinterpret_cast<unsigned long long*>(p.out);
      atomicAdd(out + 2 * chunk, sum0);
      atomicAdd(out + 2 * chunk + 1, sum1);
    }
  }
}

/// flags[c] = 1 when chunks a[c] and b[c] differ in any word (left 0 where they are equal).
extern "C" __global__ void __launch_bounds__(kThreads) glake_dedup_compare(const CompareParams p) {
  const unsigned pair = blockIdx.x / p.blocks_per_chunk;
  const unsigned long long a = p.a[pair], b = p.b[pair];
  const unsigned long long words = p.chunk_bytes / 8;
  const Slice s = slice(p.blocks_per_chunk);
  unsigned long long diff = 0;
  unsigned long long scalar_from = 0;
  if ((a | b) % 16 == 0) {
    const auto* va = reinterpret_cast<const ulonglong2*>(a);
    const auto* vb = reinterpret_cast<const ulonglong2*>(b);
#pragma unroll 4
    for (unsigned long long j = s.first; j < words / 2; j += s.stride) {
      const ulonglong2 x = __ldcs(va + j), y = __ldcs(vb + j);
      diff |= (x.x ^ y.x) | (x.y ^ y.y);
    }
    scalar_from = words & ~1ull;
  }
  const auto* wa = reinterpret_cast<const unsigned long long*>(a);
  const auto* wb = reinterpret_cast<const unsigned long long*>(b);
  for (unsigned long long i = scalar_from + s.first; i < words; i += s.stride) diff |= __ldcs(wa + i) ^ __ldcs(wb + i);
  if (__syncthreads_or(diff != 0) && threadIdx.x == 0) reinterpret_cast<int*>(p.flags)[pair] = 1;
}
