// The shim's process state: lazy start of glake on the first replaced call, pass-through when glake
// cannot run (or in a child forked after it started), the re-entry guard and the shim's counters.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "shim/allocation_table.h"
#include "shim/free_queue.h"

namespace glake::shim {

/// What the replaced entry points do.
enum class Mode : int {
  Uninit = 0,       ///< nothing replaced has been called yet
  Active = 1,       ///< glake's allocator serves cuMemAlloc
  PassThrough = 2,  ///< everything goes to the real driver (glake failed to start, or a forked child)
};

/// Counters of the shim itself (the allocator's own are in its AllocatorStats).
struct ShimCounters {
  std::atomic<std::int64_t> alloc_calls{0};         ///< cuMemAlloc/cuMemAllocPitch served by glake
  std::atomic<std::int64_t> free_calls{0};          ///< cuMemFree of glake memory
  std::atomic<std::int64_t> passthrough_allocs{0};  ///< allocations handed to the real driver
  std::atomic<std::int64_t> passthrough_frees{0};   ///< frees of memory glake did not allocate
  std::atomic<std::int64_t> alloc_failures{0};      ///< cuMemAlloc answered with an error by glake (OOM, ...)
  std::atomic<std::int64_t> free_syncs{0};          ///< context synchronisations done by cuMemFree
  std::atomic<std::int64_t> free_deferred{0};       ///< cuMemFree calls that queued the memory behind events
  std::atomic<std::int64_t> reentries{0};           ///< replaced calls made from inside glake (passed through)
  std::atomic<std::int64_t> ipc_refusals{0};        ///< cuIpcGetMemHandle on glake memory (NOT_SUPPORTED)
  std::atomic<std::int64_t> attribute_answers{0};   ///< pointer queries answered for glake memory
  std::atomic<std::uint64_t> changes{0};            ///< bumped by every alloc/free: the stats page republishes
};

/// The process-wide shim state.
struct ShimState {
  std::atomic<int> mode{static_cast<int>(Mode::Uninit)};
  std::string reason;  ///< why PassThrough (set once, before mode is stored)
  int owner_pid = 0;   ///< the process that started glake (a forked child differs)
  AllocationTable table;
  FreeQueue frees;  ///< freed allocations waiting for the work queued before their free
  ShimCounters counters;
};

/// The state (never destroyed).
ShimState& state();

/// Starts glake on first use (real driver, cuda backend on it, $GLAKE_ALLOC_CONF, stats page) and
/// returns the mode now in force. Cheap after the first call: one atomic load.
Mode ensure_started();

/// True while this thread runs inside glake's core (a replaced call from there must pass through).
bool in_glake();

/// Marks this thread as inside glake's core for the guard's lifetime.
class GlakeScope {
 public:
  GlakeScope();
  ~GlakeScope();
  GlakeScope(const GlakeScope&) = delete;
  GlakeScope& operator=(const GlakeScope&) = delete;
};

/// Prints "glake shim: <message>" on stderr the first time `key` is seen (one line per kind of problem).
void warn_once(const std::string& key, const std::string& message);

/// Name of a CUresult for messages ("CUDA_ERROR_OUT_OF_MEMORY"), from the real driver when it can say.
std::string result_name(int result);

}  // namespace glake::shim
