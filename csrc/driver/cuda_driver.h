// The cuda backend: the CUDA driver API's VMM calls, loaded at run time.
//
// libcuda.so.1 is opened with dlopen and every entry point is fetched with cuGetProcAddress, so the
// library builds with cuda.h alone and imports on machines without a driver. All calls run in the
// device's primary context, the one torch and CuPy use.
#pragma once

#include <cuda.h>

#include <atomic>
#include <mutex>
#include <vector>

#include "driver/driver.h"

namespace glake {

// The driver entry points glake uses; each becomes a member p_<name> of CudaApi.
#define GLAKE_CUDA_FUNCS(X)                                                                          \
  X(cuInit) X(cuDeviceGetCount) X(cuDeviceGet) X(cuDeviceGetAttribute) X(cuDevicePrimaryCtxRetain)   \
  X(cuCtxGetCurrent) X(cuCtxSetCurrent) X(cuGetErrorName) X(cuMemGetAllocationGranularity)          \
  X(cuMemCreate) X(cuMemRelease) X(cuMemAddressReserve) X(cuMemAddressFree) X(cuMemMap)             \
  X(cuMemUnmap) X(cuMemSetAccess) X(cuMemExportToShareableHandle) X(cuMemImportFromShareableHandle) \
  X(cuMemGetInfo) X(cuMemcpy) X(cuMemcpyAsync) X(cuMemsetD8) X(cuStreamCreate) X(cuStreamDestroy)  \
  X(cuStreamWaitEvent) X(cuMemHostAlloc) X(cuMemFreeHost) X(cuMemAlloc) X(cuMemFree)                \
  X(cuPointerGetAttributes) X(cuDeviceCanAccessPeer) X(cuCtxEnablePeerAccess)                         \
  X(cuStreamSynchronize) X(cuStreamIsCapturing) X(cuEventCreate) X(cuEventRecord) X(cuEventQuery)  \
  X(cuEventSynchronize) X(cuEventDestroy) X(cuThreadExchangeStreamCaptureMode) X(cuCtxSynchronize)

/// Function pointers into libcuda, resolved once.
struct CudaApi {
#define GLAKE_CUDA_MEMBER(name) decltype(&::name) p_##name = nullptr;
  GLAKE_CUDA_FUNCS(GLAKE_CUDA_MEMBER)
#undef GLAKE_CUDA_MEMBER
};

/// VMM primitives over the CUDA driver API.
class CudaDriver final : public Driver {
 public:
  /// Loads libcuda and initialises it; throws BackendUnavailableError with the reason on failure.
  CudaDriver();

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
  void do_set_access(int device, DevPtr va, std::size_t size) override;
  int do_export_fd(int device, PhysHandle handle) override;
  PhysHandle do_import_fd(int device, int fd, std::size_t size) override;

 private:
  /// Throws the glake error for `res` naming `call`; no-op on CUDA_SUCCESS.
  void check(CUresult res, const std::string& call) const;
  /// The device's primary context, retained on first use.
  CUcontext primary_context(int device);
  /// Allocation properties for chunks on `device`.
  CUmemAllocationProp chunk_prop(int device) const;

  CudaApi api_;
  int device_count_ = 0;
  std::atomic<bool> posix_fd_handles_{true};  // cleared if the driver refuses shareable chunks
  std::mutex mutex_;
  std::vector<CUcontext> contexts_;
  std::vector<std::size_t> granularity_;
};

}  // namespace glake
