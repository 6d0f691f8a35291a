// Fences: a driver event recorded on the engine's stream when a slot's sequence ends, so that no
// chunk a kernel may still read is unmapped. Fences are polled (event_query), never waited for
// under the manager's lock: whoever must wait takes the Fence out and waits with the lock dropped.
#pragma once

#include <atomic>
#include <cstddef>
#include <memory>
#include <vector>

#include "driver/driver.h"

namespace glake::kvcache {

/// One recorded event; destroyed with the last reference (a waiter keeps it alive).
class Fence {
 public:
  /// Creates an event and records it on `stream`.
  Fence(Driver& driver, int device, StreamHandle stream);
  ~Fence();
  Fence(const Fence&) = delete;
  Fence& operator=(const Fence&) = delete;

  /// True once the work recorded before the event is done (event_query: never blocks).
  bool done();
  /// Blocks until done (event_synchronize); call it without the manager's lock.
  void wait();

 private:
  Driver& driver_;
  int device_;
  EventHandle event_;
  std::atomic<bool> done_{false};  // read by a waiter without the lock
};

using FencePtr = std::shared_ptr<Fence>;

/// The pending fences of every slot. Not thread-safe: used with the manager's lock held.
class FenceSet {
 public:
  /// Fences for `slots` slots on `device`.
  FenceSet(Driver& driver, int device, std::size_t slots);

  /// Records a fence for `slot` on `stream` (kept with any older fence still pending).
  void record(int slot, StreamHandle stream);
  /// True when `slot` has no pending fence; polls and drops completed ones.
  bool ready(int slot);
  /// The pending fences of `slot` (empty when ready), for waiting without the lock.
  std::vector<FencePtr> pending(int slot);
  /// Slots with a fence that has not been seen complete yet (no polling).
  std::size_t pending_slots() const;
  /// Every pending fence (for close()).
  std::vector<FencePtr> all_pending();

 private:
  Driver& driver_;
  int device_;
  std::vector<std::vector<FencePtr>> fences_;  // per slot
};

/// Waits for every fence (no lock may be held).
void wait_all(const std::vector<FencePtr>& fences);

}  // namespace glake::kvcache
