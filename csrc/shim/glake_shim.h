/* glake's libcuda shim: the calls a program may make to it (docs/shim.md, "Dedup").
 *
 * A program runs under the shim with `glake run --shim -- ./program`. These functions exist only
 * in the shim, so look them up at run time: without the shim the lookup fails and the program goes
 * on as before. Copy this header into your project; it needs nothing but cuda.h and dlfcn.h.
 *
 *     size_t shared = 0;
 *     glake_shim_dedup_share_fn share = glake_shim_dedup_share_lookup();
 *     if (share) share(weights, weight_bytes, &shared);   // after the weights are written, once
 */
#ifndef GLAKE_SHIM_H
#define GLAKE_SHIM_H

#include <cuda.h>
#include <dlfcn.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* With GLAKE_DEDUP=1: offers the whole 2 MiB chunks of [ptr, ptr + bytes), inside one cuMemAlloc
 * allocation, to the other processes of this user on the same GPU. A chunk whose bytes another
 * process already offered is replaced, at the same address, by that process's chunk mapped
 * read-only (bytes compared one by one first; the local copy is freed); the others become the
 * copies later processes map. From then on nobody may write to those chunks until the allocation
 * is freed (a write faults, which ends the CUDA context). Synchronises the context first.
 * *shared_bytes (may be NULL): the bytes of the allocation now shared. Returns CUDA_SUCCESS,
 * CUDA_ERROR_NOT_SUPPORTED without GLAKE_DEDUP=1, CUDA_ERROR_INVALID_VALUE for memory the shim
 * did not allocate, or another error; glake_shim_dedup_last_error() says why. */
CUresult glake_shim_dedup_share(CUdeviceptr ptr, size_t bytes, size_t* shared_bytes);

/* This process's figures: bytes of its allocations now shared, and of those the bytes mapped from
 * other processes' chunks (device memory this process did not need). */
CUresult glake_shim_dedup_stats(size_t* shared_bytes, size_t* saved_bytes);

/* Why the calling thread's last glake_shim_dedup_* call failed ("" after a success). */
const char* glake_shim_dedup_last_error(void);

typedef CUresult (*glake_shim_dedup_share_fn)(CUdeviceptr, size_t, size_t*);

/* The shim's glake_shim_dedup_share, or NULL when the program does not run under the shim. */
static inline glake_shim_dedup_share_fn glake_shim_dedup_share_lookup(void) {
  return (glake_shim_dedup_share_fn)dlsym(RTLD_DEFAULT, "glake_shim_dedup_share");
}

#ifdef __cplusplus
}
#endif

#endif /* GLAKE_SHIM_H */
