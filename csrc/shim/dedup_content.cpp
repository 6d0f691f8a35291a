#include "shim/dedup_content.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

#include "common/error.h"
#include "shim/real_driver.h"
#include "shim/shim_state.h"

#ifdef GLAKE_SHIM_DEDUP_PTX
/// dedup_kernels.cu as PTX, NUL-terminated (generated at build time by scripts/embed_text.py).
extern const char glake_shim_dedup_ptx[];
#endif

namespace glake::shim::dedup {

namespace {

void check(CUresult r, const char* what) {
  if (r != CUDA_SUCCESS) throw Error(std::string("dedup: ") + what + " failed: " + result_name(r));
}

/// The real driver's entry points, or an error when there is no real driver.
const RealApi& api() {
  const RealDriver& d = real_driver();
  if (!d.handle) throw Error("dedup: no real driver: " + d.error);
  if (!d.api.cuMemcpyDtoH) throw Error("dedup: the real driver has no cuMemcpyDtoH");
  return d.api;
}

void check_shape(std::size_t n, std::size_t chunk) {
  if (n > kMaxChunks) {
    throw InvalidArgumentError("dedup: " + std::to_string(n) + " chunks in one call (at most " +
                               std::to_string(kMaxChunks) + ")");
  }
  if (chunk == 0 || chunk % 8 != 0) {
    throw InvalidArgumentError("dedup: chunk size " + std::to_string(chunk) + " is not a positive multiple of 8");
  }
}

std::vector<Digest> host_digests(const RealApi& api, const std::vector<CUdeviceptr>& ptrs, std::size_t chunk) {
  std::vector<std::uint64_t> buf(chunk / 8);
  std::vector<Digest> out;
  out.reserve(ptrs.size());
  for (CUdeviceptr p : ptrs) {
    check(api.cuMemcpyDtoH(buf.data(), p, chunk), "cuMemcpyDtoH");
    out.push_back(host_digest(buf.data(), chunk));
  }
  return out;
}

std::vector<bool> host_equal(const RealApi& api, const std::vector<CUdeviceptr>& a, const std::vector<CUdeviceptr>& b,
                             std::size_t chunk) {
  std::vector<std::uint64_t> x(chunk / 8), y(chunk / 8);
  std::vector<bool> out;
  out.reserve(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    check(api.cuMemcpyDtoH(x.data(), a[i], chunk), "cuMemcpyDtoH");
    check(api.cuMemcpyDtoH(y.data(), b[i], chunk), "cuMemcpyDtoH");
    out.push_back(std::memcmp(x.data(), y.data(), chunk) == 0);
  }
  return out;
}

#ifdef GLAKE_SHIM_DEDUP_PTX

/// Blocks a launch aims at in all: enough to fill every SM of the largest GPUs about twice.
constexpr std::size_t kTargetBlocks = 2048;

/// The dedup kernels of one context, and its scratch buffer: 2 * kMaxChunks hash lanes, or kMaxChunks
/// compare flags. Set up on the context's first call and kept for its lifetime.
struct Kernels {
  bool usable = false;  ///< false: the kernels do not load there (the host path serves it)
  CUfunction hash = nullptr;
  CUfunction compare = nullptr;
  CUdeviceptr scratch = 0;
};

/// Guards the table below and serialises the launches (each context has one scratch buffer).
std::mutex g_mu;

/// The kernels of each context by its id (cuCtxGetId: unique for the process's lifetime); never destroyed.
std::unordered_map<unsigned long long, Kernels>& kernels_by_context() {
  static auto* table = new std::unordered_map<unsigned long long, Kernels>();
  return *table;
}

bool forced_host() {
  static const bool on = [] {
    const char* v = std::getenv("GLAKE_DEDUP_HOST");
    return v && std::strcmp(v, "1") == 0;
  }();
  return on;
}

void say_host_path(const std::string& why) {
  warn_once("dedup-kernels", "the dedup kernels cannot be used (" + why + "): chunk digests and comparisons run on the host");
}

/// Loads the kernels into the current context and allocates its scratch buffer.
Kernels load(const RealApi& api) {
  if (!api.cuModuleLoadData || !api.cuModuleGetFunction || !api.cuLaunchKernel || !api.cuMemsetD32 || !api.cuMemAlloc) {
    say_host_path("the real driver lacks a module, launch or memory entry point");
    return {};
  }
  const auto failed = [](const char* step, CUresult r) {
    say_host_path(std::string(step) + ": " + result_name(r));
    return Kernels{};
  };
  Kernels k;
  CUmodule module = nullptr;
  if (CUresult r = api.cuModuleLoadData(&module, glake_shim_dedup_ptx); r != CUDA_SUCCESS) return failed("cuModuleLoadData", r);
  if (CUresult r = api.cuModuleGetFunction(&k.hash, module, "glake_dedup_hash"); r != CUDA_SUCCESS) {
    return failed("cuModuleGetFunction", r);
  }
  if (CUresult r = api.cuModuleGetFunction(&k.compare, module, "glake_dedup_compare"); r != CUDA_SUCCESS) {
    return failed("cuModuleGetFunction", r);
  }
  if (CUresult r = api.cuMemAlloc(&k.scratch, 2 * kMaxChunks * sizeof(std::uint64_t)); r != CUDA_SUCCESS) {
    return failed("cuMemAlloc", r);
  }
  k.usable = true;
  return k;
}

/// The current context's kernels (set up on its first use), or null where the host path serves it.
/// Called with g_mu held.
const Kernels* kernels(const RealApi& api) {
  if (forced_host()) return nullptr;
  CUcontext ctx = nullptr;
  check(api.cuCtxGetCurrent(&ctx), "cuCtxGetCurrent");
  if (!ctx) throw Error("dedup: no current context");
  unsigned long long id = 0;
  const CUresult r = api.cuCtxGetId ? api.cuCtxGetId(ctx, &id) : CUDA_ERROR_NOT_FOUND;
  if (r != CUDA_SUCCESS) {
    say_host_path("cuCtxGetId: " + result_name(r));
    return nullptr;
  }
  auto [it, fresh] = kernels_by_context().try_emplace(id);
  if (fresh) it->second = load(api);
  return it->second.usable ? &it->second : nullptr;
}

/// Blocks per chunk: kTargetBlocks in all, never more than give each thread one 16-byte step.
unsigned blocks_per_chunk(std::size_t n, std::size_t chunk) {
  const std::size_t one_step = (chunk / 16 + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<std::size_t>(1, std::min((kTargetBlocks + n - 1) / n, one_step)));
}

void launch(const RealApi& api, CUfunction f, std::size_t n, unsigned per_chunk, void* params) {
  void* args[] = {params};
  check(api.cuLaunchKernel(f, static_cast<unsigned>(n) * per_chunk, 1, 1, kThreads, 1, 1, 0, nullptr, args, nullptr),
        "cuLaunchKernel");
}

std::vector<Digest> kernel_digests(const RealApi& api, const Kernels& k, const std::vector<CUdeviceptr>& ptrs,
                                   std::size_t chunk) {
  const std::size_t n = ptrs.size();
  HashParams p{};
  std::copy(ptrs.begin(), ptrs.end(), p.ptr);
  p.out = k.scratch;
  p.chunk_bytes = chunk;
  p.blocks_per_chunk = blocks_per_chunk(n, chunk);
  check(api.cuMemsetD32(k.scratch, 0, 4 * n), "cuMemsetD32");  // 2 * n lanes of 8 bytes
  launch(api, k.hash, n, p.blocks_per_chunk, &p);
  std::vector<std::uint64_t> lanes(2 * n);
  check(api.cuMemcpyDtoH(lanes.data(), k.scratch, lanes.size() * sizeof(lanes[0])), "cuMemcpyDtoH");  // waits
  std::vector<Digest> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i].lane[0] = lanes[2 * i], out[i].lane[1] = lanes[2 * i + 1];
  return out;
}

std::vector<bool> kernel_equal(const RealApi& api, const Kernels& k, const std::vector<CUdeviceptr>& a,
                               const std::vector<CUdeviceptr>& b, std::size_t chunk) {
  const std::size_t n = a.size();
  CompareParams p{};
  std::copy(a.begin(), a.end(), p.a);
  std::copy(b.begin(), b.end(), p.b);
  p.flags = k.scratch;
  p.chunk_bytes = chunk;
  p.blocks_per_chunk = blocks_per_chunk(n, chunk);
  check(api.cuMemsetD32(k.scratch, 0, n), "cuMemsetD32");
  launch(api, k.compare, n, p.blocks_per_chunk, &p);
  std::vector<int> flags(n);
  check(api.cuMemcpyDtoH(flags.data(), k.scratch, n * sizeof(int)), "cuMemcpyDtoH");  // waits
  std::vector<bool> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = flags[i] == 0;
  return out;
}

#endif  // GLAKE_SHIM_DEDUP_PTX

}  // namespace

std::vector<Digest> digests(const std::vector<CUdeviceptr>& ptrs, std::size_t chunk) {
  check_shape(ptrs.size(), chunk);
  if (ptrs.empty()) return {};
  const RealApi& real = api();
  std::vector<Digest> out;
#ifdef GLAKE_SHIM_DEDUP_PTX
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (const Kernels* k = kernels(real)) out = kernel_digests(real, *k, ptrs, chunk);
  }
#endif
  if (out.empty()) out = host_digests(real, ptrs, chunk);
  if (forced_collisions()) std::fill(out.begin(), out.end(), Digest{});
  return out;
}

std::vector<bool> equal_chunks(const std::vector<CUdeviceptr>& a, const std::vector<CUdeviceptr>& b, std::size_t chunk) {
  if (a.size() != b.size()) {
    throw InvalidArgumentError("dedup: " + std::to_string(a.size()) + " chunks to compare with " +
                               std::to_string(b.size()));
  }
  check_shape(a.size(), chunk);
  if (a.empty()) return {};
  const RealApi& real = api();
  std::vector<bool> out;
#ifdef GLAKE_SHIM_DEDUP_PTX
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (const Kernels* k = kernels(real)) out = kernel_equal(real, *k, a, b, chunk);
  }
#endif
  if (out.empty()) out = host_equal(real, a, b, chunk);
  return out;
}


}  // namespace glake::shim::dedup
