// The stream entry points the shim replaces so that deferred frees (free_queue.h) know every stream
// of a context: cuStreamCreate/cuStreamCreateWithPriority note the new stream, cuStreamDestroy
// (both names) records an event after its last work first. Each then is the real driver's call.
#include <cuda.h>

#include "shim/real_driver.h"
#include "shim/shim_state.h"

#undef cuStreamDestroy  // cuda.h maps it to cuStreamDestroy_v2; programs built long ago link the old name

extern "C" {
GLAKE_SHIM_EXPORT CUresult CUDAAPI cuStreamDestroy(CUstream hStream);
}

namespace {

/// Notes a stream the real driver just made in the calling thread's current context.
void note_stream(CUresult r, CUstream* s) {
  const glake::shim::RealDriver& d = glake::shim::real_driver();
  CUcontext ctx = nullptr;
  if (r != CUDA_SUCCESS || !s || !*s || d.api.cuCtxGetCurrent(&ctx) != CUDA_SUCCESS || !ctx) return;
  glake::shim::state().frees.stream_created(ctx, *s);
}

CUresult destroy(CUstream s) {
  const glake::shim::RealDriver& d = glake::shim::real_driver();
  if (!d.handle || !d.api.cuStreamDestroy_v2) return CUDA_ERROR_NOT_INITIALIZED;
  if (s) glake::shim::state().frees.stream_destroying(s, d.api);
  return d.api.cuStreamDestroy_v2(s);
}

}  // namespace

extern "C" {

CUresult CUDAAPI cuStreamCreate(CUstream* phStream, unsigned int Flags) {
  const glake::shim::RealDriver& d = glake::shim::real_driver();
  if (!d.handle || !d.api.cuStreamCreate) return CUDA_ERROR_NOT_INITIALIZED;
  const CUresult r = d.api.cuStreamCreate(phStream, Flags);
  note_stream(r, phStream);
  return r;
}

CUresult CUDAAPI cuStreamCreateWithPriority(CUstream* phStream, unsigned int flags, int priority) {
  const glake::shim::RealDriver& d = glake::shim::real_driver();
  if (!d.handle || !d.api.cuStreamCreateWithPriority) return CUDA_ERROR_NOT_INITIALIZED;
  const CUresult r = d.api.cuStreamCreateWithPriority(phStream, flags, priority);
  note_stream(r, phStream);
  return r;
}

CUresult CUDAAPI cuStreamDestroy_v2(CUstream hStream) { return destroy(hStream); }

CUresult CUDAAPI cuStreamDestroy(CUstream hStream) { return destroy(hStream); }

}  // extern "C"
