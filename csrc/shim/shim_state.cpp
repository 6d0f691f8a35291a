#include "shim/shim_state.h"

#include <pthread.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>

#include "driver/driver.h"
#include "gmlake/registry.h"
#include "shim/real_driver.h"
#include "shim/stats_page.h"

namespace glake::shim {

namespace {

thread_local int t_glake_depth = 0;
std::mutex g_start_mutex;  // held while starting, and across fork() (pthread_atfork)

/// Fork handlers: a child never uses the parent's driver state (CUDA does not survive fork).
void before_fork() {
  g_start_mutex.lock();
  state().frees.before_fork();
}
void after_fork_parent() {
  state().frees.after_fork_parent();
  g_start_mutex.unlock();
}
void after_fork_child() {
  ShimState& s = state();
  s.frees.after_fork_child();  // the parent's streams, events and queued frees are not the child's
  if (s.mode.load() == static_cast<int>(Mode::Active)) {
    // The allocator, its chunks and the parent's context belong to the parent: this child passes
    // everything to the real driver and publishes no stats (the parent's page stays the parent's).
    s.reason = "forked from pid " + std::to_string(s.owner_pid) + " after glake started there";
    s.mode.store(static_cast<int>(Mode::PassThrough));
  }
  g_start_mutex.unlock();
}

/// Registers the fork handlers when the shim is loaded.
struct ForkHandlers {
  ForkHandlers() { pthread_atfork(before_fork, after_fork_parent, after_fork_child); }
} g_fork_handlers;

Mode pass_through(ShimState& s, const std::string& why) {
  s.reason = why;
  s.mode.store(static_cast<int>(Mode::PassThrough), std::memory_order_release);
  std::fprintf(stderr, "glake shim: %s; every allocation goes to the real driver\n", why.c_str());
  publish_state(Mode::PassThrough, why);
  return Mode::PassThrough;
}

/// The shim's programs allocate buffer by buffer (tens of KiB to tens of MiB), not in torch's large
/// segments: 2 MiB physical chunks let a stitch reuse every free chunk, where 32 MiB ones (the default,
/// chosen for torch's driver time per step) leave partly used chunks that later sizes do not fit. On a
/// host replay of benchmarks/shim_bench's fragmenting trace, peak memory over peak live bytes was
/// 1.07-1.09 with 2 MiB chunks against 1.16-1.26 with 32 MiB. $GLAKE_ALLOC_CONF's chunk_bytes wins.
void use_small_chunks_by_default() {
  const char* conf = std::getenv(gmlake::kConfEnv);
  if (conf && std::strstr(conf, "chunk_bytes")) return;
  try {
    gmlake::configure_global("chunk_bytes:2MiB");
  } catch (const InvalidArgumentError&) {
    // glake (imported in this process) made its allocator first: its configuration stays
  }
}

Mode start_locked(ShimState& s) {
  s.owner_pid = static_cast<int>(getpid());
  const RealDriver& real = real_driver();
  if (!real.handle) return pass_through(s, real.error);
  if (!real.api.cuCtxGetCurrent || !real.api.cuCtxGetDevice || !real.api.cuCtxSynchronize) {
    return pass_through(s, real.path + " lacks cuCtxGetCurrent/cuCtxGetDevice/cuCtxSynchronize");
  }
  GlakeScope scope;
  try {
    // False when the cuda backend already exists (glake imported in this process): it then asked the
    // loaded shim for the real driver itself (glake_shim_real_libcuda), so it is on the same one.
    set_cuda_library(real.handle, real.path);
    Driver& cuda = get_driver("cuda");
    if (&get_driver() != &cuda) {
      return pass_through(s, "GLAKE_BACKEND selects the " + std::string(get_driver().name()) +
                                 " backend; the shim needs cuda");
    }
    gmlake::global_config();  // reads $GLAKE_ALLOC_CONF now: a bad one is said here, not at an allocation
    use_small_chunks_by_default();
  } catch (const std::exception& e) {
    return pass_through(s, std::string("glake could not start: ") + e.what());
  }
  s.mode.store(static_cast<int>(Mode::Active), std::memory_order_release);
  start_stats_page(real.path);
  return Mode::Active;
}

}  // namespace

ShimState& state() {
  static ShimState* s = new ShimState();
  return *s;
}

Mode ensure_started() {
  ShimState& s = state();
  const int m = s.mode.load(std::memory_order_acquire);
  if (m != static_cast<int>(Mode::Uninit)) return static_cast<Mode>(m);
  if (in_glake()) return Mode::PassThrough;  // glake's own start-up reached a replaced call
  std::lock_guard<std::mutex> lock(g_start_mutex);
  const int again = s.mode.load(std::memory_order_acquire);
  if (again != static_cast<int>(Mode::Uninit)) return static_cast<Mode>(again);
  return start_locked(s);
}

bool in_glake() { return t_glake_depth > 0; }

GlakeScope::GlakeScope() { ++t_glake_depth; }
GlakeScope::~GlakeScope() { --t_glake_depth; }

void warn_once(const std::string& key, const std::string& message) {
  static std::mutex mu;
  static std::set<std::string>* seen = new std::set<std::string>();
  std::lock_guard<std::mutex> lock(mu);
  if (!seen->insert(key).second) return;
  std::fprintf(stderr, "glake shim: %s\n", message.c_str());
}

std::string result_name(int result) {
  static std::atomic<void*> slot{nullptr};
  auto fn = reinterpret_cast<CUresult (*)(CUresult, const char**)>(real_symbol(slot, "cuGetErrorName"));
  const char* name = nullptr;
  if (fn && fn(static_cast<CUresult>(result), &name) == CUDA_SUCCESS && name) return name;
  return "CUresult " + std::to_string(result);
}

}  // namespace glake::shim
