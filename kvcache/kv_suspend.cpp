// KvManager: suspend() and resume(). The device memory goes back to the driver while the range stays
// reserved, so every torch view over the cache keeps its addresses; resume() puts the same sharing
// structure back (a fork's prefix: one new chunk mapped at both places) and the bytes with it.
#include <algorithm>
#include <map>
#include <set>
#include <unordered_map>

#include "kvcache/kv_manager.h"

namespace glake::kvcache {
namespace {

/// Entries [first, first + count) of a list of chunk copies, done as one copy.
struct Run {
  std::size_t first, count;
};

// Runs of consecutive entries whose range offsets (and host addresses, when given) follow each other
// chunk by chunk: a long sequence's chunks go in one copy, not one per chunk.
std::vector<Run> runs_of(const std::vector<std::size_t>& offsets, const std::vector<DevPtr>* host, std::size_t cb) {
  std::vector<Run> out;
  for (std::size_t k = 0; k < offsets.size(); ++k) {
    const bool joins = k > 0 && offsets[k] == offsets[k - 1] + cb && (!host || (*host)[k] == (*host)[k - 1] + cb);
    if (joins) {
      ++out.back().count;
    } else {
      out.push_back({k, 1});
    }
  }
  return out;
}

}  // namespace

void KvManager::check_resident(const char* what) const {
  if (suspended_.load()) {
    throw Error(std::string("KVCache.") + what +
                ": the KV cache is suspended (its device memory was given back); call resume() first");
  }
}

std::unique_ptr<Suspension> KvManager::save_live(HostCopier& io, bool discard) {
  auto s = std::make_unique<Suspension>();
  s->discarded = discard;
  std::unordered_map<std::uint64_t, std::size_t> entry;  // chunk id -> its SavedChunk
  std::vector<std::size_t> first;                         // each chunk's first place, as a range offset
  for (int i = 0; i < slots_.size(); ++i) {               // slot by slot, index by index: offsets ascend
    if (slots_.state(i) != SlotState::Active) continue;  // a released slot's chunks hold no sequence
    for (auto j : table_.indices(i)) {
      const auto [it, fresh] = entry.emplace(table_.chunk(i, j)->id(), s->chunks.size());
      if (fresh) {
        s->chunks.emplace_back();
        first.push_back(layout_.chunk_offset(i, j));
      }
      s->chunks[it->second].places.push_back({i, j});  // a shared chunk: copied once, every place kept
    }
  }
  if (discard) {
    host_reserve_.drop();  // nothing to copy: kept buffers from an earlier cycle go too
    return s;
  }
  const auto cb = static_cast<std::size_t>(layout_.chunk_bytes);
  const DevPtr base = table_.range()->ptr();
  const std::vector<Run> runs = runs_of(first, nullptr, cb);
  std::vector<std::size_t> sizes;
  for (const Run& r : runs) sizes.push_back(r.count * cb);
  HostReserve::Taken taken = host_reserve_.take(sizes);  // after `s`: its faulting stops before they go
  s->buffers = std::move(taken.buffers);
  s->reused_bytes = taken.reused;
  std::vector<HostCopy> copies;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const Run& r = runs[i];
    const DevPtr host = s->buffers[i]->ptr();
    copies.push_back(HostCopy{host, base + first[r.first], sizes[i]});
    for (std::size_t k = 0; k < r.count; ++k) s->chunks[r.first + k].host = host + k * cb;
    s->host_bytes += static_cast<std::int64_t>(sizes[i]);
  }
  io.to_host(copies);  // every run in one batch
  return s;
}

void KvManager::unmap_everything() {
  for (int i = 0; i < slots_.size(); ++i) {
    const auto idx = table_.indices(i);
    for (auto it = idx.rbegin(); it != idx.rend(); ++it) unmap_checked(i, *it);
  }
}

void KvManager::suspend(HostCopier* copier, bool discard) {
  std::vector<FencePtr> wait;
  {
    Lock lock(mu_);
    check_open();
    if (suspended_.load()) throw InvalidArgumentError("KVCache.suspend: already suspended (call resume() first)");
    wait = fences_.all_pending();
  }
  // Unlocked, as in close(): kernels that may still read a released slot, then every kernel that may
  // still write a live one. Only the mapper runs meanwhile; it maps fresh chunks or trims, and records
  // no fence, so what is saved below is what the engine's kernels left.
  wait_all(wait);
  driver_.device_synchronize(config_.device);
  DriverCopier plain(driver_, config_.device);
  Lock lock(mu_);  // from here the mapper waits; once it has the lock it finds suspended_ and maps nothing
  check_open();
  ++n_.locked_engine_calls;
  std::unique_ptr<Suspension> s = save_live(copier ? *copier : plain, discard);  // throws: nothing changed
  suspended_.store(true);
  unmap_everything();  // every chunk's last mapping: back to the pool, released to the driver below
  for (int i = 0; i < slots_.size(); ++i) {
    if (slots_.state(i) == SlotState::Released) {
      park(i);  // no chunk left: free
    } else if (slots_.state(i) == SlotState::Active) {
      refresh(i);  // capacity 0; no mapper request while suspended
    }
  }
  supply_.trim_pool();
  saved_ = std::move(s);
  gauge();
}

void KvManager::map_saved(const Suspension& s, HostCopier& io) {
  std::vector<const SavedChunk*> live;  // chunks some live slot still needs
  for (const SavedChunk& c : s.chunks) {
    if (!c.places.empty()) live.push_back(&c);
  }
  // Every chunk first: a device that cannot give them all changes nothing.
  std::vector<ChunkPtr> made;
  try {
    made = supply_.fresh(live.size());
  } catch (const OutOfMemoryError& e) {
    supply_.trim_pool();  // what was created before the device refused
    throw OutOfMemoryError(std::string("KVCache.resume: ") + e.what() + " (" + std::to_string(live.size()) +
                           " chunks needed; still suspended: free device memory and call resume() again)");
  }
  try {
    std::map<int, std::vector<std::pair<std::int64_t, ChunkPtr>>> by_slot;
    for (std::size_t k = 0; k < live.size(); ++k) {
      for (const Place& p : live[k]->places) by_slot[p.slot].emplace_back(p.index, made[k]);
    }
    for (auto& [slot, at] : by_slot) {
      std::sort(at.begin(), at.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      std::vector<std::int64_t> indices;
      std::vector<ChunkPtr> chunks;
      for (auto& [j, c] : at) indices.push_back(j), chunks.push_back(c);
      table_.map_at(slot, indices, chunks);
    }
    if (!s.discarded) {  // each chunk's bytes through its first place: the others see them too
      std::vector<std::size_t> dst;
      std::vector<DevPtr> src;
      for (const SavedChunk* c : live) {
        dst.push_back(layout_.chunk_offset(c->places.front().slot, c->places.front().index));
        src.push_back(c->host);
      }
      const auto cb = static_cast<std::size_t>(layout_.chunk_bytes);
      const DevPtr base = table_.range()->ptr();
      std::vector<HostCopy> copies;
      for (const Run& r : runs_of(dst, &src, cb)) copies.push_back(HostCopy{base + dst[r.first], src[r.first], r.count * cb});
      io.to_device(copies);
    }
  } catch (...) {  // a driver or copy failure: undo the maps, keep the saved state for another resume()
    unmap_everything();
    made.clear();
    supply_.trim_pool();
    gauge();
    throw;
  }
}

void KvManager::resume(HostCopier* copier) {
  Lock lock(mu_);
  check_open();
  if (!suspended_.load()) return;  // as the allocator's resume(): nothing to do
  ++n_.locked_engine_calls;
  DriverCopier plain(driver_, config_.device);
  map_saved(*saved_, copier ? *copier : plain);
  host_reserve_.give_back(std::move(saved_->buffers));
  saved_.reset();
  suspended_.store(false);
  for (int i : slots_.active()) refresh(i);  // capacities back; the mapper tops up lookahead again
  wake_starved();
  gauge();
}

std::string KvManager::check_suspended() const {
  const ChunkPoolStats ps = supply_.pool_stats();
  if (table_.unique_chunks() || ps.in_use_chunks || ps.cached_chunks) {
    return "suspended, but " + std::to_string(table_.unique_chunks()) + " chunks are mapped and the pool holds " +
           std::to_string(ps.in_use_chunks + ps.cached_chunks);
  }
  std::set<std::pair<int, std::int64_t>> seen;
  for (const SavedChunk& c : saved_->chunks) {
    if (!saved_->discarded && !c.host) return "suspended: a saved chunk has no host copy";
    for (const Place& p : c.places) {
      const std::string at = "slot " + std::to_string(p.slot) + " index " + std::to_string(p.index);
      if (slots_.state(p.slot) != SlotState::Active) return "suspended: resume() would map " + at + ", not live";
      if (!seen.emplace(p.slot, p.index).second) return "suspended: two saved chunks for " + at;
    }
  }
  return "";
}

}  // namespace glake::kvcache
