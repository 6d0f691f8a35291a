// Private pools (torch's MempoolId_t / CUDA graph pools): memory a pool's allocations used stays
// with the pool, reused only by the pool's own later allocations, until the pool is released.
#pragma once

#include <cstdint>
#include <functional>

#include "gmlake/block.h"

namespace glake::gmlake {

/// A private pool's id: torch's MempoolId_t ({0,0} = no pool).
struct PoolId {
  std::uint64_t first = 0, second = 0;
  /// Same id.
  bool operator==(const PoolId& o) const { return first == o.first && second == o.second; }
  /// Different ids.
  bool operator!=(const PoolId& o) const { return !(*this == o); }
  /// Lexicographic order (for maps).
  bool operator<(const PoolId& o) const { return first != o.first ? first < o.first : second < o.second; }
  /// True for a real pool (nonzero id).
  explicit operator bool() const { return first != 0 || second != 0; }
};

/// Which streams' allocations go to a pool while it is being allocated to.
using StreamFilter = std::function<bool(StreamHandle)>;

/// One private pool's state (inside the allocator, under its lock).
struct PrivatePool {
  PoolId id;
  int use_count = 0;  ///< graphs / MemPools holding it; at 0 it is freeable
  FreeLists free;     ///< its free blocks: reused only by allocations routed to it
};

}  // namespace glake::gmlake
