// KvManager: stats(), chunk tables for tests and engines, and the full invariant check.
#include <algorithm>

#include "kvcache/kv_manager.h"

namespace glake::kvcache {

std::vector<std::optional<std::uint64_t>> KvManager::chunk_ids(std::int64_t slot) {
  Lock lock(mu_);
  check_open();
  const int i = static_cast<int>(checked("slot", slot, 0, layout_.max_seqs - 1));
  std::vector<std::optional<std::uint64_t>> out;
  for (std::int64_t j = 0; j < table_.extent(i); ++j) {
    const ChunkPtr& c = table_.chunk(i, j);
    out.push_back(c ? std::optional<std::uint64_t>(c->id()) : std::nullopt);
  }
  return out;
}

std::vector<std::pair<std::uint64_t, int>> KvManager::chunk_refs() {
  Lock lock(mu_);
  check_open();
  std::vector<std::pair<std::uint64_t, int>> out(table_.refcounts().begin(), table_.refcounts().end());
  std::sort(out.begin(), out.end());
  return out;
}

std::uint64_t KvManager::locked_engine_calls() {
  Lock lock(mu_);
  return n_.locked_engine_calls;
}

KvStats KvManager::stats() {
  Lock lock(mu_);
  check_open();
  KvStats s;
  s.counters = n_;
  s.chunks_physical = static_cast<std::int64_t>(table_.unique_chunks());
  s.chunks_mapped = static_cast<std::int64_t>(table_.mapped_total());
  s.chunks_shared = static_cast<std::int64_t>(table_.shared_chunks());
  for (int i : slots_.active()) {
    s.chunks_active += table_.count(i);
    s.tokens_reserved += slots_[i].target.load();
  }
  for (int i : slots_.released()) s.chunks_released += table_.count(i);
  const VictimList rel = supply_.released_victims(-1), sur = supply_.surplus_victims(-1, 0);
  s.chunks_reclaimable = static_cast<std::int64_t>(rel.ready.size() + rel.fenced);
  s.chunks_surplus = static_cast<std::int64_t>(sur.ready.size() + sur.fenced);
  s.chunks_free = supply_.pool_left() + s.chunks_reclaimable + s.chunks_surplus;
  s.chunks_budget = supply_.budget_chunks();
  s.pool_cached_chunks = static_cast<std::int64_t>(supply_.pool_stats().cached_chunks);
  s.slots_active = static_cast<std::int64_t>(slots_.active().size());
  s.slots_released = static_cast<std::int64_t>(slots_.released().size());
  s.slots_free = static_cast<std::int64_t>(slots_.free_stack().size());
  s.fences_pending = static_cast<std::int64_t>(fences_.pending_slots());
  s.mapper_passes = mapper_ ? mapper_->passes() : 0;
  s.mapper_wakeups = mapper_ ? mapper_->wakeups() : 0;
  s.mapper_busy_ns = mapper_ ? mapper_->busy_ns() : 0;
  s.lengths_waits = mirror_.waits();
  s.suspended = suspended_.load();
  s.suspended_host_bytes = saved_ ? saved_->host_bytes : 0;
  s.suspended_reused_bytes = saved_ ? static_cast<std::int64_t>(saved_->reused_bytes) : 0;
  s.kept_host_bytes = static_cast<std::int64_t>(host_reserve_.bytes());
  return s;
}

std::string KvManager::check_invariants() {
  Lock lock(mu_);
  check_open();
  std::string e = table_.check();
  if (e.empty()) e = slots_.check();
  if (!e.empty()) return e;
  for (int i = 0; i < slots_.size(); ++i) {
    const std::string at = "slot " + std::to_string(i) + ": ";
    const Slot& s = slots_[i];
    switch (slots_.state(i)) {
      case SlotState::Free:
        if (table_.count(i)) return "free " + at + "holds " + std::to_string(table_.count(i)) + " chunks";
        break;
      case SlotState::Released:
        if (!table_.count(i)) return "released " + at + "holds no chunk";
        break;
      case SlotState::Active: {
        const std::int64_t cap = s.capacity.load(), target = s.target.load();
        if (cap != layout_.tokens_backed(table_.ready(i))) return at + "stale capacity " + std::to_string(cap);
        if (target > cap && !suspended_.load()) {  // suspended: nothing is backed, resume() backs it again
          return at + "reserved " + std::to_string(target) + " > capacity " + std::to_string(cap);
        }
        if (lengths_[i] != target) return at + "lengths[] says " + std::to_string(lengths_[i]);
        std::int64_t last_shared = -1;
        for (auto j : table_.indices(i)) {
          if (table_.is_shared(i, j)) last_shared = j;
        }
        if (last_shared >= layout_.full_chunks_of_prefix(target)) {
          return at + "shared chunk " + std::to_string(last_shared) + " not wholly inside its reserved tokens";
        }
        break;
      }
    }
    if (slots_.state(i) != SlotState::Active && lengths_[i] != 0) return at + "not live but lengths[] is nonzero";
  }
  const ChunkPoolStats ps = supply_.pool_stats();
  if (ps.in_use_chunks != table_.unique_chunks()) {
    return "pool has " + std::to_string(ps.in_use_chunks) + " chunks in use but the table maps " +
           std::to_string(table_.unique_chunks());
  }
  const auto budget = supply_.budget_chunks();
  if (budget && static_cast<std::int64_t>(ps.in_use_chunks + ps.cached_chunks) > *budget) return "over the memory budget";
  return suspended_.load() ? check_suspended() : "";
}

}  // namespace glake::kvcache
