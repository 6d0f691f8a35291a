// Stream ordering: record_stream frees waiting for their events, free blocks of other streams
// migrating once an event shows their stream is past the free, and the device synchronisation
// before freed memory is unmapped or a released pool's memory is reused.
#include "gmlake/stitch_allocator.h"

#include <algorithm>

namespace glake::gmlake {

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
    (it->block->kind == PoolKind::Small ? stats_.active_small : stats_.active_large)
        .add(-static_cast<std::int64_t>(it->block->size));
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

}  // namespace glake::gmlake
