// The shim benchmark's driver-API program (benchmarks/shim.py builds it with g++ -lcuda and runs it with
// and without `glake run --shim`).
//
//   shim_bench latency SIZE_BYTES PAIRS   -> "latency SIZE median_us"  (cuMemAlloc + cuMemFree per pair)
//   shim_bench trace SEED STEPS           -> "trace peak_used_bytes peak_live_bytes"
//
// The trace is a fragmenting pattern: a pool of live buffers of mixed sizes (64 KiB .. 48 MiB, skewed to
// small ones) where each step frees a random one and allocates a new random size; device memory in use
// (cuMemGetInfo: total - free) is read after every allocation.
#include <cuda.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#define CHECK(call)                                                              \
  do {                                                                           \
    CUresult r_ = (call);                                                        \
    if (r_ != CUDA_SUCCESS) {                                                    \
      std::fprintf(stderr, "FAIL %s = %d at line %d\n", #call, int(r_), __LINE__); \
      std::exit(1);                                                              \
    }                                                                            \
  } while (0)

static void setup() {
  CHECK(cuInit(0));
  CUdevice dev;
  CHECK(cuDeviceGet(&dev, 0));
  CUcontext ctx;
  CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
  CHECK(cuCtxSetCurrent(ctx));
}

static int latency(size_t size, int pairs) {
  std::vector<double> us;
  for (int i = 0; i < pairs + 5; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    CUdeviceptr p;
    CHECK(cuMemAlloc(&p, size));
    CHECK(cuMemFree(p));
    auto t1 = std::chrono::steady_clock::now();
    if (i >= 5) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());  // 5 warm-ups
  }
  std::sort(us.begin(), us.end());
  std::printf("latency %zu %.3f\n", size, us[us.size() / 2]);
  return 0;
}

static size_t used() {
  size_t free_b = 0, total = 0;
  CHECK(cuMemGetInfo(&free_b, &total));
  return total - free_b;
}

static int trace(unsigned seed, int steps) {
  std::mt19937_64 rng(seed);
  const size_t KiB = 1024, MiB = 1024 * KiB;
  auto draw = [&]() -> size_t {
    double u = std::uniform_real_distribution<double>(0, 1)(rng);
    size_t lo = 64 * KiB, hi = 48 * MiB;  // log-uniform: most buffers small, some large
    return size_t(double(lo) * std::pow(double(hi) / double(lo), u * u)) / 512 * 512 + 512;
  };
  const size_t base = used();
  std::vector<std::pair<CUdeviceptr, size_t>> live;
  size_t live_bytes = 0, peak_live = 0, peak_used = 0;
  for (int i = 0; i < 64; ++i) {
    size_t n = draw();
    CUdeviceptr p;
    CHECK(cuMemAlloc(&p, n));
    live.push_back({p, n});
    live_bytes += n;
  }
  for (int s = 0; s < steps; ++s) {
    size_t k = std::uniform_int_distribution<size_t>(0, live.size() - 1)(rng);
    CHECK(cuMemFree(live[k].first));
    live_bytes -= live[k].second;
    size_t n = draw();
    CUdeviceptr p;
    CHECK(cuMemAlloc(&p, n));
    live[k] = {p, n};
    live_bytes += n;
    peak_live = std::max(peak_live, live_bytes);
    peak_used = std::max(peak_used, used() - base);
  }
  for (auto& b : live) CHECK(cuMemFree(b.first));
  std::printf("trace %zu %zu\n", peak_used, peak_live);
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s latency SIZE PAIRS | trace SEED STEPS\n", argv[0]);
    return 2;
  }
  setup();
  std::string mode = argv[1];
  if (mode == "latency") return latency(std::strtoull(argv[2], nullptr, 10), std::atoi(argv[3]));
  if (mode == "trace") return trace(unsigned(std::strtoul(argv[2], nullptr, 10)), std::atoi(argv[3]));
  return 2;
}
