// A plain CUDA driver-API program for the shim's tests (tests/shim/test_shim.py). Linked with
// -l:libcuda.so.1, it runs against the fake libcuda alone (the baseline) or under the glake shim.
//
//   driver_api suspend   buffers filled, a pause (SHIM_TEST_PAUSE), then read back ("R kept_ok")
//   driver_api basic     fragmenting alloc/free pattern, contents, cuMemGetInfo, address ranges,
//                        pointer attributes; pauses on stdin when SHIM_TEST_PAUSE=1 ("PAUSED <pid>")
//   driver_api procaddr  cuGetProcAddress hands back the shim's replacements, the driver's otherwise
//   driver_api ipc       cuIpcGetMemHandle on cuMemAlloc memory
//   driver_api fork      fork after allocating: what a child can do, and the parent goes on
//   driver_api threads   8 threads allocating, writing, reading and freeing at once
//   driver_api deferred  a buffer freed while a (slow) copy on a stream still reads it; a new
//                        allocation written meanwhile must not change what the copy reads
//
// Lines starting "R " must be the same with and without the shim; "C " lines are counters that differ.
#include <cuda.h>
#include <dlfcn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "check.h"

namespace {

/// The fake libcuda (FAKE_CUDA_PATH), for its call counters; null when not loaded.
void* fake() {
  const char* path = std::getenv("FAKE_CUDA_PATH");
  return path ? dlopen(path, RTLD_NOW | RTLD_NOLOAD) : nullptr;
}

long fake_calls(const char* name) {
  void* h = fake();
  auto fn = h ? reinterpret_cast<long (*)(const char*)>(dlsym(h, "fake_calls")) : nullptr;
  return fn ? fn(name) : -1;
}

void print_counters() {
  for (const char* n : {"cuMemAlloc", "cuMemFree", "cuMemCreate", "cuMemMap", "cuMemAddressReserve", "cuCtxSynchronize"}) {
    std::printf("C fake.%s %ld\n", n, fake_calls(n));
  }
}

/// Fills `n` bytes at `p` with a pattern of `seed` and reads them back; true when they match.
bool round_trip(CUdeviceptr p, size_t n, unsigned seed) {
  std::vector<unsigned char> in(n), out(n, 0);
  for (size_t i = 0; i < n; ++i) in[i] = static_cast<unsigned char>((i * 31 + seed) & 0xff);
  CHECK(cuMemcpyHtoD(p, in.data(), n));
  CHECK(cuMemcpyDtoH(out.data(), p, n));
  return in == out;
}

void pause_if_asked() {
  if (!std::getenv("SHIM_TEST_PAUSE")) return;
  std::printf("PAUSED %d\n", static_cast<int>(getpid()));
  std::fflush(stdout);
  char line[64];
  if (!std::fgets(line, sizeof(line), stdin)) std::exit(3);
}

int basic() {
  primary_context();
  const size_t MiB = 1 << 20;
  std::vector<CUdeviceptr> bufs;
  std::vector<size_t> sizes;
  for (int i = 0; i < 24; ++i) {  // 3..9 MiB, then every other one freed: holes no large request fits
    size_t n = (3 + i % 7) * MiB + 1000 * i;
    CUdeviceptr p;
    CHECK(cuMemAlloc(&p, n));
    bufs.push_back(p);
    sizes.push_back(n);
  }
  int contents_ok = 1;
  for (size_t i = 0; i < bufs.size(); ++i) contents_ok &= round_trip(bufs[i], sizes[i], unsigned(i));
  for (size_t i = 0; i < bufs.size(); i += 2) {
    CHECK(cuMemFree(bufs[i]));
    bufs[i] = 0;
  }
  for (int i = 0; i < 6; ++i) {  // larger than any hole
    size_t n = 20 * MiB + 4096 * i;
    CUdeviceptr p;
    CHECK(cuMemAlloc(&p, n));
    bufs.push_back(p);
    sizes.push_back(n);
  }
  CUdeviceptr pitched;
  size_t pitch = 0;
  CHECK(cuMemAllocPitch(&pitched, &pitch, 1000, 300, 4));
  std::printf("R pitch %zu\n", pitch);
  contents_ok &= round_trip(pitched, pitch * 300, 99);
  int range_ok = 1, attr_ok = 1;
  for (size_t i = 0; i < bufs.size(); ++i) {
    if (!bufs[i]) continue;
    contents_ok &= round_trip(bufs[i], sizes[i], unsigned(i) + 7);
    CUdeviceptr base = 0, start = 0;
    size_t size = 0, rsize = 0;
    const CUdeviceptr inner = bufs[i] + sizes[i] / 2;
    CHECK(cuMemGetAddressRange(&base, &size, inner));
    range_ok &= base == bufs[i] && size == sizes[i];
    unsigned int memtype = 0;
    int ordinal = -1;
    CHECK(cuPointerGetAttribute(&memtype, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, inner));
    CHECK(cuPointerGetAttribute(&start, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, inner));
    CHECK(cuPointerGetAttribute(&rsize, CU_POINTER_ATTRIBUTE_RANGE_SIZE, inner));
    CUpointer_attribute attrs[] = {CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, CU_POINTER_ATTRIBUTE_RANGE_SIZE};
    size_t rsize2 = 0;
    void* data[] = {&ordinal, &rsize2};
    CHECK(cuPointerGetAttributes(2, attrs, data, inner));
    attr_ok &= memtype == CU_MEMORYTYPE_DEVICE && start == bufs[i] && rsize == sizes[i] && rsize2 == sizes[i] &&
               ordinal == 0;
  }
  std::printf("R contents_ok %d\nR range_ok %d\nR attr_ok %d\n", contents_ok, range_ok, attr_ok);
  size_t free_b = 0, total = 0;
  CHECK(cuMemGetInfo(&free_b, &total));
  std::printf("R meminfo %zu %zu\n", free_b, total);
  std::printf("R interior_free %d\n", int(cuMemFree(bufs[1] + 16)));
  pause_if_asked();
  for (CUdeviceptr p : bufs) {
    if (p) CHECK(cuMemFree(p));
  }
  CHECK(cuMemFree(pitched));
  print_counters();
  std::printf("R done\n");
  return 0;
}

/// Buffers filled, a pause (the test suspends and resumes the process from outside), then the same
/// addresses read back: "R kept_ok 1" when every byte survived.
int suspended() {
  primary_context();
  const size_t MiB = 1 << 20;
  std::vector<CUdeviceptr> bufs;
  std::vector<size_t> sizes;
  for (int i = 0; i < 6; ++i) {
    size_t n = (1 + 3 * i) * MiB + 777 * i;
    CUdeviceptr p;
    CHECK(cuMemAlloc(&p, n));
    std::vector<unsigned char> in(n);
    for (size_t k = 0; k < n; ++k) in[k] = static_cast<unsigned char>((k * 13 + i) & 0xff);
    CHECK(cuMemcpyHtoD(p, in.data(), n));
    bufs.push_back(p);
    sizes.push_back(n);
  }
  pause_if_asked();
  int kept = 1;
  for (size_t i = 0; i < bufs.size(); ++i) {
    std::vector<unsigned char> out(sizes[i]);
    CHECK(cuMemcpyDtoH(out.data(), bufs[i], sizes[i]));
    for (size_t k = 0; k < sizes[i]; ++k) kept &= out[k] == static_cast<unsigned char>((k * 13 + i) & 0xff);
    CHECK(cuMemFree(bufs[i]));
  }
  std::printf("R kept_ok %d\n", kept);
  return 0;
}

int procaddr() {
  primary_context();
  void* h = fake();
  auto fake_gpa = h ? reinterpret_cast<decltype(&cuGetProcAddress)>(dlsym(h, "cuGetProcAddress_v2")) : nullptr;
  if (!fake_gpa) {
    std::fprintf(stderr, "FAIL no fake cuGetProcAddress_v2\n");
    return 1;
  }
  struct Q { const char* name; int version; };
  for (Q q : {Q{"cuMemAlloc", 12000}, Q{"cuMemFree", 13000}, Q{"cuMemAllocPitch", 12000},
              Q{"cuMemGetAddressRange", 12000}, Q{"cuPointerGetAttribute", 12000}, Q{"cuPointerGetAttributes", 12000},
              Q{"cuIpcGetMemHandle", 12000}, Q{"cuGetProcAddress", 12000}, Q{"cuMemcpyHtoD", 12000},
              Q{"cuMemGetInfo", 12000}, Q{"cuMemCreate", 12000}, Q{"cuCtxSynchronize", 13000}, Q{"cuInit", 12000},
              Q{"cuMemAlloc", 2000}, Q{"cuStreamCreate", 12000}, Q{"cuStreamDestroy", 12000}}) {
    void* mine = nullptr;
    void* real = nullptr;
    CUdriverProcAddressQueryResult s1{}, s2{};
    const CUresult r1 = cuGetProcAddress(q.name, &mine, q.version, CU_GET_PROC_ADDRESS_DEFAULT, &s1);
    const CUresult r2 = fake_gpa(q.name, &real, q.version, CU_GET_PROC_ADDRESS_DEFAULT, &s2);
    Dl_info info{};
    const char* lib = mine && dladdr(mine, &info) && info.dli_fname ? info.dli_fname : "?";
    const char* slash = std::strrchr(lib, '/');
    std::printf("P %s %d result=%d/%d status=%d/%d same=%d lib=%s\n", q.name, q.version, int(r1), int(r2), int(s1),
                int(s2), mine == real, slash ? slash + 1 : lib);
  }
  return 0;
}

int ipc() {
  primary_context();
  CUdeviceptr p;
  CHECK(cuMemAlloc(&p, 4 << 20));
  CUipcMemHandle h;
  std::printf("I ipc %d\n", int(cuIpcGetMemHandle(&h, p)));
  int capable = -1;
  CHECK(cuPointerGetAttribute(&capable, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, p));
  std::printf("I capable %d\n", capable);
  CHECK(cuMemFree(p));
  return 0;
}

int forked() {
  primary_context();
  CUdeviceptr p;
  CHECK(cuMemAlloc(&p, 8 << 20));
  int ok = round_trip(p, 8 << 20, 1);
  std::fflush(stdout);
  const pid_t child = fork();
  if (child == 0) {
    // The child: its allocations go to the driver (cuMemAlloc counted by the fake), never to glake.
    const long before = fake_calls("cuMemAlloc");
    CUdeviceptr q = 0;
    const CUresult r = cuMemAlloc(&q, 1 << 20);
    const long after = fake_calls("cuMemAlloc");
    const CUresult f = r == CUDA_SUCCESS ? cuMemFree(q) : CUDA_SUCCESS;
    std::printf("F child alloc=%d driver_allocs=%ld free=%d\n", int(r), after - before, int(f));
    std::fflush(stdout);
    _exit(0);
  }
  int status = 0;
  waitpid(child, &status, 0);
  const char* xdg = std::getenv("XDG_RUNTIME_DIR");
  const std::string page = std::string(xdg ? xdg : "/nonexistent") + "/glake/" + std::to_string(getpid()) + ".shim";
  std::printf("F child_exit %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  std::printf("F page_kept %d\n", access(page.c_str(), F_OK) == 0);
  CUdeviceptr q;
  CHECK(cuMemAlloc(&q, 16 << 20));  // the parent goes on as before
  ok &= round_trip(q, 16 << 20, 2) && round_trip(p, 8 << 20, 3);
  CHECK(cuMemFree(q));
  CHECK(cuMemFree(p));
  std::printf("F parent_ok %d\n", ok);
  return 0;
}

int threads() {
  CUcontext ctx = primary_context();
  std::vector<std::thread> ts;
  std::vector<int> ok(8, 1);
  for (int t = 0; t < 8; ++t) {
    ts.emplace_back([t, ctx, &ok] {
      CHECK(cuCtxSetCurrent(ctx));
      for (int i = 0; i < 60; ++i) {
        const size_t n = (1 + (i * 7 + t) % 6) * (1 << 20) + 512 * t;
        CUdeviceptr p;
        CHECK(cuMemAlloc(&p, n));
        ok[t] &= round_trip(p, n, unsigned(t * 100 + i));
        CUdeviceptr base;
        size_t size;
        CHECK(cuMemGetAddressRange(&base, &size, p + n - 1));
        ok[t] &= base == p && size == n;
        CHECK(cuMemFree(p));
      }
    });
  }
  for (auto& th : ts) th.join();
  int all = 1;
  for (int v : ok) all &= v;
  std::printf("R threads_ok %d\n", all);
  return 0;
}

/// A free while queued work still reads the buffer (FAKE_CUDA_COPY_DELAY_US makes the copy slow):
/// whatever the next allocation gets, writing it must not change what the copy delivers. Once more
/// with a stream destroyed right after its copy was queued.
int deferred() {
  primary_context();
  const size_t n = 4 << 20;
  int ok = 1;
  for (bool destroy : {false, true}) {
    CUstream s;
    CHECK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    CUdeviceptr a, c, b;
    CHECK(cuMemAlloc(&a, n));
    CHECK(cuMemAlloc(&c, n));
    std::vector<unsigned char> want(n), junk(n, 0x5a), got(n, 0);
    for (size_t i = 0; i < n; ++i) want[i] = static_cast<unsigned char>((i * 13 + 7) & 0xff);
    CHECK(cuMemcpyHtoD(a, want.data(), n));
    CHECK(cuMemcpyAsync(c, a, n, s));  // still reading a for FAKE_CUDA_COPY_DELAY_US
    if (destroy) CHECK(cuStreamDestroy(s));
    CHECK(cuMemFree(a));
    usleep(100000);  // the legacy stream is idle by now: only the copy's stream holds a back
    CHECK(cuMemAlloc(&b, n));
    CHECK(cuMemcpyHtoD(b, junk.data(), n));  // the legacy stream: does not wait for s
    if (destroy) {
      CHECK(cuCtxSynchronize());
    } else {
      CHECK(cuStreamSynchronize(s));
      CHECK(cuStreamDestroy(s));
    }
    CHECK(cuMemcpyDtoH(got.data(), c, n));
    ok &= got == want;
    CHECK(cuMemFree(b));
    CHECK(cuMemFree(c));
  }
  std::printf("R deferred_ok %d\n", ok);
  print_counters();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "basic";
  if (mode == "basic") return basic();
  if (mode == "procaddr") return procaddr();
  if (mode == "ipc") return ipc();
  if (mode == "fork") return forked();
  if (mode == "threads") return threads();
  if (mode == "suspend") return suspended();
  if (mode == "deferred") return deferred();
  std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
  return 2;
}
