// Suspend and resume: giving the device memory back while every address stays valid, and taking it
// again (live data copied to host memory and back; the free cache dropped, not copied).
#include "gmlake/stitch_allocator.h"

#include <algorithm>

namespace glake::gmlake {

bool StitchAllocator::suspended() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return suspended_;
}

bool StitchAllocator::holds_live_data(const Segment& seg, std::size_t offset, std::size_t size,
                                      const std::set<DevPtr>& discard) const {
  // Allocated blocks include those lent to a stitch (their bytes are the stitch's, never discarded:
  // a discarded stitched allocation is copied like any other, only its contents were not needed).
  const DevPtr lo = seg.range->ptr() + offset, hi = lo + size;
  for (const Block* b = seg.head; b && b->ptr < hi; b = b->next) {
    if (b->allocated && b->ptr + b->size > lo && !discard.count(b->ptr)) return true;
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

std::vector<StitchAllocator::LiveRun> StitchAllocator::live_runs(const std::set<DevPtr>& dropped,
                                                                 std::map<const Segment*, SavedSegment>* saved) const {
  std::vector<LiveRun> runs;
  for (const auto& seg : segments_) {
    SavedSegment* s = saved ? &(*saved)[seg.get()] : nullptr;
    std::size_t run_start = 0, run_end = 0;  // the run of live chunks being gathered: [start, end)
    auto flush = [&] {
      if (run_end > run_start) runs.push_back(LiveRun{seg.get(), run_start, run_end - run_start});
    };
    for (const Mapping& m : seg->range->mappings()) {
      if (s) s->chunk_sizes.push_back(m.chunk->size());
      if (shared_chunks_.count(seg->range->ptr() + m.offset)) {
        if (s) s->shared[m.offset] = m.chunk;  // kept, not copied: other processes read it, nobody writes it
        continue;
      }
      if (!holds_live_data(*seg, m.offset, m.chunk->size(), dropped)) continue;
      if (m.offset != run_end) {
        flush();
        run_start = m.offset;
      }
      run_end = m.offset + m.chunk->size();
    }
    flush();
  }
  return runs;
}

std::size_t StitchAllocator::prepare_suspend() {
  std::vector<std::size_t> sizes;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (suspended_) throw InvalidArgumentError("prepare_suspend of the allocator of device " + std::to_string(device_) +
                                               ": already suspended");
    release_cached(0);  // as suspend() does first: idle stitches give their blocks back, runs as it will see them
    for (const LiveRun& r : live_runs({}, nullptr)) sizes.push_back(r.size);
    sizes = host_reserve_.missing(sizes);
  }
  // Seconds for tens of GiB: made without the lock (malloc and free go on meanwhile).
  std::vector<HostBufferPtr> ready = HostReserve::make_ready(sizes, driver_, device_);
  std::size_t bytes = 0;
  for (const HostBufferPtr& b : ready) bytes += b->size();
  std::lock_guard<std::mutex> lock(mutex_);
  host_reserve_.add(std::move(ready));
  return bytes;
}

void StitchAllocator::drop_host_reserve() {
  std::lock_guard<std::mutex> lock(mutex_);
  host_reserve_.drop();
}

void StitchAllocator::suspend(HostCopier* copier, const std::vector<DevPtr>& discard) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::string where = "suspend of the allocator of device " + std::to_string(device_);
  if (suspended_) throw InvalidArgumentError(where + ": already suspended");
  if (any_routing()) {
    throw InvalidArgumentError(where + ": a private pool is being allocated to (a CUDA graph may be capturing)");
  }
  const std::set<DevPtr> dropped(discard.begin(), discard.end());
  for (DevPtr p : dropped) {
    const Block* b = live_block_containing(p);
    if (!b || b->ptr != p) {
      throw InvalidArgumentError(where + ": discard names " + std::to_string(p) + ", not the base of a live allocation");
    }
  }
  process_deferred(true);  // record_stream frees: free once their streams are done
  release_cached(0);       // the free cache is not worth copying: idle stitches and free segments go
  if (!quiesce(0)) throw InvalidArgumentError(where + ": a stream is capturing a CUDA graph");
  DriverCopier plain(driver_, device_);
  HostCopier& io = copier ? *copier : plain;
  // Copy first, so that a failure (host memory, the driver) leaves the allocator as it was. Every
  // segment's runs of live chunks are gathered, given host buffers together, then copied as one batch.
  std::map<const Segment*, SavedSegment> saved;
  const std::vector<LiveRun> runs = live_runs(dropped, &saved);
  std::vector<std::size_t> sizes;
  for (const LiveRun& r : runs) sizes.push_back(r.size);
  std::size_t host_bytes = 0, file_bytes = 0;
  HostReserve::Taken taken = host_reserve_.take(sizes);  // after `saved`: its faulting stops before they go
  std::vector<HostBufferPtr>& buffers = taken.buffers;
  std::vector<HostCopy> copies;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const LiveRun& r = runs[i];
    copies.push_back(HostCopy{buffers[i]->ptr(), r.seg->range->ptr() + r.offset, r.size, buffers[i]->pinned()});
    host_bytes += r.size;
    if (buffers[i]->file_backed()) file_bytes += r.size;
    saved[r.seg].runs.push_back(SavedRun{r.offset, std::move(buffers[i])});
  }
  io.to_host(copies);
  unmap_stitches();  // then each chunk's last mapping is its segment's: unmapping it releases it
  for (auto& seg : segments_) {
    for (const Mapping& m : seg->range->mappings()) seg->range->unmap(m.offset);
  }
  saved_ = std::move(saved);
  stats_.suspended_host_bytes = static_cast<std::int64_t>(host_bytes);
  stats_.suspended_file_bytes = static_cast<std::int64_t>(file_bytes);
  stats_.suspended_reused_bytes = static_cast<std::int64_t>(taken.reused);
  suspended_ = true;
}

void StitchAllocator::resume(HostCopier* copier) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!suspended_) return;
  // The segments' chunks are created and mapped a slice at a time, in the copy's order, by a thread,
  // while the runs of the slices before are copied back (copy_to_device_behind). A device that cannot
  // give them all changes nothing: the slices mapped are unmapped again and the saved state stays.
  struct Slice {
    Segment* seg;
    std::size_t offset, bytes;
    std::vector<std::size_t> sizes;
  };
  constexpr std::size_t kSliceBytes = 64u << 20;
  std::vector<Slice> slices;
  std::vector<HostCopy> copies;
  std::vector<std::size_t> needs;  // per copy: the slices it needs mapped
  for (auto& seg : segments_) {
    const auto found = saved_.find(seg.get());
    if (found == saved_.end()) continue;
    const std::size_t first = slices.size();
    std::size_t end = 0;
    for (std::size_t size : found->second.chunk_sizes) {
      if (slices.size() == first || slices.back().bytes >= kSliceBytes) slices.push_back(Slice{seg.get(), end, 0, {}});
      slices.back().sizes.push_back(size);
      slices.back().bytes += size;
      end += size;
    }
    std::size_t k = first;  // the slice holding `at`; runs come in offset order
    for (const SavedRun& r : found->second.runs) {  // each cut where its slices end
      const std::size_t run_end = r.offset + r.bytes->size();
      for (std::size_t at = r.offset; at < run_end;) {
        while (slices[k].offset + slices[k].bytes <= at) ++k;
        const std::size_t to = std::min(run_end, slices[k].offset + slices[k].bytes);
        copies.push_back(HostCopy{seg->range->ptr() + at, r.bytes->ptr() + (at - r.offset), to - at, r.bytes->pinned()});
        needs.push_back(k + 1);
        at = to;
      }
    }
  }
  std::size_t mapped = 0;  // slices [0, mapped) are mapped (written by the thread, read after it)
  auto prepare = [&](std::size_t k) {
    const Slice& sl = slices[k];
    const std::map<std::size_t, std::shared_ptr<PhysChunk>>& shared = saved_.at(sl.seg).shared;
    std::vector<std::shared_ptr<PhysChunk>> chunks;
    std::size_t at = sl.offset;
    for (std::size_t size : sl.sizes) {
      const auto kept = shared.find(at);
      chunks.push_back(kept != shared.end() ? kept->second : PhysChunk::create(driver_, device_, size));
      at += size;
    }
    sl.seg->range->map_many(sl.offset, chunks);
    ++mapped;
    for (auto it = shared.lower_bound(sl.offset); it != shared.end() && it->first < at; ++it) {
      sl.seg->range->set_access(it->first, it->second->size(), /*read_only=*/true);  // nothing runs meanwhile
    }
  };
  auto unmap_prepared = [&] {
    for (std::size_t k = 0; k < mapped; ++k) {
      std::size_t at = slices[k].offset;
      for (std::size_t size : slices[k].sizes) {
        slices[k].seg->range->unmap(at);
        at += size;
      }
    }
  };
  DriverCopier plain(driver_, device_);
  try {
    copy_to_device_behind(copier ? *copier : plain, copies, needs, slices.size(), prepare);
  } catch (const OutOfMemoryError& e) {
    unmap_prepared();
    throw OutOfMemoryError("resume of the allocator of device " + std::to_string(device_) + ": " + e.what() +
                           " (still suspended: free device memory and call resume() again)");
  } catch (...) {
    unmap_prepared();
    throw;
  }
  map_stitches();
  std::vector<HostBufferPtr> done;
  for (auto& [seg, s] : saved_) {
    for (SavedRun& r : s.runs) done.push_back(std::move(r.bytes));
  }
  host_reserve_.give_back(std::move(done));
  saved_.clear();
  stats_.suspended_host_bytes = 0;
  stats_.suspended_file_bytes = 0;
  stats_.suspended_reused_bytes = 0;
  suspended_ = false;
}

}  // namespace glake::gmlake
