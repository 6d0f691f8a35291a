// The cuda backend: the CUDA driver API's VMM calls, loaded at run time.
//
// libcuda.so.1 is opened with dlopen and every entry point is fetched with cuGetProcAddress, so the
// library builds with cuda.h alone and imports on machines without a driver. All calls run in the
// device's primary context, the one torch and CuPy use.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

#include "driver/driver.h"

namespace glake {

// The driver entry points glake uses, each with the CUDA version whose variant it calls. Each
// becomes a member p_<name> of type PFN_<name>_v<version> (cudaTypedefs.h) and is resolved with
// cuGetProcAddress at exactly that version, so a signature change between versions (cuCtxSynchronize
// takes a CUcontext from 13000 on) cannot be called with the wrong arguments: it does not compile.
#define GLAKE_CUDA_FUNCS(X)                                                                          \
  X(cuInit, 2000) X(cuDeviceGetCount, 2000) X(cuDeviceGet, 2000) X(cuDeviceGetAttribute, 2000)       \
  X(cuDevicePrimaryCtxRetain, 7000) X(cuCtxGetCurrent, 4000) X(cuCtxSetCurrent, 4000)                \
  X(cuGetErrorName, 6000) X(cuMemGetAllocationGranularity, 10020) X(cuMemCreate, 10020)              \
  X(cuMemRelease, 10020) X(cuMemAddressReserve, 10020) X(cuMemAddressFree, 10020) X(cuMemMap, 10020) \
  X(cuMemUnmap, 10020) X(cuMemSetAccess, 10020) X(cuMemExportToShareableHandle, 10020)               \
  X(cuMemImportFromShareableHandle, 10020) X(cuMemGetInfo, 3020) X(cuMemcpy, 4000)                   \
  X(cuMemcpyAsync, 4000) X(cuMemsetD8, 3020) X(cuStreamCreate, 2000) X(cuStreamDestroy, 4000)         \
  X(cuStreamWaitEvent, 3020) X(cuMemHostAlloc, 2020) X(cuMemFreeHost, 2000) X(cuMemAlloc, 3020)      \
  X(cuMemHostRegister, 6050) X(cuMemHostUnregister, 4000)                                            \
  X(cuMemFree, 3020) X(cuPointerGetAttributes, 7000) X(cuDeviceCanAccessPeer, 4000)                  \
  X(cuCtxEnablePeerAccess, 4000) X(cuStreamSynchronize, 2000) X(cuStreamIsCapturing, 10000)          \
  X(cuEventCreate, 2000) X(cuEventRecord, 2000) X(cuEventQuery, 2000) X(cuEventSynchronize, 2000)    \
  X(cuEventDestroy, 4000) X(cuThreadExchangeStreamCaptureMode, 10010)

// Entry points whose variant depends on the driver: the newest for drivers at or above its version,
// the older one below (the member p_<name>_v<old> is then set instead of p_<name>).
#define GLAKE_CUDA_VERSIONED_FUNCS(X) X(cuCtxSynchronize, 13000, 2000)

/// Function pointers into libcuda, resolved once, each typed by the variant it was resolved as.
struct CudaApi {
#define GLAKE_CUDA_MEMBER(name, version) PFN_##name##_v##version p_##name = nullptr;
  GLAKE_CUDA_FUNCS(GLAKE_CUDA_MEMBER)
#undef GLAKE_CUDA_MEMBER
#define GLAKE_CUDA_VERSIONED_MEMBER(name, version, old)      \
  PFN_##name##_v##version p_##name = nullptr;               \
  PFN_##name##_v##old p_##name##_v##old = nullptr;
  GLAKE_CUDA_VERSIONED_FUNCS(GLAKE_CUDA_VERSIONED_MEMBER)
#undef GLAKE_CUDA_VERSIONED_MEMBER
};

/// VMM primitives over the CUDA driver API.
class CudaDriver final : public Driver {
 public:
  /// Initialises the driver of `lib` (a dlopen handle; null: the shim's real driver if a libcuda shim
  /// is loaded, else dlopen("libcuda.so.1")); `lib_name` names it in errors. Throws
  /// BackendUnavailableError with the reason on failure.
  explicit CudaDriver(void* lib = nullptr, const std::string& lib_name = "");

  /// Which libcuda this backend calls (a path, or "libcuda.so.1" when found by name).
  const std::string& library() const { return library_; }

  /// The version cuDriverGetVersion reported (e.g. 13000).
  int driver_version() const { return driver_version_; }

  const char* name() const override { return "cuda"; }
  int device_count() override { return device_count_; }
  std::size_t granularity(int device) override;
  MemInfo mem_info(int device) override;

  void memcpy(int device, DevPtr dst, DevPtr src, std::size_t n) override;
  void memcpy_async(int device, DevPtr dst, DevPtr src, std::size_t n, StreamHandle stream) override;
  void memset(int device, DevPtr dst, int value, std::size_t n) override;

  void stream_wait_event(int device, StreamHandle stream, EventHandle event) override;
  DevPtr host_alloc_pinned(int device, std::size_t size) override;
  void host_free_pinned(int device, DevPtr ptr) override;
  void host_register(int device, DevPtr ptr, std::size_t size) override;
  void host_unregister(int device, DevPtr ptr) override;
  DevPtr device_alloc(int device, std::size_t size) override;
  void device_free(int device, DevPtr ptr) override;
  PointerInfo pointer_info(int device, DevPtr ptr) override;
  bool can_access_peer(int device, int peer) override;
  void enable_peer_access(int device, int peer) override;

  StreamHandle stream_create(int device) override;
  void stream_destroy(int device, StreamHandle stream) override;
  void stream_synchronize(int device, StreamHandle stream) override;
  void device_synchronize(int device) override;
  bool stream_is_capturing(int device, StreamHandle stream) override;
  EventHandle event_create(int device) override;
  void event_record(int device, EventHandle event, StreamHandle stream) override;
  bool event_query(int device, EventHandle event) override;
  void event_synchronize(int device, EventHandle event) override;
  void event_destroy(int device, EventHandle event) override;
  CaptureMode exchange_capture_mode(CaptureMode mode) override;

  /// Makes `device`'s primary context current on this thread for the guard's lifetime.
  class ContextGuard {
   public:
    ContextGuard(CudaDriver& driver, int device);
    ~ContextGuard();
    ContextGuard(const ContextGuard&) = delete;
    ContextGuard& operator=(const ContextGuard&) = delete;

   private:
    CudaDriver& driver_;
    CUcontext previous_ = nullptr;
  };

 protected:
  PhysHandle do_create(int device, std::size_t size) override;
  void do_release(int device, PhysHandle handle) override;
  DevPtr do_reserve(int device, std::size_t size, std::size_t alignment) override;
  void do_free_va(int device, DevPtr va, std::size_t size) override;
  void do_map(int device, DevPtr va, std::size_t size, PhysHandle handle) override;
  void do_unmap(int device, DevPtr va, std::size_t size) override;
  void do_set_access(int device, DevPtr va, std::size_t size, bool read_only) override;
  int do_export_fd(int device, PhysHandle handle) override;
  PhysHandle do_import_fd(int device, int fd, std::size_t size) override;

 private:
  /// Throws the glake error for `res` naming `call`; no-op on CUDA_SUCCESS.
  void check(CUresult res, const std::string& call) const;
  /// The device's primary context, retained on first use; throws InvalidArgumentError for a device
  /// that does not exist (every call that makes a context current goes through here).
  CUcontext primary_context(int device);
  /// Allocation properties for chunks on `device`.
  CUmemAllocationProp chunk_prop(int device) const;

  CudaApi api_;
  std::string library_;
  int device_count_ = 0;
  int driver_version_ = 0;
  std::atomic<bool> posix_fd_handles_{true};  // cleared if the driver refuses shareable chunks
  std::mutex mutex_;                      // guards contexts_
  std::vector<CUcontext> contexts_;
  std::unique_ptr<std::atomic<std::size_t>[]> granularity_;  // 0 until first asked; written once per device
};

}  // namespace glake
