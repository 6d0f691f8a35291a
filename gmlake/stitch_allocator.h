// The stitched caching allocator (GMLake's policy) over glake's VMM core.
#pragma once

#include <cstdint>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "gmlake/block.h"
#include "gmlake/config.h"

namespace glake::gmlake {

/// A current value with its peak.
struct Stat {
  std::int64_t current = 0;
  std::int64_t peak = 0;
  void add(std::int64_t delta) {
    current += delta;
    if (current > peak) peak = current;
  }
};

/// Counters in torch's vocabulary plus glake's own.
struct AllocatorStats {
  Stat allocated_bytes, allocated_small, allocated_large;  ///< rounded sizes of live allocations
  Stat reserved_bytes, reserved_small, reserved_large;     ///< physical memory held
  Stat active_bytes;     ///< allocated + freed-but-awaiting-events (record_stream)
  Stat requested_bytes;  ///< exact sizes asked for
  Stat mapped_va_bytes;  ///< VA of segments and stitched ranges
  Stat stitched_bytes;   ///< bytes of live stitched allocations
  Stat segments;         ///< segments held
  Stat allocations;      ///< live allocations
  std::int64_t num_allocs = 0, num_frees = 0, num_alloc_retries = 0, num_ooms = 0;
  std::int64_t num_stitches = 0, num_stitch_reuses = 0, num_stitch_gc = 0;
  std::int64_t num_segments_created = 0, num_segments_released = 0, num_cross_stream_reuses = 0;
  std::int64_t num_sync_all_streams = 0;  ///< device synchronisations before unmapping freed memory
  std::int64_t stitched_va_cached = 0;  ///< VA of stitched ranges (active and idle)
};

/// One block as seen by snapshot().
struct BlockInfo {
  DevPtr ptr;
  std::size_t size;
  std::size_t requested;
  const char* state;  ///< "allocated", "free", "stitched" (lent to a stitch), "pending" (awaiting events)
  StreamHandle stream;
  DevPtr lent_to = 0;  ///< "stitched" blocks: the address of the stitched range using them
};

/// One segment or stitched range as seen by snapshot().
struct SegmentInfo {
  const char* kind;  ///< "small", "large" or "stitched"
  DevPtr ptr;
  std::size_t size;
  bool active;       ///< stitched: allocated now
  std::vector<BlockInfo> blocks;
};

/// A per-device caching allocator: small pool, best-fit large pool, stitching, streams, limits.
/// Thread-safe. The cached path (a free block fits) takes no driver call.
class GLAKE_API StitchAllocator {
 public:
  StitchAllocator(Driver& driver, int device, AllocatorConfig config);
  ~StitchAllocator();
  StitchAllocator(const StitchAllocator&) = delete;
  StitchAllocator& operator=(const StitchAllocator&) = delete;

  /// Allocates `size` (> 0) bytes for use on `stream`. Throws OutOfMemoryError with a full report.
  DevPtr malloc(std::size_t size, StreamHandle stream = 0);
  /// Frees an allocation (exact base pointer). Unknown, interior or double frees throw.
  void free(DevPtr ptr);
  /// Marks an allocation as used on another stream too: its memory is reused only after that
  /// stream's work (recorded when the allocation is freed) completes.
  void record_stream(DevPtr ptr, StreamHandle stream);
  /// Releases cached memory: idle stitched ranges and fully free segments no active stitch spans.
  void empty_cache();
  /// Sets the cap as a fraction of device memory (0 = none), like torch's.
  void set_memory_fraction(double fraction);
  /// A CUDA graph `graph` starts capturing: allocations made on capturing streams until
  /// end_graph belong to it, and their memory is not reused outside it until release_graph.
  void begin_graph(std::uint64_t graph);
  /// The capture of `graph` ended (its memory stays reserved for replays).
  void end_graph(std::uint64_t graph);
  /// `graph` was reset or destroyed: its memory, once freed, returns to the cache.
  void release_graph(std::uint64_t graph);
  /// Counters.
  AllocatorStats stats() const;
  /// Resets peaks to current values.
  void reset_peak_stats();
  /// Segments and stitched ranges with their blocks.
  std::vector<SegmentInfo> snapshot() const;
  /// The bytes and base pointer of the allocation containing `ptr` (0 size if none).
  std::pair<DevPtr, std::size_t> allocation_of(DevPtr ptr) const;
  /// The cap on reserved bytes now in force (0 = none).
  std::size_t limit() const;
  /// The configuration.
  const AllocatorConfig& config() const { return config_; }
  /// Device and backend.
  int device() const { return device_; }
  Driver& driver() const { return driver_; }

 private:
  using FreeKey = std::tuple<StreamHandle, std::size_t, DevPtr>;
  struct FreeLess {
    using is_transparent = void;
    bool operator()(const Block* a, const Block* b) const { return key(a) < key(b); }
    bool operator()(const Block* a, const FreeKey& b) const { return key(a) < b; }
    bool operator()(const FreeKey& a, const Block* b) const { return a < key(b); }
    static FreeKey key(const Block* b) { return {b->stream, b->size, b->ptr}; }
  };
  using FreeSet = std::set<Block*, FreeLess>;

  FreeSet& free_set(PoolKind kind) { return kind == PoolKind::Small ? small_free_ : large_free_; }
  std::size_t round_size(std::size_t size) const;
  Block* take_fit(PoolKind kind, std::size_t size, StreamHandle stream);
  Block* carve(Block* b, DevPtr start, std::size_t size);
  void insert_free(Block* b);
  void release_block(Block* b);
  void hold_stitch(Stitch* s);
  void dissolve(Stitch* s);
  void dissolve_held(StreamHandle stream, bool all_streams);
  Block* take_held_stitch(std::size_t size, StreamHandle stream);
  void shrink_stitch(Stitch* s, std::size_t size);
  Block* slow_path(PoolKind kind, std::size_t size, StreamHandle stream, std::size_t requested);
  Block* grow(PoolKind kind, std::size_t size, StreamHandle stream);
  Block* reuse_stitch(std::size_t size, StreamHandle stream);
  Block* stitch(std::size_t size, StreamHandle stream);
  Segment* create_segment(PoolKind kind, std::size_t bytes, StreamHandle stream);
  void release_segment(Segment* seg);
  bool quiesce(StreamHandle stream);
  void release_retired_graph_blocks();
  std::size_t release_cached(StreamHandle stream);
  void drop_stitch(Stitch* s);
  void gc_stitches(StreamHandle stream);
  void process_deferred(bool wait);
  bool migrate_free_blocks(StreamHandle to, bool wait);
  std::size_t free_bytes(PoolKind kind, StreamHandle stream) const;
  std::size_t largest_free() const;
  std::string oom_message(std::size_t size, std::size_t rounded, const std::string& cause) const;

  Driver& driver_;
  int device_;
  AllocatorConfig config_;
  std::size_t granularity_;
  std::size_t device_total_;
  mutable std::mutex mutex_;
  FreeSet small_free_, large_free_;
  FreeSet stitch_free_;  ///< held stitched blocks (see Stitch)
  std::map<DevPtr, Block*> allocated_;
  std::vector<std::unique_ptr<Segment>> segments_;
  std::vector<std::unique_ptr<Stitch>> stitches_;
  struct Deferred {
    Block* block;
    std::vector<EventHandle> events;
  };
  std::vector<Deferred> deferred_;
  struct StreamEvent {
    EventHandle event = 0;
    std::uint64_t covers = 0;  ///< free_seq recorded before the event
  };
  std::map<StreamHandle, StreamEvent> stream_events_;
  std::uint64_t free_seq_ = 0, tick_ = 0, next_id_ = 1;
  std::atomic<int> capturing_graphs_{0};  ///< read without the lock on every malloc
  std::uint64_t capture_graph_ = 0;
  /// Live graphs -> their freed blocks; key kRetiredGraphs: blocks of released graphs waiting for a
  /// moment the device may be synchronised (none while another graph captures).
  std::map<std::uint64_t, std::vector<Block*>> graph_blocks_;
  static constexpr std::uint64_t kRetiredGraphs = 0;
  AllocatorStats stats_;
};

}  // namespace glake::gmlake

namespace glake::gmlake {

/// Median nanoseconds of one malloc+free pair of `size` bytes on `a` (cached path), over `iters`.
GLAKE_API double measure_alloc_free_ns(StitchAllocator& a, std::size_t size, int iters);

}  // namespace glake::gmlake
