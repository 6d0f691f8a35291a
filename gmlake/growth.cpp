// The slow path: where memory comes from when no free block fits (cross-stream blocks, stitching,
// new segments, the OOM retry), and where it goes when the cache is emptied.
#include "gmlake/stitch_allocator.h"

#include <algorithm>
#include <set>

#include "gmlake/oom_report.h"

namespace glake::gmlake {

namespace {

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

}  // namespace

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
  const std::size_t have = stitchable_bytes(stream);
  // Under a cap, a plain segment that would pass it is no alternative: stitch whatever is free.
  const std::size_t cap = cap_bytes();
  const bool plain_fits = !cap || static_cast<std::size_t>(stats_.reserved_bytes.current) + size <= cap;
  if (config_.stitch && size >= config_.stitch_min_bytes && have > 0 && (have >= size / 8 || !plain_fits)) {
    if (have < size) create_segment(kind, size - have, stream);  // the rest, stitched with what is free
    if (Block* b = stitch(size, stream)) return b;
  }
  create_segment(kind, size, stream);
  return take_fit(free_, kind, size, stream);
}

Segment* StitchAllocator::create_segment(PoolKind kind, std::size_t bytes, StreamHandle stream) {
  const std::size_t cap = cap_bytes();
  if (cap && static_cast<std::size_t>(stats_.reserved_bytes.current) + bytes > cap) {
    throw OutOfMemoryError("the limit of " + gib(cap) + " would be exceeded");
  }
  auto seg = std::make_unique<Segment>();
  seg->kind = kind;
  seg->id = next_id_++;
  seg->range = std::make_unique<VirtualRange>(driver_, device_, bytes);
  seg->range->map_many(0, segment_chunks(kind, bytes));  // the range now holds the chunks
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
  (kind == PoolKind::Small ? stats_.segments_small : stats_.segments_large).add(1);
  stats_.num_segments_created++;
  segments_.push_back(std::move(seg));
  free_.of(kind).insert(b);
  return segments_.back().get();
}

std::vector<std::shared_ptr<PhysChunk>> StitchAllocator::segment_chunks(PoolKind kind, std::size_t bytes) {
  // Every driver call costs per chunk, not per byte (H200: cuMemCreate ~13 us and the first
  // cuMemSetAccess ~35 us per chunk whether it holds 2 MiB or 128 MiB), so a large segment is cut
  // into chunks of up to chunk_bytes. Physical memory may be too scarce for a large chunk while
  // granules still fit: then the rest comes in granules.
  std::size_t piece = kind == PoolKind::Small ? granularity_ : config_.chunk_bytes;
  std::vector<std::shared_ptr<PhysChunk>> chunks;
  for (std::size_t off = 0; off < bytes;) {
    const std::size_t want = std::min(piece, bytes - off);
    try {
      chunks.push_back(PhysChunk::create(driver_, device_, want));
      off += want;
    } catch (const OutOfMemoryError&) {
      if (want <= granularity_) throw;
      piece = granularity_;
    }
  }
  return chunks;
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
  (seg->kind == PoolKind::Small ? stats_.segments_small : stats_.segments_large).add(-1);
  stats_.num_segments_released++;
  auto it = std::find_if(segments_.begin(), segments_.end(), [&](auto& p) { return p.get() == seg; });
  segments_.erase(it);  // unmaps and releases the chunks (idle stitches were dropped first)
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

}  // namespace glake::gmlake
