// Private pools (torch's MempoolId_t, CUDA graph pools): routing allocations to a pool, its free
// lists, and returning its memory to the cache once released.
#include "gmlake/stitch_allocator.h"

#include <algorithm>

namespace glake::gmlake {

void StitchAllocator::create_or_incref_pool(PoolId id) {
  if (!id) throw InvalidArgumentError("create_or_incref_pool: pool id {0,0} means no pool");
  std::lock_guard<std::mutex> lock(mutex_);
  incref_pool(id);
}

PrivatePool* StitchAllocator::incref_pool(PoolId id) {
  auto& pool = pools_[id];
  if (!pool) {
    pool = std::make_unique<PrivatePool>();
    pool->id = id;
  }
  // A released pool whose memory could not be returned yet (a capture was under way) is taken
  // up again as it is: its memory was private to it all along.
  pool->use_count++;
  return pool.get();
}

int StitchAllocator::pool_use_count(PoolId id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pools_.find(id);
  return it == pools_.end() ? 0 : it->second->use_count;
}

void StitchAllocator::begin_allocate_to_pool(PoolId id, StreamFilter filter) {
  if (!id) throw InvalidArgumentError("begin_allocate_to_pool: pool id {0,0} means no pool");
  if (!filter) throw InvalidArgumentError("begin_allocate_to_pool: the stream filter is empty");
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& [pool, f] : routing_) {
    if (pool->id == id) {
      throw InvalidArgumentError("begin_allocate_to_pool: already allocating to pool (" + std::to_string(id.first) +
                                 ", " + std::to_string(id.second) + ")");
    }
  }
  routing_.emplace_back(incref_pool(id), std::move(filter));
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
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = std::find_if(routing_.begin(), routing_.end(), [&](const auto& r) { return r.first->id == PoolId{graph, 0}; });
  if (it != routing_.end()) routing_.erase(it);  // not routing to it: nothing to end (as before pools)
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

}  // namespace glake::gmlake
