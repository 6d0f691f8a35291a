// VMM call costs by physical chunk (handle) size, straight on the CUDA driver: 4 GiB made of chunks of
// 2..2048 MiB, each call timed over all chunks and reported per GiB. Built and run by
// benchmarks/vmm_chunk_size.py (needs a GPU and libcuda). A second range maps the same chunks again
// (what a stitch does). Mapping with an offset into a chunk is tried first: driver 580 refuses it.
#include <cuda.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#define CK(x) do { CUresult r = (x); if (r != CUDA_SUCCESS) { const char* s; cuGetErrorName(r, &s); printf("FAIL %s: %s line %d\n", #x, s, __LINE__); exit(1);} } while (0)
static double now() { return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
int main() {
  CK(cuInit(0)); CUdevice dev; CK(cuDeviceGet(&dev, 0)); CUcontext ctx; CK(cuDevicePrimaryCtxRetain(&ctx, dev)); CK(cuCtxSetCurrent(ctx));
  CUmemAllocationProp prop = {}; prop.type = CU_MEM_ALLOCATION_TYPE_PINNED; prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE; prop.location.id = 0;
  CUmemAccessDesc acc = {}; acc.location = prop.location; acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  const size_t MiB = 1 << 20, total = 4096 * MiB;
  {  // cuMemMap with an offset into a chunk
    CUmemGenericAllocationHandle h; CUdeviceptr v; CK(cuMemCreate(&h, 8 * MiB, &prop, 0)); CK(cuMemAddressReserve(&v, 2 * MiB, 0, 0, 0));
    CUresult r = cuMemMap(v, 2 * MiB, 2 * MiB, h, 0); const char* name; cuGetErrorName(r, &name);
    printf("offset_map %s\n", name);
    if (r == CUDA_SUCCESS) CK(cuMemUnmap(v, 2 * MiB));
    CK(cuMemAddressFree(v, 2 * MiB)); CK(cuMemRelease(h));
  }
  printf("chunk_MiB create map set_access set_access_2nd_va unmap release  (us per GiB)\n");
  for (size_t hs : {2, 8, 32, 128, 512, 2048}) {
    size_t h = hs * MiB, n = total / h; std::vector<CUmemGenericAllocationHandle> hd(n);
    CUdeviceptr va, va2; CK(cuMemAddressReserve(&va, total, 0, 0, 0)); CK(cuMemAddressReserve(&va2, total, 0, 0, 0));
    double t0 = now(); for (size_t i = 0; i < n; ++i) CK(cuMemCreate(&hd[i], h, &prop, 0));
    double t1 = now(); for (size_t i = 0; i < n; ++i) CK(cuMemMap(va + i * h, h, 0, hd[i], 0));
    double t2 = now(); CK(cuMemSetAccess(va, total, &acc, 1));
    double t3 = now();
    // second VA (a stitch over already-accessed memory), whole handles
    for (size_t i = 0; i < n; ++i) CK(cuMemMap(va2 + i * h, h, 0, hd[i], 0));
    double t4 = now(); CK(cuMemSetAccess(va2, total, &acc, 1)); double t5 = now();
    for (size_t i = 0; i < n; ++i) CK(cuMemUnmap(va2 + i * h, h));
    double t9 = now(); for (size_t i = 0; i < n; ++i) CK(cuMemUnmap(va + i * h, h));
    double t10 = now(); for (size_t i = 0; i < n; ++i) CK(cuMemRelease(hd[i]));
    double t11 = now();
    const double g = total / double(1 << 30);
    printf("%6zu %8.0f %8.0f %8.0f %8.0f %8.0f %8.0f\n", hs, (t1 - t0) / g, (t2 - t1) / g, (t3 - t2) / g, (t5 - t4) / g,
           (t10 - t9) / g, (t11 - t10) / g);
    CK(cuMemAddressFree(va, total)); CK(cuMemAddressFree(va2, total));
  }
  return 0;
}
