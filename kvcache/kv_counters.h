// KvCounters: the event counters of one KV cache (what stats() reports besides its gauges).
#pragma once

#include <cstdint>

namespace glake::kvcache {

/// Monotonic counters; changed only with the manager's lock held.
struct KvCounters {
  std::uint64_t maps_background = 0;      ///< chunks the mapper thread mapped
  std::uint64_t maps_sync = 0;            ///< chunks mapped by the engine's own calls
  std::uint64_t maps_shared = 0;          ///< chunks mapped a second time by fork (prefix sharing)
  std::uint64_t unmaps = 0;
  std::uint64_t reclaimed_released = 0;   ///< taken from released slots
  std::uint64_t reclaimed_lookahead = 0;  ///< taken from live sequences past their reservation
  std::uint64_t moved = 0;                ///< a slot's own chunk moved from past its need into a hole
  std::uint64_t trimmed = 0;              ///< surplus the mapper unmapped from live sequences
  std::uint64_t sync_waits = 0;           ///< reserve calls that mapped synchronously
  std::uint64_t wait_ns = 0;              ///< their time, lock waits included
  std::uint64_t fence_waits = 0;          ///< engine calls that waited (unlocked) for a release fence
  std::uint64_t fences_recorded = 0;
  std::uint64_t mapper_errors = 0;
  std::uint64_t forks = 0;
  std::uint64_t fork_tail_bytes = 0;
  std::uint64_t releases = 0;
  std::uint64_t swaps_out = 0, swaps_in = 0;
  std::uint64_t bytes_swapped_out = 0, bytes_swapped_in = 0;
  std::uint64_t batches = 0;              ///< reserve_batch calls
  std::uint64_t locked_engine_calls = 0;  ///< engine calls that took the lock (the fast path takes none)
};

}  // namespace glake::kvcache
