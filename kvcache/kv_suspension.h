// Suspension: what a suspended KV cache remembers to be put back by resume(): every place each
// physical chunk was mapped at (a fork prefix: one chunk, several places) and its bytes in host memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/host_copy.h"

namespace glake::kvcache {

/// One place a chunk was mapped at: chunk `index` of `slot`.
struct Place {
  int slot;
  std::int64_t index;
};

/// One physical chunk of the suspended cache.
struct SavedChunk {
  std::vector<Place> places;  ///< ascending (slot, index); empty once every slot holding it was released
  DevPtr host = 0;            ///< its bytes, inside one of Suspension::buffers (0 after a discard)
};

/// The saved state of a suspended cache (the manager's lock guards it).
struct Suspension {
  std::vector<SavedChunk> chunks;
  std::vector<HostBufferPtr> buffers;  ///< one per run of chunks copied together
  std::int64_t host_bytes = 0;
  std::size_t reused_bytes = 0;  ///< of host_bytes, written into host memory kept from the last resume
  bool discarded = false;  ///< suspend(discard=true): nothing was copied

  /// Forgets `slot`'s places: its sequence ended while suspended, resume() leaves it unmapped.
  void drop_slot(int slot) {
    for (SavedChunk& c : chunks) {
      auto gone = std::remove_if(c.places.begin(), c.places.end(), [slot](const Place& p) { return p.slot == slot; });
      c.places.erase(gone, c.places.end());
    }
  }
};

}  // namespace glake::kvcache
