// cuGetProcAddress (both versions): the door the CUDA runtime uses for every entry point. Each call is
// answered by the real driver, then the shim's own function replaces the answer for the names it
// replaces (at the versions whose signature it implements). No allocation and no start-up of glake
// here: only a table lookup (glake starts on the first replaced call).
#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstring>

#include "shim/real_driver.h"
#include "shim/shim_state.h"

#undef cuGetProcAddress  // cuda.h maps it to cuGetProcAddress_v2; the legacy 4-argument one is exported too
#undef cuStreamDestroy   // likewise cuStreamDestroy_v2 (replaced_streams.cpp)

extern "C" {
GLAKE_SHIM_EXPORT CUresult CUDAAPI cuGetProcAddress(const char* symbol, void** pfn, int cudaVersion, cuuint64_t flags);
GLAKE_SHIM_EXPORT CUresult CUDAAPI cuStreamDestroy(CUstream hStream);
}

namespace glake::shim {

namespace {

/// One replaced entry point: the shim's function for requested versions from `since` on.
struct Replacement {
  const char* name;
  int since;
  void* fn;
};

#define GLAKE_REPLACED(name, since, fn) \
  Replacement{#name, since, reinterpret_cast<void*>(static_cast<PFN_##name##_v##since>(&fn))}
const Replacement kReplacements[] = {
    GLAKE_REPLACED(cuMemAlloc, 3020, cuMemAlloc_v2),
    GLAKE_REPLACED(cuMemFree, 3020, cuMemFree_v2),
    GLAKE_REPLACED(cuMemAllocPitch, 3020, cuMemAllocPitch_v2),
    GLAKE_REPLACED(cuMemGetAddressRange, 3020, cuMemGetAddressRange_v2),
    GLAKE_REPLACED(cuPointerGetAttribute, 4000, cuPointerGetAttribute),
    GLAKE_REPLACED(cuPointerGetAttributes, 7000, cuPointerGetAttributes),
    GLAKE_REPLACED(cuIpcGetMemHandle, 4010, cuIpcGetMemHandle),
    GLAKE_REPLACED(cuStreamCreate, 2000, cuStreamCreate),
    GLAKE_REPLACED(cuStreamCreateWithPriority, 5050, cuStreamCreateWithPriority),
    // the 2000 signature is the 4000 one (its typedef exists only in the driver's own build)
    Replacement{"cuStreamDestroy", 2000, reinterpret_cast<void*>(static_cast<PFN_cuStreamDestroy_v4000>(&cuStreamDestroy))},
    GLAKE_REPLACED(cuStreamDestroy, 4000, cuStreamDestroy_v2),
    GLAKE_REPLACED(cuGetProcAddress, 11030, cuGetProcAddress),
    GLAKE_REPLACED(cuGetProcAddress, 12000, cuGetProcAddress_v2),
};
#undef GLAKE_REPLACED

/// The shim's variant of `name` for a caller asking at `version`, or null (the real answer stands).
/// The newest of the shim's variants not newer than `version`; a caller of a newer major version than
/// the headers the shim was built with may expect a variant the shim does not know: not replaced.
void* replacement(const char* name, int version) {
  if (version / 1000 > CUDA_VERSION / 1000) {
    for (const Replacement& r : kReplacements) {
      if (std::strcmp(r.name, name) == 0) {
        warn_once(std::string("version") + name, std::string("cuGetProcAddress(") + name + ", version=" +
                  std::to_string(version) + "): newer than the CUDA " + std::to_string(CUDA_VERSION) +
                  " headers glake was built with, so the driver's own is used (rebuild glake with newer headers)");
        break;
      }
    }
    return nullptr;
  }
  const Replacement* best = nullptr;
  for (const Replacement& r : kReplacements) {
    if (r.since <= version && std::strcmp(r.name, name) == 0 && (!best || r.since > best->since)) best = &r;
  }
  return best ? best->fn : nullptr;
}

}  // namespace

}  // namespace glake::shim

extern "C" {

CUresult CUDAAPI cuGetProcAddress_v2(const char* symbol, void** pfn, int cudaVersion, cuuint64_t flags,
                                     CUdriverProcAddressQueryResult* symbolStatus) {
  const glake::shim::RealDriver& d = glake::shim::real_driver();
  if (!d.handle) {
    if (symbolStatus) *symbolStatus = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    return CUDA_ERROR_NOT_INITIALIZED;
  }
  const CUresult r = d.api.cuGetProcAddress_v2(symbol, pfn, cudaVersion, flags, symbolStatus);
  if (r == CUDA_SUCCESS && symbol && pfn && *pfn) {
    const int effective = d.version > 0 && d.version < cudaVersion ? d.version : cudaVersion;
    if (void* mine = glake::shim::replacement(symbol, effective)) *pfn = mine;
  }
  return r;
}

CUresult CUDAAPI cuGetProcAddress(const char* symbol, void** pfn, int cudaVersion, cuuint64_t flags) {
  const glake::shim::RealDriver& d = glake::shim::real_driver();
  if (!d.handle) return CUDA_ERROR_NOT_INITIALIZED;
  const CUresult r = d.api.cuGetProcAddress_v1 ? d.api.cuGetProcAddress_v1(symbol, pfn, cudaVersion, flags)
                                               : d.api.cuGetProcAddress_v2(symbol, pfn, cudaVersion, flags, nullptr);
  if (r == CUDA_SUCCESS && symbol && pfn && *pfn) {
    const int effective = d.version > 0 && d.version < cudaVersion ? d.version : cudaVersion;
    if (void* mine = glake::shim::replacement(symbol, effective)) *pfn = mine;
  }
  return r;
}

}  // extern "C"
