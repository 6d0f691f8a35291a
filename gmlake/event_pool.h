// Events of one device, reused: record_stream'd frees take one per extra stream and give it back
// once it has completed, instead of creating and destroying an event per free.
#pragma once

#include <cstddef>
#include <vector>

#include "driver/driver.h"

namespace glake::gmlake {

/// A free list of driver events of one device. Not thread-safe: used under the allocator's lock.
class EventPool {
 public:
  /// An empty pool for events of `device` on `driver`.
  EventPool(Driver& driver, int device) : driver_(driver), device_(device) {}
  /// Destroys every event the pool made (best effort: at exit the context may be gone).
  ~EventPool();
  EventPool(const EventPool&) = delete;
  EventPool& operator=(const EventPool&) = delete;

  /// A free event: a cached one, or a new one when none is cached.
  EventHandle acquire();
  /// Gives an event back for reuse; its last record must be complete (or never to be waited on).
  void release(EventHandle event) { free_.push_back(event); }
  /// Events made so far (cached and in use).
  std::size_t created() const { return created_; }
  /// Events cached now.
  std::size_t cached() const { return free_.size(); }

 private:
  Driver& driver_;
  int device_;
  std::vector<EventHandle> free_;
  std::size_t created_ = 0;
};

}  // namespace glake::gmlake
