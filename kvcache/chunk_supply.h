// ChunkSupply: where new backing comes from, and the memory budget.
//
// In order: the ChunkPool within the budget (its cached chunks first, then new ones); chunks only
// released slots map, least recently released slot first, highest index first (deferred
// reclamation: they never cause an out-of-memory); and, for a synchronous (strict) request only,
// live sequences' unshared chunks past what they need (lookahead, prefetch, or kept from a slot's
// previous sequence). A chunk of a slot whose release fence is pending is not taken: it is counted
// as `fenced`, obtainable once the engine has waited for the fence without the lock.
// Not thread-safe: used with the manager's lock held.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/chunk_pool.h"
#include "kvcache/chunk_table.h"
#include "kvcache/fence.h"
#include "kvcache/kv_counters.h"
#include "kvcache/slot_table.h"

namespace glake::kvcache {

/// A chunk that may be unmapped from where it is to back another place.
struct Victim {
  int slot;
  std::int64_t index;
  SlotState state;  ///< the slot's state when it was chosen
};

/// Victims in the order they are taken, and what pending fences hold back.
struct VictimList {
  std::vector<Victim> ready;       ///< slots whose fences are done
  std::size_t fenced = 0;          ///< chunks held back by a pending fence
  std::vector<int> fenced_slots;   ///< the slots holding them
};

/// Chunks a live slot must keep: `keep[slot]` chunks from its start, or -1 = what its reserved
/// length needs (a batch passes the lengths it is about to reserve).
using KeepList = std::vector<std::int64_t>;

/// The outcome of a strict check.
enum class Supply { Ok, AfterFences };

/// The pool, the budget and the victim rules of one cache.
class ChunkSupply {
 public:
  /// A supply for `layout`; budget_chunks nullopt = the device is the limit.
  ChunkSupply(Driver& driver, int device, const KvLayout& layout, std::optional<std::int64_t> budget_chunks,
              ChunkTable& table, SlotTable& slots, FenceSet& fences, KvCounters& counters);

  /// The budget in chunks, or nullopt.
  std::optional<std::int64_t> budget_chunks() const { return budget_; }
  /// The pool's counters.
  ChunkPoolStats pool_stats() const { return pool_->stats(); }
  /// Releases the pool's cached chunks to the driver; returns bytes released.
  std::size_t trim_pool() { return pool_->trim(0); }
  /// `n` chunks straight from the pool, all or none (resume: nothing is mapped to reclaim from);
  /// OutOfMemoryError at the budget or when the device refuses.
  std::vector<ChunkPtr> fresh(std::size_t n) { return pool_->acquire_many(n); }
  /// Chunks the pool can still hand out: budget minus chunks in use (free device memory without a budget).
  std::int64_t pool_left() const;

  /// Chunks only released slots (except `exclude`) map: oldest release first, highest index first.
  VictimList released_victims(int exclude);
  /// Live slots' unshared chunks past what they keep (`for_slot`'s own past `own_keep` first).
  VictimList surplus_victims(int for_slot, std::int64_t own_keep, const KeepList* keep = nullptr);
  /// Chunks a strict request for `for_slot` may obtain besides the pool (see surplus_victims).
  VictimList strict_victims(int for_slot, std::int64_t own_keep, const KeepList* keep = nullptr);

  /// Chunks a strict request for `for_slot` may get: the pool's, and victims' (fenced ones included).
  std::int64_t obtainable(int for_slot, std::int64_t own_keep, const KeepList* keep);

  /// Whether `n` chunks can be had for `for_slot` by the strict rules: Ok now, AfterFences once the
  /// slots put in `fenced_slots` are waited for; throws OutOfMemoryError naming `what` otherwise.
  Supply check(std::int64_t n, int for_slot, std::int64_t own_keep, const std::string& what, const KeepList* keep,
               std::vector<int>* fenced_slots);

  /// What obtain() handed out and whose chunks it took.
  struct Taken {
    std::vector<ChunkPtr> chunks;
    std::vector<Victim> stolen;
  };
  /// `n` chunks for `for_slot`: from the pool, then victims. Strict: all of them (after check() said
  /// Ok), else OutOfMemoryError; not strict (the mapper): as many as the pool and released slots give.
  Taken obtain(std::int64_t n, int for_slot, std::int64_t own_keep, bool strict, const std::string& what,
               const KeepList* keep = nullptr);

  /// The usage part of an out-of-memory message.
  std::string usage() const;

 private:
  void add_slot(VictimList& out, int slot, std::int64_t keep);
  ChunkPtr steal(const Victim& v);

  Driver& driver_;
  int device_;
  KvLayout layout_;
  std::optional<std::int64_t> budget_;
  std::shared_ptr<ChunkPool> pool_;
  ChunkTable& table_;
  SlotTable& slots_;
  FenceSet& fences_;
  KvCounters& n_;
};

}  // namespace glake::kvcache
