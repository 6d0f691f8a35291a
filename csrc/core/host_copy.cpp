// HostBuffer: host memory for suspended device data, anonymous or (larger than RAM allows) file-backed;
// HostReserve: one suspending object's buffers, kept between a resume and the next suspend if asked.
#include "core/host_copy.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "driver/host_driver.h"

namespace glake {

namespace {

/// Whether `size` more bytes (after `pending` bytes not yet faulted in) should go to a file:
/// $GLAKE_SUSPEND_FILE_OVER (bytes) when set, else when they would leave less than a tenth of RAM
/// available.
bool wants_file(std::size_t size, std::size_t pending) {
  if (const char* v = std::getenv("GLAKE_SUSPEND_FILE_OVER"); v && *v) return size > std::strtoull(v, nullptr, 10);
  const MemInfo ram = host_memory();
  return ram.free && pending + size + ram.total / 10 > ram.free;
}

/// An unnamed file of `size` bytes, its blocks allocated (so a full disk fails here, not as a SIGBUS
/// during the copy), in $GLAKE_SUSPEND_DIR (default /var/tmp: on disk, where /tmp may be RAM).
int backing_file(std::size_t size) {
  const char* env = std::getenv("GLAKE_SUSPEND_DIR");
  const std::string dir = env && *env ? env : "/var/tmp";
  int fd = open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {  // no O_TMPFILE on this filesystem: a named file, unlinked at once
    std::string path = dir + "/glake-suspend-XXXXXX";
    fd = mkostemp(path.data(), O_CLOEXEC);
    if (fd >= 0) unlink(path.c_str());
  }
  if (fd < 0) {
    throw OutOfMemoryError("suspend: " + std::to_string(size) + " bytes do not fit in RAM and no file can be made in " + dir +
                           " (" + std::strerror(errno) + "; set GLAKE_SUSPEND_DIR)");
  }
  if (int rc = posix_fallocate(fd, 0, static_cast<off_t>(size)); rc != 0) {
    close(fd);
    throw OutOfMemoryError("suspend: cannot reserve " + std::to_string(size) + " bytes in " + dir + " for the device's data (" +
                           std::strerror(rc) + ")");
  }
  return fd;
}

/// Faults in [p, p + size) with $GLAKE_SUSPEND_PREFAULT_THREADS threads before the copy lands there
/// (default 0: off). Measured on an H200 host (THP madvise): 8 threads fault fresh memory in at
/// 6.2 GB/s, while multipath's copy threads, faulting as they write, land 24 GB/s in it.
void prefault(void* p, std::size_t size) {
  const char* env = std::getenv("GLAKE_SUSPEND_PREFAULT_THREADS");
  unsigned threads = env && *env ? static_cast<unsigned>(std::strtoul(env, nullptr, 10)) : 0;
  threads = std::min(threads, std::max(1u, std::thread::hardware_concurrency()));
  constexpr std::size_t kMinPerThread = 64u << 20;
  if (threads == 0 || size < kMinPerThread) return;
  threads = static_cast<unsigned>(std::min<std::size_t>(threads, size / kMinPerThread));
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  const std::size_t per = (size / threads + page - 1) / page * page;
  auto touch = [page](char* lo, char* hi) {
#ifdef MADV_POPULATE_WRITE
    if (madvise(lo, static_cast<std::size_t>(hi - lo), MADV_POPULATE_WRITE) == 0) return;
#endif
    for (char* q = lo; q < hi; q += page) *reinterpret_cast<volatile char*>(q) = 0;  // kernels before 5.14
  };
  std::vector<std::thread> pool;
  char* base = static_cast<char*>(p);
  for (unsigned t = 0; t < threads; ++t) {
    char* lo = base + std::min(size, t * per);
    char* hi = base + std::min(size, (t + 1) * per);
    if (lo < hi) pool.emplace_back(touch, lo, hi);
  }
  for (auto& th : pool) th.join();
}

}  // namespace

HostBuffer::HostBuffer(std::size_t size, std::size_t pending) : size_(size) {
  int fd = -1;
  if (wants_file(size, pending)) {
    fd = backing_file(size);
    p_ = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);  // the mapping keeps the file
    file_backed_ = true;
  } else {
    p_ = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  }
  if (p_ == MAP_FAILED) {
    p_ = nullptr;
    throw OutOfMemoryError("suspend: cannot map " + std::to_string(size) + " bytes of host memory for the device's data (" +
                           std::strerror(errno) + ")");
  }
  if (!file_backed_) {
#ifdef MADV_HUGEPAGE
    // A hint: refused (no THP) changes only the fault count. On the H200 host (THP "madvise"),
    // 8 threads fault 16 GiB in at 35 GB/s with it and at 14 GB/s without (a 16 GiB suspend:
    // 0.78 s against 0.88 s, its resume 0.43 s against 0.89 s).
    madvise(p_, size, MADV_HUGEPAGE);
#endif
    prefault(p_, size);
  }
}

HostBuffer::~HostBuffer() {
  if (p_) munmap(p_, size_);
}

namespace {
std::atomic<std::size_t> g_kept_bytes{0};  // every HostReserve's bytes
}

HostReserve::~HostReserve() { drop(); }

HostReserve::Taken HostReserve::take(const std::vector<std::size_t>& sizes) {
  Taken taken;
  std::vector<HostBufferPtr>& out = taken.buffers;
  out.resize(sizes.size());
  for (std::size_t i = 0; i < sizes.size(); ++i) {  // resident already: no fault, no file, no new RAM
    auto it = kept_.find(sizes[i]);
    if (it == kept_.end()) continue;
    out[i] = std::move(it->second);
    kept_.erase(it);
    taken.reused += sizes[i];
    bytes_ -= sizes[i];
    g_kept_bytes -= sizes[i];
  }
  drop();  // another layout's leftovers go before any new buffer counts free RAM
  std::size_t pending = 0;  // new RAM this batch will fault in
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (out[i]) continue;
    out[i] = std::make_unique<HostBuffer>(sizes[i], pending);
    if (!out[i]->file_backed()) pending += sizes[i];
  }
  return taken;
}

void HostReserve::give_back(std::vector<HostBufferPtr> buffers) {
  const char* v = std::getenv("GLAKE_SUSPEND_KEEP_HOST");
  if (!v || std::strcmp(v, "1") != 0) return;  // `buffers` unmap as they go
  for (HostBufferPtr& b : buffers) {
    if (!b || b->file_backed()) continue;
    const std::size_t n = b->size();
    kept_.emplace(n, std::move(b));
    bytes_ += n;
    g_kept_bytes += n;
  }
}

std::size_t HostReserve::drop() {
  const std::size_t n = bytes_;
  kept_.clear();
  bytes_ = 0;
  g_kept_bytes -= n;
  return n;
}

std::size_t HostReserve::process_bytes() { return g_kept_bytes.load(); }

}  // namespace glake
