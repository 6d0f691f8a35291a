// ChunkSupply: budget accounting, victim order and out-of-memory decisions.
#include "kvcache/chunk_supply.h"

#include <algorithm>

namespace glake::kvcache {

ChunkSupply::ChunkSupply(Driver& driver, int device, const KvLayout& layout, std::optional<std::int64_t> budget_chunks,
                         ChunkTable& table, SlotTable& slots, FenceSet& fences, KvCounters& counters)
    : driver_(driver),
      device_(device),
      layout_(layout),
      budget_(budget_chunks),
      pool_(ChunkPool::create(driver, device, static_cast<std::size_t>(budget_chunks.value_or(0) * layout.chunk_bytes),
                              static_cast<std::size_t>(layout.chunk_bytes))),
      table_(table),
      slots_(slots),
      fences_(fences),
      n_(counters) {}

std::int64_t ChunkSupply::pool_left() const {
  if (!budget_) return static_cast<std::int64_t>(driver_.mem_info(device_).free) / layout_.chunk_bytes;
  return std::max<std::int64_t>(0, *budget_ - static_cast<std::int64_t>(pool_->stats().in_use_chunks));
}

void ChunkSupply::add_slot(VictimList& out, int slot, std::int64_t keep) {
  const auto idx = table_.exclusive_indices(slot);
  std::size_t n = 0;
  for (auto j : idx) n += j >= keep;
  if (!n) return;
  if (!fences_.ready(slot)) {
    out.fenced += n;
    out.fenced_slots.push_back(slot);
    return;
  }
  const SlotState state = slots_.state(slot);
  for (auto it = idx.rbegin(); it != idx.rend(); ++it) {
    if (*it >= keep) out.ready.push_back({slot, *it, state});
  }
}

VictimList ChunkSupply::released_victims(int exclude) {
  VictimList out;
  for (int i : slots_.released()) {
    if (i != exclude) add_slot(out, i, 0);
  }
  return out;
}

VictimList ChunkSupply::surplus_victims(int for_slot, std::int64_t own_keep, const KeepList* keep) {
  VictimList out;
  if (for_slot >= 0 && slots_.state(for_slot) == SlotState::Active) add_slot(out, for_slot, own_keep);
  for (int i : slots_.active()) {
    if (i == for_slot) continue;
    const std::int64_t k = keep && (*keep)[i] >= 0 ? (*keep)[i] : layout_.chunks_for(slots_[i].target.load());
    add_slot(out, i, k);
  }
  return out;
}

VictimList ChunkSupply::strict_victims(int for_slot, std::int64_t own_keep, const KeepList* keep) {
  VictimList out = released_victims(for_slot);
  VictimList more = surplus_victims(for_slot, own_keep, keep);
  out.ready.insert(out.ready.end(), more.ready.begin(), more.ready.end());
  out.fenced += more.fenced;
  out.fenced_slots.insert(out.fenced_slots.end(), more.fenced_slots.begin(), more.fenced_slots.end());
  return out;
}

std::int64_t ChunkSupply::obtainable(int for_slot, std::int64_t own_keep, const KeepList* keep) {
  const VictimList v = strict_victims(for_slot, own_keep, keep);
  return pool_left() + static_cast<std::int64_t>(v.ready.size() + v.fenced);
}

Supply ChunkSupply::check(std::int64_t n, int for_slot, std::int64_t own_keep, const std::string& what,
                          const KeepList* keep, std::vector<int>* fenced_slots) {
  if (n <= 0) return Supply::Ok;
  std::int64_t have = pool_left();
  if (have >= n) return Supply::Ok;
  const VictimList v = strict_victims(for_slot, own_keep, keep);
  have += static_cast<std::int64_t>(v.ready.size());
  if (have >= n) return Supply::Ok;
  if (have + static_cast<std::int64_t>(v.fenced) >= n) {
    if (fenced_slots) *fenced_slots = v.fenced_slots;
    return Supply::AfterFences;
  }
  throw OutOfMemoryError("KVCache: cannot back " + what + ": " + std::to_string(n) + " more chunk(s) needed, " +
                         std::to_string(have + static_cast<std::int64_t>(v.fenced)) + " obtainable; " + usage());
}

ChunkPtr ChunkSupply::steal(const Victim& v) {
  ChunkPtr c = table_.unmap(v.slot, v.index);
  ++n_.unmaps;
  return c;
}

ChunkSupply::Taken ChunkSupply::obtain(std::int64_t n, int for_slot, std::int64_t own_keep, bool strict,
                                       const std::string& what, const KeepList* keep) {
  Taken out;
  const std::int64_t take = std::min(n, pool_left());
  if (take > 0) {
    try {
      out.chunks = pool_->acquire_many(static_cast<std::size_t>(take));
    } catch (const OutOfMemoryError&) {  // the device refused: reclaim below, or give up
    }
  }
  std::int64_t rest = n - static_cast<std::int64_t>(out.chunks.size());
  if (rest > 0) {
    const VictimList v = strict ? strict_victims(for_slot, own_keep, keep) : released_victims(for_slot);
    if (strict && static_cast<std::int64_t>(v.ready.size()) < rest) {
      throw OutOfMemoryError("KVCache: the device has no memory for " + what + " (" + std::to_string(n) +
                             " chunk(s)) and too few can be reclaimed; " + usage());
    }
    for (std::size_t k = 0; k < v.ready.size() && rest > 0; ++k, --rest) {
      out.chunks.push_back(steal(v.ready[k]));
      out.stolen.push_back(v.ready[k]);
    }
  }
  return out;
}

std::string ChunkSupply::usage() const {
  int active = 0;
  for (int i : slots_.active()) active += table_.count(i);
  std::size_t reclaimable = 0;
  for (int i : slots_.released()) reclaimable += table_.exclusive_indices(i).size();
  const std::string budget =
      budget_ ? std::to_string(*budget_ * layout_.chunk_bytes) + " B (" + std::to_string(*budget_) + " chunks of " +
                    std::to_string(layout_.chunk_bytes >> 20) + " MiB)"
              : "none (device memory)";
  return "memory budget " + budget + "; in use: " + std::to_string(table_.unique_chunks()) + " physical chunks (" +
         std::to_string(table_.shared_chunks()) + " shared), " + std::to_string(active) + " mappings in " +
         std::to_string(slots_.active().size()) + " live sequences, " + std::to_string(reclaimable) +
         " reclaimable in " + std::to_string(slots_.released().size()) + " released slots, " +
         std::to_string(pool_->stats().cached_chunks) + " cached in the pool, " +
         std::to_string(fences_.pending_slots()) + " slots behind a pending fence";
}

}  // namespace glake::kvcache
