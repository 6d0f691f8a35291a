// CHECK(call) for the shim's test programs: a driver call that fails ends the program with its line.
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
