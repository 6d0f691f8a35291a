// ChunkPool: a cache of free physical chunks of one size on one device, under a byte limit.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <vector>

#include "core/phys_chunk.h"

namespace glake {

/// Counters of one pool.
struct ChunkPoolStats {
  std::size_t chunk_size = 0;
  std::size_t limit_bytes = 0;   ///< 0 = no limit
  std::size_t cached_chunks = 0; ///< free, owned by the pool
  std::size_t in_use_chunks = 0; ///< handed out and not yet returned
  std::size_t created = 0;       ///< chunks this pool created
  std::size_t released = 0;      ///< chunks this pool released to the driver
  std::size_t hits = 0;          ///< acquisitions served from the cache
};

/// Hands out chunks of one size, creating them on demand. A chunk comes back to the cache by
/// itself when its last reference (owner or mapping) goes away, so holders never return chunks
/// explicitly. The pool's bytes (in use + cached) never exceed its limit.
class GLAKE_API ChunkPool : public std::enable_shared_from_this<ChunkPool> {
 public:
  /// A pool on `device`; chunk_size 0 = the granularity; limit_bytes 0 = no limit.
  static std::shared_ptr<ChunkPool> create(Driver& driver, int device, std::size_t limit_bytes = 0,
                                           std::size_t chunk_size = 0);
  ~ChunkPool();

  /// One chunk: cached if any, else new. Throws OutOfMemoryError at the limit or when the device is full.
  std::shared_ptr<PhysChunk> acquire();
  /// `n` chunks, all or none.
  std::vector<std::shared_ptr<PhysChunk>> acquire_many(std::size_t n);
  /// Creates chunks into the cache until it holds `n` (bounded by the limit); returns how many it holds.
  std::size_t prefill(std::size_t n);
  /// Releases cached chunks to the driver until at most `keep_bytes` stay cached; returns bytes released.
  std::size_t trim(std::size_t keep_bytes = 0);
  /// Changes the limit; lowering it below current use trims the cache but never takes chunks in use.
  void set_limit(std::size_t limit_bytes);

  /// The size of every chunk.
  std::size_t chunk_size() const { return chunk_size_; }
  /// Device ordinal.
  int device() const { return device_; }
  /// Driver.
  Driver& driver() const { return driver_; }
  /// Current counters.
  ChunkPoolStats stats() const;

 private:
  ChunkPool(Driver& driver, int device, std::size_t limit_bytes, std::size_t chunk_size);
  std::shared_ptr<PhysChunk> wrap(std::shared_ptr<PhysChunk> raw);  // attaches the return-to-pool hook
  std::shared_ptr<PhysChunk> take_locked();
  void give_back(std::shared_ptr<PhysChunk> chunk);

  Driver& driver_;
  int device_;
  std::size_t chunk_size_;
  mutable std::mutex mutex_;
  std::size_t limit_bytes_;
  std::vector<std::shared_ptr<PhysChunk>> cache_;  // sole owner of each cached chunk
  ChunkPoolStats counts_;
};

}  // namespace glake
