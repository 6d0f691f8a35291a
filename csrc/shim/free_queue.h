// Deferred frees: how cuMemFree of glake memory returns without synchronising the context.
//
// cuMemFree "may perform implicit synchronization" (the driver API's own words), and cudaFree has
// long been said to. A program under the shim that frees buffer by buffer (XLA's platform allocator
// frees a step's outputs each step) would wait for the GPU at every free. Instead, a free records
// one event on every stream of the calling thread's context (the legacy stream, every stream made
// by cuStreamCreate*, and the last work of streams destroyed since, while it runs) and queues the
// allocation; it goes back to glake's allocator once all those events have completed, so no work
// queued before the free can see its memory reused. Streams are learnt from cuStreamCreate* and
// cuStreamDestroy, which the shim replaces for this. Where an event cannot be recorded (a stream
// captures, a stream of another context), the free synchronises as before.
//
// GLAKE_SHIM_FREE=sync keeps the synchronising free for programs that rely on it.
#pragma once

#include <cuda.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "shim/allocation_table.h"

namespace glake::shim {

struct RealApi;

/// The streams of each context and the frees waiting for their events.
class FreeQueue {
 public:
  /// Whether frees are deferred ($GLAKE_SHIM_FREE, read once: "defer", the default, or "sync").
  static bool enabled();
  /// Whether the real driver has every entry point deferral needs.
  static bool supported(const RealApi& api);

  /// A stream `s` made in context `ctx` (cuStreamCreate*).
  void stream_created(CUcontext ctx, CUstream s);
  /// Before cuStreamDestroy(s): an event after its last work, kept until that work has run.
  void stream_destroying(CUstream s, const RealApi& api);

  /// Queues the free of `a` made in `ctx` behind an event on each of ctx's streams. False when an
  /// event could not be recorded or a destroyed stream's last work is unknown: the caller frees
  /// synchronously instead (nothing was queued) and then calls synchronised().
  bool defer(CUcontext ctx, const ShimAllocation& a, const RealApi& api);
  /// After the caller synchronised `ctx`: destroyed streams' work, known or not, is done.
  void synchronised(CUcontext ctx);
  /// The queued allocations of `ctx` whose events have all completed, oldest first, taken off the queue.
  std::vector<ShimAllocation> take_done(CUcontext ctx, const RealApi& api);

  /// The oldest queued allocation of `ctx`, after waiting for its events (without the queue's lock);
  /// false if none is queued or it could not be waited for.
  bool take_oldest(CUcontext ctx, const RealApi& api, ShimAllocation* out);

  /// fork(): the lock held across it; the child starts empty (its parent's handles are not its own).
  void before_fork() { mutex_.lock(); }
  void after_fork_parent() { mutex_.unlock(); }
  void after_fork_child();

  /// Allocations queued (all contexts) and their requested bytes.
  void totals(std::int64_t* count, std::int64_t* bytes) const;

 private:
  /// An event of one context; back to that context's spare events when the last free waiting on it
  /// is done (always with the queue's mutex held).
  struct Mark {
    CUevent event = nullptr;
    std::vector<CUevent>* spare = nullptr;
    ~Mark();
  };
  using MarkPtr = std::shared_ptr<Mark>;
  struct Pending {
    ShimAllocation alloc;
    std::vector<MarkPtr> marks;
  };
  struct Context {
    std::vector<CUevent> spare;     ///< events whose work is done, for the next records (first: the
                                    ///< marks below go back to it as they are destroyed)
    std::vector<CUstream> streams;  ///< besides the legacy stream
    std::vector<MarkPtr> retired;   ///< last work of destroyed streams, until it has run (null: unknown)
    std::deque<Pending> queue;
  };

  static bool done(const Pending& p, const RealApi& api);
  static MarkPtr record(Context& c, CUstream s, const RealApi& api);
  void pop_front(std::deque<Pending>& q);

  std::mutex mutex_;
  std::map<CUcontext, Context> contexts_;
  std::map<CUstream, CUcontext> owner_;
  std::atomic<std::int64_t> count_{0}, bytes_{0};  // read without the lock (the stats page)
};

}  // namespace glake::shim
