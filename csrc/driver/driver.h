// The driver interface: the few VMM, copy, stream and event primitives every policy is built on.
//
// Two backends implement it: `cuda` (the CUDA driver API, loaded with dlopen at run time) and
// `host` (the same semantics on host memory: memfd = physical chunk, mmap = map). Public calls are
// non-virtual wrappers that validate, time and count; backends implement the do_* hooks.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "common/error.h"

namespace glake {

using PhysHandle = std::uint64_t;    ///< CUmemGenericAllocationHandle, or a memfd on host.
using DevPtr = std::uintptr_t;       ///< A virtual address in the backend's address space.
using StreamHandle = std::uintptr_t; ///< CUstream (0 = legacy default stream); unused on host.
using EventHandle = std::uintptr_t;  ///< CUevent, or a host event id.

/// The driver operations whose calls and time are counted.
enum class DriverOp : int { Create, Release, Reserve, FreeVa, Map, Unmap, SetAccess, Export, Import, kCount };

/// Name of a DriverOp, as used in stats keys ("create", "map", ...).
const char* op_name(DriverOp op);

/// How strictly a thread's driver calls are checked while a stream captures a CUDA graph.
enum class CaptureMode : int { Global = 0, ThreadLocal = 1, Relaxed = 2 };

/// Free and total memory of one device, in bytes.
struct MemInfo {
  std::size_t free = 0;
  std::size_t total = 0;
};

/// What an address points at, as far as a backend can tell.
enum class MemoryType : int {
  Unknown = 0,  ///< The backend cannot tell (host backend: the caller must say).
  Pageable,     ///< Ordinary host memory the driver does not know (cuda: not registered or pinned).
  Pinned,       ///< Page-locked host memory the copy engines can reach directly.
  Device,       ///< Memory of one device (PointerInfo::device says which).
  Managed,      ///< Unified (managed) memory.
};

/// Name of a MemoryType ("unknown", "pageable", "pinned", "device", "managed").
const char* memory_type_name(MemoryType type);

/// The kind of memory at an address and, for device memory, its device.
struct PointerInfo {
  MemoryType type = MemoryType::Unknown;
  int device = -1;
};

/// A snapshot of a driver's counters.
struct DriverStatsSnapshot {
  std::array<std::uint64_t, static_cast<int>(DriverOp::kCount)> calls{};
  std::array<std::uint64_t, static_cast<int>(DriverOp::kCount)> time_ns{};
  std::int64_t chunks_live = 0, chunks_created = 0, chunks_released = 0;
  std::int64_t physical_bytes = 0, physical_bytes_peak = 0;
  std::int64_t reserved_va_bytes = 0, reserved_va_bytes_peak = 0, ranges_live = 0;
  std::int64_t mapped_bytes = 0, mapped_bytes_peak = 0;
};

/// Thread-safe counters kept by every driver instance.
class DriverStats {
 public:
  /// Adds one call of `op` that took `ns` nanoseconds.
  void record(DriverOp op, std::uint64_t ns);
  /// Adds `delta` to a current value and raises its peak when exceeded.
  static void bump(std::atomic<std::int64_t>& cur, std::atomic<std::int64_t>& peak, std::int64_t delta);
  /// A consistent-enough copy of all counters.
  DriverStatsSnapshot snapshot() const;
  /// Resets peaks to current values and zeroes call counts and times.
  void reset_peaks_and_times();

  std::array<std::atomic<std::uint64_t>, static_cast<int>(DriverOp::kCount)> calls{};
  std::array<std::atomic<std::uint64_t>, static_cast<int>(DriverOp::kCount)> time_ns{};
  std::atomic<std::int64_t> chunks_created{0}, chunks_released{0};
  std::atomic<std::int64_t> physical_bytes{0}, physical_bytes_peak{0};
  std::atomic<std::int64_t> reserved_va_bytes{0}, reserved_va_bytes_peak{0}, ranges_live{0};
  std::atomic<std::int64_t> mapped_bytes{0}, mapped_bytes_peak{0};
};

/// One VMM backend. All sizes and offsets of VMM calls must be multiples of granularity(device).
class GLAKE_API Driver {
 public:
  virtual ~Driver();

  /// "cuda" or "host".
  virtual const char* name() const = 0;
  /// Number of devices this backend drives (1 on host).
  virtual int device_count() = 0;
  /// Mapping granularity in bytes (2 MiB on the H100 and on host).
  virtual std::size_t granularity(int device) = 0;
  /// Free and total memory of a device (host: MemAvailable and MemTotal).
  virtual MemInfo mem_info(int device) = 0;

  /// Creates one physical allocation of `size` bytes on `device`.
  PhysHandle create(int device, std::size_t size);
  /// Releases a physical allocation made by create() or import_fd().
  void release(int device, PhysHandle handle, std::size_t size);
  /// Reserves `size` bytes of virtual addresses aligned to `alignment` (0 = granularity).
  DevPtr reserve(int device, std::size_t size, std::size_t alignment = 0);
  /// Frees a reservation made by reserve().
  void free_va(int device, DevPtr va, std::size_t size);
  /// Maps `size` bytes of `handle` at `va` (no access yet: call set_access).
  void map(int device, DevPtr va, std::size_t size, PhysHandle handle);
  /// Unmaps `size` bytes at `va`; the addresses stay reserved.
  void unmap(int device, DevPtr va, std::size_t size);
  /// Makes `size` mapped bytes at `va` readable and writable from `device` (read only: readable only,
  /// a write faults, as for chunks shared with other processes).
  void set_access(int device, DevPtr va, std::size_t size, bool read_only = false);
  /// Exports a handle as a new POSIX file descriptor that the caller owns.
  int export_fd(int device, PhysHandle handle);
  /// Imports a file descriptor made by export_fd (here or in another process); `fd` stays the caller's.
  PhysHandle import_fd(int device, int fd, std::size_t size);

  /// Copies `n` bytes, synchronously (any mix of host and device addresses on cuda).
  virtual void memcpy(int device, DevPtr dst, DevPtr src, std::size_t n) = 0;
  /// Copies `n` bytes ordered on `stream`.
  virtual void memcpy_async(int device, DevPtr dst, DevPtr src, std::size_t n, StreamHandle stream) = 0;
  /// Sets `n` bytes at `dst` to `value`, synchronously.
  virtual void memset(int device, DevPtr dst, int value, std::size_t n) = 0;

  /// Creates a non-blocking stream.
  virtual StreamHandle stream_create(int device) = 0;
  /// Destroys a stream made by stream_create.
  virtual void stream_destroy(int device, StreamHandle stream) = 0;
  /// Waits until all work on `stream` is done.
  virtual void stream_synchronize(int device, StreamHandle stream) = 0;
  /// Waits until all work on the device is done (every stream of its primary context).
  virtual void device_synchronize(int device) = 0;
  /// True while `stream` is capturing a CUDA graph (never on host).
  virtual bool stream_is_capturing(int device, StreamHandle stream) = 0;
  /// Creates an event without timing.
  virtual EventHandle event_create(int device) = 0;
  /// Records `event` on `stream`.
  virtual void event_record(int device, EventHandle event, StreamHandle stream) = 0;
  /// True once the work recorded before `event` is done.
  virtual bool event_query(int device, EventHandle event) = 0;
  /// Waits for `event`.
  virtual void event_synchronize(int device, EventHandle event) = 0;
  /// Destroys an event.
  virtual void event_destroy(int device, EventHandle event) = 0;

  /// Sets this thread's stream-capture mode and returns the previous one (host: no-op).
  virtual CaptureMode exchange_capture_mode(CaptureMode mode) { return mode; }

  /// This driver's counters.
  DriverStats& stats() { return stats_; }

  // Copy-engine support (multipath). The base versions throw Error("... not supported"): both
  // backends implement them; the defaults only keep other Driver subclasses compiling.

  /// Makes later work on `stream` wait (on the device) until `event` has completed; host: no-op.
  virtual void stream_wait_event(int device, StreamHandle stream, EventHandle event);
  /// Allocates `size` bytes of page-locked host memory usable by every device (host: aligned memory).
  virtual DevPtr host_alloc_pinned(int device, std::size_t size);
  /// Frees memory from host_alloc_pinned.
  virtual void host_free_pinned(int device, DevPtr ptr);
  /// Page-locks `size` bytes of ordinary host memory at `ptr` for every device's copies
  /// (cuMemHostRegister, portable: copies then DMA straight into and out of it; host: no-op).
  virtual void host_register(int device, DevPtr ptr, std::size_t size);
  /// Undoes host_register of `ptr`.
  virtual void host_unregister(int device, DevPtr ptr);
  /// Allocates `size` bytes of plain device memory (cuMemAlloc; host: aligned host memory).
  virtual DevPtr device_alloc(int device, std::size_t size);
  /// Frees memory from device_alloc.
  virtual void device_free(int device, DevPtr ptr);
  /// The kind of memory at `ptr`, asked in `device`'s context (host backend: always Unknown).
  virtual PointerInfo pointer_info(int device, DevPtr ptr);
  /// Whether `device` can access memory of `peer` directly (false for device == peer).
  virtual bool can_access_peer(int device, int peer);
  /// Lets `device` access `peer`'s memory directly; already enabled is fine.
  virtual void enable_peer_access(int device, int peer);

 protected:
  virtual PhysHandle do_create(int device, std::size_t size) = 0;
  virtual void do_release(int device, PhysHandle handle) = 0;
  virtual DevPtr do_reserve(int device, std::size_t size, std::size_t alignment) = 0;
  virtual void do_free_va(int device, DevPtr va, std::size_t size) = 0;
  virtual void do_map(int device, DevPtr va, std::size_t size, PhysHandle handle) = 0;
  virtual void do_unmap(int device, DevPtr va, std::size_t size) = 0;
  virtual void do_set_access(int device, DevPtr va, std::size_t size, bool read_only) = 0;
  virtual int do_export_fd(int device, PhysHandle handle) = 0;
  virtual PhysHandle do_import_fd(int device, int fd, std::size_t size) = 0;

  /// Throws InvalidArgumentError unless 0 <= device < device_count().
  void check_device(int device);
  /// Throws InvalidArgumentError unless `value` is a positive multiple of the granularity.
  void check_aligned(int device, const char* what, std::size_t value, bool allow_zero = false);

 private:
  DriverStats stats_;
};

/// Whether this build contains the cuda backend (cuda.h was found at build time).
GLAKE_API bool cuda_backend_built();

/// The driver for `name` ("cuda" or "host"); nullopt/empty = $GLAKE_BACKEND, else auto-detect.
/// Auto-detect picks cuda when libcuda loads and sees a device, else host.
/// Throws BackendUnavailableError when a named backend cannot be used.
GLAKE_API Driver& get_driver(const std::optional<std::string>& name = std::nullopt);

/// Makes the cuda backend use `dl_handle` (a dlopen handle of the real libcuda, e.g. the driver the
/// libcuda shim loaded by absolute path) instead of dlopen("libcuda.so.1"), which inside a process
/// running the shim returns the shim itself. `description` (its path) goes into error messages.
/// Must be called before the cuda backend is first used; returns false (and changes nothing) after.
/// Without it, the backend asks a loaded shim for its real driver (glake_shim_real_libcuda) first.
GLAKE_API bool set_cuda_library(void* dl_handle, const std::string& description);

/// Why the cuda backend is unavailable, or an empty string when it is usable.
GLAKE_API std::string cuda_unavailable_reason();

}  // namespace glake
