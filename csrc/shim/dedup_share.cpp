// glake_shim_dedup_share: the whole chunks of a cuMemAlloc allocation, shared by content with the
// user's other processes through the dedup broker (glake/dedup/broker.py), as glake.dedup.Arena does
// for Python: digest each chunk on its GPU, look the digests up 64 at a time, publish the chunks
// nobody has (ours become canonical, read-only), import the ones found, compare their bytes with
// ours and map the equal ones read-only in place of ours (the allocator releases ours).
#include "shim/dedup_share.h"

#include <cuda.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <typeinfo>
#include <vector>

#include "common/error.h"
#include "core/virtual_range.h"
#include "gmlake/registry.h"
#include "shim/dedup_broker.h"
#include "shim/dedup_content.h"
#include "shim/export.h"
#include "shim/glake_shim.h"
#include "shim/real_driver.h"
#include "shim/shim_state.h"

namespace glake::shim::dedup {

namespace {

constexpr std::size_t kBatch = 64;  // chunks per broker round trip (wire.MAX_FDS)

/// What one allocation shares: the broker keys it holds, its shared and saved bytes.
struct Holding {
  std::vector<std::string> keys;
  std::int64_t shared = 0, saved = 0;
};

struct State {
  std::mutex share_mutex;  ///< one share at a time (it owns `broker`'s creation)
  std::unique_ptr<BrokerClient> broker;
  std::mutex mutex;  ///< guards the rest, held briefly: frees never wait for a share in progress
  std::map<std::uintptr_t, Holding> by_base;
  std::int64_t mismatches = 0;
};

State& state_() {
  static auto* s = new State;  // never destroyed: frees may come from atexit handlers
  return *s;
}

thread_local std::string t_last_error;

/// Which GPU a chunk lives on, the same in every process whatever CUDA_VISIBLE_DEVICES says.
std::string device_key(int device) {
  static std::atomic<void*> slot{nullptr};
  using GetUuid = CUresult (*)(CUuuid*, CUdevice);
  auto get_uuid = reinterpret_cast<GetUuid>(real_symbol(slot, "cuDeviceGetUuid_v2"));
  CUuuid u{};
  if (!get_uuid || get_uuid(&u, device) != CUDA_SUCCESS) return "cuda:" + std::to_string(device);
  std::string out = "cuda-";
  char hex[3];
  for (unsigned char c : u.bytes) {
    std::snprintf(hex, sizeof(hex), "%02x", c);
    out += hex;
  }
  return out;
}

/// Exports `chunk` anew while it lives (the broker client republishes after a broker restart).
FdMaker maker_of(const std::shared_ptr<PhysChunk>& chunk) {
  std::weak_ptr<PhysChunk> weak = chunk;
  return [weak]() -> int {
    auto c = weak.lock();
    return c ? c->export_fd() : -1;
  };
}

void close_all(const std::vector<int>& fds) {
  for (int fd : fds) {
    if (fd >= 0) ::close(fd);
  }
}

/// Shares `refs` (chunks of one allocation, of one size, not yet shared, at most kBatch); what it
/// shared goes into `holding`.
void share_batch(gmlake::StitchAllocator& alloc, const std::vector<gmlake::ChunkRef>& refs, const std::string& where,
                 Holding& holding, State& st) {
  const std::size_t size = refs.front().chunk->size();
  std::vector<CUdeviceptr> ptrs;
  for (const auto& r : refs) ptrs.push_back(static_cast<CUdeviceptr>(r.ptr));
  std::vector<std::string> keys;
  for (const Digest& d : digests(ptrs, size)) keys.push_back(where + ":" + std::to_string(size) + ":s1-" + d.hex());
  BrokerClient& broker = *st.broker;
  std::vector<int> fds = broker.lookup(keys);
  std::vector<std::shared_ptr<PhysChunk>> theirs(refs.size());
  try {
    std::vector<std::size_t> fresh;
    for (std::size_t j = 0; j < refs.size(); ++j) {
      if (fds[j] < 0) fresh.push_back(j);
    }
    if (!fresh.empty()) {
      std::vector<std::string> fresh_keys;
      std::vector<FdMaker> makers;
      for (std::size_t j : fresh) {
        fresh_keys.push_back(keys[j]);
        makers.push_back(maker_of(refs[j].chunk));
      }
      const std::vector<int> others = broker.publish(fresh_keys, size, makers);
      for (std::size_t n = 0; n < fresh.size(); ++n) fds[fresh[n]] = others[n];  // closed below, whatever happens
      for (std::size_t n = 0; n < fresh.size(); ++n) {
        const std::size_t j = fresh[n];
        if (others[n] >= 0) continue;
        try {
          alloc.share_chunk(refs[j].ptr, nullptr);  // ours is the canonical copy: read-only from now on
        } catch (...) {
          for (std::size_t m = n; m < fresh.size(); ++m) {
            if (others[m] < 0) broker.drop(keys[fresh[m]]);  // canonical, held by us, but not shared here
          }
          throw;
        }
        holding.keys.push_back(keys[j]);
        holding.shared += static_cast<std::int64_t>(size);
      }
    }
    for (std::size_t j = 0; j < refs.size(); ++j) {
      if (fds[j] >= 0) theirs[j] = PhysChunk::import_fd(alloc.driver(), alloc.device(), fds[j], size);
    }
  } catch (...) {
    close_all(fds);
    throw;
  }
  close_all(fds);
  // Their chunks, side by side in a scratch range, read-only, compared with ours in one pass.
  std::vector<std::size_t> found;
  for (std::size_t j = 0; j < refs.size(); ++j) {
    if (theirs[j]) found.push_back(j);
  }
  if (found.empty()) return;
  std::vector<bool> same;
  {
    VirtualRange scratch(alloc.driver(), alloc.device(), found.size() * size);
    std::vector<CUdeviceptr> mine, other;
    for (std::size_t n = 0; n < found.size(); ++n) {
      scratch.map(n * size, theirs[found[n]], /*set_access=*/false);
      mine.push_back(static_cast<CUdeviceptr>(refs[found[n]].ptr));
      other.push_back(static_cast<CUdeviceptr>(scratch.ptr() + n * size));
    }
    scratch.set_access(0, found.size() * size, /*read_only=*/true);
    same = equal_chunks(mine, other, size);
  }  // unmapped and freed here
  std::vector<std::string> hold_keys;
  std::vector<FdMaker> makers;
  std::vector<std::size_t> equal;
  for (std::size_t n = 0; n < found.size(); ++n) {
    if (!same[n]) {
      std::lock_guard<std::mutex> lock(st.mutex);
      ++st.mismatches;  // a digest collision: this chunk stays private
      continue;
    }
    equal.push_back(found[n]);
    hold_keys.push_back(keys[found[n]]);
    makers.push_back(maker_of(theirs[found[n]]));
  }
  if (equal.empty()) return;
  const std::vector<bool> held = broker.hold(hold_keys, makers, size);
  for (std::size_t n = 0; n < equal.size(); ++n) {
    if (!held[n]) continue;  // its last holder let go meanwhile: ours stays private
    const std::size_t j = equal[n];
    try {
      alloc.share_chunk(refs[j].ptr, theirs[j]);
    } catch (...) {
      for (std::size_t m = n; m < equal.size(); ++m) {
        if (held[m]) broker.drop(hold_keys[m]);
      }
      throw;
    }
    holding.keys.push_back(keys[j]);
    holding.shared += static_cast<std::int64_t>(size);
    holding.saved += static_cast<std::int64_t>(size);
  }
}

/// The work of glake_shim_dedup_share; throws glake::Error (InvalidArgumentError for bad arguments).
std::size_t share(CUdeviceptr ptr, std::size_t bytes) {
  if (!enabled()) throw Error("dedup is off: run the program with GLAKE_DEDUP=1 (glake run --shim starts the broker)");
  ShimAllocation a;
  if (ensure_started() != Mode::Active || !state().table.find(static_cast<std::uintptr_t>(ptr), &a)) {
    throw InvalidArgumentError("glake_shim_dedup_share(" + hex(ptr) + "): not memory the shim allocated with cuMemAlloc");
  }
  if (bytes == 0 || bytes > a.base + a.size - ptr) {
    throw InvalidArgumentError("glake_shim_dedup_share(" + hex(ptr) + ", " + std::to_string(bytes) +
                               "): past the end of its allocation at " + hex(a.base) + " of " + std::to_string(a.size) +
                               " bytes");
  }
  const RealDriver& d = real_driver();
  CUdevice current = -1;
  if (d.api.cuCtxGetDevice(&current) != CUDA_SUCCESS || current != a.device) {
    throw InvalidArgumentError("glake_shim_dedup_share(" + hex(ptr) + "): the allocation is on device " +
                               std::to_string(a.device) + "; make a context of that device current first");
  }
  if (CUresult r = d.api.cuCtxSynchronize()) {  // no kernel may use the chunks while they are swapped
    throw Error("glake_shim_dedup_share: cuCtxSynchronize failed: " + result_name(r));
  }
  State& st = state_();
  std::lock_guard<std::mutex> lock(st.share_mutex);
  GlakeScope scope;
  gmlake::StitchAllocator& alloc = gmlake::device_allocator(a.device);
  const std::vector<gmlake::ChunkRef> refs = alloc.whole_chunks(ptr, bytes);
  if (!st.broker) st.broker = std::make_unique<BrokerClient>();
  Holding done;  // what this call shared: recorded for the allocation however the call ends
  struct Record {
    State& st;
    std::uintptr_t base;
    Holding& done;
    ~Record() {
      std::lock_guard<std::mutex> lock(st.mutex);
      Holding& h = st.by_base[base];
      h.keys.insert(h.keys.end(), done.keys.begin(), done.keys.end());
      h.shared += done.shared;
      h.saved += done.saved;
    }
  } record{st, a.base, done};
  const std::string where = device_key(a.device);
  std::vector<gmlake::ChunkRef> batch;
  auto flush = [&] {
    if (!batch.empty()) share_batch(alloc, batch, where, done, st);
    batch.clear();
  };
  for (const gmlake::ChunkRef& r : refs) {
    if (r.shared) continue;
    if (!batch.empty() && (batch.size() == kBatch || batch.front().chunk->size() != r.chunk->size())) flush();
    batch.push_back(r);
  }
  flush();
  state().counters.changes.fetch_add(1, std::memory_order_relaxed);
  std::size_t shared = 0;
  for (const gmlake::ChunkRef& r : alloc.whole_chunks(a.base, a.size)) {
    if (r.shared) shared += r.chunk->size();
  }
  return shared;
}

}  // namespace

bool enabled() {
  static const bool on = [] {
    const char* v = std::getenv("GLAKE_DEDUP");
    return v && std::string(v) == "1";
  }();
  return on;
}

void forget(std::uintptr_t base) {
  if (!enabled()) return;
  State& st = state_();
  std::vector<std::string> keys;
  {
    std::lock_guard<std::mutex> lock(st.mutex);
    const auto it = st.by_base.find(base);
    if (it == st.by_base.end()) return;
    keys = std::move(it->second.keys);
    st.by_base.erase(it);
  }
  for (const std::string& key : keys) st.broker->drop(key);  // its own lock: one round trip at a time
}

std::unique_lock<std::mutex> exclusive() { return std::unique_lock<std::mutex>(state_().share_mutex); }

Figures figures() {
  State& st = state_();
  std::lock_guard<std::mutex> lock(st.mutex);
  Figures f;
  for (const auto& [base, h] : st.by_base) {
    f.shared_bytes += h.shared;
    f.saved_bytes += h.saved;
  }
  f.mismatches = st.mismatches;
  return f;
}

}  // namespace glake::shim::dedup

extern "C" {

GLAKE_SHIM_EXPORT CUresult glake_shim_dedup_share(CUdeviceptr ptr, size_t bytes, size_t* shared_bytes) {
  using namespace glake::shim;
  dedup::t_last_error.clear();
  try {
    const std::size_t shared = dedup::share(ptr, bytes);
    if (shared_bytes) *shared_bytes = shared;
    return CUDA_SUCCESS;
  } catch (const std::exception& e) {
    dedup::t_last_error = e.what();
    warn_once(std::string("dedup-") + typeid(e).name(), std::string("glake_shim_dedup_share: ") + e.what());  // once per kind
    if (!dedup::enabled()) return CUDA_ERROR_NOT_SUPPORTED;
    if (dynamic_cast<const glake::InvalidArgumentError*>(&e)) return CUDA_ERROR_INVALID_VALUE;
    if (dynamic_cast<const glake::OutOfMemoryError*>(&e)) return CUDA_ERROR_OUT_OF_MEMORY;
    return CUDA_ERROR_UNKNOWN;
  }
}

GLAKE_SHIM_EXPORT CUresult glake_shim_dedup_stats(size_t* shared_bytes, size_t* saved_bytes) {
  const glake::shim::dedup::Figures f = glake::shim::dedup::figures();
  if (shared_bytes) *shared_bytes = static_cast<size_t>(f.shared_bytes);
  if (saved_bytes) *saved_bytes = static_cast<size_t>(f.saved_bytes);
  return CUDA_SUCCESS;
}

GLAKE_SHIM_EXPORT const char* glake_shim_dedup_last_error(void) { return glake::shim::dedup::t_last_error.c_str(); }

}  // extern "C"
