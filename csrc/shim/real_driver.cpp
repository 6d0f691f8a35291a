#include "shim/real_driver.h"

#include <dlfcn.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace glake::shim {

namespace {

/// Where drivers live when the loader's cache is not consulted: distributions, containers, compat.
const char* const kCandidates[] = {
    "/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/lib64/libcuda.so.1",       "/usr/lib/aarch64-linux-gnu/libcuda.so.1",
    "/usr/lib/libcuda.so.1",                  "/usr/local/nvidia/lib64/libcuda.so.1", "/usr/lib/wsl/lib/libcuda.so.1",
    "/usr/local/cuda/compat/libcuda.so.1",
};

/// The file this code was loaded from (the shim), to never load it as the "real" driver.
bool is_shim_file(const char* path) {
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&candidate_paths_text), &info) || !info.dli_fname) return false;
  struct stat a{}, b{};
  if (stat(path, &a) != 0 || stat(info.dli_fname, &b) != 0) return false;
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/// dlopen flags: RTLD_DEEPBIND keeps the real driver's own calls inside it (never bound to the shim's
/// same-named exports), except under a sanitizer runtime, which refuses it.
int open_flags() {
  int flags = RTLD_NOW | RTLD_LOCAL;
  if (!dlsym(RTLD_DEFAULT, "__asan_init") && !std::getenv("GLAKE_SHIM_NO_DEEPBIND")) flags |= RTLD_DEEPBIND;
  return flags;
}

/// Resolves `name` at `version` with the real cuGetProcAddress; null if the driver lacks it.
void* resolve(const RealDriver& d, const char* name, int version) {
  void* fn = nullptr;
  CUdriverProcAddressQueryResult status{};
  if (d.api.cuGetProcAddress_v2(name, &fn, version, CU_GET_PROC_ADDRESS_DEFAULT, &status) != CUDA_SUCCESS ||
      status != CU_GET_PROC_ADDRESS_SUCCESS) {
    return nullptr;
  }
  return fn;
}

/// Opens `path` as the real driver; false (with d.error) when it is not usable.
bool open_real(RealDriver& d, const std::string& path) {
  if (is_shim_file(path.c_str())) {
    d.error = path + " is the glake shim itself, not the real driver";
    return false;
  }
  dlerror();
  void* h = dlopen(path.c_str(), open_flags());
  if (!h) {
    const char* err = dlerror();
    d.error = "dlopen(" + path + ") failed: " + (err ? err : "unknown error");
    return false;
  }
  if (dlsym(h, "glake_shim_real_libcuda")) {  // a copy of the shim under another name
    d.error = path + " is a glake shim, not the real driver";
    dlclose(h);
    return false;
  }
  d.api.cuGetProcAddress_v2 = reinterpret_cast<PFN_cuGetProcAddress_v12000>(dlsym(h, "cuGetProcAddress_v2"));
  d.api.cuGetProcAddress_v1 = reinterpret_cast<PFN_cuGetProcAddress_v11030>(dlsym(h, "cuGetProcAddress"));
  d.api.cuDriverGetVersion = reinterpret_cast<PFN_cuDriverGetVersion_v2020>(dlsym(h, "cuDriverGetVersion"));
  if (!d.api.cuGetProcAddress_v2 || !d.api.cuDriverGetVersion) {
    d.error = path + " has no cuGetProcAddress_v2/cuDriverGetVersion (a driver older than CUDA 12?)";
    dlclose(h);
    return false;
  }
  d.handle = h;
  d.path = path;
  d.api.cuDriverGetVersion(&d.version);
#define GLAKE_SHIM_RESOLVE(member, name, version) \
  d.api.member = reinterpret_cast<decltype(d.api.member)>(resolve(d, name, version));
  GLAKE_SHIM_RESOLVE(cuCtxGetCurrent, "cuCtxGetCurrent", 4000)
  GLAKE_SHIM_RESOLVE(cuCtxGetDevice, "cuCtxGetDevice", 2000)
  GLAKE_SHIM_RESOLVE(cuCtxSynchronize, "cuCtxSynchronize", 2000)
  GLAKE_SHIM_RESOLVE(cuMemAlloc, "cuMemAlloc", 3020)
  GLAKE_SHIM_RESOLVE(cuMemFree, "cuMemFree", 3020)
  GLAKE_SHIM_RESOLVE(cuMemAllocPitch, "cuMemAllocPitch", 3020)
  GLAKE_SHIM_RESOLVE(cuMemGetAddressRange, "cuMemGetAddressRange", 3020)
  GLAKE_SHIM_RESOLVE(cuPointerGetAttribute, "cuPointerGetAttribute", 4000)
  GLAKE_SHIM_RESOLVE(cuPointerGetAttributes, "cuPointerGetAttributes", 7000)
  GLAKE_SHIM_RESOLVE(cuIpcGetMemHandle, "cuIpcGetMemHandle", 4010)
  GLAKE_SHIM_RESOLVE(cuStreamCreate, "cuStreamCreate", 2000)
  GLAKE_SHIM_RESOLVE(cuStreamCreateWithPriority, "cuStreamCreateWithPriority", 5050)
  GLAKE_SHIM_RESOLVE(cuStreamDestroy_v2, "cuStreamDestroy", 4000)
  GLAKE_SHIM_RESOLVE(cuStreamIsCapturing, "cuStreamIsCapturing", 10000)
  GLAKE_SHIM_RESOLVE(cuThreadExchangeStreamCaptureMode, "cuThreadExchangeStreamCaptureMode", 10010)
  GLAKE_SHIM_RESOLVE(cuEventCreate, "cuEventCreate", 2000)
  GLAKE_SHIM_RESOLVE(cuEventRecord, "cuEventRecord", 2000)
  GLAKE_SHIM_RESOLVE(cuEventQuery, "cuEventQuery", 2000)
  GLAKE_SHIM_RESOLVE(cuEventSynchronize, "cuEventSynchronize", 2000)
  GLAKE_SHIM_RESOLVE(cuEventDestroy, "cuEventDestroy", 4000)
  GLAKE_SHIM_RESOLVE(cuCtxGetId, "cuCtxGetId", 12000)
  GLAKE_SHIM_RESOLVE(cuModuleLoadData, "cuModuleLoadData", 2000)
  GLAKE_SHIM_RESOLVE(cuModuleGetFunction, "cuModuleGetFunction", 2000)
  GLAKE_SHIM_RESOLVE(cuLaunchKernel, "cuLaunchKernel", 4000)
  GLAKE_SHIM_RESOLVE(cuMemcpyDtoH, "cuMemcpyDtoH", 3020)
  GLAKE_SHIM_RESOLVE(cuMemsetD32, "cuMemsetD32", 3020)
#undef GLAKE_SHIM_RESOLVE
  return true;
}

RealDriver* load() {
  auto* d = new RealDriver();  // never destroyed: stubs may run during static destruction
  if (const char* env = std::getenv("GLAKE_REAL_LIBCUDA"); env && *env) {
    if (!open_real(*d, env)) d->error = "GLAKE_REAL_LIBCUDA=" + std::string(env) + ": " + d->error;
  } else {
    std::string tried;
    for (const char* path : kCandidates) {
      struct stat st{};
      if (stat(path, &st) != 0) continue;
      if (open_real(*d, path)) break;
      tried += "; " + d->error;
    }
    if (!d->handle) {
      d->error = "no real libcuda.so.1 found in " + candidate_paths_text() + tried +
                 " (set GLAKE_REAL_LIBCUDA to its absolute path; glake run --shim finds it with ldconfig -p)";
    }
  }
  if (!d->handle) std::fprintf(stderr, "glake shim: %s\n", d->error.c_str());
  return d;
}

}  // namespace

const RealDriver& real_driver() {
  static RealDriver* d = load();  // thread-safe: one load, whoever asks first
  return *d;
}

void* real_symbol(std::atomic<void*>& slot, const char* name) {
  void* fn = slot.load(std::memory_order_acquire);
  if (fn) return fn;
  const RealDriver& d = real_driver();
  if (!d.handle) return nullptr;
  fn = dlsym(d.handle, name);
  if (fn) slot.store(fn, std::memory_order_release);
  return fn;
}

CUresult missing_symbol(const char* name) {
  const RealDriver& d = real_driver();
  if (!d.handle) return CUDA_ERROR_NOT_INITIALIZED;  // load() said why
  static std::mutex mu;
  static std::vector<std::string> said;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& s : said) {
    if (s == name) return CUDA_ERROR_NOT_FOUND;
  }
  said.emplace_back(name);
  std::fprintf(stderr, "glake shim: the real driver %s has no symbol %s: CUDA_ERROR_NOT_FOUND\n", d.path.c_str(), name);
  return CUDA_ERROR_NOT_FOUND;
}

std::string candidate_paths_text() {
  std::string out;
  for (const char* path : kCandidates) out += (out.empty() ? "" : ", ") + std::string(path);
  return out;
}

}  // namespace glake::shim

extern "C" void* glake_shim_real_libcuda(const char** path) {
  const glake::shim::RealDriver& d = glake::shim::real_driver();
  if (path) *path = d.handle ? d.path.c_str() : nullptr;
  return d.handle;
}
