#include "driver/cuda_driver.h"

#include <dlfcn.h>

#include <algorithm>

namespace glake {

namespace {

std::string size_arg(std::size_t size) { return "size=" + std::to_string(size); }

}  // namespace

namespace {

/// The real driver of a libcuda shim loaded in this process (csrc/shim exports this), or null.
void* shim_real_driver(std::string& name) {
  using RealFn = void* (*)(const char**);
  auto fn = reinterpret_cast<RealFn>(dlsym(RTLD_DEFAULT, "glake_shim_real_libcuda"));
  if (!fn) return nullptr;
  const char* path = nullptr;
  void* handle = fn(&path);
  if (handle) name = path ? path : "the shim's real libcuda";
  return handle;
}

}  // namespace

CudaDriver::CudaDriver(void* lib, const std::string& lib_name) : library_(lib_name) {
  if (!lib) lib = shim_real_driver(library_);  // inside the shim, dlopen("libcuda.so.1") is the shim
  if (!lib) {
    lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    library_ = "libcuda.so.1";
  }
  if (!lib) {
    const char* err = dlerror();
    throw BackendUnavailableError(std::string("dlopen(libcuda.so.1) failed: ") + (err ? err : "unknown error") +
                                  " (no NVIDIA driver on this machine?)");
  }
  if (library_.empty()) library_ = "the libcuda handle given to set_cuda_library";
  auto get_proc = reinterpret_cast<PFN_cuGetProcAddress_v12000>(dlsym(lib, "cuGetProcAddress_v2"));
  auto get_version = reinterpret_cast<PFN_cuDriverGetVersion_v2020>(dlsym(lib, "cuDriverGetVersion"));
  if (!get_proc || !get_version) {
    throw BackendUnavailableError(library_ + " has no cuGetProcAddress_v2: the driver is older than CUDA 12");
  }
  get_version(&driver_version_);
  // Resolves `name` as the variant of CUDA `version`; null when `optional` and the driver lacks it.
  auto resolve = [&](const char* name, int version, bool optional) -> void* {
    void* fn = nullptr;
    CUdriverProcAddressQueryResult status{};
    const CUresult res = get_proc(name, &fn, version, CU_GET_PROC_ADDRESS_DEFAULT, &status);
    if (res == CUDA_SUCCESS && fn && status == CU_GET_PROC_ADDRESS_SUCCESS) return fn;
    if (optional) return nullptr;
    throw BackendUnavailableError(std::string("cuGetProcAddress(") + name + ", version=" + std::to_string(version) +
                                  ") failed (result " + std::to_string(res) + ", status " +
                                  std::to_string(static_cast<int>(status)) + "): driver version " +
                                  std::to_string(driver_version_));
  };
#define GLAKE_CUDA_LOAD(name, version) \
  api_.p_##name = reinterpret_cast<PFN_##name##_v##version>(resolve(#name, version, false));
  GLAKE_CUDA_FUNCS(GLAKE_CUDA_LOAD)
#undef GLAKE_CUDA_LOAD
#define GLAKE_CUDA_LOAD_VERSIONED(name, version, old)                                            \
  if (driver_version_ >= version) {                                                              \
    api_.p_##name = reinterpret_cast<PFN_##name##_v##version>(resolve(#name, version, false));   \
  } else {                                                                                       \
    api_.p_##name##_v##old = reinterpret_cast<PFN_##name##_v##old>(resolve(#name, old, false));  \
  }
  GLAKE_CUDA_VERSIONED_FUNCS(GLAKE_CUDA_LOAD_VERSIONED)
#undef GLAKE_CUDA_LOAD_VERSIONED

  CUresult res = api_.p_cuInit(0);
  if (res != CUDA_SUCCESS) {
    const char* ename = nullptr;
    api_.p_cuGetErrorName(res, &ename);
    throw BackendUnavailableError(std::string("cuInit(0) failed: ") + (ename ? ename : "?"));
  }
  res = api_.p_cuDeviceGetCount(&device_count_);
  if (res != CUDA_SUCCESS || device_count_ == 0) throw BackendUnavailableError("no CUDA device is visible");
  int vmm = 0;
  CUdevice dev0 = 0;
  api_.p_cuDeviceGet(&dev0, 0);
  api_.p_cuDeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev0);
  if (!vmm) throw BackendUnavailableError("device 0 does not support virtual memory management");
  contexts_.assign(device_count_, nullptr);
  granularity_ = std::make_unique<std::atomic<std::size_t>[]>(device_count_);
}

void CudaDriver::check(CUresult res, const std::string& call) const {
  if (res == CUDA_SUCCESS) return;
  const char* ename = nullptr;
  if (api_.p_cuGetErrorName(res, &ename) != CUDA_SUCCESS || !ename) ename = "CUDA_ERROR_UNKNOWN";
  const std::string msg = call + " failed: " + ename;
  if (res == CUDA_ERROR_OUT_OF_MEMORY) throw OutOfMemoryError(msg);
  if (res == CUDA_ERROR_INVALID_VALUE || res == CUDA_ERROR_INVALID_HANDLE) throw InvalidArgumentError(msg);
  throw Error(msg);
}

CUcontext CudaDriver::primary_context(int device) {
  check_device(device);
  std::lock_guard<std::mutex> lock(mutex_);
  if (!contexts_[device]) {
    CUdevice dev = 0;
    check(api_.p_cuDeviceGet(&dev, device), "cuDeviceGet(" + std::to_string(device) + ")");
    check(api_.p_cuDevicePrimaryCtxRetain(&contexts_[device], dev),
          "cuDevicePrimaryCtxRetain(device=" + std::to_string(device) + ")");
  }
  return contexts_[device];
}

CudaDriver::ContextGuard::ContextGuard(CudaDriver& driver, int device) : driver_(driver) {
  CUcontext want = driver.primary_context(device);
  CUcontext current = nullptr;
  driver.api_.p_cuCtxGetCurrent(&current);
  if (current != want) {
    driver.check(driver.api_.p_cuCtxSetCurrent(want), "cuCtxSetCurrent(device=" + std::to_string(device) + ")");
    previous_ = current;  // restored only when the thread had another context
  }
}

CudaDriver::ContextGuard::~ContextGuard() {
  if (previous_) driver_.api_.p_cuCtxSetCurrent(previous_);
}

CUmemAllocationProp CudaDriver::chunk_prop(int device) const {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.requestedHandleTypes = posix_fd_handles_ ? CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR : CU_MEM_HANDLE_TYPE_NONE;
  return prop;
}

std::size_t CudaDriver::granularity(int device) {
  check_device(device);
  std::size_t g = granularity_[device].load(std::memory_order_acquire);
  if (g) return g;
  CUmemAllocationProp prop = chunk_prop(device);
  check(api_.p_cuMemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
        "cuMemGetAllocationGranularity(device=" + std::to_string(device) + ")");
  granularity_[device].store(g, std::memory_order_release);  // every thread computes the same value
  return g;
}

MemInfo CudaDriver::mem_info(int device) {
  check_device(device);
  ContextGuard guard(*this, device);
  MemInfo info;
  check(api_.p_cuMemGetInfo(&info.free, &info.total), "cuMemGetInfo(device=" + std::to_string(device) + ")");
  return info;
}

PhysHandle CudaDriver::do_create(int device, std::size_t size) {
  ContextGuard guard(*this, device);
  CUmemGenericAllocationHandle h = 0;
  CUmemAllocationProp prop = chunk_prop(device);
  CUresult res = api_.p_cuMemCreate(&h, size, &prop, 0);
  if (res == CUDA_ERROR_NOT_SUPPORTED && posix_fd_handles_) {
    posix_fd_handles_ = false;  // e.g. a container without fd export: chunks stay private
    prop = chunk_prop(device);
    res = api_.p_cuMemCreate(&h, size, &prop, 0);
  }
  check(res, "cuMemCreate(" + size_arg(size) + ", device=" + std::to_string(device) + ")");
  return h;
}

void CudaDriver::do_release(int device, PhysHandle handle) {
  ContextGuard guard(*this, device);
  check(api_.p_cuMemRelease(handle), "cuMemRelease(handle=" + hex(handle) + ")");
}

DevPtr CudaDriver::do_reserve(int device, std::size_t size, std::size_t alignment) {
  ContextGuard guard(*this, device);
  CUdeviceptr va = 0;
  check(api_.p_cuMemAddressReserve(&va, size, alignment, 0, 0),
        "cuMemAddressReserve(" + size_arg(size) + ", alignment=" + std::to_string(alignment) + ")");
  return va;
}

void CudaDriver::do_free_va(int device, DevPtr va, std::size_t size) {
  ContextGuard guard(*this, device);
  check(api_.p_cuMemAddressFree(va, size), "cuMemAddressFree(va=" + hex(va) + ", " + size_arg(size) + ")");
}

void CudaDriver::do_map(int device, DevPtr va, std::size_t size, PhysHandle handle) {
  ContextGuard guard(*this, device);
  check(api_.p_cuMemMap(va, size, 0, handle, 0),
        "cuMemMap(va=" + hex(va) + ", " + size_arg(size) + ", handle=" + hex(handle) + ")");
}

void CudaDriver::do_unmap(int device, DevPtr va, std::size_t size) {
  ContextGuard guard(*this, device);
  check(api_.p_cuMemUnmap(va, size), "cuMemUnmap(va=" + hex(va) + ", " + size_arg(size) + ")");
}

void CudaDriver::do_set_access(int device, DevPtr va, std::size_t size, bool read_only) {
  ContextGuard guard(*this, device);
  CUmemAccessDesc desc{};
  desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  desc.location.id = device;
  desc.flags = read_only ? CU_MEM_ACCESS_FLAGS_PROT_READ : CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  check(api_.p_cuMemSetAccess(va, size, &desc, 1),
        "cuMemSetAccess(va=" + hex(va) + ", " + size_arg(size) + ", device=" + std::to_string(device) +
            (read_only ? ", PROT_READ)" : ")"));
}

int CudaDriver::do_export_fd(int device, PhysHandle handle) {
  if (!posix_fd_handles_) {
    throw Error("cuMemExportToShareableHandle: this driver refused POSIX-fd shareable chunks, so chunks cannot be exported");
  }
  ContextGuard guard(*this, device);
  int fd = -1;
  check(api_.p_cuMemExportToShareableHandle(&fd, handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
        "cuMemExportToShareableHandle(handle=" + hex(handle) + ", POSIX_FILE_DESCRIPTOR)");
  return fd;
}

PhysHandle CudaDriver::do_import_fd(int device, int fd, std::size_t size) {
  ContextGuard guard(*this, device);
  CUmemGenericAllocationHandle h = 0;
  check(api_.p_cuMemImportFromShareableHandle(&h, reinterpret_cast<void*>(static_cast<std::uintptr_t>(fd)),
                                              CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
        "cuMemImportFromShareableHandle(fd=" + std::to_string(fd) + ", " + size_arg(size) + ")");
  return h;
}

void CudaDriver::memcpy(int device, DevPtr dst, DevPtr src, std::size_t n) {
  ContextGuard guard(*this, device);
  check(api_.p_cuMemcpy(dst, src, n), "cuMemcpy(dst=" + hex(dst) + ", src=" + hex(src) + ", n=" + std::to_string(n) + ")");
  check(api_.p_cuStreamSynchronize(nullptr), "cuStreamSynchronize(0)");
}

void CudaDriver::memcpy_async(int device, DevPtr dst, DevPtr src, std::size_t n, StreamHandle stream) {
  ContextGuard guard(*this, device);
  check(api_.p_cuMemcpyAsync(dst, src, n, reinterpret_cast<CUstream>(stream)),
        "cuMemcpyAsync(dst=" + hex(dst) + ", src=" + hex(src) + ", n=" + std::to_string(n) + ")");
}

void CudaDriver::memset(int device, DevPtr dst, int value, std::size_t n) {
  ContextGuard guard(*this, device);
  check(api_.p_cuMemsetD8(dst, static_cast<unsigned char>(value), n),
        "cuMemsetD8(dst=" + hex(dst) + ", value=" + std::to_string(value) + ", n=" + std::to_string(n) + ")");
  check(api_.p_cuStreamSynchronize(nullptr), "cuStreamSynchronize(0)");
}

void CudaDriver::stream_wait_event(int device, StreamHandle stream, EventHandle event) {
  ContextGuard guard(*this, device);
  check(api_.p_cuStreamWaitEvent(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUevent>(event), 0),
        "cuStreamWaitEvent(stream=" + hex(stream) + ", event=" + hex(event) + ")");
}

DevPtr CudaDriver::host_alloc_pinned(int device, std::size_t size) {
  check_device(device);
  ContextGuard guard(*this, device);
  void* p = nullptr;
  check(api_.p_cuMemHostAlloc(&p, size, CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc(" + size_arg(size) + ", PORTABLE)");
  return reinterpret_cast<DevPtr>(p);
}

void CudaDriver::host_free_pinned(int device, DevPtr ptr) {
  ContextGuard guard(*this, device);
  check(api_.p_cuMemFreeHost(reinterpret_cast<void*>(ptr)), "cuMemFreeHost(" + hex(ptr) + ")");
}

void CudaDriver::host_register(int device, DevPtr ptr, std::size_t size) {
  check_device(device);
  ContextGuard guard(*this, device);
  check(api_.p_cuMemHostRegister(reinterpret_cast<void*>(ptr), size, CU_MEMHOSTREGISTER_PORTABLE),
        "cuMemHostRegister(" + hex(ptr) + ", " + size_arg(size) + ", PORTABLE)");
}

void CudaDriver::host_unregister(int device, DevPtr ptr) {
  ContextGuard guard(*this, device);
  check(api_.p_cuMemHostUnregister(reinterpret_cast<void*>(ptr)), "cuMemHostUnregister(" + hex(ptr) + ")");
}

DevPtr CudaDriver::device_alloc(int device, std::size_t size) {
  check_device(device);
  ContextGuard guard(*this, device);
  CUdeviceptr p = 0;
  check(api_.p_cuMemAlloc(&p, size), "cuMemAlloc(" + size_arg(size) + ", device=" + std::to_string(device) + ")");
  return p;
}

void CudaDriver::device_free(int device, DevPtr ptr) {
  ContextGuard guard(*this, device);
  check(api_.p_cuMemFree(ptr), "cuMemFree(" + hex(ptr) + ")");
}

PointerInfo CudaDriver::pointer_info(int device, DevPtr ptr) {
  check_device(device);
  ContextGuard guard(*this, device);  // with unified addressing the answer does not depend on the context
  unsigned int mem_type = 0;
  int ordinal = -1;
  unsigned int managed = 0;
  CUpointer_attribute attrs[] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                 CU_POINTER_ATTRIBUTE_IS_MANAGED};
  void* data[] = {&mem_type, &ordinal, &managed};
  const CUresult res = api_.p_cuPointerGetAttributes(3, attrs, data, ptr);
  PointerInfo info;
  // Memory CUDA does not know (plain malloc/mmap) reads as type 0; some drivers answer INVALID_VALUE.
  if (res == CUDA_ERROR_INVALID_VALUE) {
    info.type = MemoryType::Pageable;
    return info;
  }
  check(res, "cuPointerGetAttributes(ptr=" + hex(ptr) + ", MEMORY_TYPE|DEVICE_ORDINAL|IS_MANAGED)");
  if (managed) {
    info.type = MemoryType::Managed;
  } else if (mem_type == CU_MEMORYTYPE_DEVICE) {
    info.type = MemoryType::Device;
    info.device = ordinal;
  } else if (mem_type == CU_MEMORYTYPE_HOST) {
    info.type = MemoryType::Pinned;
  } else {
    info.type = MemoryType::Pageable;
  }
  return info;
}

bool CudaDriver::can_access_peer(int device, int peer) {
  check_device(device);
  check_device(peer);
  if (device == peer) return false;
  CUdevice dev = 0, peer_dev = 0;
  check(api_.p_cuDeviceGet(&dev, device), "cuDeviceGet(" + std::to_string(device) + ")");
  check(api_.p_cuDeviceGet(&peer_dev, peer), "cuDeviceGet(" + std::to_string(peer) + ")");
  int can = 0;
  check(api_.p_cuDeviceCanAccessPeer(&can, dev, peer_dev),
        "cuDeviceCanAccessPeer(device=" + std::to_string(device) + ", peer=" + std::to_string(peer) + ")");
  return can != 0;
}

void CudaDriver::enable_peer_access(int device, int peer) {
  check_device(device);
  check_device(peer);
  CUcontext peer_ctx = primary_context(peer);
  ContextGuard guard(*this, device);
  const CUresult res = api_.p_cuCtxEnablePeerAccess(peer_ctx, 0);
  if (res == CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED) return;
  check(res, "cuCtxEnablePeerAccess(device=" + std::to_string(device) + ", peer=" + std::to_string(peer) + ")");
}

StreamHandle CudaDriver::stream_create(int device) {
  check_device(device);
  ContextGuard guard(*this, device);
  CUstream s = nullptr;
  check(api_.p_cuStreamCreate(&s, CU_STREAM_NON_BLOCKING), "cuStreamCreate(NON_BLOCKING)");
  return reinterpret_cast<StreamHandle>(s);
}

void CudaDriver::stream_destroy(int device, StreamHandle stream) {
  ContextGuard guard(*this, device);
  check(api_.p_cuStreamDestroy(reinterpret_cast<CUstream>(stream)), "cuStreamDestroy(" + hex(stream) + ")");
}

void CudaDriver::stream_synchronize(int device, StreamHandle stream) {
  ContextGuard guard(*this, device);
  check(api_.p_cuStreamSynchronize(reinterpret_cast<CUstream>(stream)), "cuStreamSynchronize(" + hex(stream) + ")");
}

void CudaDriver::device_synchronize(int device) {
  CUcontext ctx = primary_context(device);
  ContextGuard guard(*this, device);
  const CUresult res = api_.p_cuCtxSynchronize ? api_.p_cuCtxSynchronize(ctx) : api_.p_cuCtxSynchronize_v2000();
  check(res, "cuCtxSynchronize(device " + std::to_string(device) + ", driver " + std::to_string(driver_version_) + ")");
}

bool CudaDriver::stream_is_capturing(int device, StreamHandle stream) {
  ContextGuard guard(*this, device);
  CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
  const CUresult res = api_.p_cuStreamIsCapturing(reinterpret_cast<CUstream>(stream), &status);
  // The legacy stream cannot be queried while another stream captures: treat it as capturing.
  if (res == CUDA_ERROR_STREAM_CAPTURE_IMPLICIT) return true;
  check(res, "cuStreamIsCapturing(" + hex(stream) + ")");
  return status != CU_STREAM_CAPTURE_STATUS_NONE;
}

EventHandle CudaDriver::event_create(int device) {
  check_device(device);
  ContextGuard guard(*this, device);
  CUevent e = nullptr;
  check(api_.p_cuEventCreate(&e, CU_EVENT_DISABLE_TIMING), "cuEventCreate(DISABLE_TIMING)");
  return reinterpret_cast<EventHandle>(e);
}

void CudaDriver::event_record(int device, EventHandle event, StreamHandle stream) {
  ContextGuard guard(*this, device);
  check(api_.p_cuEventRecord(reinterpret_cast<CUevent>(event), reinterpret_cast<CUstream>(stream)),
        "cuEventRecord(event=" + hex(event) + ", stream=" + hex(stream) + ")");
}

bool CudaDriver::event_query(int device, EventHandle event) {
  ContextGuard guard(*this, device);
  const CUresult res = api_.p_cuEventQuery(reinterpret_cast<CUevent>(event));
  if (res == CUDA_ERROR_NOT_READY) return false;
  check(res, "cuEventQuery(" + hex(event) + ")");
  return true;
}

void CudaDriver::event_synchronize(int device, EventHandle event) {
  ContextGuard guard(*this, device);
  check(api_.p_cuEventSynchronize(reinterpret_cast<CUevent>(event)), "cuEventSynchronize(" + hex(event) + ")");
}

void CudaDriver::event_destroy(int device, EventHandle event) {
  ContextGuard guard(*this, device);
  check(api_.p_cuEventDestroy(reinterpret_cast<CUevent>(event)), "cuEventDestroy(" + hex(event) + ")");
}

CaptureMode CudaDriver::exchange_capture_mode(CaptureMode mode) {
  auto m = static_cast<CUstreamCaptureMode>(static_cast<int>(mode));
  check(api_.p_cuThreadExchangeStreamCaptureMode(&m), "cuThreadExchangeStreamCaptureMode(" +
        std::to_string(static_cast<int>(mode)) + ")");
  return static_cast<CaptureMode>(static_cast<int>(m));
}

}  // namespace glake
