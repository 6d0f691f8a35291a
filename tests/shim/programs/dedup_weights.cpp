// A driver-API program that "loads weights" and shares them through the shim's dedup hint
// (csrc/shim/glake_shim.h), for tests/shim/test_shim_dedup.py (fake libcuda) and test_shim_gpu.py.
//
//   dedup_weights MIB SEED [DIFFER_CHUNK]
//     cuMemAlloc(MIB MiB), filled with bytes drawn from SEED (one byte changed in chunk DIFFER_CHUNK
//     when given), glake_shim_dedup_share on all of it, then prints
//       R share <CUresult> <shared bytes>   R saved <bytes>   R intact <0|1>   (and "R error <text>")
//     (with "R mem_before <free device bytes>" before the allocation and "R share_us <time of the call>"),
//     and waits on stdin: "mem" prints "R mem <free device bytes>", "check" reads every byte back again ("R intact ..."), "write" writes into the
//     first chunk (shared memory is read-only: this faults), "free" frees the buffer, allocates the same
//     size again and writes and reads it ("R rewrite <0|1>"), "exit" (or end of input) ends.
#include <cuda.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "check.h"
#include "glake_shim.h"

namespace {

constexpr std::size_t kChunk = 2u << 20;

std::vector<unsigned char> weights(std::size_t bytes, std::uint64_t seed, long differ) {
  std::vector<unsigned char> out(bytes);
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (std::size_t i = 0; i < bytes; i += 8) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    std::memcpy(&out[i], &x, 8);
  }
  if (differ >= 0) out[static_cast<std::size_t>(differ) * kChunk + 12345] ^= 0x5A;
  return out;
}

bool intact(CUdeviceptr p, const std::vector<unsigned char>& want) {
  std::vector<unsigned char> got(want.size());
  CHECK(cuMemcpyDtoH(got.data(), p, got.size()));
  return got == want;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: dedup_weights MIB SEED [DIFFER_CHUNK]\n");
    return 2;
  }
  const std::size_t bytes = std::strtoull(argv[1], nullptr, 10) << 20;
  const std::uint64_t seed = std::strtoull(argv[2], nullptr, 10);
  const long differ = argc > 3 ? std::strtol(argv[3], nullptr, 10) : -1;
  primary_context();
  size_t free_bytes = 0, total_bytes = 0;
  CHECK(cuMemGetInfo(&free_bytes, &total_bytes));
  std::printf("R mem_before %zu\n", free_bytes);
  CUdeviceptr p = 0;
  CHECK(cuMemAlloc(&p, bytes));
  const std::vector<unsigned char> want = weights(bytes, seed, differ);
  CHECK(cuMemcpyHtoD(p, want.data(), bytes));
  size_t shared = 0, saved = 0;
  glake_shim_dedup_share_fn share = glake_shim_dedup_share_lookup();
  if (!share) {
    std::printf("R share none 0\n");
  } else {
    const auto t0 = std::chrono::steady_clock::now();
    const CUresult r = share(p, bytes, &shared);
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0);
    std::printf("R share %d %zu\nR share_us %lld\n", static_cast<int>(r), shared, static_cast<long long>(us.count()));
    if (r != CUDA_SUCCESS) {
      auto why = reinterpret_cast<const char* (*)()>(dlsym(RTLD_DEFAULT, "glake_shim_dedup_last_error"));
      std::printf("R error %s\n", why ? why() : "?");
    }
    auto stats = reinterpret_cast<CUresult (*)(size_t*, size_t*)>(dlsym(RTLD_DEFAULT, "glake_shim_dedup_stats"));
    if (stats) stats(&shared, &saved);
  }
  std::printf("R saved %zu\nR intact %d\n", saved, intact(p, want) ? 1 : 0);
  std::fflush(stdout);
  char line[64];
  while (std::fgets(line, sizeof(line), stdin)) {
    const std::string cmd(line, std::strcspn(line, "\n"));
    if (cmd == "mem") {
      CHECK(cuMemGetInfo(&free_bytes, &total_bytes));
      std::printf("R mem %zu\n", free_bytes);
    } else if (cmd == "check") {
      std::printf("R intact %d\n", intact(p, want) ? 1 : 0);
    } else if (cmd == "write") {
      const unsigned char zero[64] = {};
      std::printf("R write %d\n", static_cast<int>(cuMemcpyHtoD(p, zero, sizeof(zero))));  // faults first
    } else if (cmd == "free") {
      CHECK(cuMemFree(p));
      CHECK(cuCtxSynchronize());
      CHECK(cuMemAlloc(&p, bytes));
      std::vector<unsigned char> other = weights(bytes, seed + 1, -1);
      CHECK(cuMemcpyHtoD(p, other.data(), bytes));
      std::printf("R rewrite %d\n", intact(p, other) ? 1 : 0);
      if (auto stats = reinterpret_cast<CUresult (*)(size_t*, size_t*)>(dlsym(RTLD_DEFAULT, "glake_shim_dedup_stats"))) {
        stats(&shared, &saved);
        std::printf("R after_free %zu %zu\n", shared, saved);
      }
    } else if (cmd == "exit") {
      break;
    }
    std::fflush(stdout);
  }
  return 0;
}
