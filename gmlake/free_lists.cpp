// Free-block bookkeeping of the stitched allocator: best fit, carving, coalescing. Each owner (the
// global cache, or one private pool) has its own FreeLists; blocks never coalesce across owners.
#include "gmlake/stitch_allocator.h"

#include <algorithm>

namespace glake::gmlake {

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

Span StitchAllocator::mappable(const Block* b) const {
  // A chunk maps only whole (cuMemMap takes no offset into a chunk on current drivers): the part of
  // `b` in chunks it shares with its neighbours cannot be stitched.
  const VirtualRange& r = *b->segment->range;
  const std::size_t off = b->ptr - r.ptr(), end = off + b->size;
  const Mapping first = r.mapping_at(off), last = r.mapping_at(end - 1);
  const std::size_t start = first.offset == off ? off : first.offset + first.chunk->size();
  const std::size_t stop = last.offset + last.chunk->size() == end ? end : last.offset;
  return {b->segment, start, stop > start ? stop - start : 0};
}

std::size_t StitchAllocator::stitchable_bytes(StreamHandle stream) const {
  std::size_t total = 0;
  for (auto it = free_.large.lower_bound(FreeKey{stream, 0, 0}); it != free_.large.end() && (*it)->stream == stream; ++it) {
    total += mappable(*it).size;
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

}  // namespace glake::gmlake
