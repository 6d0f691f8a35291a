#include "gmlake/stitch_allocator.h"

#include <algorithm>
#include <cstdio>

namespace glake::gmlake {

namespace {

constexpr std::size_t kSmallRound = 512;

/// Puts the calling thread in relaxed stream-capture mode for its lifetime (when asked to).
class CaptureModeGuard {
 public:
  CaptureModeGuard(Driver& driver, bool relax) : driver_(driver), relax_(relax) {
    if (relax_) previous_ = driver_.exchange_capture_mode(CaptureMode::Relaxed);
  }
  ~CaptureModeGuard() {
    if (relax_) driver_.exchange_capture_mode(previous_);
  }

 private:
  Driver& driver_;
  bool relax_;
  CaptureMode previous_ = CaptureMode::Global;
};

/// "1.50 GiB" or "14.00 MiB": readable at any size.
std::string gib(std::size_t bytes) {
  char buf[48];
  const double mib = static_cast<double>(bytes) / (1024.0 * 1024);
  if (mib >= 1024) std::snprintf(buf, sizeof(buf), "%.2f GiB", mib / 1024);
  else std::snprintf(buf, sizeof(buf), "%.2f MiB", mib);
  return buf;
}

}  // namespace

StitchAllocator::StitchAllocator(Driver& driver, int device, AllocatorConfig config)
    : driver_(driver), device_(device), config_(config), events_(driver, device) {
  granularity_ = driver_.granularity(device);
  device_total_ = driver_.mem_info(device).total;
  if (config_.stitch_va_limit == 0) config_.stitch_va_limit = device_total_;
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
  std::size_t cap = config_.limit_bytes;
  if (config_.memory_fraction > 0) {
    const auto frac = static_cast<std::size_t>(config_.memory_fraction * static_cast<double>(device_total_));
    cap = cap ? std::min(cap, frac) : frac;
  }
  return cap;
}

// ---- free-block bookkeeping ------------------------------------------------------------------

void StitchAllocator::insert_free(Block* b) {
  b->allocated = false;
  b->stitch = nullptr;
  b->requested = 0;
  // Coalesce with free neighbours of the same stream and owner (global cache or the same private
  // pool); they are in the same segment by construction.
  FreeSet& set = lists_of(b).of(b->kind);
  for (Block* n : {b->prev, b->next}) {
    if (!n || n->allocated || n->stream != b->stream || n->pool != b->pool) continue;
    if (set.erase(n) == 0) continue;  // pending (deferred) blocks are not in the set
    if (n == b->prev) {
      b->ptr = n->ptr;
      b->prev = n->prev;
      if (n->prev) n->prev->next = b; else b->segment->head = b;
    } else {
      b->next = n->next;
      if (n->next) n->next->prev = b;
    }
    b->size += n->size;
    b->free_seq = std::max(b->free_seq, n->free_seq);
    delete n;
  }
  set.insert(b);
}

Block* StitchAllocator::carve(Block* b, DevPtr start, std::size_t size) {
  FreeSet& set = lists_of(b).of(b->kind);  // the pieces stay with b's owner
  set.erase(b);
  if (start > b->ptr) {  // split off the front as its own free block
    Block* front = new Block(*b);
    front->size = start - b->ptr;
    front->extra_streams.clear();
    front->next = b;
    if (b->prev) b->prev->next = front; else b->segment->head = front;
    b->prev = front;
    b->size -= front->size;
    b->ptr = start;
    set.insert(front);
  }
  if (b->size > size) {  // split off the tail
    Block* tail = new Block(*b);
    tail->ptr = b->ptr + size;
    tail->size = b->size - size;
    tail->extra_streams.clear();
    tail->prev = b;
    if (b->next) b->next->prev = tail;
    b->next = tail;
    b->size = size;
    set.insert(tail);
  }
  return b;
}

Block* StitchAllocator::take_fit(FreeLists& lists, PoolKind kind, std::size_t size, StreamHandle stream) {
  FreeSet& set = lists.of(kind);
  auto it = set.lower_bound(FreeKey{stream, size, 0});
  if (it == set.end() || (*it)->stream != stream) return nullptr;
  Block* b = *it;
  return carve(b, b->ptr, size);
}

std::size_t StitchAllocator::free_bytes(PoolKind kind, StreamHandle stream) const {
  const FreeSet& set = free_.of(kind);
  std::size_t total = 0;
  for (auto it = set.lower_bound(FreeKey{stream, 0, 0}); it != set.end() && (*it)->stream == stream; ++it) {
    total += (*it)->size;
  }
  return total;
}

std::size_t StitchAllocator::largest_free() const {
  std::size_t best = 0;
  for (const Block* b : free_.large) best = std::max(best, b->size);
  for (const Block* b : free_.small) best = std::max(best, b->size);
  return best;
}

const Block* StitchAllocator::free_block_containing(DevPtr ptr) const {
  std::vector<const FreeLists*> all{&free_};
  for (const auto& [id, pool] : pools_) all.push_back(&pool->free);
  for (const FreeLists* lists : all) {
    for (const FreeSet* set : {&lists->small, &lists->large, &lists->stitched}) {
      for (const Block* f : *set) {
        if (ptr >= f->ptr && ptr < f->ptr + f->size) return f;
      }
    }
  }
  return nullptr;
}

// ---- public API ------------------------------------------------------------------------------

DevPtr StitchAllocator::malloc(std::size_t size, StreamHandle stream) {
  if (size == 0) throw InvalidArgumentError("malloc: size must be positive");
  std::lock_guard<std::mutex> lock(mutex_);
  const PoolKind kind = size <= config_.small_size ? PoolKind::Small : PoolKind::Large;
  const std::size_t rounded = round_size(size);
  const std::size_t cap = limit() ? limit() : device_total_;
  if (rounded > cap) {
    stats_.num_ooms++;
    throw OutOfMemoryError(oom_message(size, rounded, "the request is larger than " +
                                                        std::string(limit() ? "the limit" : "the device")));
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
  allocated_.erase(it);
  const auto rounded = static_cast<std::int64_t>(b->size);
  stats_.num_frees++;
  stats_.allocations.add(-1);
  stats_.allocated_bytes.add(-rounded);
  (b->kind == PoolKind::Small ? stats_.allocated_small : stats_.allocated_large).add(-rounded);
  stats_.requested_bytes.add(-static_cast<std::int64_t>(b->requested));
  if (b->kind == PoolKind::Stitched) stats_.stitched_bytes.add(-rounded);
  if (!b->extra_streams.empty()) {
    defer_free(b);
    return;  // still active until those streams are done with it
  }
  stats_.active_bytes.add(-rounded);
  release_block(b);  // a private pool's block goes to the pool's free lists, even during a capture
}

void StitchAllocator::record_stream(DevPtr ptr, StreamHandle stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = allocated_.find(ptr);
  if (it == allocated_.end()) throw InvalidArgumentError("record_stream(" + hex(ptr) + "): not a live allocation");
  Block* b = it->second;
  if (stream == b->stream) return;
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
  release_cached(0);
}

void StitchAllocator::set_memory_fraction(double fraction) {
  if (!(fraction >= 0.0 && fraction <= 1.0)) {
    throw InvalidArgumentError("memory fraction " + std::to_string(fraction) + " must be in [0, 1]");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  config_.memory_fraction = fraction;
}

AllocatorStats StitchAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  AllocatorStats s = stats_;
  s.num_events_created = static_cast<std::int64_t>(events_.created());
  s.private_pools = static_cast<std::int64_t>(pools_.size());
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
                  &stats_.mapped_va_bytes, &stats_.stitched_bytes, &stats_.segments, &stats_.allocations}) {
    s->peak = s->current;
  }
}

const Block* StitchAllocator::live_block_containing(DevPtr ptr) const {
  auto after = allocated_.upper_bound(ptr);
  if (after == allocated_.begin()) return nullptr;
  const Block* b = std::prev(after)->second;
  return ptr < b->ptr + b->size ? b : nullptr;
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

// ---- releasing -------------------------------------------------------------------------------

void StitchAllocator::release_block(Block* b) {
  b->free_seq = ++free_seq_;
  if (b->kind == PoolKind::Stitched) {
    hold_stitch(b->stitch);
    return;
  }
  insert_free(b);
}

void StitchAllocator::hold_stitch(Stitch* s) {
  s->active = false;
  s->held = true;
  s->last_used = ++tick_;
  lists_of(s->block).stitched.insert(s->block);  // a private pool's stitch stays with the pool
}

void StitchAllocator::dissolve(Stitch* s) {
  lists_of(s->block).stitched.erase(s->block);
  for (Block* m : s->members) {
    m->free_seq = s->block->free_seq;
    m->stream = s->block->stream;
    insert_free(m);
  }
  s->members.clear();
  s->held = false;
}

void StitchAllocator::dissolve_held(StreamHandle stream, bool all_streams) {
  std::vector<Stitch*> held;  // the global cache's only: a private pool's held stitches are its free blocks
  for (Block* b : free_.stitched) {
    if (all_streams || b->stream == stream) held.push_back(b->stitch);
  }
  for (Stitch* s : held) dissolve(s);
}

void StitchAllocator::shrink_stitch(Stitch* s, std::size_t size) {
  // Keep the members that cover the first `size` bytes; give the rest back to the pool.
  std::vector<Block*> keep;
  std::size_t acc = 0;
  for (Block* m : s->members) {
    if (acc >= size) {
      m->stream = s->block->stream;
      m->free_seq = s->block->free_seq;
      insert_free(m);
      continue;
    }
    if (acc + m->size > size) {  // split at a chunk boundary: the tail goes back
      Block* tail = new Block(*m);
      tail->ptr = m->ptr + (size - acc);
      tail->size = m->size - (size - acc);
      tail->prev = m;
      if (m->next) m->next->prev = tail;
      m->next = tail;
      m->size = size - acc;
      tail->stream = s->block->stream;
      tail->free_seq = s->block->free_seq;
      insert_free(tail);
    }
    acc += m->size;
    keep.push_back(m);
  }
  s->members = std::move(keep);
  s->block->size = size;
}

Block* StitchAllocator::take_held_stitch(FreeLists& lists, std::size_t size, StreamHandle stream) {
  auto it = lists.stitched.lower_bound(FreeKey{stream, size, 0});
  if (it == lists.stitched.end() || (*it)->stream != stream) return nullptr;
  Stitch* s = (*it)->stitch;
  lists.stitched.erase(it);
  if (s->block->size > size) shrink_stitch(s, size);
  s->held = false;
  s->active = true;
  stats_.num_stitch_reuses++;
  return s->block;
}

void StitchAllocator::defer_free(Block* b) {
  Deferred d{b, std::move(b->extra_streams), {}};
  b->extra_streams.clear();
  // While a pool is allocated to, a capture may be under way: an event recorded on a capturing
  // stream would become a graph node, never to complete. Its events are recorded afterwards.
  if (!any_routing()) {
    for (StreamHandle s : d.streams) {
      const EventHandle e = events_.acquire();
      driver_.event_record(device_, e, s);
      d.events.push_back(e);
    }
    d.streams.clear();
  }
  deferred_.push_back(std::move(d));
}

void StitchAllocator::process_deferred(bool wait) {
  // Called only when no pool is allocated to (no capture can be under way).
  for (Deferred& d : deferred_) {
    for (StreamHandle s : d.streams) {
      const EventHandle e = events_.acquire();
      driver_.event_record(device_, e, s);
      d.events.push_back(e);
    }
    d.streams.clear();
  }
  auto done = [&](Deferred& d) {
    for (EventHandle e : d.events) {
      if (wait) driver_.event_synchronize(device_, e);
      else if (!driver_.event_query(device_, e)) return false;
    }
    return true;
  };
  for (auto it = deferred_.begin(); it != deferred_.end();) {
    if (!done(*it)) {
      ++it;
      continue;
    }
    for (EventHandle e : it->events) events_.release(e);
    stats_.active_bytes.add(-static_cast<std::int64_t>(it->block->size));
    release_block(it->block);
    it = deferred_.erase(it);
  }
}

bool StitchAllocator::migrate_free_blocks(StreamHandle to, bool wait) {
  // Free blocks of other streams become usable on `to` once an event recorded on their stream
  // after they were freed has completed. Events are recorded lazily, here, on the slow path.
  // The global cache's blocks only: a private pool's blocks stay with their stream.
  std::vector<StreamHandle> others;
  for (const FreeSet* set : {&free_.small, &free_.large}) {
    for (const Block* b : *set) {
      if (b->stream != to && (others.empty() || others.back() != b->stream)) others.push_back(b->stream);
    }
  }
  std::sort(others.begin(), others.end());
  others.erase(std::unique(others.begin(), others.end()), others.end());
  bool moved = false;
  for (StreamHandle s : others) {
    if (driver_.stream_is_capturing(device_, s)) continue;
    StreamEvent& se = stream_events_[s];
    if (!se.event) se.event = driver_.event_create(device_);
    if (se.covers < free_seq_) {
      // Re-record only if the last one finished or we must wait anyway; else keep waiting on it.
      if (se.covers == 0 || driver_.event_query(device_, se.event) || wait) {
        driver_.event_record(device_, se.event, s);
        se.covers = free_seq_;
      }
    }
    if (wait) driver_.event_synchronize(device_, se.event);
    else if (!driver_.event_query(device_, se.event)) continue;
    for (FreeSet* set : {&free_.small, &free_.large}) {
      std::vector<Block*> take;
      for (auto it = set->lower_bound(FreeKey{s, 0, 0}); it != set->end() && (*it)->stream == s; ++it) {
        if ((*it)->free_seq <= se.covers) take.push_back(*it);
      }
      for (Block* b : take) {
        set->erase(b);
        b->stream = to;
        insert_free(b);
        stats_.num_cross_stream_reuses++;
        moved = true;
      }
    }
  }
  return moved;
}

void StitchAllocator::drop_stitch(Stitch* s) {
  stats_.mapped_va_bytes.add(-static_cast<std::int64_t>(s->range->size()));
  stats_.stitched_va_cached -= static_cast<std::int64_t>(s->range->size());
  stats_.num_stitch_gc++;
  delete s->block;
  auto it = std::find_if(stitches_.begin(), stitches_.end(), [&](auto& p) { return p.get() == s; });
  stitches_.erase(it);  // unmaps the range; the chunks stay with their segments
}

void StitchAllocator::gc_stitches(StreamHandle stream) {
  bool quiet = false;
  while (static_cast<std::size_t>(stats_.stitched_va_cached) > config_.stitch_va_limit) {
    Stitch* lru = nullptr;
    for (auto& s : stitches_) {  // a private pool's held stitches are its free blocks: kept
      if (!s->active && !s->block->pool && (!lru || s->last_used < lru->last_used)) lru = s.get();
    }
    if (!lru) return;
    if (!quiet && !(quiet = quiesce(stream))) return;  // over the bound until later
    if (lru->held) dissolve(lru);
    drop_stitch(lru);
  }
}

void StitchAllocator::release_segment(Segment* seg) {
  const auto bytes = static_cast<std::int64_t>(seg->range->size());
  for (Block* b = seg->head; b;) {
    Block* next = b->next;
    free_.of(seg->kind).erase(b);
    delete b;
    b = next;
  }
  stats_.reserved_bytes.add(-bytes);
  (seg->kind == PoolKind::Small ? stats_.reserved_small : stats_.reserved_large).add(-bytes);
  stats_.mapped_va_bytes.add(-bytes);
  stats_.segments.add(-1);
  stats_.num_segments_released++;
  auto it = std::find_if(segments_.begin(), segments_.end(), [&](auto& p) { return p.get() == seg; });
  segments_.erase(it);  // unmaps and releases the chunks (idle stitches were dropped first)
}

bool StitchAllocator::quiesce(StreamHandle stream) {
  // Waits for the device before memory that kernels may still use is unmapped or reused: cuMemUnmap,
  // unlike cudaFree, does not wait for them (torch's expandable segments synchronise for the same
  // reason), freed blocks may still be in use by work enqueued before their free, and a released
  // private pool's graph may still be replaying. Waiting is not allowed while a graph is captured,
  // which may be the case while any pool is allocated to: then the caller leaves the memory alone
  // (false). A legacy-stream query reports a capture on any blocking stream.
  if (any_routing() || driver_.stream_is_capturing(device_, stream)) {
    return false;
  }
  driver_.device_synchronize(device_);
  stats_.num_sync_all_streams++;
  return true;
}

std::size_t StitchAllocator::release_cached(StreamHandle stream) {
  dissolve_held(0, true);
  std::vector<Stitch*> idle;
  // An active stitch that was shrunk or prefix-reused lends only some of its spans, yet its range
  // maps the chunks of all of them and a later reuse reads every span's segment: those segments
  // stay, even when all their blocks are free.
  // A private pool's held stitch (a free block of the pool, maybe shrunk) is kept, and so are the
  // segments it spans.
  std::set<const Segment*> spanned;
  for (auto& s : stitches_) {
    if (!s->active && !s->block->pool) {
      idle.push_back(s.get());
    } else {
      for (const Span& sp : s->spans) spanned.insert(sp.segment);
    }
  }
  std::vector<Segment*> empty;
  for (auto& seg : segments_) {
    if (spanned.count(seg.get())) continue;
    // Free blocks of different streams do not coalesce, so look at each; a private pool's free
    // block is not in the global cache, so its segment stays.
    bool all_free = true;
    for (Block* b = seg->head; b && all_free; b = b->next) all_free = !b->allocated && free_.of(seg->kind).count(b);
    if (all_free) empty.push_back(seg.get());
  }
  if ((idle.empty() && empty.empty()) || !quiesce(stream)) return 0;
  for (Stitch* s : idle) drop_stitch(s);
  std::size_t released = 0;
  for (Segment* seg : empty) {
    released += seg->range->size();
    release_segment(seg);
  }
  return released;
}

// ---- growing ---------------------------------------------------------------------------------

Segment* StitchAllocator::create_segment(PoolKind kind, std::size_t bytes, StreamHandle stream) {
  const std::size_t cap = limit();
  if (cap && static_cast<std::size_t>(stats_.reserved_bytes.current) + bytes > cap) {
    throw OutOfMemoryError("the limit of " + gib(cap) + " would be exceeded");
  }
  auto seg = std::make_unique<Segment>();
  seg->kind = kind;
  seg->id = next_id_++;
  seg->range = std::make_unique<VirtualRange>(driver_, device_, bytes);
  std::vector<std::shared_ptr<PhysChunk>> chunks;
  for (std::size_t off = 0; off < bytes; off += granularity_) {
    chunks.push_back(PhysChunk::create(driver_, device_, granularity_));
  }
  seg->range->map_many(0, chunks);  // the range now holds the chunks
  Block* b = new Block();
  b->kind = kind;
  b->segment = seg.get();
  b->ptr = seg->range->ptr();
  b->size = bytes;
  b->stream = stream;
  seg->head = b;
  stats_.reserved_bytes.add(bytes);
  (kind == PoolKind::Small ? stats_.reserved_small : stats_.reserved_large).add(bytes);
  stats_.mapped_va_bytes.add(bytes);
  stats_.segments.add(1);
  stats_.num_segments_created++;
  segments_.push_back(std::move(seg));
  free_.of(kind).insert(b);
  return segments_.back().get();
}

Block* StitchAllocator::reuse_stitch(std::size_t size, StreamHandle stream) {
  // A detached stitch at least as large whose first `size` bytes all lie in free blocks of this
  // stream serves again without mapping anything: its prefix becomes the allocation.
  auto piece = [&](const Span& sp, std::size_t acc) { return std::min(sp.size, size - acc); };
  auto host_of = [](const Span& sp, DevPtr start) {
    Block* h = sp.segment->head;
    while (h && h->ptr + h->size <= start) h = h->next;
    return h;
  };
  Stitch* best = nullptr;
  for (auto& s : stitches_) {
    if (s->active || s->held || s->range->size() < size) continue;
    if (best && s->range->size() >= best->range->size()) continue;
    bool ok = true;
    for (std::size_t i = 0, acc = 0; ok && acc < size; acc += s->spans[i].size, ++i) {
      const Span& sp = s->spans[i];
      const DevPtr start = sp.segment->range->ptr() + sp.offset;
      Block* h = host_of(sp, start);
      ok = h && !h->allocated && h->stream == stream && h->ptr + h->size >= start + piece(sp, acc) &&
           free_.large.count(h);
    }
    if (ok) best = s.get();
  }
  if (!best) return nullptr;
  for (std::size_t i = 0, acc = 0; acc < size; ++i) {
    const Span& sp = best->spans[i];
    const DevPtr start = sp.segment->range->ptr() + sp.offset;
    const std::size_t n = piece(sp, acc);
    Block* m = carve(host_of(sp, start), start, n);  // re-found: earlier carves may have split it
    m->allocated = true;
    m->stitch = best;
    best->members.push_back(m);
    acc += n;
  }
  best->block->size = size;
  best->block->stream = stream;
  best->active = true;
  stats_.num_stitch_reuses++;
  return best->block;
}

Block* StitchAllocator::stitch(std::size_t size, StreamHandle stream) {
  // Largest free blocks of this stream first, until they cover the request.
  std::vector<Block*> pick;
  std::size_t got = 0;
  auto lo = free_.large.lower_bound(FreeKey{stream, 0, 0});
  auto hi = free_.large.lower_bound(FreeKey{stream + 1, 0, 0});
  for (auto it = hi; it != lo && got < size;) {  // [lo, hi): this stream's free blocks, by size
    --it;
    pick.push_back(*it);
    got += (*it)->size;
  }
  if (got < size) return nullptr;
  auto s = std::make_unique<Stitch>();
  s->id = next_id_++;
  s->range = std::make_unique<VirtualRange>(driver_, device_, size);
  std::vector<std::shared_ptr<PhysChunk>> chunks;
  std::size_t need = size;
  for (Block* b : pick) {
    const std::size_t take = std::min(need, b->size);
    const std::size_t seg_off = b->ptr - b->segment->range->ptr();
    for (std::size_t off = 0; off < take; off += granularity_) chunks.push_back(b->segment->range->chunk_at(seg_off + off));
    s->spans.push_back({b->segment, seg_off, take});
    need -= take;
  }
  s->range->map_many(0, chunks);  // throws before any bookkeeping changes
  for (std::size_t i = 0; i < pick.size(); ++i) {
    const Span& sp = s->spans[i];
    Block* m = carve(pick[i], sp.segment->range->ptr() + sp.offset, sp.size);
    m->allocated = true;
    m->stitch = s.get();
    s->members.push_back(m);
  }
  Block* sb = new Block();
  sb->kind = PoolKind::Stitched;
  sb->stitch = s.get();
  sb->ptr = s->range->ptr();
  sb->size = size;
  sb->stream = stream;
  s->block = sb;
  s->active = true;
  stats_.num_stitches++;
  stats_.mapped_va_bytes.add(size);
  stats_.stitched_va_cached += static_cast<std::int64_t>(size);
  stitches_.push_back(std::move(s));
  gc_stitches(stream);
  return sb;
}

Block* StitchAllocator::grow(PoolKind kind, std::size_t size, StreamHandle stream) {
  if (kind == PoolKind::Small) {
    create_segment(kind, granularity_, stream);
    return take_fit(free_, kind, size, stream);
  }
  dissolve_held(stream, false);  // their members may form (or join) what this request needs
  if (Block* b = take_fit(free_, kind, size, stream)) return b;
  if (Block* b = reuse_stitch(size, stream)) return b;
  // Stitch when what is free covers a useful part of the request (an eighth or more); below that,
  // mapping every chunk a second time costs more than the few free bytes it saves.
  const std::size_t have = free_bytes(PoolKind::Large, stream);
  // Under a cap, a plain segment that would pass it is no alternative: stitch whatever is free.
  const std::size_t cap = limit();
  const bool plain_fits = !cap || static_cast<std::size_t>(stats_.reserved_bytes.current) + size <= cap;
  if (config_.stitch && size >= config_.stitch_min_bytes && have > 0 && (have >= size / 8 || !plain_fits)) {
    if (have < size) create_segment(kind, size - have, stream);  // the rest, stitched with what is free
    if (Block* b = stitch(size, stream)) return b;
  }
  create_segment(kind, size, stream);
  return take_fit(free_, kind, size, stream);
}

Block* StitchAllocator::slow_path(PoolKind kind, std::size_t size, StreamHandle stream, std::size_t requested) {
  // During graph capture, driver calls must not invalidate the capture: like torch, switch this
  // thread to relaxed capture mode while the slow path queries events, creates, maps or waits.
  // A global-mode capture forbids them on every thread, so this holds for allocations on other
  // streams while a pool is allocated to (a capture may be under way) too.
  CaptureModeGuard relax(driver_, any_routing() || driver_.stream_is_capturing(device_, stream));
  if (migrate_free_blocks(stream, false)) {
    if (Block* b = take_fit(free_, kind, size, stream)) return b;
  }
  try {
    return grow(kind, size, stream);
  } catch (const OutOfMemoryError& first) {
    if (!config_.release_on_oom) {
      stats_.num_ooms++;
      throw OutOfMemoryError(oom_message(requested, size, first.what()));
    }
    stats_.num_alloc_retries++;
    if (!any_routing()) process_deferred(true);  // no event work while a capture may be under way
    dissolve_held(0, true);  // members lent to held stitches of other streams can migrate too
    migrate_free_blocks(stream, true);
    if (Block* b = take_fit(free_, kind, size, stream)) return b;
    retire_freeable_pools();  // released private pools' free memory joins the cache
    if (Block* b = take_fit(free_, kind, size, stream)) return b;
    release_cached(stream);
    try {
      return grow(kind, size, stream);
    } catch (const OutOfMemoryError& second) {
      stats_.num_ooms++;
      throw OutOfMemoryError(oom_message(requested, size, second.what()));
    }
  }
}

// ---- private pools ---------------------------------------------------------------------------

void StitchAllocator::create_or_incref_pool(PoolId id) {
  if (!id) throw InvalidArgumentError("create_or_incref_pool: pool id {0,0} means no pool");
  std::lock_guard<std::mutex> lock(mutex_);
  auto& pool = pools_[id];
  if (!pool) {
    pool = std::make_unique<PrivatePool>();
    pool->id = id;
  }
  // A released pool whose memory could not be returned yet (a capture was under way) is taken
  // up again as it is: its memory was private to it all along.
  pool->use_count++;
}

int StitchAllocator::pool_use_count(PoolId id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pools_.find(id);
  return it == pools_.end() ? 0 : it->second->use_count;
}

void StitchAllocator::begin_allocate_to_pool(PoolId id, StreamFilter filter) {
  if (!id) throw InvalidArgumentError("begin_allocate_to_pool: pool id {0,0} means no pool");
  if (!filter) throw InvalidArgumentError("begin_allocate_to_pool: the stream filter is empty");
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [pool, f] : routing_) {
      if (pool->id == id) {
        throw InvalidArgumentError("begin_allocate_to_pool: already allocating to pool (" + std::to_string(id.first) +
                                   ", " + std::to_string(id.second) + ")");
      }
    }
  }
  create_or_incref_pool(id);
  std::lock_guard<std::mutex> lock(mutex_);
  routing_.emplace_back(pools_.at(id).get(), std::move(filter));
}

void StitchAllocator::end_allocate_to_pool(PoolId id) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = routing_.begin(); it != routing_.end(); ++it) {
    if (it->first->id == id) {
      routing_.erase(it);
      return;
    }
  }
  throw InvalidArgumentError("end_allocate_to_pool: not allocating to pool (" + std::to_string(id.first) + ", " +
                             std::to_string(id.second) + ")");
}

void StitchAllocator::release_pool(PoolId id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pools_.find(id);
  if (it == pools_.end() || it->second->use_count == 0) {
    throw InvalidArgumentError("release_pool: pool (" + std::to_string(id.first) + ", " + std::to_string(id.second) +
                               ") is " + (it == pools_.end() ? "unknown" : "already released"));
  }
  if (--it->second->use_count == 0) retire_freeable_pools();
}

void StitchAllocator::begin_graph(std::uint64_t graph) {
  if (graph == 0) throw InvalidArgumentError("begin_graph: graph id 0 is reserved");
  begin_allocate_to_pool({graph, 0}, [this](StreamHandle s) { return driver_.stream_is_capturing(device_, s); });
}

void StitchAllocator::end_graph(std::uint64_t graph) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const bool routing = std::any_of(routing_.begin(), routing_.end(),
                                     [&](const auto& r) { return r.first->id == PoolId{graph, 0}; });
    if (!routing) return;
  }
  end_allocate_to_pool({graph, 0});
}

void StitchAllocator::release_graph(std::uint64_t graph) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pools_.find(PoolId{graph, 0});
  if (graph == 0 || it == pools_.end() || it->second->use_count == 0) return;
  if (--it->second->use_count == 0) retire_freeable_pools();
}

PrivatePool* StitchAllocator::route(StreamHandle stream) {
  for (auto& [pool, filter] : routing_) {
    if (filter(stream)) return pool;  // the first to begin that accepts the stream, as torch's
  }
  return nullptr;
}

Block* StitchAllocator::take_from_pool(PrivatePool& pool, PoolKind kind, std::size_t size, StreamHandle stream) {
  if (Block* b = take_fit(pool.free, kind, size, stream)) return b;
  return kind == PoolKind::Large ? take_held_stitch(pool.free, size, stream) : nullptr;
}

void StitchAllocator::assign_pool(Block* b, PrivatePool* pool) {
  b->pool = pool;
  if (b->kind == PoolKind::Stitched) {
    for (Block* m : b->stitch->members) m->pool = pool;  // its chunks are the pool's while it lives
  }
}

void StitchAllocator::retire_freeable_pools() {
  std::vector<PrivatePool*> freeable;
  for (auto& [id, pool] : pools_) {
    if (pool->use_count == 0) freeable.push_back(pool.get());
  }
  // A replay of a released graph may still be running, on any stream: its memory returns to the
  // cache only once the device is idle, which cannot be waited for during a capture.
  if (freeable.empty() || !quiesce(0)) return;
  for (PrivatePool* pool : freeable) retire_pool(pool);
}

void StitchAllocator::retire_pool(PrivatePool* pool) {
  std::vector<Block*> free_blocks(pool->free.small.begin(), pool->free.small.end());
  free_blocks.insert(free_blocks.end(), pool->free.large.begin(), pool->free.large.end());
  std::vector<Block*> held(pool->free.stitched.begin(), pool->free.stitched.end());
  // Untag everything of the pool first: free, live, pending and lent blocks. Live ones then go to
  // the global cache when freed.
  for (auto& seg : segments_) {
    for (Block* b = seg->head; b; b = b->next) {
      if (b->pool == pool) b->pool = nullptr;
    }
  }
  for (auto& s : stitches_) {
    if (s->block->pool == pool) s->block->pool = nullptr;
  }
  for (Block* b : free_blocks) insert_free(b);  // coalesces with the global cache's free neighbours
  for (Block* b : held) free_.stitched.insert(b);
  pools_.erase(pool->id);
}

std::string StitchAllocator::oom_message(std::size_t size, std::size_t rounded, const std::string& cause) const {
  std::size_t free_dev = 0;
  try {
    free_dev = driver_.mem_info(device_).free;
  } catch (...) {
  }
  std::size_t cached_free = 0;
  for (const Block* b : free_.large) cached_free += b->size;
  for (const Block* b : free_.small) cached_free += b->size;
  std::size_t pool_free = 0;
  for (const auto& [id, pool] : pools_) {
    for (const FreeSet* set : {&pool->free.small, &pool->free.large, &pool->free.stitched}) {
      for (const Block* b : *set) pool_free += b->size;
    }
  }
  const std::size_t cap = limit();
  std::string msg = "glake: out of memory on " + std::string(driver_.name()) + ":" + std::to_string(device_) +
                    " allocating " + std::to_string(size) + " bytes (" + gib(rounded) + " rounded). Allocated " +
                    gib(stats_.allocated_bytes.current) + ", reserved " + gib(stats_.reserved_bytes.current) +
                    " (free in cache " + gib(cached_free) + ", largest free block " + gib(largest_free()) +
                    (pool_free ? ", free in private pools " + gib(pool_free) : std::string()) +
                    "), device free " + gib(free_dev) + " of " + gib(device_total_) + ", limit " +
                    (cap ? gib(cap) : std::string("none")) + ". Cause: " + cause + ".";
  if (!config_.stitch && cached_free >= rounded) {
    msg += " Hint: the cache holds enough free memory in pieces; enable stitching (GLAKE_ALLOC_CONF=stitch:true).";
  } else if (cap && cap < device_total_) {
    msg += " Hint: raise the limit (limit_bytes / memory_fraction) or reduce the batch size.";
  } else {
    msg += " Hint: reduce the batch size or sequence length, or free tensors you no longer need.";
  }
  return msg;
}

}  // namespace glake::gmlake
