// The content digest of dedup, with no driver dependency: its definition (shared, as inline code, by
// the host path and by the kernels of dedup_kernels.cu), the host implementation, and the parameter
// blocks the kernels take by value.
//
// The digest of a chunk of n bytes (n a multiple of 8) is two 64-bit lanes. With x[i] the chunk's i-th
// little-endian uint64 word and w(i, l) = splitmix64(0x6C616B65 + 2*i + l) | 1,
//     lane[l] = sum over i of x[i] * w(i, l)   (mod 2^64, wrapping unsigned arithmetic), l = 0, 1,
// where splitmix64(z): z += 0x9E3779B97F4A7C15; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
// z = (z ^ (z >> 27)) * 0x94D049BB133111EB; return z ^ (z >> 31).
// A sum of per-word terms: any split of the words over threads, in any order, gives the same lanes.
// Its hex form is "%016llx%016llx" of lane 0 then lane 1. With GLAKE_DEDUP_TEST_COLLIDE=1 in the
// environment every digest is {0, 0} (a test hook: forced collisions).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#ifdef __CUDACC__
#define GLAKE_DEDUP_HD __host__ __device__ __forceinline__
#else
#define GLAKE_DEDUP_HD inline
#endif

namespace glake::shim::dedup {

/// Most chunks (or pairs of chunks) one call, and one kernel launch, takes.
constexpr unsigned kMaxChunks = 64;
/// Threads per block of both kernels.
constexpr unsigned kThreads = 256;

/// The splitmix64 finaliser (Steele, Lea, Flood 2014) of the digest's definition.
GLAKE_DEDUP_HD std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// The weight w(i, lane) of word i in `lane` (0 or 1): odd, so that every bit of a word counts.
GLAKE_DEDUP_HD std::uint64_t weight(std::uint64_t i, unsigned lane) {
  return splitmix64(0x6C616B65ull + 2 * i + lane) | 1;
}

/// Parameters of glake_dedup_hash, passed by value (no device-side pointer array).
struct HashParams {
  unsigned long long ptr[kMaxChunks];  ///< device address of each chunk
  unsigned long long out;              ///< device address of 2 * n uint64 lanes, zeroed before the launch
  unsigned long long chunk_bytes;      ///< bytes per chunk, a multiple of 8
  unsigned blocks_per_chunk;           ///< the grid is n * blocks_per_chunk blocks of kThreads
};

/// Parameters of glake_dedup_compare, passed by value.
struct CompareParams {
  unsigned long long a[kMaxChunks];  ///< device address of each pair's first chunk
  unsigned long long b[kMaxChunks];  ///< and of its second
  unsigned long long flags;          ///< device address of n ints, zeroed before: set to 1 where a pair differs
  unsigned long long chunk_bytes;    ///< bytes per chunk, a multiple of 8
  unsigned blocks_per_chunk;         ///< the grid is n * blocks_per_chunk blocks of kThreads
};

/// A chunk's content digest (see the top of this file).
struct Digest {
  std::uint64_t lane[2] = {0, 0};
  /// The 32 hex digits of lane 0 then lane 1.
  std::string hex() const;
  bool operator==(const Digest& o) const { return lane[0] == o.lane[0] && lane[1] == o.lane[1]; }
  bool operator!=(const Digest& o) const { return !(*this == o); }
};

/// Whether GLAKE_DEDUP_TEST_COLLIDE=1 (read once): every digest is then {0, 0}.
bool forced_collisions();

/// The digest of the `n` bytes (a multiple of 8) at host address `data`, computed on the host.
Digest host_digest(const void* data, std::size_t n);

}  // namespace glake::shim::dedup
