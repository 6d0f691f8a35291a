// KvManager: the vTensor KV-cache mechanism (glake.kvcache.KVCache is its Python face).
//
// One reserved range holds every slot's rows; physical chunks from a budgeted ChunkPool are mapped
// into a slot as its sequence grows, ahead of need by the Mapper thread. Composition: SlotTable
// (states), ChunkTable (what is mapped where), ChunkSupply (pool, budget, victims), FenceSet
// (release fences), Mapper (the thread), LengthsMirror (the device lengths array).
//
// Threading contract. One engine thread calls the methods; the mapper is the only other thread.
// One mutex guards the tables; the mapper holds it while it maps (driver calls, no Python). The
// engine's reserve_fast() takes no lock: it publishes the new target *before* reading the capacity,
// and the mapper, trimming a live slot, publishes the lowered capacity *before* re-reading the
// target (seq_cst atomics), so either reserve sees the lower capacity and takes the locked path or
// the mapper sees the new target and keeps the chunks. Nothing waits on the GPU under the lock:
// a chunk whose slot has a pending release fence is not unmapped; the mapper retries such work
// later, and an engine call that cannot go on without it drops the lock, waits, and starts over.
//
// Suspension (kv_suspend.cpp): suspend() copies the live chunks to host memory and gives every chunk
// back to the driver, keeping the range; the mapper stays alive but a pass finds `suspended_` set
// under the lock and maps nothing, and every engine call that would need backing refuses until
// resume() has mapped every chunk again at its old places.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "kvcache/chunk_supply.h"
#include "kvcache/chunk_table.h"
#include "kvcache/fence.h"
#include "kvcache/kv_counters.h"
#include "kvcache/kv_layout.h"
#include "kvcache/kv_suspension.h"
#include "kvcache/lengths_mirror.h"
#include "kvcache/mapper.h"
#include "kvcache/slot_table.h"

namespace glake::kvcache {

/// What a KV cache is made with.
struct KvConfig {
  std::int64_t max_seqs = 0, max_seq_len = 0, row_bytes = 0;
  std::optional<std::int64_t> budget_bytes;  ///< nullopt = the device is the limit
  std::int64_t lookahead_tokens = 2;         ///< 0 = no mapper thread
  int device = 0;
};

/// Gauges and counters of stats().
struct KvStats {
  KvCounters counters;
  std::int64_t chunks_physical = 0, chunks_mapped = 0, chunks_shared = 0, chunks_active = 0, chunks_released = 0;
  std::int64_t chunks_reclaimable = 0, chunks_surplus = 0, chunks_free = 0, pool_cached_chunks = 0;
  std::optional<std::int64_t> chunks_budget;
  std::int64_t slots_active = 0, slots_released = 0, slots_free = 0, tokens_reserved = 0, fences_pending = 0;
  std::uint64_t mapper_passes = 0, mapper_wakeups = 0, mapper_busy_ns = 0, lengths_waits = 0;
  bool suspended = false;
  std::int64_t suspended_host_bytes = 0;  ///< bytes suspend() copied to host memory (0 when not suspended)
  std::int64_t suspended_reused_bytes = 0; ///< of them, bytes written into host memory kept from the last resume
  std::int64_t kept_host_bytes = 0;       ///< host memory a resume kept for the next suspend ($GLAKE_SUSPEND_KEEP_HOST=1)
};

/// Where fork() wants the partial tail chunk's bytes copied (offsets in the range; bytes 0 = none).
struct ForkResult {
  int slot = -1;
  std::size_t tail_src = 0, tail_dst = 0, tail_bytes = 0;
};

/// Where publish_lengths() copies the lengths: an int32 device array, ordered on a stream.
struct LengthsTarget {
  DevPtr dst = 0;
  StreamHandle stream{};
};

/// Test hooks: a failing background map, and holding the mapper inside a trim with the lock held.
struct KvTestHooks {
  bool fail_background_maps = false;
  bool hold_next_trim = false, trim_held = false, trim_release = false;
  bool log_unmaps = false;
  std::vector<std::pair<int, std::int64_t>> unmap_log;  ///< (slot, index) of the mapper's trim unmaps
};

/// The KV-cache manager. See the threading contract above.
class KvManager {
 public:
  /// A cache over `driver`; throws InvalidArgumentError for a bad config.
  KvManager(Driver& driver, const KvConfig& config);
  ~KvManager();
  KvManager(const KvManager&) = delete;
  KvManager& operator=(const KvManager&) = delete;

  /// The geometry.
  const KvLayout& layout() const { return layout_; }
  /// The reserved range (for building views).
  std::shared_ptr<VirtualRange> range() const;
  /// The backend's name.
  const char* backend() const { return driver_.name(); }

  // ---- slot lifecycle ----
  /// A slot for a new sequence (the most recently released one first); OutOfMemoryError when all are live.
  int allocate();
  /// Ends `slot`'s sequence; its chunks stay mapped; a fence is recorded on `stream` first.
  void release(std::int64_t slot, StreamHandle stream);
  /// The lock-free fast path of reserve: true when done, false when the locked path must run. A slot
  /// the mapper should now serve is asked for at once, or added to `wake` when given.
  bool reserve_fast(std::int64_t slot, std::int64_t length, std::vector<int>* wake = nullptr);
  /// Guarantees backing for tokens [0, length) of `slot` (maps synchronously when needed).
  void reserve(std::int64_t slot, std::int64_t length);
  /// reserve() for `n` slots at once, all or nothing: an OutOfMemoryError changes no slot. With `publish`
  /// the lengths are then published (publish_lengths); the mapper is woken once, after that: the slots
  /// it should serve are gathered, so that its driver calls do not race the publish's copy.
  void reserve_batch(const std::int64_t* slots, const std::int64_t* lengths, std::size_t n,
                     const LengthsTarget* publish = nullptr);
  /// Whether reserve(slot, length) would succeed now (it may have to wait for a fence).
  bool can_reserve(std::int64_t slot, std::int64_t length);
  /// Tokens the chunks a reservation can still get would back (num_free_chunks x tokens per chunk).
  std::int64_t free_tokens();
  /// Chunks a reservation can still get.
  std::int64_t num_free_chunks();
  /// Asks the mapper to back [0, length) of `slot` in the background; guarantees nothing.
  void prefetch(std::int64_t slot, std::int64_t length);
  /// Tokens backed now / guaranteed by reserve.
  std::int64_t capacity(std::int64_t slot);
  std::int64_t reserved(std::int64_t slot);

  // ---- fork, writes, swap ----
  /// A new slot sharing `src`'s full prefix chunks; the caller copies the tail as the result says.
  ForkResult fork(std::int64_t src, std::int64_t prefix_len);
  /// Throws InvalidArgumentError unless tokens [start, end) of `slot` are backed and in no shared chunk.
  void check_writable(std::int64_t slot, std::int64_t start, std::int64_t end);
  /// The first token of `slot` in no shared chunk.
  std::int64_t first_writable(std::int64_t slot);
  /// Validates a swap-out of `slot` and returns its length (nullopt = the reserved length).
  std::int64_t swap_out_length(std::int64_t slot, std::optional<std::int64_t> length);
  /// After the caller copied `nbytes` out: unmaps the slot's chunks and frees it.
  void swap_out_finish(std::int64_t slot, std::size_t nbytes);
  /// A slot backed for `length` tokens, reserved to it; the caller copies the bytes in.
  int swap_in(std::int64_t length, std::size_t nbytes);

  // ---- memory, lengths, mapper ----
  /// Unmaps released slots' chunks (not those behind a pending fence) and empties the pool; bytes freed.
  std::size_t trim();
  /// Publishes every slot's reserved length (0 when not live) to the int32 array at `dst` on `stream`.
  void publish_lengths(DevPtr dst, StreamHandle stream);
  /// Blocks until the mapper is idle (true at once without one).
  bool wait_mapper(double timeout_s);
  /// True while the mapper thread runs.
  bool mapper_alive() const;
  /// True when the mapper failed since the last take_mapper_error().
  bool mapper_failed() const { return mapper_failed_.load(std::memory_order_relaxed); }
  /// (error type name, message) of the first mapper failure, cleared.
  std::pair<std::string, std::string> take_mapper_error();

  // ---- introspection ----
  /// Chunk ids at each index of `slot` (nullopt = unmapped).
  std::vector<std::optional<std::uint64_t>> chunk_ids(std::int64_t slot);
  /// Chunk id -> places it is mapped at.
  std::vector<std::pair<std::uint64_t, int>> chunk_refs();
  /// Distinct physical chunks mapped now (lock-free gauge).
  std::int64_t physical_chunks() const { return physical_.load(std::memory_order_relaxed); }
  /// Reserve calls that mapped synchronously (lock-free).
  std::uint64_t sync_waits() const { return sync_waits_.load(std::memory_order_relaxed); }
  /// Engine calls that took the lock.
  std::uint64_t locked_engine_calls();
  /// Gauges and counters.
  KvStats stats();
  /// "" when every invariant holds, else the first broken one.
  std::string check_invariants();
  /// Test hooks (see KvTestHooks); hold_trim arms the hold, wait_trim_held waits for the mapper to be in it.
  void set_fail_background_maps(bool fail);
  void hold_next_trim();
  bool wait_trim_held(double timeout_s);
  void release_trim();
  void set_unmap_log(bool on);
  std::vector<std::pair<int, std::int64_t>> unmap_log();

  // ---- suspension (kv_suspend.cpp) ----
  /// Waits for the pending fences and the device, copies every chunk live sequences map to host memory
  /// through `copier` (null: the driver's memcpy; none with `discard`), then unmaps everything and gives
  /// every chunk back to the driver; the range stays reserved. Released slots' chunks are dropped, not
  /// copied (the slots become free). A failed copy changes nothing. InvalidArgumentError when suspended.
  void suspend(HostCopier* copier, bool discard);
  /// Maps a new chunk at every place each saved chunk had (a shared one: one chunk, several places) and
  /// copies the bytes back (none after a discard). OutOfMemoryError when the device cannot give the
  /// chunks: nothing made is kept and the cache stays suspended. A no-op when not suspended.
  void resume(HostCopier* copier);
  /// True between suspend() and resume() (lock-free).
  bool suspended() const { return suspended_.load(); }

  /// Stops the mapper, waits for pending fences (unlocked), unmaps everything, frees the range. Idempotent.
  void close();
  /// True after close().
  bool closed() const { return closed_.load(); }

 private:
  using Lock = std::unique_lock<std::mutex>;
  template <class T, class Body> T locked_with_fences(Body body);
  void check_open() const;
  void check_resident(const char* what) const;
  int active_slot(std::int64_t slot) const;
  std::int64_t checked(const char* name, std::int64_t v, std::int64_t lo, std::optional<std::int64_t> hi) const;
  std::optional<int> take_slot(std::optional<std::uint64_t> prefer_chunk0, std::vector<int>& fenced);
  bool has_shared(int i) const;
  void activate(int i, bool unmap_shared);
  void drop_shared(int i);
  std::int64_t shared_below(int i, std::int64_t upto) const;
  void park(int i);
  void set_target(int i, std::int64_t t);
  void refresh(int i, bool starved = false);
  std::int64_t surplus_start(int i) const;
  std::int64_t grow(int i, std::int64_t want, bool strict, const std::string& what, const KeepList* keep = nullptr,
                    std::vector<std::pair<int, std::int64_t>>* mapped = nullptr);
  void after_steal(const std::vector<Victim>& stolen, int for_slot);
  void wake_starved();
  void gauge();
  std::int64_t first_writable_locked(int i) const;
  void unmap_checked(int i, std::int64_t j);
  // the mapper thread's side (kv_background.cpp)
  void background_pass(const std::vector<int>& slots);
  bool trim_live(int i, std::int64_t keep);
  void record_mapper_error(std::exception_ptr e);
  // suspension's side (kv_suspend.cpp)
  std::unique_ptr<Suspension> save_live(HostCopier& io, bool discard);
  void map_saved(const Suspension& s, HostCopier& io);
  void unmap_everything();
  std::string check_suspended() const;

  Driver& driver_;
  KvConfig config_;
  KvLayout layout_;
  mutable std::mutex mu_;
  KvCounters n_;
  SlotTable slots_;
  ChunkTable table_;
  FenceSet fences_;
  ChunkSupply supply_;
  LengthsMirror mirror_;
  std::vector<std::int32_t> lengths_;  // engine thread only
  std::set<int> starved_;              // slots whose lookahead the mapper could not back
  std::atomic<bool> closed_{false};
  std::atomic<bool> suspended_{false};  // set and cleared with the lock held; read lock-free by reserve_fast
  std::unique_ptr<Suspension> saved_;   // while suspended
  HostReserve host_reserve_;            // suspend's host buffers, kept between cycles if asked
  std::atomic<bool> mapper_failed_{false};
  std::atomic<std::int64_t> physical_{0};
  std::atomic<std::uint64_t> sync_waits_{0};
  std::string mapper_error_type_, mapper_error_message_;
  std::mutex hooks_mu_;  // guards hooks_ (the mapper waits on it holding mu_)
  std::condition_variable hooks_cv_;
  KvTestHooks hooks_;
  std::unique_ptr<Mapper> mapper_;     // last: stopped first
};

// Runs `body` with the lock held; a body that returns nullopt named the slots whose fences it must
// wait for: they are waited for with the lock dropped, and the body runs again.
template <class T, class Body>
T KvManager::locked_with_fences(Body body) {
  for (;;) {
    std::vector<FencePtr> wait;
    {
      Lock lock(mu_);
      check_open();
      ++n_.locked_engine_calls;
      std::vector<int> fenced;
      std::optional<T> r = body(fenced);
      if (r) {
        gauge();
        return *r;
      }
      for (int s : fenced) {
        for (auto& f : fences_.pending(s)) wait.push_back(f);
      }
      ++n_.fence_waits;
    }
    wait_all(wait);  // the lock is dropped: the GPU is waited for by this thread alone
  }
}

}  // namespace glake::kvcache
