// torch's allocator history for glake's torch frontend: what torch.cuda.memory._record_memory_history
// turns on (a ring of trace entries per device, the stack of each live allocation) and the trace
// trackers torch attaches. Compiled against the installed torch (see glake/torch_frontend.py).
#pragma once

#include <c10/cuda/CUDACachingAllocator.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace glake_torch {

namespace CCA = c10::cuda::CUDACachingAllocator;
using TraceEntry = c10::CachingDeviceAllocator::TraceEntry;
using Context = std::shared_ptr<c10::GatheredContext>;

/// Alloc/free history and trace trackers. Thread-safe; the context recorder (which takes the GIL to
/// gather Python stacks) is never called with the lock held.
class History {
 public:
  /// torch's recordHistory(): on/off, how to gather a stack, how many entries to keep, when to keep
  /// stacks, whether to drop what was recorded, and which actions not to record.
  void configure(bool enabled, CCA::CreateContextFn recorder, std::size_t max_entries, CCA::RecordContext when,
                 bool clear, const std::vector<std::string>& skip_actions);
  /// Whether history is being recorded.
  bool enabled() const { return enabled_.load(std::memory_order_relaxed); }
  /// Whether anything (history or a tracker) wants events: one relaxed load on the hot path.
  bool wanted() const { return wanted_.load(std::memory_order_relaxed); }
  /// Attaches a tracker called with every event from now on.
  void attach_tracker(CCA::AllocatorTraceTracker tracker);
  /// An allocation was made (records its stack when stacks are kept for live allocations).
  void on_alloc(int device, std::uintptr_t addr, std::size_t size, cudaStream_t stream, c10::cuda::MempoolId_t pool);
  /// An allocation was freed.
  void on_free(int device, std::uintptr_t addr, std::size_t size, cudaStream_t stream, c10::cuda::MempoolId_t pool);
  /// An allocation failed: `free_bytes` is what the device had free.
  void on_oom(int device, std::size_t size, std::size_t free_bytes, cudaStream_t stream);
  /// The stack recorded when the live allocation at `addr` was made (null when none was kept).
  Context context_of(std::uintptr_t addr) const;
  /// The recorded entries of each of `devices` devices, times in microseconds since the epoch.
  std::vector<std::vector<TraceEntry>> traces(int devices) const;

 private:
  Context gather(CCA::RecordContext needed) const;
  void emit(TraceEntry entry);

  mutable std::mutex mutex_;
  std::atomic<bool> enabled_{false}, wanted_{false};
  CCA::CreateContextFn recorder_ = nullptr;
  CCA::RecordContext when_ = CCA::RecordContext::NEVER;
  std::size_t max_entries_ = 0;
  std::set<TraceEntry::Action> skip_;
  std::unordered_map<int, std::deque<TraceEntry>> ring_;
  std::unordered_map<std::uintptr_t, Context> live_;
  std::vector<CCA::AllocatorTraceTracker> trackers_;
  c10::ApproximateClockToUnixTimeConverter clock_;
};

}  // namespace glake_torch
