// The entry points the shim replaces: cuMemAlloc/cuMemAllocPitch/cuMemFree go to glake's stitched
// allocator of the current context's device; cuMemGetAddressRange, cuPointerGetAttribute(s) answer for
// glake's allocations; cuIpcGetMemHandle refuses glake memory. Anything glake did not allocate, and
// every call made while glake cannot run, goes to the real driver unchanged.
//
// cuMemFree returns at once: the block goes back to glake's cache once events recorded at the free
// on every stream of the context have completed (free_queue.h), so no work queued before the free
// can touch memory a later allocation reuses. Where that cannot be done (a capture under way), and
// with GLAKE_SHIM_FREE=sync, it synchronises the context first (cuCtxSynchronize), as cudaFree is
// said to.
#include <cuda.h>

#include <cstdio>
#include <string>
#include <vector>

#include "common/error.h"
#include "gmlake/registry.h"
#include "shim/dedup_share.h"
#include "shim/real_driver.h"
#include "shim/shim_state.h"

namespace glake::shim {

namespace {

std::string hex(std::uintptr_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

/// The calling thread's current context and its device; CUDA's error when there is none.
CUresult current_device(const RealDriver& d, int* device, CUcontext* context = nullptr) {
  CUcontext ctx = nullptr;
  if (CUresult r = d.api.cuCtxGetCurrent(&ctx)) return r;
  if (!ctx) return CUDA_ERROR_INVALID_CONTEXT;
  CUdevice dev = 0;
  if (CUresult r = d.api.cuCtxGetDevice(&dev)) return r;
  *device = static_cast<int>(dev);
  if (context) *context = ctx;
  return CUDA_SUCCESS;
}

/// Gives a freed allocation's memory back to glake's allocator; false (said once) if glake refused.
/// Out of memory (a dedup-shared buffer's chunks must become private first): the allocation is live
/// again, and a later cuMemFree may try again.
bool give_back(const ShimAllocation& a) {
  try {
    GlakeScope scope;
    gmlake::device_allocator(a.device).free(static_cast<DevPtr>(a.base));  // shared chunks made private first
  } catch (const OutOfMemoryError& e) {  // a dedup-shared buffer found no memory to become private in
    warn_once(std::string("free") + e.what(), "cuMemFree(" + hex(a.base) + ") failed in glake: " + e.what());
    state().table.insert(a);
    return false;
  } catch (const std::exception& e) {
    warn_once(std::string("free") + e.what(), "cuMemFree(" + hex(a.base) + ") failed in glake: " + e.what());
    return false;
  }
  dedup::forget(a.base);
  state().counters.changes.fetch_add(1, std::memory_order_relaxed);
  return true;
}

/// `bytes` from glake's allocator of `device` (glake_serves() was true).
CUresult glake_malloc(CUdeviceptr* dptr, std::size_t bytes, int device, const char* call) {
  ShimState& s = state();
  DevPtr p = 0;
  try {
    GlakeScope scope;
    p = gmlake::device_allocator(device).malloc(bytes, 0);  // stream 0: a free is given back only after every stream's work before it
  } catch (const OutOfMemoryError&) {
    s.counters.alloc_failures.fetch_add(1, std::memory_order_relaxed);
    s.counters.changes.fetch_add(1, std::memory_order_relaxed);
    return CUDA_ERROR_OUT_OF_MEMORY;  // as the driver: no message (programs probe with failing sizes)
  } catch (const std::exception& e) {
    s.counters.alloc_failures.fetch_add(1, std::memory_order_relaxed);
    warn_once(std::string(call) + e.what(), std::string(call) + "(bytes=" + std::to_string(bytes) + ", device=" +
                                                std::to_string(device) + ") failed in glake: " + e.what());
    return dynamic_cast<const InvalidArgumentError*>(&e) ? CUDA_ERROR_INVALID_VALUE : CUDA_ERROR_UNKNOWN;
  }
  s.table.insert(ShimAllocation{p, bytes, device});
  s.counters.alloc_calls.fetch_add(1, std::memory_order_relaxed);
  s.counters.changes.fetch_add(1, std::memory_order_relaxed);
  *dptr = static_cast<CUdeviceptr>(p);
  return CUDA_SUCCESS;
}

/// Gives back the deferred frees of `ctx` whose work is done.
void reap(CUcontext ctx) {
  for (const ShimAllocation& a : state().frees.take_done(ctx, real_driver().api)) give_back(a);
}

/// Waits for the oldest deferred free of `ctx` and gives it back; false if none waits.
bool reap_oldest(CUcontext ctx) {
  ShimAllocation a;
  if (!state().frees.take_oldest(ctx, real_driver().api, &a)) return false;
  give_back(a);
  return true;
}

/// Before allocating `bytes` on `device`: the frees whose work is done go back; then, while glake's
/// cache holds fewer free bytes than asked for and frees still wait, the oldest is waited for. So
/// the allocator grows only when the queued frees could not have served the request either (an
/// idle GPU answers in microseconds; a busy one is waited for, as a synchronising free would).
void reap_for(CUcontext ctx, int device, std::size_t bytes) {
  reap(ctx);
  while (true) {
    std::int64_t pending = 0, pending_bytes = 0;
    state().frees.totals(&pending, &pending_bytes);
    if (!pending) return;
    std::int64_t cached = 0;
    {
      GlakeScope scope;
      const gmlake::AllocatorStats st = gmlake::device_allocator(device).stats();
      cached = st.reserved_bytes.current - st.allocated_bytes.current;
    }
    const auto want = static_cast<std::int64_t>(bytes);
    if (cached >= want || cached + pending_bytes < want) return;  // enough now, or the queue could not make it so
    if (!reap_oldest(ctx)) return;
  }
}

/// glake_malloc after reap_for; on out-of-memory, every deferred free of `ctx` is waited for and
/// given back, then it tries once more.
CUresult malloc_after_frees(CUdeviceptr* dptr, std::size_t bytes, int device, CUcontext ctx, const char* call) {
  reap_for(ctx, device, bytes);
  CUresult r = glake_malloc(dptr, bytes, device, call);
  if (r != CUDA_ERROR_OUT_OF_MEMORY || !reap_oldest(ctx)) return r;
  while (reap_oldest(ctx)) {
  }
  return glake_malloc(dptr, bytes, device, call);
}

/// Whether glake serves this thread's calls now (false inside glake's core: those reach the driver).
bool glake_serves() {
  if (in_glake()) {
    state().counters.reentries.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  return ensure_started() == Mode::Active;
}

/// The live glake allocation containing `ptr`, when glake is active in this process.
bool glake_allocation(CUdeviceptr ptr, ShimAllocation* a) {
  if (state().mode.load(std::memory_order_acquire) != static_cast<int>(Mode::Active) || in_glake()) return false;
  return state().table.find(static_cast<std::uintptr_t>(ptr), a);
}

/// Answers one attribute for a glake allocation; false for those the real driver answers truthfully.
bool glake_attribute(const ShimAllocation& a, CUpointer_attribute attr, void* data) {
  switch (attr) {
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:  // the allocation, not the segment or stitched reservation
      *static_cast<CUdeviceptr*>(data) = static_cast<CUdeviceptr>(a.base);
      return true;
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE:
      *static_cast<size_t*>(data) = a.size;
      return true;
    case CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:  // VMM memory: cuIpcGetMemHandle cannot share it
      *static_cast<int*>(data) = 0;
      return true;
    default:
      return false;
  }
}

}  // namespace

}  // namespace glake::shim

using glake::shim::real_driver;
using glake::shim::ShimAllocation;
using glake::shim::state;

extern "C" {

CUresult CUDAAPI cuMemAlloc_v2(CUdeviceptr* dptr, size_t bytesize) {
  const glake::shim::RealDriver& d = real_driver();
  if (!d.handle || !d.api.cuMemAlloc) return CUDA_ERROR_NOT_INITIALIZED;
  int device = -1;  // asked before glake starts: no context (or no cuInit) is the driver's own error
  CUcontext ctx = nullptr;
  if (!dptr || bytesize == 0 || glake::shim::current_device(d, &device, &ctx) || !glake::shim::glake_serves()) {
    if (dptr && bytesize) state().counters.passthrough_allocs.fetch_add(1, std::memory_order_relaxed);
    return d.api.cuMemAlloc(dptr, bytesize);  // the driver's answer, errors included
  }
  return glake::shim::malloc_after_frees(dptr, bytesize, device, ctx, "cuMemAlloc");
}

CUresult CUDAAPI cuMemAllocPitch_v2(CUdeviceptr* dptr, size_t* pPitch, size_t WidthInBytes, size_t Height,
                                    unsigned int ElementSizeBytes) {
  const glake::shim::RealDriver& d = real_driver();
  if (!d.handle || !d.api.cuMemAllocPitch) return CUDA_ERROR_NOT_INITIALIZED;
  const bool valid = dptr && pPitch && WidthInBytes && Height &&
                     (ElementSizeBytes == 4 || ElementSizeBytes == 8 || ElementSizeBytes == 16);
  int device = -1;
  CUcontext ctx = nullptr;
  if (!valid || glake::shim::current_device(d, &device, &ctx) || !glake::shim::glake_serves()) {
    if (valid) state().counters.passthrough_allocs.fetch_add(1, std::memory_order_relaxed);
    return d.api.cuMemAllocPitch(dptr, pPitch, WidthInBytes, Height, ElementSizeBytes);
  }
  // Rows padded to 512 bytes: a multiple of every GPU's texture pitch alignment, as cuMemAllocPitch gives.
  const size_t pitch = (WidthInBytes + 511) / 512 * 512;
  CUresult r = glake::shim::malloc_after_frees(dptr, pitch * Height, device, ctx, "cuMemAllocPitch");
  if (r == CUDA_SUCCESS) *pPitch = pitch;
  return r;
}

CUresult CUDAAPI cuMemFree_v2(CUdeviceptr dptr) {
  const glake::shim::RealDriver& d = real_driver();
  if (!d.handle || !d.api.cuMemFree) return CUDA_ERROR_NOT_INITIALIZED;
  ShimAllocation a;
  if (!dptr || !glake::shim::glake_allocation(dptr, &a)) {
    state().counters.passthrough_frees.fetch_add(1, std::memory_order_relaxed);
    return d.api.cuMemFree(dptr);
  }
  if (a.base != static_cast<std::uintptr_t>(dptr)) return CUDA_ERROR_INVALID_VALUE;  // interior pointer, as CUDA
  glake::shim::ShimState& s = state();
  CUcontext ctx = nullptr;
  if (d.api.cuCtxGetCurrent(&ctx) != CUDA_SUCCESS || !ctx) return CUDA_ERROR_INVALID_CONTEXT;
  if (!s.table.erase(a.base)) return CUDA_ERROR_INVALID_VALUE;  // another thread freed it meanwhile
  if (glake::shim::FreeQueue::enabled() && s.frees.defer(ctx, a, d.api)) {
    s.counters.free_deferred.fetch_add(1, std::memory_order_relaxed);
  } else {
    // cudaFree's implicit synchronisation: nothing queued before the free may see the memory reused.
    if (CUresult r = d.api.cuCtxSynchronize()) {  // e.g. during a capture: refused, nothing freed
      s.table.insert(a);
      return r;
    }
    s.frees.synchronised(ctx);
    s.counters.free_syncs.fetch_add(1, std::memory_order_relaxed);
    if (!glake::shim::give_back(a)) return CUDA_ERROR_UNKNOWN;
  }
  glake::shim::reap(ctx);
  s.counters.free_calls.fetch_add(1, std::memory_order_relaxed);
  s.counters.changes.fetch_add(1, std::memory_order_relaxed);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemGetAddressRange_v2(CUdeviceptr* pbase, size_t* psize, CUdeviceptr dptr) {
  const glake::shim::RealDriver& d = real_driver();
  if (!d.handle || !d.api.cuMemGetAddressRange) return CUDA_ERROR_NOT_INITIALIZED;
  ShimAllocation a;
  if (!glake::shim::glake_allocation(dptr, &a)) return d.api.cuMemGetAddressRange(pbase, psize, dptr);
  // The driver would answer the one chunk holding dptr (ARCHITECTURE: multi-handle VMM ranges): answer
  // the allocation, stitched ones too.
  if (pbase) *pbase = static_cast<CUdeviceptr>(a.base);
  if (psize) *psize = a.size;
  state().counters.attribute_answers.fetch_add(1, std::memory_order_relaxed);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuPointerGetAttribute(void* data, CUpointer_attribute attribute, CUdeviceptr ptr) {
  const glake::shim::RealDriver& d = real_driver();
  if (!d.handle || !d.api.cuPointerGetAttribute) return CUDA_ERROR_NOT_INITIALIZED;
  ShimAllocation a;
  if (data && glake::shim::glake_allocation(ptr, &a) && glake::shim::glake_attribute(a, attribute, data)) {
    state().counters.attribute_answers.fetch_add(1, std::memory_order_relaxed);
    return CUDA_SUCCESS;
  }
  return d.api.cuPointerGetAttribute(data, attribute, ptr);
}

CUresult CUDAAPI cuPointerGetAttributes(unsigned int numAttributes, CUpointer_attribute* attributes, void** data,
                                        CUdeviceptr ptr) {
  const glake::shim::RealDriver& d = real_driver();
  if (!d.handle || !d.api.cuPointerGetAttributes) return CUDA_ERROR_NOT_INITIALIZED;
  ShimAllocation a;
  if (!attributes || !data || !glake::shim::glake_allocation(ptr, &a)) {
    return d.api.cuPointerGetAttributes(numAttributes, attributes, data, ptr);
  }
  std::vector<CUpointer_attribute> rest_attrs;  // the ones the real driver answers
  std::vector<void*> rest_data;
  for (unsigned i = 0; i < numAttributes; ++i) {
    if (!glake::shim::glake_attribute(a, attributes[i], data[i])) {
      rest_attrs.push_back(attributes[i]);
      rest_data.push_back(data[i]);
    }
  }
  state().counters.attribute_answers.fetch_add(1, std::memory_order_relaxed);
  if (rest_attrs.empty()) return CUDA_SUCCESS;
  return d.api.cuPointerGetAttributes(static_cast<unsigned>(rest_attrs.size()), rest_attrs.data(), rest_data.data(), ptr);
}

CUresult CUDAAPI cuIpcGetMemHandle(CUipcMemHandle* pHandle, CUdeviceptr dptr) {
  const glake::shim::RealDriver& d = real_driver();
  if (!d.handle || !d.api.cuIpcGetMemHandle) return CUDA_ERROR_NOT_INITIALIZED;
  ShimAllocation a;
  if (!glake::shim::glake_allocation(dptr, &a)) return d.api.cuIpcGetMemHandle(pHandle, dptr);
  state().counters.ipc_refusals.fetch_add(1, std::memory_order_relaxed);
  glake::shim::warn_once("ipc", "cuIpcGetMemHandle(ptr=" + glake::shim::hex(a.base) + ", size=" +
                                    std::to_string(a.size) + ") on memory glake allocated: legacy CUDA IPC does not "
                                    "work on VMM memory and this shim does not support IPC yet; returning "
                                    "CUDA_ERROR_NOT_SUPPORTED (run the program without --shim to share it this way)");
  return CUDA_ERROR_NOT_SUPPORTED;
}

}  // extern "C"
