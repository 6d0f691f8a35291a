// Shared chunks: whole chunks of a live allocation whose physical memory is shared with other
// processes by content (the shim's dedup), mapped read-only, and made private again when freed.
#include <algorithm>

#include "gmlake/stitch_allocator.h"

namespace glake::gmlake {

std::vector<ChunkRef> StitchAllocator::whole_chunks(DevPtr ptr, std::size_t bytes) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::string where = "whole_chunks(" + hex(ptr) + ", " + std::to_string(bytes) + ")";
  if (suspended_) throw InvalidArgumentError(where + ": the allocator is suspended");
  const Block* b = live_block_containing(ptr);
  if (!b || bytes == 0 || bytes > b->ptr + b->size - ptr) {
    throw InvalidArgumentError(where + ": not inside one live allocation");
  }
  if (b->kind != PoolKind::Large || b->stitch || b->pool || !b->extra_streams.empty()) {
    throw InvalidArgumentError(where + ": the allocation at " + hex(b->ptr) + " is " +
                               (b->kind == PoolKind::Small ? "a small one (no whole chunk)"
                                : b->kind == PoolKind::Stitched ? "stitched from several segments"
                                : b->pool ? "in a private pool (a CUDA graph's)"
                                          : "used on other streams (record_stream)") +
                               ": its chunks cannot be shared");
  }
  std::vector<ChunkRef> out;
  const VirtualRange& r = *b->segment->range;
  for (const Mapping& m : r.mappings()) {
    const DevPtr at = r.ptr() + m.offset;
    // A chunk a stitched range maps too (an idle stitch spanning what is now this block) is left out:
    // the stitch would keep it writable, and hand it out again.
    if (at >= ptr && at - ptr + m.chunk->size() <= bytes && m.chunk->mappings() == 1) {
      out.push_back(ChunkRef{at, m.chunk, shared_chunks_.count(at) > 0});
    }
  }
  return out;
}

void StitchAllocator::share_chunk(DevPtr at, std::shared_ptr<PhysChunk> theirs) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::string where = "share_chunk(" + hex(at) + ")";
  if (suspended_) throw InvalidArgumentError(where + ": the allocator is suspended");
  auto* b = const_cast<Block*>(live_block_containing(at));
  if (!b || b->kind != PoolKind::Large || b->stitch || b->pool || !b->extra_streams.empty()) {
    throw InvalidArgumentError(where + ": not in a live allocation whole_chunks() accepts");
  }
  if (shared_chunks_.count(at)) throw InvalidArgumentError(where + ": that chunk is shared already");
  VirtualRange& r = *b->segment->range;
  const Mapping m = r.mapping_at(at - r.ptr());
  if (!m.chunk || r.ptr() + m.offset != at || at + m.chunk->size() > b->ptr + b->size) {
    throw InvalidArgumentError(where + ": not the start of a chunk the allocation covers whole");
  }
  if (m.chunk->mappings() != 1) throw InvalidArgumentError(where + ": a stitched range maps that chunk too");
  const auto size = static_cast<std::int64_t>(m.chunk->size());
  if (theirs) {
    if (theirs->size() != m.chunk->size() || theirs->device() != device_) {
      throw InvalidArgumentError(where + ": the chunk to map is " + std::to_string(theirs->size()) +
                                 " bytes on device " + std::to_string(theirs->device()) + ", ours " +
                                 std::to_string(size) + " on device " + std::to_string(device_));
    }
    r.unmap(m.offset);  // ours is released when this last reference goes
    try {
      r.map(m.offset, theirs, /*set_access=*/false);
      try {
        r.set_access(m.offset, theirs->size(), /*read_only=*/true);
      } catch (...) {
        r.unmap(m.offset);
        throw;
      }
    } catch (...) {
      r.map(m.offset, m.chunk);  // ours again, read-write as it was
      throw;
    }
    stats_.shared_imported_bytes += size;
  } else {
    r.set_access(m.offset, m.chunk->size(), /*read_only=*/true);
  }
  shared_chunks_[at] = theirs != nullptr;
  stats_.shared_bytes += size;
  b->shared = true;
}

void StitchAllocator::unshare(Block* b) {
  VirtualRange& r = *b->segment->range;
  const auto lo = shared_chunks_.lower_bound(b->ptr), hi = shared_chunks_.lower_bound(b->ptr + b->size);
  auto forget = [&](std::map<DevPtr, bool>::iterator it, std::size_t size) {
    stats_.shared_bytes -= static_cast<std::int64_t>(size);
    if (it->second) stats_.shared_imported_bytes -= static_cast<std::int64_t>(size);
    return shared_chunks_.erase(it);
  };
  if (suspended_) {  // nothing is mapped: the resume makes fresh chunks where the saved ones are dropped
    auto& kept = saved_.at(b->segment).shared;
    for (auto it = lo; it != hi;) {
      const std::size_t offset = it->first - r.ptr(), size = kept.at(offset)->size();
      kept.erase(offset);
      it = forget(it, size);
    }
    b->shared = false;
    return;
  }
  // Fresh chunks first, all of them, so that a device out of memory changes nothing; the free cache
  // is given back once before giving up (the memory the sharing saved may be in use by now).
  std::vector<std::pair<std::size_t, std::shared_ptr<PhysChunk>>> fresh;
  for (int attempt = 0; fresh.empty() && lo != hi; ++attempt) {
    try {
      for (auto it = lo; it != hi; ++it) {
        const std::size_t offset = it->first - r.ptr();
        fresh.emplace_back(offset, PhysChunk::create(driver_, device_, r.chunk_at(offset)->size()));
      }
    } catch (const OutOfMemoryError&) {
      fresh.clear();
      if (attempt > 0 || release_cached(0) == 0) {
        throw OutOfMemoryError("free(" + hex(b->ptr) + "): its shared chunks need fresh private memory before the "
                               "cache may reuse them, and the device has none; the allocation stays live: free "
                               "other memory and free it again");
      }
    }
  }
  auto it = lo;
  for (auto& [offset, chunk] : fresh) {
    r.unmap(offset);  // the shared chunk: another process may still map it, never written here
    r.map(offset, chunk);
    it = forget(it, chunk->size());
  }
  b->shared = false;
}

}  // namespace glake::gmlake
