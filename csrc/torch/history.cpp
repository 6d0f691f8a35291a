#include "history.h"

#include <unordered_map>

namespace glake_torch {

namespace {

/// torch's names of trace actions, as _record_memory_history's skip_actions spells them.
const std::unordered_map<std::string, TraceEntry::Action>& action_names() {
  static const std::unordered_map<std::string, TraceEntry::Action> names = {
      {"alloc", TraceEntry::ALLOC},
      {"free_requested", TraceEntry::FREE_REQUESTED},
      {"free_completed", TraceEntry::FREE_COMPLETED},
      {"segment_alloc", TraceEntry::SEGMENT_ALLOC},
      {"segment_free", TraceEntry::SEGMENT_FREE},
      {"segment_map", TraceEntry::SEGMENT_MAP},
      {"segment_unmap", TraceEntry::SEGMENT_UNMAP},
      {"snapshot", TraceEntry::SNAPSHOT},
      {"oom", TraceEntry::OOM},
  };
  return names;
}

}  // namespace

void History::configure(bool enabled, CCA::CreateContextFn recorder, std::size_t max_entries, CCA::RecordContext when,
                        bool clear, const std::vector<std::string>& skip_actions) {
  std::lock_guard<std::mutex> lock(mutex_);
  recorder_ = enabled ? recorder : nullptr;
  when_ = enabled ? when : CCA::RecordContext::NEVER;
  max_entries_ = enabled ? max_entries : 0;
  skip_.clear();
  for (const std::string& name : skip_actions) {
    auto it = action_names().find(name);
    TORCH_CHECK(it != action_names().end(), "glake: unknown trace action '", name, "' in skip_actions");
    skip_.insert(it->second);
  }
  if (clear || !enabled) {
    ring_.clear();
    live_.clear();
  }
  enabled_.store(enabled, std::memory_order_relaxed);
  wanted_.store(enabled || !trackers_.empty(), std::memory_order_relaxed);
}

void History::attach_tracker(CCA::AllocatorTraceTracker tracker) {
  std::lock_guard<std::mutex> lock(mutex_);
  trackers_.push_back(std::move(tracker));
  wanted_.store(true, std::memory_order_relaxed);
}

Context History::gather(CCA::RecordContext needed) const {
  CCA::CreateContextFn recorder = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (when_ < needed) return nullptr;
    recorder = recorder_;
  }
  return recorder ? recorder() : nullptr;
}

void History::emit(TraceEntry entry) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& tracker : trackers_) tracker(entry);
  if (!enabled_.load(std::memory_order_relaxed) || max_entries_ == 0 || skip_.count(entry.action_)) return;
  std::deque<TraceEntry>& ring = ring_[entry.device_];
  if (ring.size() >= max_entries_) ring.pop_front();
  ring.push_back(std::move(entry));
}

void History::on_alloc(int device, std::uintptr_t addr, std::size_t size, cudaStream_t stream,
                       c10::cuda::MempoolId_t pool) {
  Context ctx = gather(CCA::RecordContext::STATE);
  if (ctx) {
    std::lock_guard<std::mutex> lock(mutex_);
    live_[addr] = ctx;
  }
  bool trace_stack = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    trace_stack = when_ >= CCA::RecordContext::ALLOC;
  }
  emit(TraceEntry(TraceEntry::ALLOC, static_cast<c10::DeviceIndex>(device), addr, size, stream, pool,
                  c10::getApproximateTime(), trace_stack ? ctx : nullptr));
}

void History::on_free(int device, std::uintptr_t addr, std::size_t size, cudaStream_t stream,
                      c10::cuda::MempoolId_t pool) {
  Context ctx = gather(CCA::RecordContext::ALL);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    live_.erase(addr);
  }
  const auto dev = static_cast<c10::DeviceIndex>(device);
  // glake frees at once (a record_stream'd block is reused only after its streams' events, but the
  // allocation ends here): the request and its completion are one moment.
  emit(TraceEntry(TraceEntry::FREE_REQUESTED, dev, addr, size, stream, pool, c10::getApproximateTime(), ctx));
  emit(TraceEntry(TraceEntry::FREE_COMPLETED, dev, addr, size, stream, pool, c10::getApproximateTime(), ctx));
}

void History::on_oom(int device, std::size_t size, std::size_t free_bytes, cudaStream_t stream) {
  // As torch's: an OOM entry's address field is the device's free bytes.
  emit(TraceEntry(TraceEntry::OOM, static_cast<c10::DeviceIndex>(device), free_bytes, size, stream, {0, 0},
                  c10::getApproximateTime(), gather(CCA::RecordContext::ALLOC)));
}

Context History::context_of(std::uintptr_t addr) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = live_.find(addr);
  return it == live_.end() ? nullptr : it->second;
}

std::vector<std::vector<TraceEntry>> History::traces(int devices) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto to_ns = const_cast<c10::ApproximateClockToUnixTimeConverter&>(clock_).makeConverter();
  std::vector<std::vector<TraceEntry>> out(devices);
  for (const auto& [device, ring] : ring_) {
    if (device < 0 || device >= devices) continue;
    for (TraceEntry e : ring) {
      e.time_.t_ = to_ns(e.time_.approx_t_) / 1000;  // torch's snapshots carry microseconds
      out[device].push_back(std::move(e));
    }
  }
  return out;
}

}  // namespace glake_torch
