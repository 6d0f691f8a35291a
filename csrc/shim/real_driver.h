// The real CUDA driver behind the libcuda shim, loaded by absolute path (never by its soname, which
// inside a shimmed process names the shim itself), and the few of its entry points the shim calls.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <atomic>
#include <string>

#include "shim/export.h"

namespace glake::shim {

/// The real driver's entry points the shim's own code calls, each resolved with the real
/// cuGetProcAddress at the version whose signature its type names (ARCHITECTURE: "resolve by version").
struct RealApi {
  PFN_cuGetProcAddress_v12000 cuGetProcAddress_v2 = nullptr;  ///< dlsym: the one symbol every driver has
  PFN_cuGetProcAddress_v11030 cuGetProcAddress_v1 = nullptr;  ///< dlsym; null on drivers without it
  PFN_cuDriverGetVersion_v2020 cuDriverGetVersion = nullptr;
  PFN_cuCtxGetCurrent_v4000 cuCtxGetCurrent = nullptr;
  PFN_cuCtxGetDevice_v2000 cuCtxGetDevice = nullptr;
  PFN_cuCtxSynchronize_v2000 cuCtxSynchronize = nullptr;
  PFN_cuMemAlloc_v3020 cuMemAlloc = nullptr;
  PFN_cuMemFree_v3020 cuMemFree = nullptr;
  PFN_cuMemAllocPitch_v3020 cuMemAllocPitch = nullptr;
  PFN_cuMemGetAddressRange_v3020 cuMemGetAddressRange = nullptr;
  PFN_cuPointerGetAttribute_v4000 cuPointerGetAttribute = nullptr;
  PFN_cuPointerGetAttributes_v7000 cuPointerGetAttributes = nullptr;
  PFN_cuIpcGetMemHandle_v4010 cuIpcGetMemHandle = nullptr;
  // streams and events, for deferred frees (free_queue.h)
  PFN_cuStreamCreate_v2000 cuStreamCreate = nullptr;
  PFN_cuStreamCreateWithPriority_v5050 cuStreamCreateWithPriority = nullptr;
  PFN_cuStreamDestroy_v4000 cuStreamDestroy_v2 = nullptr;  // named as cuda.h renames it
  PFN_cuStreamIsCapturing_v10000 cuStreamIsCapturing = nullptr;
  PFN_cuThreadExchangeStreamCaptureMode_v10010 cuThreadExchangeStreamCaptureMode = nullptr;
  PFN_cuEventCreate_v2000 cuEventCreate = nullptr;
  PFN_cuEventRecord_v2000 cuEventRecord = nullptr;
  PFN_cuEventQuery_v2000 cuEventQuery = nullptr;
  PFN_cuEventSynchronize_v2000 cuEventSynchronize = nullptr;
  PFN_cuEventDestroy_v4000 cuEventDestroy = nullptr;
  // dedup's content operations (dedup_content.h)
  PFN_cuCtxGetId_v12000 cuCtxGetId = nullptr;
  PFN_cuModuleLoadData_v2000 cuModuleLoadData = nullptr;
  PFN_cuModuleGetFunction_v2000 cuModuleGetFunction = nullptr;
  PFN_cuLaunchKernel_v4000 cuLaunchKernel = nullptr;
  PFN_cuMemcpyDtoH_v3020 cuMemcpyDtoH = nullptr;
  PFN_cuMemsetD32_v3020 cuMemsetD32 = nullptr;
};

/// The loaded real driver: its dlopen handle, path and entry points.
struct RealDriver {
  void* handle = nullptr;
  std::string path;
  std::string error;  ///< why it could not be loaded (handle null)
  int version = 0;    ///< cuDriverGetVersion
  RealApi api;
};

/// The real driver, loaded on first use ($GLAKE_REAL_LIBCUDA, else the usual folders); thread-safe.
/// When it cannot be loaded, handle is null and error says why (printed once on stderr).
const RealDriver& real_driver();

/// The real driver's `name` (a dlsym of the exact exported name), cached in `slot`; null if absent.
void* real_symbol(std::atomic<void*>& slot, const char* name);

/// What a stub returns when the real driver lacks its symbol: CUDA_ERROR_NOT_FOUND (said once on stderr)
/// or CUDA_ERROR_NOT_INITIALIZED when no real driver could be loaded at all.
CUresult missing_symbol(const char* name);

/// Candidate paths of the real libcuda.so.1, in the order they are tried (without $GLAKE_REAL_LIBCUDA).
std::string candidate_paths_text();

}  // namespace glake::shim

extern "C" {
/// The real driver's dlopen handle (null if it cannot be loaded) and its path: how glake's cuda
/// backend (csrc/driver/cuda_driver.cpp) finds the real driver from inside a shimmed process.
GLAKE_SHIM_EXPORT void* glake_shim_real_libcuda(const char** path);
}
