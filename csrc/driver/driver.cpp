#include "driver/driver.h"

#include <chrono>
#include <cstdlib>
#include <mutex>

#include "driver/host_driver.h"
#ifdef GLAKE_HAVE_CUDA
#include "driver/cuda_driver.h"
#endif

namespace glake {

namespace {

/// Times one driver call and records it under `op`.
class OpTimer {
 public:
  OpTimer(DriverStats& stats, DriverOp op)
      : stats_(stats), op_(op), start_(std::chrono::steady_clock::now()) {}
  ~OpTimer() {
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now() - start_).count();
    stats_.record(op_, static_cast<std::uint64_t>(ns));
  }

 private:
  DriverStats& stats_;
  DriverOp op_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace

const char* op_name(DriverOp op) {
  switch (op) {
    case DriverOp::Create: return "create";
    case DriverOp::Release: return "release";
    case DriverOp::Reserve: return "reserve";
    case DriverOp::FreeVa: return "free_va";
    case DriverOp::Map: return "map";
    case DriverOp::Unmap: return "unmap";
    case DriverOp::SetAccess: return "set_access";
    case DriverOp::Export: return "export";
    case DriverOp::Import: return "import";
    default: return "?";
  }
}

const char* memory_type_name(MemoryType type) {
  switch (type) {
    case MemoryType::Unknown: return "unknown";
    case MemoryType::Pageable: return "pageable";
    case MemoryType::Pinned: return "pinned";
    case MemoryType::Device: return "device";
    case MemoryType::Managed: return "managed";
    default: return "?";
  }
}

void DriverStats::record(DriverOp op, std::uint64_t ns) {
  calls[static_cast<int>(op)].fetch_add(1, std::memory_order_relaxed);
  time_ns[static_cast<int>(op)].fetch_add(ns, std::memory_order_relaxed);
}

void DriverStats::bump(std::atomic<std::int64_t>& cur, std::atomic<std::int64_t>& peak, std::int64_t delta) {
  const std::int64_t now = cur.fetch_add(delta, std::memory_order_relaxed) + delta;
  std::int64_t seen = peak.load(std::memory_order_relaxed);
  while (now > seen && !peak.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
  }
}

DriverStatsSnapshot DriverStats::snapshot() const {
  DriverStatsSnapshot s;
  for (int i = 0; i < static_cast<int>(DriverOp::kCount); ++i) {
    s.calls[i] = calls[i].load();
    s.time_ns[i] = time_ns[i].load();
  }
  s.chunks_created = chunks_created.load();
  s.chunks_released = chunks_released.load();
  s.chunks_live = s.chunks_created - s.chunks_released;
  s.physical_bytes = physical_bytes.load();
  s.physical_bytes_peak = physical_bytes_peak.load();
  s.reserved_va_bytes = reserved_va_bytes.load();
  s.reserved_va_bytes_peak = reserved_va_bytes_peak.load();
  s.ranges_live = ranges_live.load();
  s.mapped_bytes = mapped_bytes.load();
  s.mapped_bytes_peak = mapped_bytes_peak.load();
  return s;
}

void DriverStats::reset_peaks_and_times() {
  for (int i = 0; i < static_cast<int>(DriverOp::kCount); ++i) {
    calls[i] = 0;
    time_ns[i] = 0;
  }
  physical_bytes_peak = physical_bytes.load();
  reserved_va_bytes_peak = reserved_va_bytes.load();
  mapped_bytes_peak = mapped_bytes.load();
}

Driver::~Driver() = default;

void Driver::check_device(int device) {
  const int n = device_count();
  if (device < 0 || device >= n) {
    throw InvalidArgumentError(std::string(name()) + " backend: device " + std::to_string(device) +
                               " does not exist (" + std::to_string(n) + " device(s))");
  }
}

void Driver::check_aligned(int device, const char* what, std::size_t value, bool allow_zero) {
  const std::size_t g = granularity(device);
  if ((value == 0 && !allow_zero) || value % g != 0) {
    throw InvalidArgumentError(std::string(what) + "=" + std::to_string(value) +
                               " must be a positive multiple of the granularity (" + std::to_string(g) + ")");
  }
}

PhysHandle Driver::create(int device, std::size_t size) {
  check_device(device);
  check_aligned(device, "size", size);
  PhysHandle h;
  {
    OpTimer t(stats_, DriverOp::Create);
    h = do_create(device, size);
  }
  stats_.chunks_created.fetch_add(1, std::memory_order_relaxed);
  DriverStats::bump(stats_.physical_bytes, stats_.physical_bytes_peak, static_cast<std::int64_t>(size));
  return h;
}

void Driver::release(int device, PhysHandle handle, std::size_t size) {
  {
    OpTimer t(stats_, DriverOp::Release);
    do_release(device, handle);
  }
  stats_.chunks_released.fetch_add(1, std::memory_order_relaxed);
  stats_.physical_bytes.fetch_sub(static_cast<std::int64_t>(size), std::memory_order_relaxed);
}

DevPtr Driver::reserve(int device, std::size_t size, std::size_t alignment) {
  check_device(device);
  check_aligned(device, "size", size);
  if (alignment == 0) alignment = granularity(device);
  check_aligned(device, "alignment", alignment);
  if ((alignment & (alignment - 1)) != 0) {
    throw InvalidArgumentError("alignment=" + std::to_string(alignment) + " must be a power of two");
  }
  DevPtr va;
  {
    OpTimer t(stats_, DriverOp::Reserve);
    va = do_reserve(device, size, alignment);
  }
  stats_.ranges_live.fetch_add(1, std::memory_order_relaxed);
  DriverStats::bump(stats_.reserved_va_bytes, stats_.reserved_va_bytes_peak, static_cast<std::int64_t>(size));
  return va;
}

void Driver::free_va(int device, DevPtr va, std::size_t size) {
  {
    OpTimer t(stats_, DriverOp::FreeVa);
    do_free_va(device, va, size);
  }
  stats_.ranges_live.fetch_sub(1, std::memory_order_relaxed);
  stats_.reserved_va_bytes.fetch_sub(static_cast<std::int64_t>(size), std::memory_order_relaxed);
}

void Driver::map(int device, DevPtr va, std::size_t size, PhysHandle handle) {
  {
    OpTimer t(stats_, DriverOp::Map);
    do_map(device, va, size, handle);
  }
  DriverStats::bump(stats_.mapped_bytes, stats_.mapped_bytes_peak, static_cast<std::int64_t>(size));
}

void Driver::unmap(int device, DevPtr va, std::size_t size) {
  {
    OpTimer t(stats_, DriverOp::Unmap);
    do_unmap(device, va, size);
  }
  stats_.mapped_bytes.fetch_sub(static_cast<std::int64_t>(size), std::memory_order_relaxed);
}

void Driver::set_access(int device, DevPtr va, std::size_t size, bool read_only) {
  OpTimer t(stats_, DriverOp::SetAccess);
  do_set_access(device, va, size, read_only);
}

int Driver::export_fd(int device, PhysHandle handle) {
  OpTimer t(stats_, DriverOp::Export);
  return do_export_fd(device, handle);
}

PhysHandle Driver::import_fd(int device, int fd, std::size_t size) {
  check_device(device);
  check_aligned(device, "size", size);
  if (fd < 0) throw InvalidArgumentError("import_fd: fd=" + std::to_string(fd) + " is not a file descriptor");
  PhysHandle h;
  {
    OpTimer t(stats_, DriverOp::Import);
    h = do_import_fd(device, fd, size);
  }
  stats_.chunks_created.fetch_add(1, std::memory_order_relaxed);
  DriverStats::bump(stats_.physical_bytes, stats_.physical_bytes_peak, static_cast<std::int64_t>(size));
  return h;
}

namespace {
[[noreturn]] void unsupported(const Driver& d, const char* what) {
  throw Error(std::string(d.name()) + " backend does not support " + what);
}
}  // namespace

void Driver::stream_wait_event(int, StreamHandle, EventHandle) { unsupported(*this, "stream_wait_event"); }
DevPtr Driver::host_alloc_pinned(int, std::size_t) { unsupported(*this, "host_alloc_pinned"); }
void Driver::host_free_pinned(int, DevPtr) { unsupported(*this, "host_free_pinned"); }
void Driver::host_register(int, DevPtr, std::size_t) { unsupported(*this, "host_register"); }
void Driver::host_unregister(int, DevPtr) { unsupported(*this, "host_unregister"); }
DevPtr Driver::device_alloc(int, std::size_t) { unsupported(*this, "device_alloc"); }
void Driver::device_free(int, DevPtr) { unsupported(*this, "device_free"); }
PointerInfo Driver::pointer_info(int, DevPtr) { unsupported(*this, "pointer_info"); }
bool Driver::can_access_peer(int, int) { unsupported(*this, "can_access_peer"); }
void Driver::enable_peer_access(int, int) { unsupported(*this, "enable_peer_access"); }

bool cuda_backend_built() {
#ifdef GLAKE_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

namespace {

/// The process-wide cuda driver, created once; holds the reason when it cannot be.
struct CudaSlot {
  std::once_flag once;
  Driver* driver = nullptr;
  std::string reason;
};

/// The libcuda handle set by set_cuda_library (null: find it), and whether the backend was made.
struct CudaLibrary {
  std::mutex mutex;
  void* handle = nullptr;
  std::string description;
  bool used = false;
};

CudaLibrary& cuda_library() {
  static CudaLibrary* lib = new CudaLibrary();  // never destroyed: read by the backend at any time
  return *lib;
}

CudaSlot& cuda_slot() {
  static CudaSlot slot;
  std::call_once(slot.once, [] {
#ifdef GLAKE_HAVE_CUDA
    try {
      CudaLibrary& lib = cuda_library();
      void* handle = nullptr;
      std::string description;
      {
        std::lock_guard<std::mutex> lock(lib.mutex);
        lib.used = true;
        handle = lib.handle;
        description = lib.description;
      }
      slot.driver = new CudaDriver(handle, description);  // lives for the whole process, like the CUDA context
    } catch (const std::exception& e) {
      slot.reason = e.what();
    }
#else
    slot.reason = "glake was built without cuda.h, so only the host backend exists in this build";
#endif
  });
  return slot;
}

Driver& host_driver() {
  static HostDriver* driver = new HostDriver();  // never destroyed: chunks may outlive statics
  return *driver;
}

}  // namespace

bool set_cuda_library(void* dl_handle, const std::string& description) {
  CudaLibrary& lib = cuda_library();
  std::lock_guard<std::mutex> lock(lib.mutex);
  if (lib.used) return false;
  lib.handle = dl_handle;
  lib.description = description;
  return true;
}

std::string cuda_unavailable_reason() { return cuda_slot().driver ? std::string() : cuda_slot().reason; }

Driver& get_driver(const std::optional<std::string>& name) {
  std::string choice = name.value_or("");
  if (choice.empty()) {
    const char* env = std::getenv("GLAKE_BACKEND");
    choice = env ? env : "";
  }
  if (choice == "host") return host_driver();
  if (choice == "cuda") {
    CudaSlot& slot = cuda_slot();
    if (!slot.driver) throw BackendUnavailableError("the cuda backend is unavailable: " + slot.reason);
    return *slot.driver;
  }
  if (choice.empty() || choice == "auto") {
    CudaSlot& slot = cuda_slot();
    return slot.driver ? *slot.driver : host_driver();
  }
  throw InvalidArgumentError("unknown backend '" + choice + "' (expected 'cuda', 'host' or 'auto')");
}

}  // namespace glake
