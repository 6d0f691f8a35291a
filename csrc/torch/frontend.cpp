// glake as torch's CUDA allocator through torch's own C++ allocator interface
// (c10::cuda::CUDACachingAllocator::CUDAAllocator), so that torch's memory API, snapshots, history,
// OOM type, CUDA graph pools and MemPool behave as with torch's allocator.
//
// Compiled against the installed torch on first use (glake/torch_frontend.py); it reaches glake only
// through the C ABI of libglake_torch.so (plugin/glake_c_api.h), so glake's own build needs no torch.
// It derives from torch's CUDAPluggableAllocator only to inherit the members every torch version
// declares (memcpyAsync, enablePeerAccess, ...); every call glake serves is overridden here.
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>
#include <pybind11/pybind11.h>

#include <c10/core/Allocator.h>
#include <c10/core/impl/GPUTrace.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <cstdio>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_set>
#include <utility>

#include "history.h"
#include "plugin/glake_c_api.h"

namespace glake_torch {

namespace {

using c10::cuda::MempoolId_t;
using DeviceStats = c10::CachingDeviceAllocator::DeviceStats;
constexpr int kMaxDevices = 64;
constexpr std::size_t kErrLen = 4096;

/// torch's format_size: "512 bytes", "2.00 MiB", "1.50 GiB".
std::string format_size(std::uint64_t n) {
  char buf[64];
  if (n < 1024) std::snprintf(buf, sizeof(buf), "%llu bytes", static_cast<unsigned long long>(n));
  else if (n < (1ull << 20)) std::snprintf(buf, sizeof(buf), "%.2f KiB", n / 1024.0);
  else if (n < (1ull << 30)) std::snprintf(buf, sizeof(buf), "%.2f MiB", n / 1048576.0);
  else std::snprintf(buf, sizeof(buf), "%.2f GiB", n / 1073741824.0);
  return buf;
}

/// Raises glake's error as torch's RuntimeError.
void check(int code, const char* err, const char* call) {
  if (code != GLAKE_OK) TORCH_CHECK(false, "glake: ", call, " failed: ", err);
}

c10::CachingAllocator::Stat torch_stat(const glake_stat& s, std::int64_t allocated = 0, std::int64_t freed = 0) {
  c10::CachingAllocator::Stat out;
  out.current = s.current;
  out.peak = s.peak;
  out.allocated = allocated;
  out.freed = freed;
  return out;
}

}  // namespace

class GlakeAllocator;
GlakeAllocator* g_self = nullptr;  // the one instance: torch keeps it for the process's lifetime

/// torch's CUDA allocator interface over glake's stitched allocators (one per device).
class GlakeAllocator final : public torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator {
 public:
  GlakeAllocator()
      : CUDAPluggableAllocator(
            [](size_t size, int device, cudaStream_t stream) { return g_self->raw_malloc(size, device, stream); },
            [](void* ptr, size_t, int device, cudaStream_t) { g_self->free_block(device, ptr, true); }) {
    TORCH_CHECK(glake_c_api_version() == GLAKE_C_API_VERSION, "glake: the torch frontend was built for C ABI ",
                GLAKE_C_API_VERSION, " but libglake_torch.so has ", glake_c_api_version(), "; rebuild it");
    g_self = this;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      n = 0;
      (void)cudaGetLastError();
    }
    device_count_ = std::min(n, kMaxDevices);
  }

  // ---- allocation -----------------------------------------------------------------------------

  /// Allocates on the current device and stream; throws torch.cuda.OutOfMemoryError when out of memory.
  void* raw_malloc(size_t size, int device, cudaStream_t stream) {
    void* ptr = nullptr;
    char err[kErrLen];
    const int code = glake_c_malloc(size, device, stream, &ptr, err, sizeof(err));
    if (C10_UNLIKELY(code == GLAKE_ERR_OOM)) throw_oom(size, device, stream, err);
    check(code, err, "malloc");
    if (C10_UNLIKELY(history_.wanted())) history_.on_alloc(device, reinterpret_cast<std::uintptr_t>(ptr), size,
                                                           stream, pool_of(device, ptr));
    if (const c10::impl::PyInterpreter* interp = c10::impl::GPUTrace::get_trace()) {
      (*interp)->trace_gpu_memory_allocation(c10::kCUDA, reinterpret_cast<std::uintptr_t>(ptr));
    }
    return ptr;
  }

  /// Frees `ptr` of `device`; a failure throws when `can_throw`, else is reported on stderr (deleters
  /// run in destructors).
  void free_block(int device, void* ptr, bool can_throw) {
    if (!ptr) return;
    if (const c10::impl::PyInterpreter* interp = c10::impl::GPUTrace::get_trace()) {
      (*interp)->trace_gpu_memory_deallocation(c10::kCUDA, reinterpret_cast<std::uintptr_t>(ptr));
    }
    if (C10_UNLIKELY(history_.wanted())) {
      void* base = nullptr;
      size_t size = 0;
      glake_c_allocation_of(device, ptr, &base, &size);
      history_.on_free(device, reinterpret_cast<std::uintptr_t>(ptr), size, nullptr, pool_of(device, ptr));
    }
    char err[kErrLen];
    const int code = glake_c_free(ptr, device, err, sizeof(err));
    if (code == GLAKE_OK) return;
    if (can_throw) check(code, err, "free");
    std::fprintf(stderr, "glake: free of %p failed: %s\n", ptr, err);
  }

  c10::DataPtr allocate(size_t size) override {
    const c10::DeviceIndex device = c10::cuda::current_device();
    const c10::Device where(c10::DeviceType::CUDA, device);
    if (size == 0) return {nullptr, nullptr, &free_nothing, where};
    void* ptr = raw_malloc(size, device, c10::cuda::getCurrentCUDAStream(device).stream());
    return {ptr, ptr, deleters()[device], where};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &free_anywhere; }

  void* raw_alloc(size_t nbytes) override {
    const c10::DeviceIndex device = c10::cuda::current_device();
    return raw_alloc_with_stream(nbytes, c10::cuda::getCurrentCUDAStream(device).stream());
  }

  void* raw_alloc_with_stream(size_t nbytes, cudaStream_t stream) override {
    if (nbytes == 0) return nullptr;
    return raw_malloc(nbytes, c10::cuda::current_device(), stream);
  }

  void raw_delete(void* ptr) override {
    if (!ptr) return;
    // Most raw frees are of the current device's memory: one lookup there, the search otherwise.
    void* base = nullptr;
    size_t size = 0;
    const int device = c10::cuda::current_device();
    if (glake_c_allocation_of(device, ptr, &base, &size) == GLAKE_OK && size && base == ptr) {
      free_block(device, ptr, true);
      return;
    }
    char err[kErrLen];
    check(glake_c_free_any(ptr, err, sizeof(err)), err, "raw_delete");
  }

  void init(int) override { initialized_ = true; }
  bool initialized() override { return initialized_; }
  std::string name() override { return "glake"; }

  // ---- cache, limits, streams ------------------------------------------------------------------

  void emptyCache(MempoolId_t) override {
    // A pool's memory went back to glake's cache when the pool was released; empty_cache of a pool
    // releases everything glake has cached, which includes it.
    char err[kErrLen];
    check(glake_c_empty_cache(err, sizeof(err)), err, "empty_cache");
  }

  double getMemoryFraction(c10::DeviceIndex device) override {
    const glake_stats s = stats(device);
    return s.memory_fraction > 0 ? s.memory_fraction : 1.0;
  }

  void setMemoryFraction(double fraction, c10::DeviceIndex device) override {
    char err[kErrLen];
    check(glake_c_set_memory_fraction(device, fraction, err, sizeof(err)), err, "set_per_process_memory_fraction");
  }

  void cacheInfo(c10::DeviceIndex device, size_t* largest) override {
    *largest = static_cast<size_t>(stats(device).largest_free);
  }

  void* getBaseAllocation(void* ptr, size_t* size) override {
    void* base = nullptr;
    for (int d = 0; d < device_count_; ++d) {
      if (glake_c_allocation_of(d, ptr, &base, size) == GLAKE_OK && *size) return base;
    }
    TORCH_CHECK(false, "glake: getBaseAllocation(", ptr, "): not a live glake allocation");
  }

  void recordStream(const c10::DataPtr& data, c10::cuda::CUDAStream stream) override {
    if (!data.get()) return;
    char err[kErrLen];
    check(glake_c_record_stream(data.device().index(), data.get(), stream.stream(), err, sizeof(err)), err,
          "record_stream");
  }

  // ---- stats -----------------------------------------------------------------------------------

  DeviceStats getDeviceStats(c10::DeviceIndex device) override {
    const glake_stats s = stats(device);
    const Baseline& b = baseline(device);
    DeviceStats out;
    for (int i = 0; i < 3; ++i) {
      out.allocation[i] = torch_stat(s.allocations[i], i ? 0 : s.num_allocs - b.allocs, i ? 0 : s.num_frees - b.frees);
      out.segment[i] = torch_stat(s.segments[i], i ? 0 : s.num_segments_created - b.segments_created,
                                  i ? 0 : s.num_segments_released - b.segments_released);
      out.active[i] = torch_stat(s.allocations[i]);
      out.allocated_bytes[i] = torch_stat(s.allocated_bytes[i]);
      out.reserved_bytes[i] = torch_stat(s.reserved_bytes[i]);
      out.active_bytes[i] = torch_stat(s.active_bytes[i]);
      out.requested_bytes[i] = torch_stat(s.requested_bytes[i]);
    }
    out.num_alloc_retries = s.num_alloc_retries - b.retries;
    out.num_ooms = s.num_ooms - b.ooms;
    out.num_sync_all_streams = s.num_sync_all_streams - b.syncs;
    out.num_device_alloc = s.num_segments_created - b.segments_created;
    out.num_device_free = s.num_segments_released - b.segments_released;
    out.max_split_size = -1;  // glake never caps block splitting (torch's "unlimited")
    return out;
  }

  void resetAccumulatedStats(c10::DeviceIndex device) override {
    const glake_stats s = stats(device);
    std::lock_guard<std::mutex> lock(mutex_);
    baselines_[device] = {s.num_allocs, s.num_frees, s.num_alloc_retries, s.num_ooms, s.num_sync_all_streams,
                          s.num_segments_created, s.num_segments_released};
  }

  void resetPeakStats(c10::DeviceIndex device) override {
    char err[kErrLen];
    check(glake_c_reset_peak_stats(device, err, sizeof(err)), err, "reset_peak_memory_stats");
  }

  // ---- snapshots and history -------------------------------------------------------------------

  CCA::SnapshotInfo snapshot(MempoolId_t mempool, bool include_traces) override;

  bool isHistoryEnabled() override { return history_.enabled(); }

  void recordHistory(bool enabled, CCA::CreateContextFn recorder, size_t max_entries, CCA::RecordContext when,
                     bool clear, const std::vector<std::string>& skip_actions) override {
    history_.configure(enabled, recorder, max_entries, when, clear, skip_actions);
  }

  void attachOutOfMemoryObserver(CCA::OutOfMemoryObserver observer) override {
    std::lock_guard<std::mutex> lock(mutex_);
    oom_observers_.push_back(std::move(observer));
  }

  void attachAllocatorTraceTracker(CCA::AllocatorTraceTracker tracker) override {
    history_.attach_tracker(std::move(tracker));
  }

  // ---- private pools: CUDA graphs and MemPool --------------------------------------------------

  void createOrIncrefPool(c10::DeviceIndex device, MempoolId_t id, std::shared_ptr<CCA::CUDAAllocator> other) override {
    TORCH_CHECK(!other || other.get() == this,
                "glake: a MemPool with an allocator of its own cannot be used while glake is torch's allocator "
                "(glake serves every allocation; create the MemPool without an allocator)");
    char err[kErrLen];
    check(glake_c_create_or_incref_pool(device, id.first, id.second, err, sizeof(err)), err, "createOrIncrefPool");
  }

  void setUseOnOOM(c10::DeviceIndex, MempoolId_t, bool use_on_oom) override {
    // torch's MemPool destructor turns it off again: only turning it on is refused.
    TORCH_CHECK(!use_on_oom, "glake: MemPool(use_on_oom=True) is not supported: on OOM glake retries by stitching "
                "and releasing its whole cache instead of falling back to one pool's memory");
  }

  int getPoolUseCount(c10::DeviceIndex device, MempoolId_t id) override {
    return glake_c_pool_use_count(device, id.first, id.second);
  }

  void beginAllocateToPool(c10::DeviceIndex device, MempoolId_t id, std::function<bool(cudaStream_t)> filter) override {
    auto owned = std::make_unique<std::function<bool(cudaStream_t)>>(std::move(filter));
    auto* ctx = owned.get();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      filters_[{device, id.first, id.second}] = std::move(owned);
    }
    char err[kErrLen];
    const int code = glake_c_begin_allocate_to_pool(device, id.first, id.second, &call_filter, ctx, err, sizeof(err));
    if (code != GLAKE_OK) {
      std::lock_guard<std::mutex> lock(mutex_);
      filters_.erase({device, id.first, id.second});
    }
    check(code, err, "beginAllocateToPool");
  }

  void endAllocateToPool(c10::DeviceIndex device, MempoolId_t id) override {
    char err[kErrLen];
    const int code = glake_c_end_allocate_to_pool(device, id.first, id.second, err, sizeof(err));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      filters_.erase({device, id.first, id.second});
    }
    check(code, err, "endAllocateToPool");
  }

  void releasePool(c10::DeviceIndex device, MempoolId_t id) override {
    char err[kErrLen];
    check(glake_c_release_pool(device, id.first, id.second, err, sizeof(err)), err, "releasePool");
  }

  bool checkPoolLiveAllocations(c10::DeviceIndex device, MempoolId_t id,
                                const std::unordered_set<void*>& expected) override {
    std::unordered_set<void*> live;
    for_each_segment(device, [&](const glake_segment_info& seg) {
      for (size_t i = 0; i < seg.num_blocks; ++i) {
        const glake_block_info& b = seg.blocks[i];
        if (b.pool_first == id.first && b.pool_second == id.second && std::string(b.state) == "allocated") {
          live.insert(reinterpret_cast<void*>(b.ptr));
        }
      }
    });
    return live == expected;
  }

  // ---- IPC -------------------------------------------------------------------------------------

  CCA::ShareableHandle shareIpcHandle(void*) override { TORCH_CHECK(false, ipc_refusal()); }
  std::shared_ptr<void> getIpcDevPtr(std::string) override { TORCH_CHECK(false, ipc_refusal()); }

 private:
  struct Baseline {
    std::int64_t allocs = 0, frees = 0, retries = 0, ooms = 0, syncs = 0, segments_created = 0, segments_released = 0;
  };

  static const char* ipc_refusal() {
    return "glake: CUDA IPC of tensors (torch.multiprocessing, Tensor.share_memory_ on CUDA) is not supported for "
           "memory from glake's allocator: it is mapped with the CUDA virtual memory API, which "
           "cudaIpcGetMemHandle cannot export. Copy the tensor to the CPU (or to memory from another process's "
           "allocator) to share it, or run the sharing process without glake.";
  }

  static int call_filter(void* ctx, void* stream) {
    return (*static_cast<std::function<bool(cudaStream_t)>*>(ctx))(static_cast<cudaStream_t>(stream)) ? 1 : 0;
  }

  static void free_nothing(void*) {}

  static void free_anywhere(void* ptr) {
    if (!ptr) return;
    char err[kErrLen];
    if (glake_c_free_any(ptr, err, sizeof(err)) != GLAKE_OK) std::fprintf(stderr, "glake: free of %p failed: %s\n", ptr, err);
  }

  template <std::size_t D>
  static void free_on(void* ptr) {
    g_self->free_block(static_cast<int>(D), ptr, false);
  }

  template <std::size_t... D>
  static std::array<c10::DeleterFnPtr, kMaxDevices> make_deleters(std::index_sequence<D...>) {
    return {&free_on<D>...};
  }

  /// One deleter per device, so that freeing a tensor needs no lookup of its device.
  static const std::array<c10::DeleterFnPtr, kMaxDevices>& deleters() {
    static const auto table = make_deleters(std::make_index_sequence<kMaxDevices>{});
    return table;
  }

  glake_stats stats(int device) const {
    glake_stats s{};
    char err[kErrLen];
    check(glake_c_stats(device, &s, err, sizeof(err)), err, "memory_stats");
    return s;
  }

  const Baseline& baseline(int device) {
    std::lock_guard<std::mutex> lock(mutex_);
    return baselines_[device];
  }

  MempoolId_t pool_of(int device, void* ptr) const;

  template <typename Fn>
  void for_each_segment(int device, Fn&& fn) const {
    char err[kErrLen];
    auto trampoline = [](void* ctx, const glake_segment_info* seg) { (*static_cast<Fn*>(ctx))(*seg); };
    check(glake_c_snapshot(device, trampoline, &fn, err, sizeof(err)), err, "snapshot");
  }

  [[noreturn]] void throw_oom(size_t size, int device, cudaStream_t stream, const char* report);

  int device_count_ = 0;
  History history_;
  std::mutex mutex_;
  std::map<int, Baseline> baselines_;
  std::vector<CCA::OutOfMemoryObserver> oom_observers_;
  std::map<std::tuple<int, std::uint64_t, std::uint64_t>, std::unique_ptr<std::function<bool(cudaStream_t)>>> filters_;
};

MempoolId_t GlakeAllocator::pool_of(int device, void* ptr) const {
  std::uint64_t first = 0, second = 0;
  glake_c_pool_of(device, ptr, &first, &second);
  return {first, second};
}

void GlakeAllocator::throw_oom(size_t size, int device, cudaStream_t stream, const char* report) {
  size_t free_bytes = 0, total = 0;
  if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) (void)cudaGetLastError();
  const glake_stats s = stats(device);
  const auto allocated = static_cast<std::uint64_t>(s.allocated_bytes[0].current);
  const auto reserved = static_cast<std::uint64_t>(s.reserved_bytes[0].current);
  std::vector<CCA::OutOfMemoryObserver> observers;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    observers = oom_observers_;
  }
  for (const auto& observer : observers) observer(device, allocated, total, free_bytes);
  if (history_.wanted()) history_.on_oom(device, size, free_bytes, stream);
  std::string msg = "CUDA out of memory. Tried to allocate " + format_size(size) + ". GPU " + std::to_string(device) +
                    " has a total capacity of " + format_size(total) + " of which " + format_size(free_bytes) +
                    " is free. Of the allocated memory " + format_size(allocated) +
                    " is allocated by PyTorch, and " + format_size(reserved > allocated ? reserved - allocated : 0) +
                    " is reserved by PyTorch but unallocated.\n" + report;
  throw c10::OutOfMemoryError(c10::SourceLocation{__func__, __FILE__, static_cast<std::uint32_t>(__LINE__)}, msg);
}

CCA::SnapshotInfo GlakeAllocator::snapshot(MempoolId_t mempool, bool include_traces) {
  CCA::SnapshotInfo info{};
  const bool any_pool = mempool.first == 0 && mempool.second == 0;
  for (int d = 0; d < device_count_; ++d) {
    if (!glake_c_has_allocator(d)) continue;
    for_each_segment(d, [&](const glake_segment_info& seg) {
      c10::CachingDeviceAllocator::SegmentInfo out;
      out.device = static_cast<c10::DeviceIndex>(d);
      out.address = seg.ptr;
      out.total_size = seg.size;
      out.is_large = std::string(seg.kind) != "small";
      out.is_expandable = std::string(seg.kind) == "stitched";  // a VA range over other segments' chunks
      std::uint64_t covered = 0;
      for (size_t i = 0; i < seg.num_blocks; ++i) {
        const glake_block_info& b = seg.blocks[i];
        const std::string state = b.state;
        if (i == 0) out.stream = b.stream;
        if (b.pool_first || b.pool_second) out.owner_private_pool_id = {b.pool_first, b.pool_second};
        c10::CachingDeviceAllocator::BlockInfo block;
        block.size = b.size;
        block.requested_size = b.requested;
        block.allocated = state == "allocated" || state == "stitched";  // "stitched": lent to a live stitched range
        block.active = block.allocated || state == "pending";
        if (state == "allocated") block.context_when_allocated = history_.context_of(b.ptr);
        out.requested_size += block.allocated ? b.requested : 0;
        out.allocated_size += block.allocated ? b.size : 0;
        out.active_size += block.active ? b.size : 0;
        covered += b.size;
        out.blocks.push_back(std::move(block));
      }
      if (covered < seg.size) {  // a stitched range serving less than its length: the rest is idle
        c10::CachingDeviceAllocator::BlockInfo idle;
        idle.size = seg.size - covered;
        out.blocks.push_back(std::move(idle));
      }
      if (any_pool || (out.owner_private_pool_id.first == mempool.first &&
                       out.owner_private_pool_id.second == mempool.second)) {
        info.segments.push_back(std::move(out));
      }
    });
  }
  if (include_traces) info.device_traces = history_.traces(device_count_);
  else info.device_traces.resize(device_count_);
  info.config_metadata.max_split_size = static_cast<size_t>(-1);
  if (const char* conf = std::getenv("GLAKE_ALLOC_CONF")) info.config_metadata.last_allocator_settings = conf;
  return info;
}

}  // namespace glake_torch

namespace {

std::shared_ptr<c10::cuda::CUDACachingAllocator::CUDAAllocator> make_allocator() {
  static std::shared_ptr<glake_torch::GlakeAllocator> instance = std::make_shared<glake_torch::GlakeAllocator>();
  return instance;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "glake's torch allocator frontend (torch's CUDAAllocator interface over glake's C ABI)";
  m.def("make_allocator", &make_allocator, "The process's glake allocator, as a torch CUDAAllocator");
  m.def("c_api_version", [] { return GLAKE_C_API_VERSION; });
  // torch.cuda.memory.change_current_allocator swaps only CUDACachingAllocator's pointer;
  // torch.accelerator.* and everything else that asks c10::GetAllocator(kCUDA) would still reach
  // torch's own allocator and report its empty figures. Register there too (priority: the highest,
  // so that a registration torch made at a higher priority than its default cannot win).
  m.def("register_device_allocator", [] {
    c10::Allocator* ours = make_allocator().get();
    c10::SetAllocator(c10::DeviceType::CUDA, ours, UINT8_MAX);
    return c10::GetAllocator(c10::DeviceType::CUDA) == ours;
  }, "Make glake c10's allocator for DeviceType::CUDA (torch.accelerator's path); true when it took");
}
