#include "shim/stats_page.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "gmlake/registry.h"
#include "shim/control.h"
#include "shim/runtime_dir.h"

#ifndef GLAKE_VERSION_STRING
#define GLAKE_VERSION_STRING "unknown"
#endif

namespace glake::shim {

namespace {

constexpr std::uint32_t kPageBytes = 32768;
constexpr auto kPublishInterval = std::chrono::milliseconds(50);

const char* const kShimCounterNames[] = {
    "shim.alloc_calls", "shim.free_calls", "shim.passthrough_allocs", "shim.passthrough_frees",
    "shim.alloc_failures", "shim.free_syncs", "shim.reentries", "shim.ipc_refusals", "shim.attribute_answers",
    "shim.live_allocations", "shim.live_requested_bytes", "shim.free_deferred", "shim.free_pending",
    "shim.free_pending_bytes",
};
constexpr std::uint32_t kShimCounters = sizeof(kShimCounterNames) / sizeof(kShimCounterNames[0]);

/// The allocator figures, named as glake's Python allocator section names them (csrc/python/bind_gmlake.cpp).
const char* const kAllocCounterNames[] = {
    "allocated_bytes.all.current", "allocated_bytes.all.peak", "reserved_bytes.all.current",
    "reserved_bytes.all.peak", "active_bytes.all.current", "active_bytes.all.peak", "requested_bytes.all.current",
    "requested_bytes.all.peak", "segment.all.current", "segment.all.peak", "allocation.all.current",
    "allocation.all.peak", "allocation.all.allocated", "allocation.all.freed", "num_alloc_retries", "num_ooms",
    "num_stitches", "num_stitch_reuses", "num_stitch_gc", "stitched_bytes.current", "stitched_bytes.peak",
    "mapped_va_bytes.current", "mapped_va_bytes.peak", "stitched_va_bytes.current", "num_segments_created",
    "num_segments_released", "num_sync_all_streams", "limit_bytes", "chunk_bytes", "suspended",
    "suspended_host_bytes", "shared_bytes", "shared_imported_bytes",
};
constexpr std::uint32_t kAllocCounters = sizeof(kAllocCounterNames) / sizeof(kAllocCounterNames[0]);
static_assert(kShimCounters <= kMaxShimCounters && kAllocCounters <= kMaxAllocCounters, "page too small");

void alloc_values(const gmlake::StitchAllocator& a, std::int64_t* v) {
  const gmlake::AllocatorStats s = a.stats();
  const std::int64_t values[] = {
      s.allocated_bytes.current, s.allocated_bytes.peak, s.reserved_bytes.current, s.reserved_bytes.peak,
      s.active_bytes.current, s.active_bytes.peak, s.requested_bytes.current, s.requested_bytes.peak,
      s.segments.current, s.segments.peak, s.allocations.current, s.allocations.peak, s.num_allocs, s.num_frees,
      s.num_alloc_retries, s.num_ooms, s.num_stitches, s.num_stitch_reuses, s.num_stitch_gc,
      s.stitched_bytes.current, s.stitched_bytes.peak, s.mapped_va_bytes.current, s.mapped_va_bytes.peak,
      s.stitched_va_cached, s.num_segments_created, s.num_segments_released, s.num_sync_all_streams,
      static_cast<std::int64_t>(a.limit()), static_cast<std::int64_t>(a.config().chunk_bytes),
      a.suspended() ? 1 : 0, s.suspended_host_bytes, s.shared_bytes, s.shared_imported_bytes,
  };
  static_assert(sizeof(values) / sizeof(values[0]) == kAllocCounters, "one value per name");
  std::memcpy(v, values, sizeof(values));
}

std::uint64_t unix_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch()).count());
}

void copy_text(char* dst, std::size_t cap, const std::string& text) {
  std::memset(dst, 0, cap);
  std::memcpy(dst, text.data(), std::min(cap - 1, text.size()));
}

std::string cmdline() {
  std::string out;
  if (FILE* f = std::fopen("/proc/self/cmdline", "rb")) {
    char buf[1024];
    const std::size_t n = std::fread(buf, 1, sizeof(buf), f);
    out.assign(buf, n);
    std::fclose(f);
  }
  return out;
}

struct Page {
  std::mutex mutex;  // the publisher and publish_state (rare) serialise here; the program's path never does
  char* base = nullptr;
  std::string path;
  int owner = 0;
  PageHeader* header() { return reinterpret_cast<PageHeader*>(base); }
  std::int64_t* shim_values() { return reinterpret_cast<std::int64_t*>(base + header()->shim_values_offset); }
  std::int64_t* alloc_values(int d) {
    return reinterpret_cast<std::int64_t*>(base + header()->alloc_values_offset) + d * kMaxAllocCounters;
  }
};

Page& page() {
  static Page* p = new Page();
  return *p;
}

void begin_write(PageHeader* h) {
  __atomic_fetch_add(&h->seq, 1, __ATOMIC_RELAXED);
  __atomic_thread_fence(__ATOMIC_RELEASE);
}
void end_write(PageHeader* h) { __atomic_fetch_add(&h->seq, 1, __ATOMIC_RELEASE); }

/// Writes every figure now (page mutex held).
void write_locked(Page& p) {
  PageHeader* h = p.header();
  ShimState& s = state();
  std::vector<std::int64_t> dev(kPageDevices * kAllocCounters, 0);
  std::uint64_t mask = 0;
  for (std::uint32_t d = 0; d < kPageDevices; ++d) {  // copied outside the seqlock: stats() takes a lock
    if (const gmlake::StitchAllocator* a = gmlake::existing_device_allocator(static_cast<int>(d))) {
      alloc_values(*a, &dev[d * kAllocCounters]);
      mask |= std::uint64_t{1} << d;
    }
  }
  std::int64_t live = 0, live_bytes = 0;
  s.table.totals(&live, &live_bytes);
  std::int64_t pending = 0, pending_bytes = 0;
  s.frees.totals(&pending, &pending_bytes);
  const ShimCounters& c = s.counters;
  const std::int64_t shim[] = {c.alloc_calls, c.free_calls, c.passthrough_allocs, c.passthrough_frees,
                               c.alloc_failures, c.free_syncs, c.reentries, c.ipc_refusals, c.attribute_answers,
                               live, live_bytes, c.free_deferred, pending, pending_bytes};
  static_assert(sizeof(shim) / sizeof(shim[0]) == kShimCounters, "one value per name");
  begin_write(h);
  std::memcpy(p.shim_values(), shim, sizeof(shim));
  for (std::uint32_t d = 0; d < kPageDevices; ++d) {
    std::memcpy(p.alloc_values(static_cast<int>(d)), &dev[d * kAllocCounters], kAllocCounters * sizeof(std::int64_t));
  }
  h->device_mask = mask;
  h->mode = static_cast<std::uint32_t>(s.mode.load());
  h->updated_unix_ns = unix_ns();
  ++h->publishes;
  end_write(h);
}

/// The publisher: republishes whenever a counter moved (checked every 50 ms).
void publisher(int owner) {
  std::uint64_t seen = ~std::uint64_t{0};
  for (;;) {
    if (static_cast<int>(getpid()) != owner) return;  // never in a forked child (threads do not fork anyway)
    const ShimCounters& c = state().counters;  // any counter that moved (queries too) means republish
    const std::uint64_t now = c.changes.load(std::memory_order_relaxed) +
                              static_cast<std::uint64_t>(c.attribute_answers + c.ipc_refusals + c.passthrough_allocs +
                                                         c.passthrough_frees + c.reentries + state().mode.load());
    Page& p = page();
    const bool served = serve_control(reinterpret_cast<ControlBlock*>(p.base + kControlOffset));  // glake suspend|resume PID
    if (now != seen || served) {
      seen = now;
      std::lock_guard<std::mutex> lock(p.mutex);
      write_locked(p);
    }
    std::this_thread::sleep_for(kPublishInterval);
  }
}

void remove_page() {
  Page& p = page();
  if (!p.path.empty() && static_cast<int>(getpid()) == p.owner) unlink(p.path.c_str());  // a child leaves it be
}

}  // namespace

void start_stats_page(const std::string& real_driver) {
  if (std::getenv("GLAKE_SHIM_STATS") && std::string(std::getenv("GLAKE_SHIM_STATS")) == "0") return;
  Page& p = page();
  std::lock_guard<std::mutex> lock(p.mutex);
  if (p.base) return;
  std::string why;
  const std::string dir = runtime_dir(why);
  if (dir.empty()) {
    warn_once("stats-dir", "no stats page: " + why);
    return;
  }
  const int pid = static_cast<int>(getpid());
  const std::string path = dir + "/" + std::to_string(pid) + ".shim";
  const std::string tmp = dir + "/." + std::to_string(pid) + ".shim.tmp";
  unlink(tmp.c_str());
  const int fd = open(tmp.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0 || ftruncate(fd, kPageBytes) != 0) {
    warn_once("stats-open", "no stats page: open/ftruncate(" + tmp + ") failed: " + std::strerror(errno));
    if (fd >= 0) close(fd);
    return;
  }
  void* m = mmap(nullptr, kPageBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (m == MAP_FAILED) {
    warn_once("stats-mmap", "no stats page: mmap(" + tmp + ") failed: " + std::strerror(errno));
    unlink(tmp.c_str());
    return;
  }
  p.base = static_cast<char*>(m);
  PageHeader* h = p.header();
  std::memset(h, 0, sizeof(PageHeader));
  std::memcpy(h->magic, kPageMagic, sizeof(kPageMagic));
  h->version = kPageVersion;
  h->page_bytes = kPageBytes;
  h->pid = pid;
  h->max_devices = kPageDevices;
  h->name_bytes = kNameBytes;
  h->n_shim_counters = kShimCounters;
  h->n_alloc_counters = kAllocCounters;
  h->shim_names_offset = 4096;
  h->alloc_names_offset = h->shim_names_offset + kMaxShimCounters * kNameBytes;
  h->shim_values_offset = h->alloc_names_offset + kMaxAllocCounters * kNameBytes;
  h->alloc_values_offset = h->shim_values_offset + kMaxShimCounters * 8;
  static_assert(sizeof(PageHeader) <= kControlOffset && kControlOffset + sizeof(ControlBlock) <= 4096,
                "header and control block fit the first 4 KiB");
  static_assert(4096 + (kMaxShimCounters + kMaxAllocCounters) * kNameBytes + kMaxShimCounters * 8 +
                    kPageDevices * kMaxAllocCounters * 8 <= kPageBytes, "page fits");
  for (std::uint32_t i = 0; i < kShimCounters; ++i) {
    copy_text(p.base + h->shim_names_offset + i * kNameBytes, kNameBytes, kShimCounterNames[i]);
  }
  for (std::uint32_t i = 0; i < kAllocCounters; ++i) {
    copy_text(p.base + h->alloc_names_offset + i * kNameBytes, kNameBytes, kAllocCounterNames[i]);
  }
  h->start_time_unix_ns = unix_ns();
  copy_text(h->real_driver, sizeof(h->real_driver), real_driver);
  copy_text(h->glake_version, sizeof(h->glake_version), GLAKE_VERSION_STRING);
  const std::string argv = cmdline();
  std::memcpy(h->argv, argv.data(), std::min(argv.size(), sizeof(h->argv) - 1));
  write_locked(p);
  if (rename(tmp.c_str(), path.c_str()) != 0) {  // readers only ever see a complete page
    warn_once("stats-rename", "no stats page: rename(" + tmp + ", " + path + ") failed: " + std::strerror(errno));
    unlink(tmp.c_str());
    return;
  }
  p.path = path;
  p.owner = pid;
  std::atexit(remove_page);
  std::thread(publisher, pid).detach();
}

void publish_state(Mode mode, const std::string& reason) {
  Page& p = page();
  std::lock_guard<std::mutex> lock(p.mutex);
  if (!p.base || static_cast<int>(getpid()) != p.owner) return;
  PageHeader* h = p.header();
  begin_write(h);
  h->mode = static_cast<std::uint32_t>(mode);
  copy_text(h->reason, sizeof(h->reason), reason);
  end_write(h);
}

std::string stats_page_path() {
  Page& p = page();
  std::lock_guard<std::mutex> lock(p.mutex);
  return p.path;
}

}  // namespace glake::shim
