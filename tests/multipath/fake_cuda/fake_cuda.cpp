// A fake libcuda.so.1 for testing glake's cuda backend code paths on machines without a GPU.
//
// NOT a GPU and not a measurement of one. It gives the CUDA driver API's *semantics* that the
// multipath engine depends on, on host memory:
//   - device memory (cuMemAlloc) and pinned memory (cuMemHostAlloc) are tracked host allocations;
//     cuPointerGetAttributes answers from that table; anything else is "pageable";
//   - every stream is a thread draining a FIFO, so copies really are asynchronous to the caller;
//   - events count records and completions: cuEventSynchronize / cuStreamWaitEvent wait for the
//     latest record at call time, as CUDA does; an event may be destroyed while queued work still
//     records or waits on it (CUDA frees it once that work is done);
//   - FAKE_CUDA_COPY_DELAY_US=n delays every copy on streams made by cuStreamCreate (glake's own
//     streams) by n microseconds, so tests can make the engine's copies lag the caller's stream;
//   - FAKE_CUDA_WAIT_LAG_US=n makes every stream reach its event waits n microseconds late;
//   - calls check what CUDA checks and glake could get wrong: a current context, streams and events
//     of the current context, copies that run past the end of a device allocation.
// Test helpers (extern "C" fake_*) let tests make streams, delay them and count live allocations.
#include <cuda.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>

namespace {

int device_count() {
  const char* env = std::getenv("FAKE_CUDA_DEVICES");
  return env ? std::atoi(env) : 2;
}

struct Ctx {
  int device;
};
Ctx g_ctx[16] = {{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}, {8}, {9}, {10}, {11}, {12}, {13}, {14}, {15}};
thread_local Ctx* t_current = nullptr;

struct Alloc {
  std::size_t size;
  int device;  // -1 for pinned host memory
};
std::mutex g_mem_mu;
std::map<std::uintptr_t, Alloc> g_allocs;
std::set<std::pair<int, int>> g_peer;  // (accessor, owner)

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

/// A range [p, p + n) is fine if it is not tracked memory, or lies inside one allocation.
bool range_ok(std::uintptr_t p, std::size_t n) {
  std::uintptr_t base;
  Alloc a;
  if (!find_alloc(p, base, a)) return true;
  return p + n <= base + a.size;
}

bool tracked(std::uintptr_t p) {
  std::uintptr_t base;
  Alloc a;
  return find_alloc(p, base, a);
}

struct Stream {
  explicit Stream(int dev) : device(dev), thread([this] { run(); }) {}
  ~Stream() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    cv.notify_all();
    thread.join();
  }
  void push(std::function<void()> op) {
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
  unsigned delay_us = 0;  // added before every copy (FAKE_CUDA_COPY_DELAY_US, cuStreamCreate streams)
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> ops;
  std::uint64_t pushed = 0, done = 0;
  bool stop = false;
  std::thread thread;  // last: starts after the members above exist
};

/// What streams touch of an event. Stream ops hold it by shared_ptr, so cuEventDestroy can free the
/// handle while work that records or waits on it is still queued, as CUDA allows.
struct EventState {
  std::mutex mu;
  std::condition_variable cv;
  std::uint64_t recorded = 0, completed = 0;
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
  if (!g_legacy[device]) g_legacy[device] = new Stream(device);  // lives for the process
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
    case CUDA_SUCCESS: *name = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *name = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case CUDA_ERROR_INVALID_HANDLE: *name = "CUDA_ERROR_INVALID_HANDLE"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *name = "CUDA_ERROR_NOT_SUPPORTED"; break;
    case CUDA_ERROR_NOT_READY: *name = "CUDA_ERROR_NOT_READY"; break;
    case CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED: *name = "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED"; break;
    default: *name = "CUDA_ERROR_UNKNOWN"; break;
  }
  return CUDA_SUCCESS;
}
CUresult f_cuMemGetAllocationGranularity(size_t* g, const CUmemAllocationProp*, CUmemAllocationGranularity_flags) {
  *g = 2u << 20;
  return CUDA_SUCCESS;
}
CUresult f_cuMemGetInfo(size_t* free_b, size_t* total) { *free_b = 70ull << 30; *total = 80ull << 30; return CUDA_SUCCESS; }

CUresult f_cuMemAlloc(CUdeviceptr* p, size_t n) {
  NEED_CTX();
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
CUresult f_cuMemFree(CUdeviceptr p) { NEED_CTX(); return free_tracked(p, true); }
CUresult f_cuMemHostAlloc(void** pp, size_t n, unsigned int) {
  NEED_CTX();
  void* m = std::malloc(n ? n : 1);
  if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
  std::lock_guard<std::mutex> lock(g_mem_mu);
  g_allocs[reinterpret_cast<std::uintptr_t>(m)] = Alloc{n, -1};
  *pp = m;
  return CUDA_SUCCESS;
}
CUresult f_cuMemFreeHost(void* p) { NEED_CTX(); return free_tracked(reinterpret_cast<std::uintptr_t>(p), false); }

CUresult f_cuPointerGetAttributes(unsigned int n, CUpointer_attribute* attrs, void** data, CUdeviceptr ptr) {
  NEED_CTX();
  std::uintptr_t base;
  Alloc a{};
  const bool known = find_alloc(ptr, base, a);
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
      default:
        return CUDA_ERROR_INVALID_VALUE;
    }
  }
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

CUresult f_cuStreamCreate(CUstream* s, unsigned int) {
  NEED_CTX();
  Stream* st = new Stream(t_current->device);
  if (const char* env = std::getenv("FAKE_CUDA_COPY_DELAY_US")) st->delay_us = static_cast<unsigned>(std::atoi(env));
  *s = reinterpret_cast<CUstream>(st);
  return CUDA_SUCCESS;
}
CUresult f_cuStreamDestroy(CUstream s) {
  if (!s) return CUDA_ERROR_INVALID_HANDLE;
  Stream* st = reinterpret_cast<Stream*>(s);
  st->sync();
  delete st;
  return CUDA_SUCCESS;
}
CUresult f_cuStreamSynchronize(CUstream s) {
  Stream* st = stream_of(s);
  if (!st) return CUDA_ERROR_INVALID_CONTEXT;
  st->sync();
  return CUDA_SUCCESS;
}
CUresult f_cuStreamIsCapturing(CUstream, CUstreamCaptureStatus* status) {
  *status = CU_STREAM_CAPTURE_STATUS_NONE;
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
  st->push([=] {
    if (delay) std::this_thread::sleep_for(std::chrono::microseconds(delay));
    std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
  });
  // Pageable host memory: CUDA returns once the source is staged (H2D) or the copy is done (D2H).
  if (!tracked(dst) || !tracked(src)) st->sync();
  return CUDA_SUCCESS;
}
CUresult f_cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) { return f_cuMemcpyAsync(dst, src, n, nullptr) ?: f_cuStreamSynchronize(nullptr); }
CUresult f_cuMemsetD8(CUdeviceptr dst, unsigned char v, size_t n) {
  Stream* st = nullptr;
  if (CUresult r = stream_in_ctx(nullptr, st)) return r;
  if (!range_ok(dst, n)) return CUDA_ERROR_INVALID_VALUE;
  st->push([=] { std::memset(reinterpret_cast<void*>(dst), v, n); });
  st->sync();
  return CUDA_SUCCESS;
}

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
    gen = ++state->recorded;
  }
  st->push([state, gen] {
    std::lock_guard<std::mutex> lock(state->mu);
    if (state->completed < gen) state->completed = gen;
    state->cv.notify_all();
  });
  return CUDA_SUCCESS;
}
CUresult f_cuEventQuery(CUevent e) {
  EventState& st = *reinterpret_cast<Event*>(e)->state;
  std::lock_guard<std::mutex> lock(st.mu);
  return st.completed >= st.recorded ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}
CUresult f_cuEventSynchronize(CUevent e) {
  EventState& st = *reinterpret_cast<Event*>(e)->state;
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

struct Entry {
  const char* name;
  void* fn;
};
#define E(name) Entry{#name, reinterpret_cast<void*>(static_cast<decltype(&::name)>(&f_##name))}
const Entry kEntries[] = {
    E(cuInit), E(cuDeviceGetCount), E(cuDeviceGet), E(cuDeviceGetAttribute), E(cuDevicePrimaryCtxRetain),
    E(cuCtxGetCurrent), E(cuCtxSetCurrent), E(cuGetErrorName), E(cuMemGetAllocationGranularity), E(cuMemGetInfo),
    E(cuMemAlloc), E(cuMemFree), E(cuMemHostAlloc), E(cuMemFreeHost), E(cuPointerGetAttributes),
    E(cuDeviceCanAccessPeer), E(cuCtxEnablePeerAccess), E(cuStreamCreate), E(cuStreamDestroy),
    E(cuStreamSynchronize), E(cuStreamIsCapturing), E(cuMemcpyAsync), E(cuMemcpy), E(cuMemsetD8), E(cuEventCreate),
    E(cuEventDestroy), E(cuEventRecord), E(cuEventQuery), E(cuEventSynchronize), E(cuStreamWaitEvent),
};
#undef E

}  // namespace

extern "C" {

CUresult CUDAAPI cuDriverGetVersion(int* v) {
  *v = CUDA_VERSION;
  return CUDA_SUCCESS;
}

// cuda.h maps cuGetProcAddress to cuGetProcAddress_v2.
CUresult CUDAAPI cuGetProcAddress(const char* symbol, void** pfn, int, cuuint64_t, CUdriverProcAddressQueryResult* status) {
  for (const Entry& e : kEntries) {
    if (std::strcmp(e.name, symbol) == 0) {
      *pfn = e.fn;
      if (status) *status = CU_GET_PROC_ADDRESS_SUCCESS;
      return CUDA_SUCCESS;
    }
  }
  // Everything else (VMM calls, ...) exists but answers CUDA_ERROR_NOT_SUPPORTED.
  *pfn = reinterpret_cast<void*>(&f_unsupported);
  if (status) *status = CU_GET_PROC_ADDRESS_SUCCESS;
  return CUDA_SUCCESS;
}

// ---- test helpers: no context needed ----

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
void* fake_stream_create(int device) { return new Stream(device); }
void fake_stream_destroy(void* s) { f_cuStreamDestroy(reinterpret_cast<CUstream>(s)); }
void fake_stream_sleep(void* s, unsigned us) {
  reinterpret_cast<Stream*>(s)->push([us] { std::this_thread::sleep_for(std::chrono::microseconds(us)); });
}
void fake_stream_memcpy(void* s, void* dst, const void* src, size_t n) {
  reinterpret_cast<Stream*>(s)->push([=] { std::memcpy(dst, src, n); });
}
void fake_stream_sync(void* s) { reinterpret_cast<Stream*>(s)->sync(); }
void fake_legacy_sync(int device) { legacy(device)->sync(); }
int fake_live_allocations() {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  return static_cast<int>(g_allocs.size());
}
int fake_peer_enabled(int accessor, int owner) {
  std::lock_guard<std::mutex> lock(g_mem_mu);
  return g_peer.count({accessor, owner}) ? 1 : 0;
}

}  // extern "C"
