// A CUDA runtime program for the shim's tests: cudaMalloc/cudaMemcpy/cudaMemGetInfo/
// cudaPointerGetAttributes/cudaFree, built with nvcc against libcudart (static and shared).
// On the fake libcuda the runtime stops at cuGetExportTable (see docs/shim.md), so the test only
// checks that the runtime reaches the driver through the shim and fares the same as without it.
#include <cuda_runtime.h>
#include <cstdio>
#include <vector>
int main() {
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, 8 << 20);
  std::printf("malloc %d %s\n", int(e), cudaGetErrorString(e));
  if (e) return 1;
  std::vector<char> in(8 << 20, 7), out(8 << 20, 0);
  e = cudaMemcpy(p, in.data(), in.size(), cudaMemcpyHostToDevice); std::printf("h2d %d\n", int(e));
  e = cudaMemcpy(out.data(), p, out.size(), cudaMemcpyDeviceToHost); std::printf("d2h %d eq=%d\n", int(e), in == out);
  size_t f, t; e = cudaMemGetInfo(&f, &t); std::printf("meminfo %d %zu %zu\n", int(e), f, t);
  cudaPointerAttributes a{}; e = cudaPointerGetAttributes(&a, p); std::printf("attr %d type=%d dev=%d\n", int(e), int(a.type), a.device);
  e = cudaFree(p); std::printf("free %d\n", int(e));
  return 0;
}
