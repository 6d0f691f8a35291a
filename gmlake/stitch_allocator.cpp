// The stitched allocator's core: construction, malloc/free and the public calls that route to the
// other concepts (free_lists, stitch_policy, growth, stream_order, private_pools, introspection,
// oom_report: one file each).
#include "gmlake/stitch_allocator.h"

#include <algorithm>

namespace glake::gmlake {

namespace {

constexpr std::size_t kSmallRound = 512;

}  // namespace

StitchAllocator::StitchAllocator(Driver& driver, int device, AllocatorConfig config)
    : driver_(driver), device_(device), config_(config), events_(driver, device) {
  granularity_ = driver_.granularity(device);
  device_total_ = driver_.mem_info(device).total;
  if (config_.stitch_va_limit == 0) config_.stitch_va_limit = device_total_;
  config_.chunk_bytes = std::max(granularity_, config_.chunk_bytes / granularity_ * granularity_);
}

StitchAllocator::~StitchAllocator() {
  std::lock_guard<std::mutex> lock(mutex_);
  try {
    if (!segments_.empty()) quiesce(0);  // no kernel may still use what is unmapped below
  } catch (...) {  // a context already torn down at exit runs nothing any more
  }
  for (auto& d : deferred_) {
    for (EventHandle e : d.events) events_.release(e);  // destroyed with the pool
    if (d.block->kind == PoolKind::Stitched) d.block->stitch->active = false;
  }
  for (auto& [stream, se] : stream_events_) {
    if (se.event) driver_.event_destroy(device_, se.event);
  }
  for (auto& [ptr, b] : allocated_) {
    if (b->kind == PoolKind::Stitched) b->stitch->active = false;  // deleted with the stitches below
  }
  for (auto& s : stitches_) {
    if (!s->active) delete s->block;
  }
  stitches_.clear();  // unmaps the stitched ranges
  for (auto& seg : segments_) {
    for (Block* b = seg->head; b;) {
      Block* next = b->next;
      delete b;
      b = next;
    }
  }
  segments_.clear();  // unmaps and releases every chunk
}

std::size_t StitchAllocator::round_size(std::size_t size) const {
  if (size <= config_.small_size) return (size + kSmallRound - 1) / kSmallRound * kSmallRound;
  return (size + granularity_ - 1) / granularity_ * granularity_;
}

std::size_t StitchAllocator::limit() const {
  std::lock_guard<std::mutex> lock(mutex_);  // set_memory_fraction may change it meanwhile
  return cap_bytes();
}

std::size_t StitchAllocator::cap_bytes() const {
  std::size_t cap = config_.limit_bytes;
  if (config_.memory_fraction > 0) {
    const auto frac = static_cast<std::size_t>(config_.memory_fraction * static_cast<double>(device_total_));
    cap = cap ? std::min(cap, frac) : frac;
  }
  return cap;
}

const Block* StitchAllocator::live_block_containing(DevPtr ptr) const {
  auto after = allocated_.upper_bound(ptr);
  if (after == allocated_.begin()) return nullptr;
  const Block* b = std::prev(after)->second;
  return ptr < b->ptr + b->size ? b : nullptr;
}

DevPtr StitchAllocator::malloc(std::size_t size, StreamHandle stream) {
  if (size == 0) throw InvalidArgumentError("malloc: size must be positive");
  std::lock_guard<std::mutex> lock(mutex_);
  if (suspended_) {
    throw Error("malloc(" + std::to_string(size) + ") on device " + std::to_string(device_) +
                ": the allocator is suspended (glake.suspend()); call glake.resume() first");
  }
  const PoolKind kind = size <= config_.small_size ? PoolKind::Small : PoolKind::Large;
  const std::size_t rounded = round_size(size);
  const std::size_t cap = cap_bytes() ? cap_bytes() : device_total_;
  if (rounded > cap) {
    stats_.num_ooms++;
    throw OutOfMemoryError(oom_message(size, rounded, "the request is larger than " +
                                                        std::string(cap_bytes() ? "the limit" : "the device")));
  }
  // Pending record_stream frees are looked at only when no pool is being allocated to (a capture
  // may be under way): their event queries are forbidden during a global-mode capture (torch
  // defers them the same way).
  if (!deferred_.empty() && !any_routing()) process_deferred(false);
  PrivatePool* pool = any_routing() ? route(stream) : nullptr;
  Block* b = pool ? take_from_pool(*pool, kind, rounded, stream) : nullptr;
  if (!b) b = take_fit(free_, kind, rounded, stream);
  if (!b && kind == PoolKind::Large) b = take_held_stitch(free_, rounded, stream);
  if (!b) b = slow_path(kind, rounded, stream, size);
  if (pool && b->pool != pool) assign_pool(b, pool);  // taken from the global cache: the pool's for life
  b->allocated = true;
  b->requested = size;
  b->stream = stream;
  allocated_.emplace(b->ptr, b);
  stats_.num_allocs++;
  stats_.allocations.add(1);
  stats_.allocated_bytes.add(rounded);
  (kind == PoolKind::Small ? stats_.allocated_small : stats_.allocated_large).add(rounded);
  stats_.active_bytes.add(rounded);
  stats_.requested_bytes.add(size);
  const bool small = kind == PoolKind::Small;
  (small ? stats_.active_small : stats_.active_large).add(rounded);
  (small ? stats_.requested_small : stats_.requested_large).add(static_cast<std::int64_t>(size));
  (small ? stats_.allocations_small : stats_.allocations_large).add(1);
  if (b->kind == PoolKind::Stitched) stats_.stitched_bytes.add(rounded);
  return b->ptr;
}

void StitchAllocator::free(DevPtr ptr) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = allocated_.find(ptr);
  if (it == allocated_.end()) {
    auto after = allocated_.upper_bound(ptr);
    if (after != allocated_.begin()) {
      Block* owner = std::prev(after)->second;
      if (ptr < owner->ptr + owner->size) {
        throw InvalidArgumentError("free(" + hex(ptr) + "): interior pointer, " + std::to_string(ptr - owner->ptr) +
                                   " bytes into the allocation at " + hex(owner->ptr) + " of " +
                                   std::to_string(owner->requested) + " bytes");
      }
    }
    if (free_block_containing(ptr)) {
      throw InvalidArgumentError("free(" + hex(ptr) + "): double free (that memory is already free)");
    }
    throw InvalidArgumentError("free(" + hex(ptr) + "): not allocated by this allocator");
  }
  Block* b = it->second;
  if (b->shared) unshare(b);  // may throw OutOfMemoryError: then the allocation stays live
  allocated_.erase(it);
  const auto rounded = static_cast<std::int64_t>(b->size);
  stats_.num_frees++;
  stats_.allocations.add(-1);
  stats_.allocated_bytes.add(-rounded);
  (b->kind == PoolKind::Small ? stats_.allocated_small : stats_.allocated_large).add(-rounded);
  stats_.requested_bytes.add(-static_cast<std::int64_t>(b->requested));
  const bool small = b->kind == PoolKind::Small;
  (small ? stats_.requested_small : stats_.requested_large).add(-static_cast<std::int64_t>(b->requested));
  (small ? stats_.allocations_small : stats_.allocations_large).add(-1);
  if (b->kind == PoolKind::Stitched) stats_.stitched_bytes.add(-rounded);
  if (!b->extra_streams.empty()) {
    defer_free(b);
    return;  // still active until those streams are done with it
  }
  stats_.active_bytes.add(-rounded);
  (small ? stats_.active_small : stats_.active_large).add(-rounded);
  release_block(b);  // a private pool's block goes to the pool's free lists, even during a capture
}

void StitchAllocator::record_stream(DevPtr ptr, StreamHandle stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = allocated_.find(ptr);
  if (it == allocated_.end()) throw InvalidArgumentError("record_stream(" + hex(ptr) + "): not a live allocation");
  Block* b = it->second;
  if (stream == b->stream) return;
  if (b->shared) {
    throw InvalidArgumentError("record_stream(" + hex(ptr) + "): the allocation has shared chunks (dedup), which "
                               "free() replaces at once: it cannot wait for other streams");
  }
  if (std::find(b->extra_streams.begin(), b->extra_streams.end(), stream) == b->extra_streams.end()) {
    b->extra_streams.push_back(stream);
  }
}

void StitchAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  // Like torch's empty_cache, wait for the events of pending record_stream frees, so that their
  // memory is released too (not while a pool is allocated to: see malloc).
  if (!any_routing()) process_deferred(true);
  retire_freeable_pools();
  if (!suspended_) release_cached(0);  // suspended: nothing is held, and resume() needs every segment
}

void StitchAllocator::set_memory_fraction(double fraction) {
  if (!(fraction >= 0.0 && fraction <= 1.0)) {
    throw InvalidArgumentError("memory fraction " + std::to_string(fraction) + " must be in [0, 1]");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  config_.memory_fraction = fraction;
}

void StitchAllocator::release_block(Block* b) {
  b->free_seq = ++free_seq_;
  if (b->kind == PoolKind::Stitched) {
    hold_stitch(b->stitch);
    return;
  }
  insert_free(b);
}

}  // namespace glake::gmlake
