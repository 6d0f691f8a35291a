// The stitch policy: stitching free blocks into one range, holding a freed stitch on the fast path,
// shrinking, dissolving, reusing a detached stitch's mapping, and dropping idle ones past the VA bound.
#include "gmlake/stitch_allocator.h"

#include <algorithm>

namespace glake::gmlake {

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

std::size_t StitchAllocator::append_chunks(const Span& sp, std::vector<std::shared_ptr<PhysChunk>>& out) const {
  const VirtualRange& r = *sp.segment->range;
  std::size_t off = sp.offset;
  while (off < sp.offset + sp.size) {
    const Mapping m = r.mapping_at(off);
    out.push_back(m.chunk);
    off = m.offset + m.chunk->size();
  }
  return off;
}

Block* StitchAllocator::stitch(std::size_t size, StreamHandle stream) {
  // Largest free blocks of this stream first, until their whole chunks cover the request.
  std::vector<std::pair<Block*, Span>> pick;
  std::size_t got = 0;
  auto lo = free_.large.lower_bound(FreeKey{stream, 0, 0});
  auto hi = free_.large.lower_bound(FreeKey{stream + 1, 0, 0});
  for (auto it = hi; it != lo && got < size;) {  // [lo, hi): this stream's free blocks, by size
    --it;
    const Span sp = mappable(*it);
    if (sp.size == 0) continue;
    pick.emplace_back(*it, sp);
    got += sp.size;
  }
  if (got < size) return nullptr;
  // The last span ends at a chunk's end, so it may map more than the request needs: that rest stays
  // free in its segment and is never touched through this range (as with a prefix-reused stitch).
  auto s = std::make_unique<Stitch>();
  s->id = next_id_++;
  std::vector<std::shared_ptr<PhysChunk>> chunks;
  std::vector<std::size_t> lend;  // bytes of each span lent to the allocation
  std::size_t need = size, mapped = 0;
  for (auto& [b, sp] : pick) {
    if (need == 0) break;
    const std::size_t take = std::min(need, sp.size);
    const std::size_t off = append_chunks({sp.segment, sp.offset, take}, chunks);
    s->spans.push_back({sp.segment, sp.offset, off - sp.offset});
    lend.push_back(take);
    mapped += off - sp.offset;
    need -= take;
  }
  s->range = std::make_unique<VirtualRange>(driver_, device_, mapped);
  s->range->map_many(0, chunks);  // throws before any bookkeeping changes
  for (std::size_t i = 0; i < s->spans.size(); ++i) {
    const Span& sp = s->spans[i];
    Block* m = carve(pick[i].first, sp.segment->range->ptr() + sp.offset, lend[i]);
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
  stats_.mapped_va_bytes.add(mapped);
  stats_.stitched_va_cached += static_cast<std::int64_t>(mapped);
  stitches_.push_back(std::move(s));
  gc_stitches(stream);
  return sb;
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

}  // namespace glake::gmlake
