// What the stitched allocator reports: counters, peaks, the owner and pool of an address, snapshots.
#include "gmlake/stitch_allocator.h"

namespace glake::gmlake {

AllocatorStats StitchAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  AllocatorStats s = stats_;
  s.num_events_created = static_cast<std::int64_t>(events_.created());
  s.private_pools = static_cast<std::int64_t>(pools_.size());
  s.suspended = suspended_;
  s.kept_host_bytes = static_cast<std::int64_t>(host_reserve_.bytes());
  for (const auto& [id, pool] : pools_) {
    for (const FreeSet* set : {&pool->free.small, &pool->free.large, &pool->free.stitched}) {
      for (const Block* b : *set) s.private_pool_free_bytes += static_cast<std::int64_t>(b->size);
    }
  }
  return s;
}

void StitchAllocator::reset_peak_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (Stat* s : {&stats_.allocated_bytes, &stats_.allocated_small, &stats_.allocated_large, &stats_.reserved_bytes,
                  &stats_.reserved_small, &stats_.reserved_large, &stats_.active_bytes, &stats_.requested_bytes,
                  &stats_.mapped_va_bytes, &stats_.stitched_bytes, &stats_.segments, &stats_.allocations,
                  &stats_.active_small, &stats_.active_large, &stats_.requested_small, &stats_.requested_large,
                  &stats_.allocations_small, &stats_.allocations_large, &stats_.segments_small,
                  &stats_.segments_large}) {
    s->peak = s->current;
  }
}

std::size_t StitchAllocator::largest_free_block() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return largest_free();
}

std::pair<DevPtr, std::size_t> StitchAllocator::allocation_of(DevPtr ptr) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const Block* b = live_block_containing(ptr);
  if (!b) return {0, 0};
  return {b->ptr, b->requested};
}

PoolId StitchAllocator::pool_of(DevPtr ptr) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const Block* b = live_block_containing(ptr);
  return b && b->pool ? b->pool->id : PoolId{};
}

std::vector<SegmentInfo> StitchAllocator::snapshot() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<SegmentInfo> out;
  auto state_of = [&](const Block* b) -> const char* {
    if (!b->allocated) return "free";
    if (b->stitch) return "stitched";
    return allocated_.count(b->ptr) && allocated_.at(b->ptr) == b ? "allocated" : "pending";
  };
  auto pool_id = [](const Block* b) { return b->pool ? b->pool->id : PoolId{}; };
  for (const auto& seg : segments_) {
    SegmentInfo info{seg->kind == PoolKind::Small ? "small" : "large", seg->range->ptr(), seg->range->size(), true, {}};
    for (const Block* b = seg->head; b; b = b->next) {
      info.blocks.push_back({b->ptr, b->size, b->requested, state_of(b), b->stream,
                             b->allocated && b->stitch ? b->stitch->range->ptr() : 0, pool_id(b)});
    }
    out.push_back(std::move(info));
  }
  for (const auto& s : stitches_) {
    SegmentInfo info{"stitched", s->range->ptr(), s->range->size(), s->active, {}};
    const Block* b = s->block;
    const char* state = s->active ? (allocated_.count(b->ptr) ? "allocated" : "pending") : s->held ? "held" : "free";
    info.blocks.push_back({b->ptr, b->size, s->active ? b->requested : 0, state, b->stream, 0, pool_id(b)});
    out.push_back(std::move(info));
  }
  return out;
}

}  // namespace glake::gmlake
