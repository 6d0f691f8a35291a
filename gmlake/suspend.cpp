// Suspend and resume: giving the device memory back while every address stays valid, and taking it
// again (live data copied to host memory and back; the free cache dropped, not copied).
#include "gmlake/stitch_allocator.h"

namespace glake::gmlake {

bool StitchAllocator::suspended() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return suspended_;
}

bool StitchAllocator::holds_live_data(const Segment& seg, std::size_t offset, std::size_t size) const {
  // Allocated blocks include those lent to a stitch (their bytes are the stitch's).
  const DevPtr lo = seg.range->ptr() + offset, hi = lo + size;
  for (const Block* b = seg.head; b && b->ptr < hi; b = b->next) {
    if (b->allocated && b->ptr + b->size > lo) return true;
  }
  return false;
}

void StitchAllocator::unmap_stitches() {
  for (auto& s : stitches_) {
    for (const Mapping& m : s->range->mappings()) s->range->unmap(m.offset);
  }
}

void StitchAllocator::map_stitches() {
  for (auto& s : stitches_) {  // the same chunks of the same spans, at the same offsets
    std::vector<std::shared_ptr<PhysChunk>> chunks;
    for (const Span& sp : s->spans) append_chunks(sp, chunks);
    s->range->map_many(0, chunks);
  }
}

void StitchAllocator::suspend() {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::string where = "suspend of the allocator of device " + std::to_string(device_);
  if (suspended_) throw InvalidArgumentError(where + ": already suspended");
  if (any_routing()) {
    throw InvalidArgumentError(where + ": a private pool is being allocated to (a CUDA graph may be capturing)");
  }
  process_deferred(true);  // record_stream frees: free once their streams are done
  release_cached(0);       // the free cache is not worth copying: idle stitches and free segments go
  if (!quiesce(0)) throw InvalidArgumentError(where + ": a stream is capturing a CUDA graph");
  // Copy first, so that a failure (host memory, the driver) leaves the allocator as it was.
  std::map<const Segment*, std::vector<SavedChunk>> saved;
  std::int64_t host_bytes = 0;
  for (auto& seg : segments_) {
    auto& chunks = saved[seg.get()];
    for (const Mapping& m : seg->range->mappings()) {
      SavedChunk c{m.offset, m.chunk->size(), nullptr};
      if (holds_live_data(*seg, m.offset, c.size)) {
        c.bytes.reset(new unsigned char[c.size]);  // default-initialised: the copy writes every byte
        driver_.memcpy(device_, reinterpret_cast<DevPtr>(c.bytes.get()), seg->range->ptr() + m.offset, c.size);
        host_bytes += static_cast<std::int64_t>(c.size);
      }
      chunks.push_back(std::move(c));
    }
  }
  unmap_stitches();  // then each chunk's last mapping is its segment's: unmapping it releases it
  for (auto& seg : segments_) {
    for (const Mapping& m : seg->range->mappings()) seg->range->unmap(m.offset);
  }
  saved_ = std::move(saved);
  stats_.suspended_host_bytes = host_bytes;
  suspended_ = true;
}

void StitchAllocator::resume() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!suspended_) return;
  // Every chunk first: running out of memory changes nothing (the new chunks go with `made`).
  std::map<const Segment*, std::vector<std::shared_ptr<PhysChunk>>> made;
  try {
    for (const auto& [seg, chunks] : saved_) {
      for (const SavedChunk& c : chunks) made[seg].push_back(PhysChunk::create(driver_, device_, c.size));
    }
  } catch (const OutOfMemoryError& e) {
    throw OutOfMemoryError("resume of the allocator of device " + std::to_string(device_) + ": " + e.what() +
                           " (still suspended: free device memory and call resume() again)");
  }
  for (auto& seg : segments_) {
    seg->range->map_many(0, made[seg.get()]);
    for (const SavedChunk& c : saved_[seg.get()]) {
      if (c.bytes) {
        driver_.memcpy(device_, seg->range->ptr() + c.offset, reinterpret_cast<DevPtr>(c.bytes.get()), c.size);
      }
    }
  }
  map_stitches();
  saved_.clear();
  stats_.suspended_host_bytes = 0;
  suspended_ = false;
}

}  // namespace glake::gmlake
