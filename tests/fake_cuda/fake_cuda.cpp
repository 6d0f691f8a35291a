// A fake libcuda.so.1 for testing glake's cuda backend code paths on machines without a GPU.
//
// NOT a GPU and not a measurement of one. It gives the CUDA driver API's *semantics* that the
// multipath engine and the stitched allocator depend on, on host memory:
//   - device memory (cuMemAlloc) and pinned memory (cuMemHostAlloc) are tracked host allocations;
//     cuPointerGetAttributes answers from that table and from the VMM mappings; anything else is
//     "pageable";
//   - the virtual memory API, as glake's host backend emulates it (csrc/driver/host_driver.cpp):
//     granularity 2 MiB; cuMemCreate makes a memfd (POSIX-fd shareable when asked;
//     FAKE_CUDA_NO_FD_EXPORT=1 refuses that with NOT_SUPPORTED, as some containers do);
//     cuMemAddressReserve is an aligned PROT_NONE reservation; cuMemMap maps the memfd there with
//     MAP_FIXED but PROT_NONE, as nothing is accessible before cuMemSetAccess; cuMemUnmap turns the
//     range back into a reservation; export/import dup the fd. Arguments are checked as CUDA
//     does (granularity alignment, no mapping over a mapping, unmapping only whole mappings,
//     freeing only whole reservations) with CUDA's error codes. Mapped memory is device memory of
//     the handle's device for pointer attributes and for the copy range checks. cuMemRelease of a
//     mapped handle is legal: the memory lives until its last unmap (as in CUDA);
//   - every stream is a thread draining a FIFO, so copies really are asynchronous to the caller;
//     cuCtxSynchronize waits for every stream of the current context's device, legacy included;
//   - events count records and completions: cuEventSynchronize / cuStreamWaitEvent wait for the
//     latest record at call time, as CUDA does; an event may be destroyed while queued work still
//     records or waits on it (CUDA frees it once that work is done);
//   - FAKE_CUDA_COPY_DELAY_US=n delays every copy on streams made by cuStreamCreate (glake's own
//     streams) by n microseconds, so tests can make the engine's copies lag the caller's stream;
//   - FAKE_CUDA_WAIT_LAG_US=n makes every stream reach its event waits n microseconds late;
//   - calls check what CUDA checks and glake could get wrong: a current context, streams and events
//     of the current context, copies that run past the end of a device allocation or mapping.
//
// Violations: what a real GPU would not report as an error but would get wrong, or what a capture
// forbids, is counted (fake_violations()) and described on stderr ("fake_cuda: VIOLATION ..."):
//   - the unmap hazard: cuMemUnmap of a range that queued-but-unfinished stream work (copies,
//     memsets) will touch: on a GPU a running kernel would use unmapped memory. A stream op that
//     finds its memory unmapped when it runs is counted too, and skipped instead of faulting;
//   - stream capture, emulated by fake_set_capturing(stream, on) (a capture in global mode, owned
//     by the calling thread): cuStreamIsCapturing answers ACTIVE for that stream, and for the
//     legacy stream returns CUDA_ERROR_STREAM_CAPTURE_IMPLICIT while a blocking stream captures.
//     Work pushed to a capturing stream is captured, i.e. not run. While a capture is under way,
//     the "potentially unsafe" calls (cuCtxSynchronize, cuStreamSynchronize of the legacy or a
//     capturing stream, cuEventQuery, cuEventSynchronize, cuMemAlloc/cuMemFree/cuMemHostAlloc/
//     cuMemFreeHost, synchronous cuMemcpy/cuMemsetD8) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
//     and count a violation, unless the calling thread's mode (cuThreadExchangeStreamCaptureMode,
//     per thread) allows them: RELAXED always does, THREAD_LOCAL does when the thread owns no
//     capture. Querying or waiting on an event last recorded in a capture returns
//     CUDA_ERROR_CAPTURED_EVENT in every mode. cuEventRecord / cuStreamWaitEvent on a stream that
//     does not capture, cuEventCreate/Destroy and the VMM calls are allowed during a capture. A
//     forbidden call does not invalidate the capture here (CUDA would): the counter is the signal.
// Test helpers (extern "C" fake_*) let tests make streams, delay them, mark them capturing, and
// count live allocations, VMM handles/reservations and violations.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

constexpr std::size_t kGranularity = 2u << 20;

int device_count() {
  const char* env = std::getenv("FAKE_CUDA_DEVICES");
  return env ? std::atoi(env) : 2;
}

struct Ctx {
  int device;
};
Ctx g_ctx[16] = {{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}, {8}, {9}, {10}, {11}, {12}, {13}, {14}, {15}};
thread_local Ctx* t_current = nullptr;

std::atomic<int> g_violations{0};
std::atomic<long> g_creates_left{-1};  // fake_fail_creates_after: creates that still succeed (-1: all)

void violation(const std::string& what) {
  g_violations.fetch_add(1);
  std::fprintf(stderr, "fake_cuda: VIOLATION %s\n", what.c_str());
}

/// Calls per entry point (fake_calls(name)), so a test can tell which library a call reached.
std::mutex g_calls_mu;
std::map<std::string, long> g_calls;
void count_call(const char* name) {
  std::lock_guard<std::mutex> lock(g_calls_mu);
  ++g_calls[name];
}
#define COUNT_CALL() count_call(__func__ + 2)  // f_cuX -> "cuX"

std::string hex(std::uintptr_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

struct Alloc {
  std::size_t size;
  int device;  // -1 for pinned host memory
};
std::mutex g_mem_mu;
std::map<std::uintptr_t, Alloc> g_allocs;
std::set<std::pair<int, int>> g_peer;  // (accessor, owner)

// ---- VMM state: all of it under g_vmm_mu (exclusive to change, shared to read) ----------------

constexpr const char* kChunkName = "fake-cuda-chunk-dev";

struct Phys {
  int fd;               // -1 once released (the mappings keep the memory)
  std::size_t size;
  int device;
  bool shareable;       // created with CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
  int mappings = 0;
};
struct Mapping {
  std::size_t size;
  CUmemGenericAllocationHandle handle;
  int device;
  bool access = false;  // cuMemSetAccess done
};
std::shared_mutex g_vmm_mu;
std::map<CUmemGenericAllocationHandle, Phys> g_handles;  // live (unreleased, or still mapped)
CUmemGenericAllocationHandle g_next_handle = 1;
std::map<std::uintptr_t, std::size_t> g_reserved;        // base -> size
std::map<std::uintptr_t, Mapping> g_mapped;              // va -> mapping

/// The reservation containing [p, p + n), if any (g_vmm_mu held).
bool in_reservation(std::uintptr_t p, std::size_t n) {
  auto it = g_reserved.upper_bound(p);
  if (it == g_reserved.begin()) return false;
  --it;
  return p >= it->first && p + n <= it->first + it->second;
}
bool touches_reservation(std::uintptr_t p, std::size_t n) {
  auto it = g_reserved.upper_bound(p + n - 1);
  if (it == g_reserved.begin()) return false;
  --it;
  return it->first + it->second > p;
}

/// Whether [p, p + n) is covered by back-to-back mappings (accessible ones if `access`), and the
/// device of the first (g_vmm_mu held).
bool mapped_span(std::uintptr_t p, std::size_t n, bool access, int* device = nullptr) {
  auto it = g_mapped.upper_bound(p);
  if (it == g_mapped.begin()) return false;
  --it;
  if (p >= it->first + it->second.size) return false;
  if (device) *device = it->second.device;
  std::uintptr_t at = it->first;
  for (; it != g_mapped.end() && at < p + n; ++it) {
    if (it->first != at || (access && !it->second.access)) return false;
    at += it->second.size;
  }
  return at >= p + n;
}

/// The allocation containing p, if any.
bool find_alloc(std::uintptr_t p, std::uintptr_t& base, Alloc& a) {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  auto it = g_allocs.upper_bound(p);
  if (it == g_allocs.begin()) return false;
  --it;
  if (p >= it->first + it->second.size) return false;
  base = it->first;
  a = it->second;
  return true;
}

/// A range [p, p + n) is fine if it is not tracked memory, lies inside one allocation, or (VMM
/// memory) lies in accessible mappings.
bool range_ok(std::uintptr_t p, std::size_t n) {
  {
    std::shared_lock<std::shared_mutex> lock(g_vmm_mu);
    if (touches_reservation(p, n ? n : 1)) return n == 0 || mapped_span(p, n, true);
  }
  std::uintptr_t base;
  Alloc a;
  if (!find_alloc(p, base, a)) return true;
  return p + n <= base + a.size;
}

bool tracked(std::uintptr_t p) {
  {
    std::shared_lock<std::shared_mutex> lock(g_vmm_mu);
    if (mapped_span(p, 1, false)) return true;
  }
  std::uintptr_t base;
  Alloc a;
  return find_alloc(p, base, a);
}

// ---- in-flight stream work, for the unmap hazard ----------------------------------------------

struct Touch {
  std::uintptr_t lo, hi;  // [lo, hi)
};
std::mutex g_flight_mu;
std::multimap<std::uint64_t, Touch> g_in_flight;  // op id -> a range it will touch
std::uint64_t g_next_op = 1;

/// The queued op touching [lo, hi), if any (g_flight_mu held).
bool in_flight(std::uintptr_t lo, std::uintptr_t hi, Touch& hit) {
  for (const auto& [id, t] : g_in_flight) {
    if (t.lo < hi && lo < t.hi) {
      hit = t;
      return true;
    }
  }
  return false;
}

// ---- stream capture ---------------------------------------------------------------------------

std::atomic<int> g_capturing{0};           // streams capturing now
std::atomic<int> g_capturing_blocking{0};  // ... of them blocking (not CU_STREAM_NON_BLOCKING)
thread_local CUstreamCaptureMode t_capture_mode = CU_STREAM_CAPTURE_MODE_GLOBAL;
thread_local int t_owned_captures = 0;     // captures this thread started

struct Stream {
  Stream(int dev, bool blocking_) : device(dev), blocking(blocking_), thread([this] { run(); }) {}
  ~Stream() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    cv.notify_all();
    thread.join();
  }
  /// Queues `op`. On a capturing stream work is captured, not run: dropped here.
  void push(std::function<void()> op) {
    if (capturing) return;
    {
      std::lock_guard<std::mutex> lock(mu);
      ops.push_back(std::move(op));
      ++pushed;
    }
    cv.notify_all();
  }
  void sync() {
    std::unique_lock<std::mutex> lock(mu);
    const std::uint64_t target = pushed;
    cv.wait(lock, [&] { return done >= target; });
  }
  void run() {
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      cv.wait(lock, [&] { return stop || !ops.empty(); });
      if (ops.empty()) return;
      auto op = std::move(ops.front());
      ops.pop_front();
      lock.unlock();
      op();
      lock.lock();
      ++done;
      cv.notify_all();
    }
  }
  int device;
  bool blocking;
  std::atomic<bool> capturing{false};
  unsigned delay_us = 0;  // added before every copy (FAKE_CUDA_COPY_DELAY_US, cuStreamCreate streams)
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> ops;
  std::uint64_t pushed = 0, done = 0;
  bool stop = false;
  std::thread thread;  // last: starts after the members above exist
};

/// Every stream, legacy ones included, for cuCtxSynchronize.
std::mutex g_streams_mu;
std::set<Stream*> g_streams;

Stream* new_stream(int device, bool blocking) {
  Stream* s = new Stream(device, blocking);
  std::lock_guard<std::mutex> lock(g_streams_mu);
  g_streams.insert(s);
  return s;
}

/// Whether a "potentially unsafe" call is forbidden now; if so it is counted and described.
bool capture_forbids(const char* call) {
  if (g_capturing.load() == 0) return false;
  const CUstreamCaptureMode mode = t_capture_mode;
  if (mode == CU_STREAM_CAPTURE_MODE_RELAXED) return false;
  if (mode == CU_STREAM_CAPTURE_MODE_THREAD_LOCAL && t_owned_captures == 0) return false;
  violation(std::string(call) + " during a stream capture (global mode): CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED");
  return true;
}

/// Queues `op` on `st`, which will touch the ranges `touch`: they count as in flight until it has
/// run, and it runs only if they are still accessible (else it is counted and skipped, where a
/// GPU would fault).
void push_touching(Stream* st, std::vector<Touch> touch, std::function<void()> op) {
  if (st->capturing) return;  // captured, not run
  std::uint64_t id;
  {
    std::lock_guard<std::mutex> lock(g_flight_mu);
    id = g_next_op++;
    for (const Touch& t : touch) g_in_flight.emplace(id, t);
  }
  st->push([id, touch = std::move(touch), op = std::move(op)] {
    std::shared_lock<std::shared_mutex> vmm(g_vmm_mu);  // no unmap while the op checks and runs
    bool ok = true;
    for (const Touch& t : touch) {
      if (t.hi > t.lo && touches_reservation(t.lo, t.hi - t.lo) && !mapped_span(t.lo, t.hi - t.lo, true)) {
        violation("a stream op touches [" + hex(t.lo) + ", " + hex(t.hi) + ") which is no longer mapped: skipped");
        ok = false;
      }
    }
    if (ok) op();
    std::lock_guard<std::mutex> lock(g_flight_mu);
    g_in_flight.erase(id);
  });
}

/// What streams touch of an event. Stream ops hold it by shared_ptr, so cuEventDestroy can free the
/// handle while work that records or waits on it is still queued, as CUDA allows.
struct EventState {
  std::mutex mu;
  std::condition_variable cv;
  std::uint64_t recorded = 0, completed = 0;
  bool captured = false;  // last recorded in a capture
  void wait_for(std::uint64_t target) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return completed >= target; });
  }
  std::uint64_t latest_record() {
    std::lock_guard<std::mutex> lock(mu);
    return recorded;
  }
};

struct Event {
  int device;
  std::shared_ptr<EventState> state = std::make_shared<EventState>();
};

Stream* g_legacy[16] = {};
std::mutex g_legacy_mu;

Stream* legacy(int device) {
  std::lock_guard<std::mutex> lock(g_legacy_mu);
  if (!g_legacy[device]) g_legacy[device] = new_stream(device, true);  // lives for the process
  return g_legacy[device];
}

/// The stream a handle names: 0 is the current context's legacy stream. Null when no context.
Stream* stream_of(CUstream s) {
  if (s) return reinterpret_cast<Stream*>(s);
  return t_current ? legacy(t_current->device) : nullptr;
}

#define NEED_CTX() \
  if (!t_current) return CUDA_ERROR_INVALID_CONTEXT

CUresult f_cuInit(unsigned int) { return CUDA_SUCCESS; }
CUresult f_cuDeviceGetCount(int* n) { *n = device_count(); return CUDA_SUCCESS; }
CUresult f_cuDeviceGet(CUdevice* d, int ordinal) {
  if (ordinal < 0 || ordinal >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
  *d = ordinal;
  return CUDA_SUCCESS;
}
CUresult f_cuDeviceGetAttribute(int* v, CUdevice_attribute, CUdevice) { *v = 1; return CUDA_SUCCESS; }
CUresult f_cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
  if (d < 0 || d >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
  *c = reinterpret_cast<CUcontext>(&g_ctx[d]);
  return CUDA_SUCCESS;
}
CUresult f_cuCtxGetCurrent(CUcontext* c) { *c = reinterpret_cast<CUcontext>(t_current); return CUDA_SUCCESS; }
CUresult f_cuCtxSetCurrent(CUcontext c) { t_current = reinterpret_cast<Ctx*>(c); return CUDA_SUCCESS; }
CUresult f_cuGetErrorName(CUresult r, const char** name) {
  switch (r) {
#define NAME(e) case e: *name = #e; break;
    NAME(CUDA_SUCCESS) NAME(CUDA_ERROR_INVALID_VALUE) NAME(CUDA_ERROR_OUT_OF_MEMORY) NAME(CUDA_ERROR_INVALID_CONTEXT)
    NAME(CUDA_ERROR_INVALID_DEVICE) NAME(CUDA_ERROR_INVALID_HANDLE) NAME(CUDA_ERROR_NOT_SUPPORTED)
    NAME(CUDA_ERROR_NOT_READY) NAME(CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED)
    NAME(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED) NAME(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT)
    NAME(CUDA_ERROR_CAPTURED_EVENT)
#undef NAME
    default: *name = "CUDA_ERROR_UNKNOWN"; break;
  }
  return CUDA_SUCCESS;
}
CUresult f_cuMemGetInfo(size_t* free_b, size_t* total) { COUNT_CALL(); *free_b = 70ull << 30; *total = 80ull << 30; return CUDA_SUCCESS; }

// ---- the virtual memory API -------------------------------------------------------------------

bool granular(std::uintptr_t v) { return v % kGranularity == 0; }

CUresult f_cuMemGetAllocationGranularity(size_t* g, const CUmemAllocationProp* prop, CUmemAllocationGranularity_flags) {
  if (!g || !prop) return CUDA_ERROR_INVALID_VALUE;
  *g = kGranularity;
  return CUDA_SUCCESS;
}

CUresult f_cuMemCreate(CUmemGenericAllocationHandle* h, size_t size, const CUmemAllocationProp* prop,
                       unsigned long long flags) {
  COUNT_CALL();
  NEED_CTX();
  if (!h || !prop || flags || size == 0 || !granular(size) || prop->type != CU_MEM_ALLOCATION_TYPE_PINNED ||
      prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (prop->location.id < 0 || prop->location.id >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
  const auto types = static_cast<unsigned>(prop->requestedHandleTypes);
  if (types & ~static_cast<unsigned>(CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)) return CUDA_ERROR_NOT_SUPPORTED;
  const bool shareable = types != 0;
  if (shareable && std::getenv("FAKE_CUDA_NO_FD_EXPORT") && std::atoi(std::getenv("FAKE_CUDA_NO_FD_EXPORT"))) {
    return CUDA_ERROR_NOT_SUPPORTED;
  }
  // FAKE_CUDA_MAX_CHUNK=N: a chunk over N bytes fails as when physical memory is too scarce for it.
  if (const char* cap = std::getenv("FAKE_CUDA_MAX_CHUNK"); cap && size > std::strtoull(cap, nullptr, 10)) {
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  // fake_fail_creates_after(n): the device runs out after n more chunks.
  for (long left = g_creates_left.load(); left >= 0;) {
    if (left == 0) return CUDA_ERROR_OUT_OF_MEMORY;
    if (g_creates_left.compare_exchange_weak(left, left - 1)) break;
  }
  // The name carries the device, so an importer in any process can tell a chunk of this fake.
  const std::string name = kChunkName + std::to_string(prop->location.id);
  const int fd = memfd_create(name.c_str(), MFD_CLOEXEC);
  if (fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    close(fd);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  std::unique_lock<std::shared_mutex> lock(g_vmm_mu);
  *h = g_next_handle++;
  g_handles[*h] = Phys{fd, size, prop->location.id, shareable};
  return CUDA_SUCCESS;
}

CUresult f_cuMemRelease(CUmemGenericAllocationHandle h) {
  std::unique_lock<std::shared_mutex> lock(g_vmm_mu);
  auto it = g_handles.find(h);
  if (it == g_handles.end() || it->second.fd < 0) return CUDA_ERROR_INVALID_VALUE;
  close(it->second.fd);  // a mapping keeps the memfd's memory, as CUDA keeps a mapped allocation
  it->second.fd = -1;
  if (it->second.mappings == 0) g_handles.erase(it);
  return CUDA_SUCCESS;
}

CUresult f_cuMemAddressReserve(CUdeviceptr* ptr, size_t size, size_t alignment, CUdeviceptr, unsigned long long flags) {
  COUNT_CALL();
  NEED_CTX();
  if (!ptr || flags || size == 0 || !granular(size) || (alignment & (alignment - 1))) return CUDA_ERROR_INVALID_VALUE;
  alignment = std::max(alignment, kGranularity);
  const std::size_t span = size + alignment;
  void* p = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  const auto base = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t aligned = (base + alignment - 1) & ~(alignment - 1);
  if (aligned > base) munmap(p, aligned - base);
  const std::uintptr_t end = aligned + size;
  if (base + span > end) munmap(reinterpret_cast<void*>(end), base + span - end);
  std::unique_lock<std::shared_mutex> lock(g_vmm_mu);
  g_reserved[aligned] = size;
  *ptr = aligned;
  return CUDA_SUCCESS;
}

CUresult f_cuMemAddressFree(CUdeviceptr ptr, size_t size) {
  std::unique_lock<std::shared_mutex> lock(g_vmm_mu);
  auto it = g_reserved.find(ptr);
  if (it == g_reserved.end() || it->second != size) return CUDA_ERROR_INVALID_VALUE;  // whole reservations only
  auto m = g_mapped.lower_bound(ptr);
  if (m != g_mapped.end() && m->first < ptr + size) {
    // CUDA leaves this undefined; the fake refuses it, so that glake's order (unmap first) is checked.
    std::fprintf(stderr, "fake_cuda: cuMemAddressFree(%s) with mappings left in it\n", hex(ptr).c_str());
    return CUDA_ERROR_INVALID_VALUE;
  }
  munmap(reinterpret_cast<void*>(ptr), size);
  g_reserved.erase(it);
  return CUDA_SUCCESS;
}

CUresult f_cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle h, unsigned long long flags) {
  COUNT_CALL();
  NEED_CTX();
  std::unique_lock<std::shared_mutex> lock(g_vmm_mu);
  auto it = g_handles.find(h);
  if (it == g_handles.end() || it->second.fd < 0) return CUDA_ERROR_INVALID_VALUE;
  Phys& ph = it->second;
  if (offset) return CUDA_ERROR_NOT_SUPPORTED;  // as driver 580 answers (H200, 2026-12-01): a chunk maps whole
  if (flags || size == 0 || !granular(ptr) || !granular(size) || size > ph.size ||
      !in_reservation(ptr, size)) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  auto next = g_mapped.lower_bound(ptr);
  if (next != g_mapped.end() && next->first < ptr + size) return CUDA_ERROR_INVALID_VALUE;  // over a mapping
  if (next != g_mapped.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.size > ptr) return CUDA_ERROR_INVALID_VALUE;
  }
  void* p = mmap(reinterpret_cast<void*>(ptr), size, PROT_NONE, MAP_SHARED | MAP_FIXED, ph.fd, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  g_mapped[ptr] = Mapping{size, h, ph.device};
  ph.mappings++;
  return CUDA_SUCCESS;
}

CUresult f_cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc* desc, size_t count) {
  NEED_CTX();
  if (!desc || count == 0 || size == 0 || !granular(ptr) || !granular(size)) return CUDA_ERROR_INVALID_VALUE;
  int prot = PROT_NONE;
  for (size_t i = 0; i < count; ++i) {
    if (desc[i].location.type != CU_MEM_LOCATION_TYPE_DEVICE) return CUDA_ERROR_INVALID_VALUE;
    if (desc[i].location.id < 0 || desc[i].location.id >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    if (desc[i].flags == CU_MEM_ACCESS_FLAGS_PROT_READWRITE) prot = PROT_READ | PROT_WRITE;
    else if (desc[i].flags == CU_MEM_ACCESS_FLAGS_PROT_READ && prot == PROT_NONE) prot = PROT_READ;
    else if (desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_READ) return CUDA_ERROR_INVALID_VALUE;
  }
  std::unique_lock<std::shared_mutex> lock(g_vmm_mu);
  if (!mapped_span(ptr, size, false)) return CUDA_ERROR_INVALID_VALUE;  // a contiguous mapped range only
  if (mprotect(reinterpret_cast<void*>(ptr), size, prot) != 0) return CUDA_ERROR_INVALID_VALUE;
  for (auto it = g_mapped.lower_bound(ptr); it != g_mapped.end() && it->first < ptr + size; ++it) {
    if (it->first + it->second.size <= ptr + size) it->second.access = true;  // whole mappings
  }
  return CUDA_SUCCESS;
}

CUresult f_cuMemUnmap(CUdeviceptr ptr, size_t size) {
  std::unique_lock<std::shared_mutex> lock(g_vmm_mu);
  // The range must be whole mappings, back to back.
  auto first = g_mapped.find(ptr);
  if (size == 0 || first == g_mapped.end()) return CUDA_ERROR_INVALID_VALUE;
  std::uintptr_t at = ptr;
  auto it = first;
  for (; it != g_mapped.end() && at < ptr + size; ++it) {
    if (it->first != at) return CUDA_ERROR_INVALID_VALUE;
    at += it->second.size;
  }
  if (at != ptr + size) return CUDA_ERROR_INVALID_VALUE;
  {
    std::lock_guard<std::mutex> flight(g_flight_mu);
    Touch hit{};
    if (in_flight(ptr, ptr + size, hit)) {
      violation("cuMemUnmap(" + hex(ptr) + ", " + std::to_string(size) + ") while queued stream work will touch [" +
                hex(hit.lo) + ", " + hex(hit.hi) + "): a running kernel would use unmapped memory");
    }
  }
  void* p = mmap(reinterpret_cast<void*>(ptr), size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_INVALID_VALUE;
  for (auto m = first; m != it;) {
    auto h = g_handles.find(m->second.handle);
    if (--h->second.mappings == 0 && h->second.fd < 0) g_handles.erase(h);
    m = g_mapped.erase(m);
  }
  return CUDA_SUCCESS;
}

CUresult f_cuMemExportToShareableHandle(void* out, CUmemGenericAllocationHandle h, CUmemAllocationHandleType type,
                                        unsigned long long flags) {
  std::shared_lock<std::shared_mutex> lock(g_vmm_mu);
  auto it = g_handles.find(h);
  if (!out || flags || it == g_handles.end() || it->second.fd < 0) return CUDA_ERROR_INVALID_VALUE;
  if (type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR || !it->second.shareable) return CUDA_ERROR_INVALID_VALUE;
  const int fd = fcntl(it->second.fd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  *static_cast<int*>(out) = fd;
  return CUDA_SUCCESS;
}

/// The device of a chunk made by this fake (in this or another process), from its memfd's name
/// ("/memfd:fake-cuda-chunk-dev<N> (deleted)"); -1 for any other file.
int chunk_device(int fd) {
  char target[256] = {};
  const std::string link = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = readlink(link.c_str(), target, sizeof(target) - 1);
  const std::string prefix = std::string("/memfd:") + kChunkName;
  if (n <= 0 || std::strncmp(target, prefix.c_str(), prefix.size()) != 0) return -1;
  return std::atoi(target + prefix.size());
}

CUresult f_cuMemImportFromShareableHandle(CUmemGenericAllocationHandle* h, void* os_handle, CUmemAllocationHandleType type) {
  NEED_CTX();
  if (!h || type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) return CUDA_ERROR_INVALID_VALUE;
  const int fd = static_cast<int>(reinterpret_cast<std::uintptr_t>(os_handle));
  struct stat st {};
  if (fstat(fd, &st) != 0 || st.st_size <= 0 || !granular(static_cast<std::size_t>(st.st_size))) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  const int device = chunk_device(fd);
  if (device < 0) return CUDA_ERROR_INVALID_VALUE;  // not a chunk of this fake
  std::unique_lock<std::shared_mutex> lock(g_vmm_mu);
  const int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  *h = g_next_handle++;
  g_handles[*h] = Phys{own, static_cast<std::size_t>(st.st_size), device, true};
  return CUDA_SUCCESS;
}

// ---- plain allocations ------------------------------------------------------------------------

CUresult f_cuMemAlloc(CUdeviceptr* p, size_t n) {
  COUNT_CALL();
  NEED_CTX();
  if (capture_forbids("cuMemAlloc")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  void* m = std::malloc(n ? n : 1);
  if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
  std::lock_guard<std::mutex> lock(g_mem_mu);
  g_allocs[reinterpret_cast<std::uintptr_t>(m)] = Alloc{n, t_current->device};
  *p = reinterpret_cast<CUdeviceptr>(m);
  return CUDA_SUCCESS;
}
CUresult free_tracked(std::uintptr_t p, bool device) {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  auto it = g_allocs.find(p);
  if (it == g_allocs.end() || (it->second.device >= 0) != device) return CUDA_ERROR_INVALID_VALUE;
  g_allocs.erase(it);
  std::free(reinterpret_cast<void*>(p));
  return CUDA_SUCCESS;
}
CUresult f_cuMemFree(CUdeviceptr p) {
  COUNT_CALL();
  NEED_CTX();
  if (capture_forbids("cuMemFree")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  return free_tracked(p, true);
}
CUresult f_cuMemHostAlloc(void** pp, size_t n, unsigned int) {
  NEED_CTX();
  if (capture_forbids("cuMemHostAlloc")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  void* m = std::malloc(n ? n : 1);
  if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
  std::lock_guard<std::mutex> lock(g_mem_mu);
  g_allocs[reinterpret_cast<std::uintptr_t>(m)] = Alloc{n, -1};
  *pp = m;
  return CUDA_SUCCESS;
}
CUresult f_cuMemFreeHost(void* p) {
  NEED_CTX();
  if (capture_forbids("cuMemFreeHost")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  return free_tracked(reinterpret_cast<std::uintptr_t>(p), false);
}
// Registered host memory: pinned for pointer attributes until unregistered; registering a range
// that overlaps one already registered fails as in CUDA, and so does unregistering an unknown base.
std::map<std::uintptr_t, std::size_t> g_registered;
CUresult f_cuMemHostRegister(void* p, size_t n, unsigned int) {
  COUNT_CALL();
  NEED_CTX();
  if (!p || !n) return CUDA_ERROR_INVALID_VALUE;
  const auto lo = reinterpret_cast<std::uintptr_t>(p);
  std::lock_guard<std::mutex> lock(g_mem_mu);
  auto it = g_registered.lower_bound(lo);
  if ((it != g_registered.end() && it->first < lo + n) ||
      (it != g_registered.begin() && std::prev(it)->first + std::prev(it)->second > lo)) {
    return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
  }
  g_registered[lo] = n;
  g_allocs[lo] = Alloc{n, -1};
  return CUDA_SUCCESS;
}
CUresult f_cuMemHostUnregister(void* p) {
  COUNT_CALL();
  NEED_CTX();
  std::lock_guard<std::mutex> lock(g_mem_mu);
  const auto lo = reinterpret_cast<std::uintptr_t>(p);
  if (!g_registered.erase(lo)) return CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
  g_allocs.erase(lo);
  return CUDA_SUCCESS;
}

CUresult f_cuPointerGetAttributes(unsigned int n, CUpointer_attribute* attrs, void** data, CUdeviceptr ptr) {
  COUNT_CALL();
  NEED_CTX();
  std::uintptr_t base = 0;
  Alloc a{};
  bool known = find_alloc(ptr, base, a);
  const bool vmm = !known;
  if (!known) {
    std::shared_lock<std::shared_mutex> lock(g_vmm_mu);
    known = mapped_span(ptr, 1, false, &a.device);
    auto it = g_reserved.upper_bound(ptr);  // VMM memory: the range is the reservation, as in CUDA
    if (known && it != g_reserved.begin()) {
      --it;
      base = it->first;
      a.size = it->second;
    }
  }
  for (unsigned i = 0; i < n; ++i) {
    switch (attrs[i]) {
      case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
        *static_cast<unsigned int*>(data[i]) =
            !known ? 0u : static_cast<unsigned int>(a.device >= 0 ? CU_MEMORYTYPE_DEVICE : CU_MEMORYTYPE_HOST);
        break;
      case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
        *static_cast<int*>(data[i]) = known && a.device >= 0 ? a.device : -2;
        break;
      case CU_POINTER_ATTRIBUTE_IS_MANAGED:
        *static_cast<unsigned int*>(data[i]) = 0;
        break;
      case CU_POINTER_ATTRIBUTE_DEVICE_POINTER:
        if (!known) return CUDA_ERROR_INVALID_VALUE;
        *static_cast<CUdeviceptr*>(data[i]) = ptr;
        break;
      case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
        if (!known) return CUDA_ERROR_INVALID_VALUE;
        *static_cast<CUdeviceptr*>(data[i]) = base;
        break;
      case CU_POINTER_ATTRIBUTE_RANGE_SIZE:
        if (!known) return CUDA_ERROR_INVALID_VALUE;
        *static_cast<size_t*>(data[i]) = a.size;
        break;
      case CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:
        *static_cast<int*>(data[i]) = known && !vmm && a.device >= 0;
        break;
      default:
        return CUDA_ERROR_INVALID_VALUE;
    }
  }
  return CUDA_SUCCESS;
}

CUresult f_cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n);

/// One attribute: the same answers as cuPointerGetAttributes.
CUresult f_cuPointerGetAttribute(void* data, CUpointer_attribute attr, CUdeviceptr ptr) {
  COUNT_CALL();
  void* out[] = {data};
  return f_cuPointerGetAttributes(1, &attr, out, ptr);
}
/// Base and size of the cuMemAlloc allocation containing `ptr` (VMM memory: the mapping, as CUDA does).
CUresult f_cuMemGetAddressRange(CUdeviceptr* pbase, size_t* psize, CUdeviceptr ptr) {
  COUNT_CALL();
  NEED_CTX();
  std::uintptr_t base;
  Alloc a{};
  if (find_alloc(ptr, base, a) && a.device >= 0) {
    if (pbase) *pbase = base;
    if (psize) *psize = a.size;
    return CUDA_SUCCESS;
  }
  std::shared_lock<std::shared_mutex> lock(g_vmm_mu);
  auto it = g_mapped.upper_bound(ptr);
  if (it == g_mapped.begin()) return CUDA_ERROR_NOT_FOUND;
  --it;
  if (ptr >= it->first + it->second.size) return CUDA_ERROR_NOT_FOUND;
  if (pbase) *pbase = it->first;
  if (psize) *psize = it->second.size;
  return CUDA_SUCCESS;
}
/// The device of the current context.
CUresult f_cuCtxGetDevice(CUdevice* d) {
  NEED_CTX();
  *d = t_current->device;
  return CUDA_SUCCESS;
}
/// cuCtxGetDevice as 13.0 hands it out: the context is an argument (NULL: the current one).
CUresult f_cuCtxGetDevice_v2(CUdevice* d, CUcontext ctx) {
  if (!ctx) return f_cuCtxGetDevice(d);
  *d = reinterpret_cast<Ctx*>(ctx)->device;
  return CUDA_SUCCESS;
}
/// Pitched allocation: rows padded to 512 bytes (ElementSizeBytes must be 4, 8 or 16, as in CUDA).
CUresult f_cuMemAllocPitch(CUdeviceptr* p, size_t* pitch, size_t width, size_t height, unsigned int elem) {
  COUNT_CALL();
  if (!p || !pitch || (elem != 4 && elem != 8 && elem != 16) || width == 0 || height == 0) return CUDA_ERROR_INVALID_VALUE;
  *pitch = (width + 511) / 512 * 512;
  return f_cuMemAlloc(p, *pitch * height);
}
CUresult f_cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t n) {
  return f_cuMemcpy(dst, reinterpret_cast<CUdeviceptr>(src), n);
}
CUresult f_cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t n) {
  return f_cuMemcpy(reinterpret_cast<CUdeviceptr>(dst), src, n);
}
/// Legacy IPC: a handle naming the allocation for cuMemAlloc memory; VMM memory cannot be shared this way.
CUresult f_cuIpcGetMemHandle(CUipcMemHandle* h, CUdeviceptr ptr) {
  COUNT_CALL();
  std::uintptr_t base;
  Alloc a{};
  if (!h || !find_alloc(ptr, base, a) || a.device < 0) return CUDA_ERROR_INVALID_VALUE;
  std::memset(h, 0, sizeof(*h));
  std::memcpy(h->reserved, &base, sizeof(base));
  return CUDA_SUCCESS;
}

CUresult f_cuDeviceCanAccessPeer(int* can, CUdevice a, CUdevice b) {
  if (a < 0 || b < 0 || a >= device_count() || b >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
  *can = a != b;
  return CUDA_SUCCESS;
}
CUresult f_cuCtxEnablePeerAccess(CUcontext peer, unsigned int) {
  NEED_CTX();
  const int owner = reinterpret_cast<Ctx*>(peer)->device;
  if (owner == t_current->device) return CUDA_ERROR_INVALID_DEVICE;
  std::lock_guard<std::mutex> lock(g_mem_mu);
  if (!g_peer.insert({t_current->device, owner}).second) return CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED;
  return CUDA_SUCCESS;
}

// ---- streams ----------------------------------------------------------------------------------

CUresult f_cuStreamCreate(CUstream* s, unsigned int flags) {
  NEED_CTX();
  Stream* st = new_stream(t_current->device, !(flags & CU_STREAM_NON_BLOCKING));
  if (const char* env = std::getenv("FAKE_CUDA_COPY_DELAY_US")) st->delay_us = static_cast<unsigned>(std::atoi(env));
  *s = reinterpret_cast<CUstream>(st);
  return CUDA_SUCCESS;
}
CUresult f_cuStreamDestroy(CUstream s) {
  if (!s) return CUDA_ERROR_INVALID_HANDLE;
  Stream* st = reinterpret_cast<Stream*>(s);
  st->sync();
  {
    std::lock_guard<std::mutex> lock(g_streams_mu);
    g_streams.erase(st);
  }
  delete st;
  return CUDA_SUCCESS;
}
CUresult f_cuStreamSynchronize(CUstream s) {
  Stream* st = stream_of(s);
  if (!st) return CUDA_ERROR_INVALID_CONTEXT;
  if ((!s || st->capturing) && capture_forbids(s ? "cuStreamSynchronize(capturing stream)" : "cuStreamSynchronize(legacy stream)")) {
    return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  }
  st->sync();
  return CUDA_SUCCESS;
}
/// Waits for every stream of `ctx`'s device, legacy included.
CUresult sync_context(Ctx* ctx) {
  if (capture_forbids("cuCtxSynchronize")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  legacy(ctx->device);
  std::lock_guard<std::mutex> lock(g_streams_mu);  // a stream destroyed meanwhile waits for this
  for (Stream* st : g_streams) {
    if (st->device == ctx->device) st->sync();
  }
  return CUDA_SUCCESS;
}
/// cuCtxSynchronize as drivers before 13.0 hand it out: the current context.
CUresult f_cuCtxSynchronize() {
  COUNT_CALL();
  NEED_CTX();
  return sync_context(t_current);
}
/// cuCtxSynchronize as 13.0 hands it out (PFN_cuCtxSynchronize_v13000): the context is an argument,
/// NULL meaning the current one. Anything that is not a context is refused as a real driver does,
/// so a caller using the old signature (no argument: a garbage register) fails here as on a GPU.
CUresult f_cuCtxSynchronize_v2(CUcontext ctx) {
  COUNT_CALL();
  if (!ctx) {
    NEED_CTX();
    return sync_context(t_current);
  }
  auto* c = reinterpret_cast<Ctx*>(ctx);
  if (c < &g_ctx[0] || c >= &g_ctx[16]) return CUDA_ERROR_CONTEXT_IS_DESTROYED;
  return sync_context(c);
}
CUresult f_cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus* status) {
  Stream* st = stream_of(s);
  if (!st || !status) return CUDA_ERROR_INVALID_VALUE;
  if (!s && g_capturing_blocking.load() > 0) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
  *status = st->capturing ? CU_STREAM_CAPTURE_STATUS_ACTIVE : CU_STREAM_CAPTURE_STATUS_NONE;
  return CUDA_SUCCESS;
}
CUresult f_cuThreadExchangeStreamCaptureMode(CUstreamCaptureMode* mode) {
  if (!mode || *mode < CU_STREAM_CAPTURE_MODE_GLOBAL || *mode > CU_STREAM_CAPTURE_MODE_RELAXED) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  std::swap(t_capture_mode, *mode);
  return CUDA_SUCCESS;
}

/// A stream handle used with a call must belong to the current context, as in CUDA.
CUresult stream_in_ctx(CUstream s, Stream*& st) {
  if (!t_current) return CUDA_ERROR_INVALID_CONTEXT;
  st = stream_of(s);
  if (st->device != t_current->device) return CUDA_ERROR_INVALID_HANDLE;
  return CUDA_SUCCESS;
}

CUresult f_cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
  Stream* st = nullptr;
  if (CUresult r = stream_in_ctx(s, st)) return r;
  if (!range_ok(dst, n) || !range_ok(src, n)) return CUDA_ERROR_INVALID_VALUE;
  const unsigned delay = st->delay_us;
  push_touching(st, {{dst, dst + n}, {src, src + n}}, [=] {
    if (delay) std::this_thread::sleep_for(std::chrono::microseconds(delay));
    std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
  });
  // Pageable host memory: CUDA returns once the source is staged (H2D) or the copy is done (D2H).
  if (!tracked(dst) || !tracked(src)) st->sync();
  return CUDA_SUCCESS;
}
CUresult f_cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  if (capture_forbids("cuMemcpy")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  return f_cuMemcpyAsync(dst, src, n, nullptr) ?: f_cuStreamSynchronize(nullptr);
}
CUresult f_cuMemsetD8(CUdeviceptr dst, unsigned char v, size_t n) {
  Stream* st = nullptr;
  if (CUresult r = stream_in_ctx(nullptr, st)) return r;
  if (capture_forbids("cuMemsetD8")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  if (!range_ok(dst, n)) return CUDA_ERROR_INVALID_VALUE;
  push_touching(st, {{dst, dst + n}}, [=] { std::memset(reinterpret_cast<void*>(dst), v, n); });
  st->sync();
  return CUDA_SUCCESS;
}

// ---- events -----------------------------------------------------------------------------------

CUresult f_cuEventCreate(CUevent* e, unsigned int) {
  NEED_CTX();
  Event* ev = new Event();
  ev->device = t_current->device;
  *e = reinterpret_cast<CUevent>(ev);
  return CUDA_SUCCESS;
}
CUresult f_cuEventDestroy(CUevent e) {
  if (!e) return CUDA_ERROR_INVALID_HANDLE;
  delete reinterpret_cast<Event*>(e);  // queued records and waits keep its state alive
  return CUDA_SUCCESS;
}
CUresult f_cuEventRecord(CUevent e, CUstream s) {
  Stream* st = nullptr;
  if (CUresult r = stream_in_ctx(s, st)) return r;
  Event* ev = reinterpret_cast<Event*>(e);
  if (!ev || ev->device != st->device) return CUDA_ERROR_INVALID_HANDLE;  // event and stream of one context
  std::shared_ptr<EventState> state = ev->state;
  std::uint64_t gen;
  {
    std::lock_guard<std::mutex> lock(state->mu);
    state->captured = st->capturing;  // a record in a capture becomes a graph node, not a record
    if (state->captured) return CUDA_SUCCESS;
    gen = ++state->recorded;
  }
  st->push([state, gen] {
    std::lock_guard<std::mutex> lock(state->mu);
    if (state->completed < gen) state->completed = gen;
    state->cv.notify_all();
  });
  return CUDA_SUCCESS;
}
/// CUDA_ERROR_CAPTURED_EVENT for an event last recorded in a capture; UNSUPPORTED when the
/// capture mode forbids the call; else 0.
CUresult event_check(EventState& st, const char* call) {
  bool captured;
  {
    std::lock_guard<std::mutex> lock(st.mu);
    captured = st.captured;
  }
  if (captured) {
    violation(std::string(call) + " on an event last recorded in a capture: CUDA_ERROR_CAPTURED_EVENT");
    return CUDA_ERROR_CAPTURED_EVENT;
  }
  if (capture_forbids(call)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  return CUDA_SUCCESS;
}
CUresult f_cuEventQuery(CUevent e) {
  EventState& st = *reinterpret_cast<Event*>(e)->state;
  if (CUresult r = event_check(st, "cuEventQuery")) return r;
  std::lock_guard<std::mutex> lock(st.mu);
  return st.completed >= st.recorded ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}
CUresult f_cuEventSynchronize(CUevent e) {
  EventState& st = *reinterpret_cast<Event*>(e)->state;
  if (CUresult r = event_check(st, "cuEventSynchronize")) return r;
  st.wait_for(st.latest_record());
  return CUDA_SUCCESS;
}
/// FAKE_CUDA_WAIT_LAG_US=n: a stream reaches each of its event waits n microseconds late, as a busy
/// GPU stream would; lets tests check that nothing frees an event a stream is still to wait on.
unsigned wait_lag_us() {
  static const unsigned lag = [] {
    const char* env = std::getenv("FAKE_CUDA_WAIT_LAG_US");
    return env ? static_cast<unsigned>(std::atoi(env)) : 0u;
  }();
  return lag;
}
CUresult f_cuStreamWaitEvent(CUstream s, CUevent e, unsigned int) {
  Stream* st = nullptr;
  if (CUresult r = stream_in_ctx(s, st)) return r;
  std::shared_ptr<EventState> state = reinterpret_cast<Event*>(e)->state;  // may be of another context
  const std::uint64_t target = state->latest_record();
  const unsigned lag = wait_lag_us();
  st->push([state, target, lag] {
    if (lag) std::this_thread::sleep_for(std::chrono::microseconds(lag));
    state->wait_for(target);
  });
  return CUDA_SUCCESS;
}

CUresult f_unsupported() { return CUDA_ERROR_NOT_SUPPORTED; }

// FAKE_CUDA_LOG_UNSUPPORTED=1: each entry point the fake does not emulate gets a function of its own
// that names it on stderr when called, so a test can tell what a program (the CUDA runtime) needs.
constexpr int kNamedUnsupported = 512;
const char* g_unsupported_names[kNamedUnsupported] = {};
std::atomic<int> g_unsupported_used{0};
template <int I>
CUresult named_unsupported() {
  std::fprintf(stderr, "fake_cuda: %s called: not emulated, CUDA_ERROR_NOT_SUPPORTED\n", g_unsupported_names[I]);
  return CUDA_ERROR_NOT_SUPPORTED;
}
template <int... I>
constexpr std::array<void*, sizeof...(I)> named_table(std::integer_sequence<int, I...>) {
  return {reinterpret_cast<void*>(&named_unsupported<I>)...};
}
/// A function naming `symbol` when called (the plain f_unsupported once the table is full).
void* unsupported_for(const char* symbol) {
  static const std::array<void*, kNamedUnsupported> table = named_table(std::make_integer_sequence<int, kNamedUnsupported>{});
  static std::mutex mu;
  static std::map<std::string, int> given;
  std::lock_guard<std::mutex> lock(mu);
  auto it = given.find(symbol);
  if (it != given.end()) return table[it->second];
  const int i = g_unsupported_used.load();
  if (i >= kNamedUnsupported) return reinterpret_cast<void*>(&f_unsupported);
  g_unsupported_names[i] = strdup(symbol);
  g_unsupported_used.store(i + 1);
  given[symbol] = i;
  return table[i];
}

}  // namespace
extern "C" CUresult CUDAAPI cuGetProcAddress(const char* symbol, void** pfn, int version, cuuint64_t flags,
                                             CUdriverProcAddressQueryResult* status);
extern "C" int driver_version();
namespace {
CUresult f_cuDriverGetVersion(int* v) {
  if (!v) return CUDA_ERROR_INVALID_VALUE;
  *v = driver_version();
  return CUDA_SUCCESS;
}
/// cuGetProcAddress as drivers before 12.0 hand it out (no status argument).
CUresult f_cuGetProcAddress_v1(const char* symbol, void** pfn, int version, cuuint64_t flags) {
  return cuGetProcAddress(symbol, pfn, version, flags, nullptr);
}

/// One variant of an entry point: what cuGetProcAddress hands back for versions >= `since`.
struct Entry {
  const char* name;
  int since;
  void* fn;
};
// The variant cuda.h declares (the _v2 ones since 3020 for sizes, etc.), from its PFN version on.
#define E(name, since) Entry{#name, since, reinterpret_cast<void*>(static_cast<PFN_##name##_v##since>(&f_##name))}
const Entry kEntries[] = {
    E(cuInit, 2000), E(cuDeviceGetCount, 2000), E(cuDeviceGet, 2000), E(cuDeviceGetAttribute, 2000),
    E(cuDevicePrimaryCtxRetain, 7000), E(cuCtxGetCurrent, 4000), E(cuCtxSetCurrent, 4000), E(cuGetErrorName, 6000),
    E(cuMemGetAllocationGranularity, 10020), E(cuMemGetInfo, 3020), E(cuMemCreate, 10020), E(cuMemRelease, 10020),
    E(cuMemAddressReserve, 10020), E(cuMemAddressFree, 10020), E(cuMemMap, 10020), E(cuMemSetAccess, 10020),
    E(cuMemUnmap, 10020), E(cuMemExportToShareableHandle, 10020), E(cuMemImportFromShareableHandle, 10020),
    E(cuMemAlloc, 3020), E(cuMemFree, 3020), E(cuMemHostAlloc, 2020), E(cuMemFreeHost, 2000),
    E(cuMemHostRegister, 6050), E(cuMemHostUnregister, 4000),
    E(cuPointerGetAttributes, 7000), E(cuDeviceCanAccessPeer, 4000), E(cuCtxEnablePeerAccess, 4000),
    E(cuStreamCreate, 2000), E(cuStreamDestroy, 4000), E(cuStreamSynchronize, 2000),
    E(cuCtxSynchronize, 2000),
    Entry{"cuCtxSynchronize", 13000,
          reinterpret_cast<void*>(static_cast<PFN_cuCtxSynchronize_v13000>(&f_cuCtxSynchronize_v2))},
    E(cuStreamIsCapturing, 10000), E(cuThreadExchangeStreamCaptureMode, 10010), E(cuMemcpyAsync, 4000),
    E(cuMemcpy, 4000), E(cuMemsetD8, 3020), E(cuEventCreate, 2000), E(cuEventDestroy, 4000),
    E(cuEventRecord, 2000), E(cuEventQuery, 2000), E(cuEventSynchronize, 2000), E(cuStreamWaitEvent, 3020),
    E(cuPointerGetAttribute, 4000), E(cuMemGetAddressRange, 3020), E(cuCtxGetDevice, 2000),
    Entry{"cuCtxGetDevice", 13000, reinterpret_cast<void*>(static_cast<PFN_cuCtxGetDevice_v13000>(&f_cuCtxGetDevice_v2))},
    E(cuMemAllocPitch, 3020), E(cuMemcpyHtoD, 3020), E(cuMemcpyDtoH, 3020), E(cuIpcGetMemHandle, 4010),
    E(cuDriverGetVersion, 2020),
    Entry{"cuGetProcAddress", 11030, reinterpret_cast<void*>(static_cast<PFN_cuGetProcAddress_v11030>(&f_cuGetProcAddress_v1))},
    Entry{"cuGetProcAddress", 12000, reinterpret_cast<void*>(static_cast<PFN_cuGetProcAddress_v12000>(&cuGetProcAddress))},
};
#undef E

}  // namespace

extern "C" {

/// CUDA_VERSION, or FAKE_CUDA_DRIVER_VERSION=n to play an older (or newer) driver.
int driver_version() {
  const char* env = std::getenv("FAKE_CUDA_DRIVER_VERSION");
  return env && *env ? std::atoi(env) : CUDA_VERSION;
}

CUresult CUDAAPI cuDriverGetVersion(int* v) {
  *v = driver_version();
  return CUDA_SUCCESS;
}

// cuda.h maps cuGetProcAddress to cuGetProcAddress_v2. As the driver does, it hands back the newest
// variant of `symbol` whose version is <= the requested one (and <= the driver's), and reports
// VERSION_NOT_SUFFICIENT when every variant is newer than that.
CUresult CUDAAPI cuGetProcAddress(const char* symbol, void** pfn, int version, cuuint64_t,
                                  CUdriverProcAddressQueryResult* status) {
  if (!symbol || !*symbol || !pfn) {
    if (status) *status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    return CUDA_ERROR_INVALID_VALUE;
  }
  const int effective = std::min(version, driver_version());
  const Entry* best = nullptr;
  bool known = false;
  for (const Entry& e : kEntries) {
    if (std::strcmp(e.name, symbol) != 0) continue;
    known = true;
    if (e.since <= effective && (!best || e.since > best->since)) best = &e;
  }
  if (best) {
    *pfn = best->fn;
    if (status) *status = CU_GET_PROC_ADDRESS_SUCCESS;
    return CUDA_SUCCESS;
  }
  if (known) {
    *pfn = nullptr;
    if (status) *status = CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT;
    return CUDA_ERROR_NOT_FOUND;
  }
  // Everything else exists but answers CUDA_ERROR_NOT_SUPPORTED (FAKE_CUDA_LOG_UNSUPPORTED=1 names each).
  const char* log = std::getenv("FAKE_CUDA_LOG_UNSUPPORTED");
  *pfn = log && *log == '1' ? unsupported_for(symbol) : reinterpret_cast<void*>(&f_unsupported);
  if (status) *status = CU_GET_PROC_ADDRESS_SUCCESS;
  return CUDA_SUCCESS;
}

// ---- exported symbols: what a program linked with -lcuda calls directly (cuda.h's names) ----
// The driver exports every entry point under its versioned name; the fake exports those its own
// tests' programs call (tests/shim/programs), each the variant cuda.h declares.
CUresult CUDAAPI cuInit(unsigned int flags) { return f_cuInit(flags); }
CUresult CUDAAPI cuDeviceGetCount(int* n) { return f_cuDeviceGetCount(n); }
CUresult CUDAAPI cuDeviceGet(CUdevice* d, int ordinal) { return f_cuDeviceGet(d, ordinal); }
CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) { return f_cuDevicePrimaryCtxRetain(c, d); }
CUresult CUDAAPI cuCtxSetCurrent(CUcontext c) { return f_cuCtxSetCurrent(c); }
CUresult CUDAAPI cuCtxGetCurrent(CUcontext* c) { return f_cuCtxGetCurrent(c); }
CUresult CUDAAPI cuCtxGetDevice(CUdevice* d) { return f_cuCtxGetDevice(d); }
CUresult CUDAAPI cuCtxSynchronize(void) { return f_cuCtxSynchronize(); }
CUresult CUDAAPI cuGetErrorName(CUresult r, const char** name) { return f_cuGetErrorName(r, name); }
CUresult CUDAAPI cuMemAlloc(CUdeviceptr* p, size_t n) { return f_cuMemAlloc(p, n); }
CUresult CUDAAPI cuMemAllocPitch(CUdeviceptr* p, size_t* pitch, size_t w, size_t h, unsigned int e) {
  return f_cuMemAllocPitch(p, pitch, w, h, e);
}
CUresult CUDAAPI cuMemFree(CUdeviceptr p) { return f_cuMemFree(p); }
CUresult CUDAAPI cuMemGetInfo(size_t* free_b, size_t* total) { return f_cuMemGetInfo(free_b, total); }
CUresult CUDAAPI cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t n) { return f_cuMemcpyHtoD(dst, src, n); }
CUresult CUDAAPI cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t n) { return f_cuMemcpyDtoH(dst, src, n); }
CUresult CUDAAPI cuMemGetAddressRange(CUdeviceptr* b, size_t* s, CUdeviceptr p) { return f_cuMemGetAddressRange(b, s, p); }
CUresult CUDAAPI cuPointerGetAttribute(void* data, CUpointer_attribute a, CUdeviceptr p) {
  return f_cuPointerGetAttribute(data, a, p);
}
CUresult CUDAAPI cuPointerGetAttributes(unsigned int n, CUpointer_attribute* a, void** d, CUdeviceptr p) {
  return f_cuPointerGetAttributes(n, a, d, p);
}
CUresult CUDAAPI cuIpcGetMemHandle(CUipcMemHandle* h, CUdeviceptr p) { return f_cuIpcGetMemHandle(h, p); }
CUresult CUDAAPI cuStreamCreate(CUstream* s, unsigned int flags) { return f_cuStreamCreate(s, flags); }
CUresult CUDAAPI cuStreamDestroy(CUstream s) { return f_cuStreamDestroy(s); }
CUresult CUDAAPI cuStreamSynchronize(CUstream s) { return f_cuStreamSynchronize(s); }
CUresult CUDAAPI cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
  return f_cuMemcpyAsync(dst, src, n, s);
}

/// Calls of entry point `name` so far ("cuMemAlloc", "cuMemCreate", "cuCtxSynchronize", ...).
long fake_calls(const char* name) {
  std::lock_guard<std::mutex> lock(g_calls_mu);
  auto it = g_calls.find(name);
  return it == g_calls.end() ? 0 : it->second;
}

// ---- test helpers: no context needed ----

/// The next `n` cuMemCreate calls succeed (within the other limits), those after fail with
/// CUDA_ERROR_OUT_OF_MEMORY; n < 0: no such limit.
void fake_fail_creates_after(long n) { g_creates_left.store(n); }

void* fake_alloc_device(int device, size_t n) {
  Ctx* saved = t_current;
  t_current = &g_ctx[device];
  CUdeviceptr p = 0;
  f_cuMemAlloc(&p, n);
  t_current = saved;
  return reinterpret_cast<void*>(p);
}
void* fake_alloc_pinned(size_t n) {
  Ctx* saved = t_current;
  t_current = &g_ctx[0];
  void* p = nullptr;
  f_cuMemHostAlloc(&p, n, 0);
  t_current = saved;
  return p;
}
int fake_free(void* p) {
  std::uintptr_t base;
  Alloc a;
  if (!find_alloc(reinterpret_cast<std::uintptr_t>(p), base, a)) return -1;
  return free_tracked(base, a.device >= 0);
}
/// A blocking stream (as cuStreamCreate(0)) of `device`, like a framework's compute stream.
void* fake_stream_create(int device) { return new_stream(device, true); }
void fake_stream_destroy(void* s) { f_cuStreamDestroy(reinterpret_cast<CUstream>(s)); }
void fake_stream_sleep(void* s, unsigned us) {
  reinterpret_cast<Stream*>(s)->push([us] { std::this_thread::sleep_for(std::chrono::microseconds(us)); });
}
/// A copy queued on `s` (a "kernel" writing dst); its ranges count as in flight until it has run.
void fake_stream_memcpy(void* s, void* dst, const void* src, size_t n) {
  const auto d = reinterpret_cast<std::uintptr_t>(dst), r = reinterpret_cast<std::uintptr_t>(src);
  push_touching(reinterpret_cast<Stream*>(s), {{d, d + n}, {r, r + n}}, [=] { std::memcpy(dst, src, n); });
}
void fake_stream_sync(void* s) { reinterpret_cast<Stream*>(s)->sync(); }
void fake_legacy_sync(int device) { legacy(device)->sync(); }
int fake_live_allocations() {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  return static_cast<int>(g_allocs.size());
}
/// Bytes of host memory registered (cuMemHostRegister) and not unregistered.
size_t fake_registered_bytes() {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  size_t n = 0;
  for (const auto& [p, size] : g_registered) n += size;
  return n;
}
int fake_peer_enabled(int accessor, int owner) {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  return g_peer.count({accessor, owner}) ? 1 : 0;
}
/// Physical VMM allocations still alive (unreleased, or released but still mapped).
int fake_live_vmm_handles() {
  std::shared_lock<std::shared_mutex> lock(g_vmm_mu);
  return static_cast<int>(g_handles.size());
}
/// VA reservations not freed, and mappings not unmapped.
int fake_live_reservations() {
  std::shared_lock<std::shared_mutex> lock(g_vmm_mu);
  return static_cast<int>(g_reserved.size());
}
int fake_live_mappings() {
  std::shared_lock<std::shared_mutex> lock(g_vmm_mu);
  return static_cast<int>(g_mapped.size());
}
/// Hazards and forbidden calls seen so far (see the top of this file).
int fake_violations() { return g_violations.load(); }
/// Starts (on != 0) or ends a global-mode capture on stream `s`, owned by the calling thread.
int fake_set_capturing(void* s, int on) {
  Stream* st = reinterpret_cast<Stream*>(s);
  if (!st || st->capturing == (on != 0)) return -1;
  st->capturing = on != 0;
  const int d = on ? 1 : -1;
  g_capturing.fetch_add(d);
  if (st->blocking) g_capturing_blocking.fetch_add(d);
  t_owned_captures += d;
  return 0;
}
/// The calling thread's capture mode (a CUstreamCaptureMode).
int fake_thread_capture_mode() { return static_cast<int>(t_capture_mode); }

}  // extern "C"
