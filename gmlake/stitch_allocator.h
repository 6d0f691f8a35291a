// The stitched caching allocator (GMLake's policy) over glake's VMM core.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "gmlake/block.h"
#include "gmlake/config.h"
#include "gmlake/event_pool.h"
#include "gmlake/pool.h"
#include "core/host_copy.h"

namespace glake::gmlake {

/// A current value with its peak.
struct Stat {
  std::int64_t current = 0;
  std::int64_t peak = 0;
  /// Adds `delta` to the current value, raising the peak with it.
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
  /// The same figures split by pool (small: requests up to small_size; large: the rest, stitched included).
  Stat active_small, active_large, requested_small, requested_large;
  Stat allocations_small, allocations_large, segments_small, segments_large;
  std::int64_t num_allocs = 0, num_frees = 0, num_alloc_retries = 0, num_ooms = 0;
  std::int64_t num_stitches = 0, num_stitch_reuses = 0, num_stitch_gc = 0;
  std::int64_t num_segments_created = 0, num_segments_released = 0, num_cross_stream_reuses = 0;
  std::int64_t num_sync_all_streams = 0;  ///< device synchronisations before unmapping freed memory
  std::int64_t stitched_va_cached = 0;  ///< VA of stitched ranges (active and idle)
  std::int64_t num_events_created = 0;  ///< driver events made for record_stream frees (reused after)
  std::int64_t private_pools = 0;       ///< private pools alive (in use, or freeable and not yet returned)
  std::int64_t private_pool_free_bytes = 0;  ///< free bytes held by private pools (reserved, not reusable outside them)
  bool suspended = false;                ///< between suspend() and resume(): no physical memory held
  std::int64_t suspended_host_bytes = 0; ///< bytes of live data suspend() keeps in host memory
  std::int64_t suspended_file_bytes = 0; ///< of them, bytes in file-backed memory (more than RAM allows)
  std::int64_t suspended_reused_bytes = 0; ///< of them, bytes written into host memory kept from the last resume
  std::int64_t kept_host_bytes = 0;      ///< host memory a resume kept for the next suspend ($GLAKE_SUSPEND_KEEP_HOST=1)
  std::int64_t shared_bytes = 0;         ///< bytes of live allocations' chunks shared with share_chunk (dedup)
  std::int64_t shared_imported_bytes = 0;///< of them, chunks of another owner mapped in place of ours (memory saved)
};

/// One physical chunk a live allocation covers whole (whole_chunks()).
struct ChunkRef {
  DevPtr ptr = 0;                      ///< where it is mapped in the allocation
  std::shared_ptr<PhysChunk> chunk;    ///< the chunk mapped there now
  bool shared = false;                 ///< already shared (share_chunk)
};

/// One block as seen by snapshot().
struct BlockInfo {
  DevPtr ptr;
  std::size_t size;
  std::size_t requested;
  const char* state;  ///< "allocated", "free", "stitched" (lent to a stitch), "pending" (awaiting events)
  StreamHandle stream;
  DevPtr lent_to = 0;  ///< "stitched" blocks: the address of the stitched range using them
  PoolId pool;         ///< the private pool it belongs to ({0,0}: the global cache)
};

/// One segment or stitched range as seen by snapshot().
struct SegmentInfo {
  const char* kind;  ///< "small", "large" or "stitched"
  DevPtr ptr;
  std::size_t size;
  bool active;       ///< stitched: allocated now
  std::vector<BlockInfo> blocks;
};

/// A per-device caching allocator: small pool, best-fit large pool, stitching, streams, limits,
/// private pools (torch's graph pools / MemPool). Thread-safe. The cached path (a free block fits)
/// takes no driver call. Defined one concept per file: stitch_allocator.cpp (construction,
/// malloc/free), free_lists.cpp, stitch_policy.cpp, growth.cpp (slow path, segments, release),
/// stream_order.cpp (deferred frees, cross-stream reuse, quiesce), private_pools.cpp,
/// introspection.cpp (stats, snapshot), suspend.cpp, oom_report.cpp.
class GLAKE_API StitchAllocator {
 public:
  /// An empty allocator of `device` on `driver` (a stitch_va_limit of 0 becomes the device's size).
  StitchAllocator(Driver& driver, int device, AllocatorConfig config);
  /// Synchronises the device once and returns every chunk and range, live allocations included.
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
  /// Releases cached memory: idle stitched ranges and fully free segments no active stitch spans,
  /// and the free memory of released private pools.
  void empty_cache();
  /// Gives the device memory back, keeping every address: waits for the device, drops the free
  /// cache (idle stitches, free segments), copies the chunks that hold live data to host memory, and
  /// unmaps and releases every chunk; the segments' and stitched ranges' VA stays reserved. Until
  /// resume(), malloc throws; free, record_stream, stats and snapshot work. Throws
  /// InvalidArgumentError when already suspended or while a private pool is allocated to. `copier`
  /// moves the bytes (null: the driver's memcpy), consecutive live chunks of a segment in one copy.
  /// `discard`: base addresses of allocations whose contents need not survive (an LLM server's
  /// weights it reloads from disk): a chunk holding only those is not copied, and their bytes are
  /// undefined after resume(). An address that is not a live allocation's base throws
  /// InvalidArgumentError before anything changes.
  void suspend(HostCopier* copier = nullptr, const std::vector<DevPtr>& discard = {});
  /// Recreates every chunk, maps it at its old address (stitched ranges too) and copies the saved
  /// data back. All or nothing: an OutOfMemoryError leaves the allocator suspended, to be retried.
  /// No-op when not suspended. `copier` as for suspend().
  void resume(HostCopier* copier = nullptr);
  /// True between suspend() and resume().
  bool suspended() const;
  /// Makes the host memory of the next suspend ready now, while the process is awake (an idle
  /// server, before it sleeps): buffers of the sizes suspend() would copy at this moment, faulted in
  /// and page-locked (HostReserve::make_ready), kept by this allocator. A suspend whose runs have
  /// those sizes then copies into resident, pinned memory, DMA'd without staging, and so does its
  /// resume back; the buffers stay for the cycles after (drop_host_reserve() gives them back).
  /// Sizes already kept are not made again. Drops the free cache first, as suspend() does (so the
  /// runs are those it will copy). Returns the bytes made. Runs without the allocator's lock while
  /// it faults and pins. Throws InvalidArgumentError when suspended, OutOfMemoryError.
  std::size_t prepare_suspend();
  /// Unmaps (and unregisters) every host buffer kept for the next suspend.
  void drop_host_reserve();
  /// Sets the cap as a fraction of device memory (0 = none), like torch's.
  void set_memory_fraction(double fraction);

  /// Creates private pool `id` with use count 1, or adds 1 to its use count.
  void create_or_incref_pool(PoolId id);
  /// The use count of pool `id` (0 when unknown).
  int pool_use_count(PoolId id) const;
  /// Routes allocations whose stream `filter` accepts to pool `id` until end_allocate_to_pool
  /// (create_or_incref_pool included, as torch's). Throws InvalidArgumentError if already routing to `id`.
  void begin_allocate_to_pool(PoolId id, StreamFilter filter);
  /// Stops routing allocations to pool `id` (its memory stays with it). Throws if not routing to `id`.
  void end_allocate_to_pool(PoolId id);
  /// Subtracts 1 from the use count of pool `id`; at 0 its free memory returns to the cache (after a
  /// device synchronisation, so not while any pool is being allocated to: then at the next
  /// release or empty_cache), and its live blocks return when freed. Throws for unknown ids.
  void release_pool(PoolId id);
  /// The pool of the live allocation containing `ptr` ({0,0}: none, or the global cache).
  PoolId pool_of(DevPtr ptr) const;

  /// A CUDA graph `graph` (nonzero) starts capturing: pool {graph, 0} is allocated to by every
  /// stream that is capturing (begin_allocate_to_pool with a cuStreamIsCapturing filter).
  void begin_graph(std::uint64_t graph);
  /// The capture of `graph` ended (its memory stays with its pool for replays). No-op if not begun.
  void end_graph(std::uint64_t graph);
  /// `graph` was reset or destroyed: release_pool({graph, 0}). No-op for unknown graphs.
  void release_graph(std::uint64_t graph);

  /// The physical chunks that [ptr, ptr + bytes) covers whole, all inside one live allocation that
  /// is neither stitched, small, in a private pool nor used on other streams (record_stream), for
  /// content-based sharing (the shim's dedup). Throws InvalidArgumentError otherwise.
  std::vector<ChunkRef> whole_chunks(DevPtr ptr, std::size_t bytes) const;
  /// Shares the chunk whole_chunks() gave at `at`: maps `theirs` (same size: an identical chunk of
  /// another process, imported) there read-only in place of ours, which is released; or, with
  /// `theirs` null, makes ours read-only (it became the canonical copy others map). Until the
  /// allocation is freed nobody may write there. free() maps fresh private chunks back first (so the
  /// cache never hands out shared memory), suspend() unmaps shared chunks without copying them and
  /// resume() maps the same chunks again. The device must not be using the chunk meanwhile.
  void share_chunk(DevPtr at, std::shared_ptr<PhysChunk> theirs);

  /// Counters.
  AllocatorStats stats() const;
  /// Resets peaks to current values.
  void reset_peak_stats();
  /// Segments and stitched ranges with their blocks.
  std::vector<SegmentInfo> snapshot() const;
  /// The bytes and base pointer of the allocation containing `ptr` (0 size if none).
  std::pair<DevPtr, std::size_t> allocation_of(DevPtr ptr) const;
  /// Bytes of device memory.
  std::size_t device_total() const { return device_total_; }
  /// The largest free block in the global cache (torch's cacheInfo).
  std::size_t largest_free_block() const;
  /// The cap on reserved bytes now in force (0 = none).
  std::size_t limit() const;
  /// The configuration.
  const AllocatorConfig& config() const { return config_; }
  /// The device ordinal.
  int device() const { return device_; }
  /// The backend.
  Driver& driver() const { return driver_; }

 private:
  // ---- core (stitch_allocator.cpp)
  std::size_t round_size(std::size_t size) const;
  std::size_t cap_bytes() const;  ///< limit() without the lock
  const Block* live_block_containing(DevPtr ptr) const;
  // ---- free-block bookkeeping (free_lists.cpp)
  FreeLists& lists_of(const Block* b) { return b->pool ? b->pool->free : free_; }
  Block* take_fit(FreeLists& lists, PoolKind kind, std::size_t size, StreamHandle stream);
  Block* carve(Block* b, DevPtr start, std::size_t size);
  void insert_free(Block* b);
  void release_block(Block* b);
  Span mappable(const Block* b) const;
  std::size_t stitchable_bytes(StreamHandle stream) const;
  std::size_t largest_free() const;
  const Block* free_block_containing(DevPtr ptr) const;
  // ---- stitch policy (stitch_policy.cpp)
  void hold_stitch(Stitch* s);
  void dissolve(Stitch* s);
  void dissolve_held(StreamHandle stream, bool all_streams);
  Block* take_held_stitch(FreeLists& lists, std::size_t size, StreamHandle stream);
  void shrink_stitch(Stitch* s, std::size_t size);
  Block* reuse_stitch(std::size_t size, StreamHandle stream);
  Block* stitch(std::size_t size, StreamHandle stream);
  /// Appends the chunks mapped over `sp` (whole chunks, the last one may end past it); returns where they end.
  std::size_t append_chunks(const Span& sp, std::vector<std::shared_ptr<PhysChunk>>& out) const;
  void drop_stitch(Stitch* s);
  void gc_stitches(StreamHandle stream);
  // ---- growing and releasing (growth.cpp)
  Block* slow_path(PoolKind kind, std::size_t size, StreamHandle stream, std::size_t requested);
  Block* grow(PoolKind kind, std::size_t size, StreamHandle stream);
  Segment* create_segment(PoolKind kind, std::size_t bytes, StreamHandle stream);
  std::vector<std::shared_ptr<PhysChunk>> segment_chunks(PoolKind kind, std::size_t bytes);
  void release_segment(Segment* seg);
  std::size_t release_cached(StreamHandle stream);
  // ---- stream ordering (stream_order.cpp)
  bool any_routing() const { return !routing_.empty(); }
  bool quiesce(StreamHandle stream);
  void defer_free(Block* b);
  void process_deferred(bool wait);
  bool migrate_free_blocks(StreamHandle to, bool wait);
  // ---- private pools (private_pools.cpp)
  PrivatePool* incref_pool(PoolId id);
  PrivatePool* route(StreamHandle stream);
  Block* take_from_pool(PrivatePool& pool, PoolKind kind, std::size_t size, StreamHandle stream);
  void assign_pool(Block* b, PrivatePool* pool);
  void retire_freeable_pools();
  void retire_pool(PrivatePool* pool);
  // ---- suspend and resume (suspend.cpp)
  bool holds_live_data(const Segment& seg, std::size_t offset, std::size_t size, const std::set<DevPtr>& discard) const;
  /// Consecutive chunks of a segment holding live data (not shared, not only `dropped` allocations).
  struct LiveRun {
    Segment* seg;
    std::size_t offset, size;
  };
  struct SavedSegment;
  /// The live runs of every segment, in order; with `saved`, each segment's chunk sizes and shared
  /// chunks are recorded there too.
  std::vector<LiveRun> live_runs(const std::set<DevPtr>& dropped, std::map<const Segment*, SavedSegment>* saved) const;
  void unmap_stitches();
  void map_stitches();
  // ---- shared chunks (shared_chunks.cpp)
  void unshare(Block* b);
  // ---- OOM report (oom_report.cpp)
  std::string oom_message(std::size_t size, std::size_t rounded, const std::string& cause) const;

  Driver& driver_;
  int device_;
  AllocatorConfig config_;
  std::size_t granularity_;
  std::size_t device_total_;
  mutable std::mutex mutex_;
  FreeLists free_;  ///< the global cache's free blocks
  std::map<DevPtr, Block*> allocated_;
  std::vector<std::unique_ptr<Segment>> segments_;
  std::vector<std::unique_ptr<Stitch>> stitches_;
  EventPool events_;
  /// A freed block waiting for the streams record_stream added: `streams` until its events are
  /// recorded (deferred while any pool is allocated to, as torch does), then `events`.
  struct Deferred {
    Block* block;
    std::vector<StreamHandle> streams;
    std::vector<EventHandle> events;
  };
  std::vector<Deferred> deferred_;
  struct StreamEvent {
    EventHandle event = 0;
    std::uint64_t covers = 0;  ///< free_seq recorded before the event
  };
  std::map<StreamHandle, StreamEvent> stream_events_;
  std::uint64_t free_seq_ = 0, tick_ = 0, next_id_ = 1;
  std::map<PoolId, std::unique_ptr<PrivatePool>> pools_;        ///< live and freeable private pools
  std::vector<std::pair<PrivatePool*, StreamFilter>> routing_;  ///< pools being allocated to, in order of begin
  AllocatorStats stats_;
  /// Consecutive chunks of a segment that held live data, copied to host memory as one.
  struct SavedRun {
    std::size_t offset = 0;
    HostBufferPtr bytes;
  };
  /// What suspend() gave back of one segment: its chunks' sizes (back to back from offset 0, to be
  /// recreated) and the runs of live data (chunks holding none are not copied, never zero-filled).
  struct SavedSegment {
    std::vector<std::size_t> chunk_sizes;
    std::vector<SavedRun> runs;
    std::map<std::size_t, std::shared_ptr<PhysChunk>> shared;  ///< shared chunks by offset: mapped again, not copied
  };
  std::map<DevPtr, bool> shared_chunks_;          ///< start of each shared chunk -> imported (not ours)
  std::map<const Segment*, SavedSegment> saved_;  ///< while suspended
  HostReserve host_reserve_;                      ///< suspend's host buffers, kept between cycles if asked
  bool suspended_ = false;
};

}  // namespace glake::gmlake
