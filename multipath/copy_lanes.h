// Copy lanes: the queues that move bytes asynchronously to the calling thread.
//
// cuda: one non-blocking CUDA stream per lane (a copy engine picks the work up); a submitted copy is
// followed by an event from a small ring, so "is copy #s done" is one event wait.
// host: one std::thread per lane, draining a FIFO of memcpys through the host driver; "done" is a
// counter. The staging pipeline above runs the same code on both.
#pragma once

#include <cstdint>
#include <memory>

#include "driver/driver.h"

namespace glake::multipath {

/// One submitted copy: done once its lane has completed copy number `seq`.
struct Ticket {
  int lane = -1;           ///< -1: nothing was submitted (waiting on it returns at once).
  std::uint64_t seq = 0;   ///< 1-based position in the lane's FIFO.
};

/// K lanes of one device. submit() and wait() are thread-safe; the ordering calls are made by one
/// thread at a time (the engine serialises copies).
class CopyLanes {
 public:
  /// Lanes for `driver` ("host" gets threads, anything else streams and events).
  static std::unique_ptr<CopyLanes> create(Driver& driver, int device, int count);
  virtual ~CopyLanes() = default;

  /// Number of lanes.
  int count() const { return count_; }
  /// Enqueues copying `n` bytes from `src` to `dst` on `lane`; returns its ticket.
  virtual Ticket submit(int lane, DevPtr dst, DevPtr src, std::size_t n) = 0;
  /// Blocks until the copy of `ticket` (and everything before it on its lane) is done.
  virtual void wait(const Ticket& ticket) = 0;
  /// Work submitted from now on starts only after the work already enqueued on `caller`.
  virtual void order_after(StreamHandle caller) = 0;
  /// Work enqueued on `caller` from now on starts only after every lane's work so far.
  virtual void order_before(StreamHandle caller) = 0;
  /// Blocks until every lane's work so far is done.
  virtual void synchronize() = 0;
  /// Whether lanes are CUDA streams (so the caller's stream must be ordered) or host threads.
  virtual bool on_device() const = 0;

 protected:
  explicit CopyLanes(int count) : count_(count) {}

 private:
  int count_;
};

}  // namespace glake::multipath
