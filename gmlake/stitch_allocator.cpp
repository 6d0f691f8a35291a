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
    : driver_(driver), device_(device), config_(config) {
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
    for (EventHandle e : d.events) driver_.event_destroy(device_, e);
    if (d.block->kind == PoolKind::Stitched) d.block->stitch->active = false;
  }
  for (auto& [stream, se] : stream_events_) {
    if (se.event) driver_.event_destroy(device_, se.event);
  }
  for (auto& [ptr, b] : allocated_) {
    if (b->kind == PoolKind::Stitched) b->stitch->active = false;  // deleted with the stitches below
  }
  for (auto& [graph, blocks] : graph_blocks_) {
    for (Block* b : blocks) {
      if (b->kind == PoolKind::Stitched) b->stitch->active = false;
    }
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
  // Coalesce with free neighbours of the same stream (they are in the same segment by construction).
  for (Block* n : {b->prev, b->next}) {
    if (!n || n->allocated || n->stream != b->stream) continue;
    if (free_set(b->kind).erase(n) == 0) continue;  // pending (deferred) blocks are not in the set
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
  free_set(b->kind).insert(b);
}

Block* StitchAllocator::carve(Block* b, DevPtr start, std::size_t size) {
  free_set(b->kind).erase(b);
  if (start > b->ptr) {  // split off the front as its own free block
    Block* front = new Block(*b);
    front->size = start - b->ptr;
    front->extra_streams.clear();
    front->next = b;
    if (b->prev) b->prev->next = front; else b->segment->head = front;
    b->prev = front;
    b->size -= front->size;
    b->ptr = start;
    free_set(b->kind).insert(front);
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
    free_set(b->kind).insert(tail);
  }
  return b;
}

Block* StitchAllocator::take_fit(PoolKind kind, std::size_t size, StreamHandle stream) {
  FreeSet& set = free_set(kind);
  auto it = set.lower_bound(FreeKey{stream, size, 0});
  if (it == set.end() || (*it)->stream != stream) return nullptr;
  Block* b = *it;
  return carve(b, b->ptr, size);
}

std::size_t StitchAllocator::free_bytes(PoolKind kind, StreamHandle stream) const {
  const FreeSet& set = kind == PoolKind::Small ? small_free_ : large_free_;
  std::size_t total = 0;
  for (auto it = set.lower_bound(FreeKey{stream, 0, 0}); it != set.end() && (*it)->stream == stream; ++it) {
    total += (*it)->size;
  }
  return total;
}

std::size_t StitchAllocator::largest_free() const {
  std::size_t best = 0;
  for (const Block* b : large_free_) best = std::max(best, b->size);
  for (const Block* b : small_free_) best = std::max(best, b->size);
  return best;
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
  // Pending record_stream frees are looked at only when no graph captures: their event queries
  // are forbidden during a global-mode capture (torch defers them the same way).
  if (!deferred_.empty() && capturing_graphs_.load(std::memory_order_relaxed) == 0) process_deferred(false);
  Block* b = take_fit(kind, rounded, stream);
  if (!b && kind == PoolKind::Large) b = take_held_stitch(rounded, stream);
  if (!b) b = slow_path(kind, rounded, stream, size);
  b->allocated = true;
  b->requested = size;
  b->stream = stream;
  b->graph = 0;
  if (capturing_graphs_.load(std::memory_order_relaxed) && capture_graph_ &&
      driver_.stream_is_capturing(device_, stream)) {
    b->graph = capture_graph_;  // a driver query only while some graph is being captured
  }
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
    for (const FreeSet* set : {&small_free_, &large_free_, &stitch_free_}) {
      for (const Block* f : *set) {
        if (ptr >= f->ptr && ptr < f->ptr + f->size) {
          throw InvalidArgumentError("free(" + hex(ptr) + "): double free (that memory is already free)");
        }
      }
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
  if (b->graph && graph_blocks_.count(b->graph)) {
    graph_blocks_[b->graph].push_back(b);  // replays may still use it: kept until the graph goes
    b->extra_streams.clear();
    return;
  }
  if (!b->extra_streams.empty()) {
    Deferred d{b, {}};
    for (StreamHandle s : b->extra_streams) {
      EventHandle e = driver_.event_create(device_);
      driver_.event_record(device_, e, s);
      d.events.push_back(e);
    }
    b->extra_streams.clear();
    deferred_.push_back(std::move(d));
    return;  // still active until those streams are done with it
  }
  stats_.active_bytes.add(-rounded);
  release_block(b);
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

void StitchAllocator::begin_graph(std::uint64_t graph) {
  if (graph == kRetiredGraphs) throw InvalidArgumentError("begin_graph: graph id 0 is reserved");
  std::lock_guard<std::mutex> lock(mutex_);
  graph_blocks_.emplace(graph, std::vector<Block*>{});
  capture_graph_ = graph;
  capturing_graphs_.fetch_add(1);
}

void StitchAllocator::end_graph(std::uint64_t graph) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (capture_graph_ == graph) capture_graph_ = 0;
  capturing_graphs_.fetch_sub(1);
}

void StitchAllocator::release_graph(std::uint64_t graph) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = graph_blocks_.find(graph);
  if (graph == kRetiredGraphs || it == graph_blocks_.end()) return;
  // A replay may still be running, on any stream: the graph's memory goes back to the cache only
  // once the device is idle (torch frees its graph pools through synchronising paths too).
  std::vector<Block*>& retired = graph_blocks_[kRetiredGraphs];
  retired.insert(retired.end(), it->second.begin(), it->second.end());
  graph_blocks_.erase(it);
  release_retired_graph_blocks();
}

void StitchAllocator::release_retired_graph_blocks() {
  auto it = graph_blocks_.find(kRetiredGraphs);
  if (it == graph_blocks_.end() || (!it->second.empty() && !quiesce(0))) return;
  for (Block* b : it->second) {
    stats_.active_bytes.add(-static_cast<std::int64_t>(b->size));
    release_block(b);
  }
  graph_blocks_.erase(it);
}

void StitchAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  // Like torch's empty_cache, wait for the events of pending record_stream frees, so that their
  // memory is released too (not during a capture: see malloc).
  if (capturing_graphs_.load(std::memory_order_relaxed) == 0) process_deferred(true);
  release_retired_graph_blocks();
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
  return stats_;
}

void StitchAllocator::reset_peak_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (Stat* s : {&stats_.allocated_bytes, &stats_.allocated_small, &stats_.allocated_large, &stats_.reserved_bytes,
                  &stats_.reserved_small, &stats_.reserved_large, &stats_.active_bytes, &stats_.requested_bytes,
                  &stats_.mapped_va_bytes, &stats_.stitched_bytes, &stats_.segments, &stats_.allocations}) {
    s->peak = s->current;
  }
}

std::pair<DevPtr, std::size_t> StitchAllocator::allocation_of(DevPtr ptr) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto after = allocated_.upper_bound(ptr);
  if (after == allocated_.begin()) return {0, 0};
  const Block* b = std::prev(after)->second;
  if (ptr >= b->ptr + b->size) return {0, 0};
  return {b->ptr, b->requested};
}

std::vector<SegmentInfo> StitchAllocator::snapshot() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<SegmentInfo> out;
  auto state_of = [&](const Block* b) -> const char* {
    if (!b->allocated) return "free";
    if (b->stitch) return "stitched";
    return allocated_.count(b->ptr) && allocated_.at(b->ptr) == b ? "allocated" : "pending";
  };
  for (const auto& seg : segments_) {
    SegmentInfo info{seg->kind == PoolKind::Small ? "small" : "large", seg->range->ptr(), seg->range->size(), true, {}};
    for (const Block* b = seg->head; b; b = b->next) {
      info.blocks.push_back({b->ptr, b->size, b->requested, state_of(b), b->stream,
                             b->allocated && b->stitch ? b->stitch->range->ptr() : 0});
    }
    out.push_back(std::move(info));
  }
  for (const auto& s : stitches_) {
    SegmentInfo info{"stitched", s->range->ptr(), s->range->size(), s->active, {}};
    const Block* b = s->block;
    const char* state = s->active ? (allocated_.count(b->ptr) ? "allocated" : "pending") : s->held ? "held" : "free";
    info.blocks.push_back({b->ptr, b->size, s->active ? b->requested : 0, state, b->stream, 0});
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
  stitch_free_.insert(s->block);
}

void StitchAllocator::dissolve(Stitch* s) {
  stitch_free_.erase(s->block);
  for (Block* m : s->members) {
    m->free_seq = s->block->free_seq;
    m->stream = s->block->stream;
    insert_free(m);
  }
  s->members.clear();
  s->held = false;
}

void StitchAllocator::dissolve_held(StreamHandle stream, bool all_streams) {
  std::vector<Stitch*> held;
  for (Block* b : stitch_free_) {
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

Block* StitchAllocator::take_held_stitch(std::size_t size, StreamHandle stream) {
  auto it = stitch_free_.lower_bound(FreeKey{stream, size, 0});
  if (it == stitch_free_.end() || (*it)->stream != stream) return nullptr;
  Stitch* s = (*it)->stitch;
  stitch_free_.erase(it);
  if (s->block->size > size) shrink_stitch(s, size);
  s->held = false;
  s->active = true;
  stats_.num_stitch_reuses++;
  return s->block;
}

void StitchAllocator::process_deferred(bool wait) {
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
    for (EventHandle e : it->events) driver_.event_destroy(device_, e);
    stats_.active_bytes.add(-static_cast<std::int64_t>(it->block->size));
    release_block(it->block);
    it = deferred_.erase(it);
  }
}

bool StitchAllocator::migrate_free_blocks(StreamHandle to, bool wait) {
  // Free blocks of other streams become usable on `to` once an event recorded on their stream
  // after they were freed has completed. Events are recorded lazily, here, on the slow path.
  std::vector<StreamHandle> others;
  for (const FreeSet* set : {&small_free_, &large_free_}) {
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
    for (FreeSet* set : {&small_free_, &large_free_}) {
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
    for (auto& s : stitches_) {
      if (!s->active && (!lru || s->last_used < lru->last_used)) lru = s.get();
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
    free_set(seg->kind).erase(b);
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
  // graph may still be replaying. Waiting is not allowed while a graph is captured: then the
  // caller leaves the memory alone (false). A legacy-stream query reports a capture on any stream.
  if (capturing_graphs_.load(std::memory_order_relaxed) > 0 || driver_.stream_is_capturing(device_, stream)) {
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
  std::set<const Segment*> spanned;
  for (auto& s : stitches_) {
    if (!s->active) {
      idle.push_back(s.get());
    } else {
      for (const Span& sp : s->spans) spanned.insert(sp.segment);
    }
  }
  std::vector<Segment*> empty;
  for (auto& seg : segments_) {
    if (spanned.count(seg.get())) continue;
    bool all_free = true;  // free blocks of different streams do not coalesce, so look at each
    for (Block* b = seg->head; b && all_free; b = b->next) all_free = !b->allocated && free_set(seg->kind).count(b);
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
  free_set(kind).insert(b);
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
           large_free_.count(h);
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
  auto lo = large_free_.lower_bound(FreeKey{stream, 0, 0});
  auto hi = large_free_.lower_bound(FreeKey{stream + 1, 0, 0});
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
    return take_fit(kind, size, stream);
  }
  dissolve_held(stream, false);  // their members may form (or join) what this request needs
  if (Block* b = take_fit(kind, size, stream)) return b;
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
  return take_fit(kind, size, stream);
}

Block* StitchAllocator::slow_path(PoolKind kind, std::size_t size, StreamHandle stream, std::size_t requested) {
  // During graph capture, driver calls must not invalidate the capture: like torch, switch this
  // thread to relaxed capture mode while the slow path queries events, creates, maps or waits.
  // A global-mode capture forbids them on every thread, so this holds for allocations on other
  // streams while a graph captures too.
  CaptureModeGuard relax(driver_, capturing_graphs_.load(std::memory_order_relaxed) > 0 ||
                                      driver_.stream_is_capturing(device_, stream));
  if (migrate_free_blocks(stream, false)) {
    if (Block* b = take_fit(kind, size, stream)) return b;
  }
  try {
    return grow(kind, size, stream);
  } catch (const OutOfMemoryError& first) {
    if (!config_.release_on_oom) {
      stats_.num_ooms++;
      throw OutOfMemoryError(oom_message(requested, size, first.what()));
    }
    stats_.num_alloc_retries++;
    process_deferred(true);
    dissolve_held(0, true);  // members lent to held stitches of other streams can migrate too
    migrate_free_blocks(stream, true);
    if (Block* b = take_fit(kind, size, stream)) return b;
    release_cached(stream);
    try {
      return grow(kind, size, stream);
    } catch (const OutOfMemoryError& second) {
      stats_.num_ooms++;
      throw OutOfMemoryError(oom_message(requested, size, second.what()));
    }
  }
}

std::string StitchAllocator::oom_message(std::size_t size, std::size_t rounded, const std::string& cause) const {
  std::size_t free_dev = 0;
  try {
    free_dev = driver_.mem_info(device_).free;
  } catch (...) {
  }
  std::size_t cached_free = 0;
  for (const Block* b : large_free_) cached_free += b->size;
  for (const Block* b : small_free_) cached_free += b->size;
  const std::size_t cap = limit();
  std::string msg = "glake: out of memory on " + std::string(driver_.name()) + ":" + std::to_string(device_) +
                    " allocating " + std::to_string(size) + " bytes (" + gib(rounded) + " rounded). Allocated " +
                    gib(stats_.allocated_bytes.current) + ", reserved " + gib(stats_.reserved_bytes.current) +
                    " (free in cache " + gib(cached_free) + ", largest free block " + gib(largest_free()) +
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

#include <chrono>

namespace glake::gmlake {

double measure_alloc_free_ns(StitchAllocator& a, std::size_t size, int iters) {
  if (iters <= 0) throw InvalidArgumentError("measure_alloc_free_ns: iters must be positive");
  a.free(a.malloc(size));  // warm: the block is cached from here on
  std::vector<double> ns;
  ns.reserve(iters);
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    a.free(a.malloc(size));
    ns.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(ns.begin(), ns.begin() + ns.size() / 2, ns.end());
  return ns[ns.size() / 2];
}

}  // namespace glake::gmlake
