// For the shim's test programs: CHECK(call), which ends the program at a failed driver call with its
// line, and the usual start (device 0's primary context, current).
#pragma once

#include <cuda.h>

#include <cstdio>
#include <cstdlib>

#define CHECK(call)                                                                \
  do {                                                                             \
    CUresult r_ = (call);                                                          \
    if (r_ != CUDA_SUCCESS) {                                                      \
      std::fprintf(stderr, "FAIL %s = %d at line %d\n", #call, int(r_), __LINE__); \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

/// cuInit, then device 0's primary context made current.
inline CUcontext primary_context() {
  CHECK(cuInit(0));
  CUdevice dev;
  CHECK(cuDeviceGet(&dev, 0));
  CUcontext ctx;
  CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
  CHECK(cuCtxSetCurrent(ctx));
  return ctx;
}
