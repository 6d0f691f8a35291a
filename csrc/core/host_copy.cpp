// HostBuffer: host memory for suspended device data, anonymous or (larger than RAM allows) file-backed;
// HostReserve: one suspending object's buffers, kept between a resume and the next suspend if asked.
#include "core/host_copy.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <system_error>
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
  }
}

HostBuffer::~HostBuffer() {
  if (pinned_by_) {
    try {
      pinned_by_->host_unregister(pinned_device_, ptr());
    } catch (...) {  // a destructor must not throw; unmapping below ends the registration anyway
    }
  }
  if (p_) munmap(p_, size_);
}

void HostBuffer::pin(Driver& driver, int device) {
  if (pinned_by_) return;
  driver.host_register(device, ptr(), size_);
  pinned_by_ = &driver;
  pinned_device_ = device;
}

void copy_to_device_behind(HostCopier& io, const std::vector<HostCopy>& items, const std::vector<std::size_t>& needs,
                           std::size_t steps, const std::function<void(std::size_t)>& prepare) {
  if (const char* v = std::getenv("GLAKE_RESUME_OVERLAP"); v && std::string(v) == "0") {
    for (std::size_t k = 0; k < steps; ++k) prepare(k);
    io.to_device(items);
    return;
  }
  std::mutex mu;
  std::condition_variable cv;
  std::size_t done = 0;  // steps finished
  bool stop = false;
  std::exception_ptr failed;
  std::thread worker([&] {
    for (std::size_t k = 0; k < steps; ++k) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (stop) return;
      }
      std::exception_ptr e;
      try {
        prepare(k);
      } catch (...) {
        e = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mu);
      if (e) {
        failed = e;
      } else {
        ++done;
      }
      cv.notify_all();
      if (e) return;
    }
  });
  std::exception_ptr copy_failed;
  try {
    std::size_t part_bytes = 64u << 20, i = 0;
    while (i < items.size()) {
      std::vector<HostCopy> part;
      std::size_t bytes = 0, need = 0;
      for (; i < items.size() && (part.empty() || bytes < part_bytes); ++i) {
        part.push_back(items[i]);
        bytes += items[i].n;
        need = std::max(need, needs[i]);
      }
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return done >= need || failed; });
        if (failed) break;
      }
      io.to_device(part);
      part_bytes *= 4;
    }
  } catch (...) {
    copy_failed = std::current_exception();
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    if (copy_failed) {
      stop = true;  // the call fails anyway: no further step
    } else {        // steps no copy needed (chunks holding no live data) must be done all the same
      cv.wait(lock, [&] { return done == steps || failed; });
    }
  }
  worker.join();
  if (failed) std::rethrow_exception(failed);
  if (copy_failed) std::rethrow_exception(copy_failed);
}

FaultAhead::FaultAhead(const std::vector<const HostBuffer*>& buffers, unsigned threads) {
  constexpr std::size_t kBlock = 32u << 20;
  for (const HostBuffer* b : buffers) {
    char* p = reinterpret_cast<char*>(b->ptr());
    for (std::size_t off = 0; off < b->size(); off += kBlock) blocks_.push_back(Block{p + off, std::min(kBlock, b->size() - off)});
  }
  if (blocks_.size() < 2) return;
  threads = static_cast<unsigned>(std::min<std::size_t>(threads, blocks_.size()));
  try {
    for (unsigned t = 0; t < threads; ++t) pool_.emplace_back([this] { work(); });
  } catch (const std::system_error&) {  // no more threads to be had: those started do the work
  }
}

FaultAhead::~FaultAhead() {
  stop_.store(true);
  finish();
}

void FaultAhead::finish() {
  for (auto& t : pool_) {
    if (t.joinable()) t.join();
  }
}

unsigned FaultAhead::threads_from_env() {
  const char* env = std::getenv("GLAKE_SUSPEND_PREFAULT_THREADS");
  const unsigned n = env && *env ? static_cast<unsigned>(std::strtoul(env, nullptr, 10)) : 8u;
  return std::min(n, std::max(1u, std::thread::hardware_concurrency()));
}

void FaultAhead::work() {
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  while (!stop_.load(std::memory_order_relaxed)) {
    const std::size_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= blocks_.size()) return;
    const Block& b = blocks_[i];
#ifdef MADV_POPULATE_WRITE
    if (madvise(b.p, b.n, MADV_POPULATE_WRITE) == 0) continue;
#endif
    // Kernels before 5.14: a read-modify-write of one byte per page faults it in and keeps its value
    // (the copy may have written it already); an atomic add of 0 is such a write.
    for (std::size_t off = 0; off < b.n; off += page) {
      __atomic_fetch_add(reinterpret_cast<unsigned char*>(b.p + off), 0, __ATOMIC_RELAXED);
    }
  }
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
  std::vector<const HostBuffer*> fresh;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (out[i]) continue;
    out[i] = std::make_unique<HostBuffer>(sizes[i], pending);
    if (out[i]->file_backed()) continue;
    pending += sizes[i];
    fresh.push_back(out[i].get());
  }
  taken.faulting = std::make_unique<FaultAhead>(fresh, FaultAhead::threads_from_env());
  return taken;
}

void HostReserve::give_back(std::vector<HostBufferPtr> buffers) {
  const char* v = std::getenv("GLAKE_SUSPEND_KEEP_HOST");
  const bool keep = v && std::strcmp(v, "1") == 0;
  for (HostBufferPtr& b : buffers) {
    if (b && !b->file_backed() && (keep || b->pinned())) add_one(std::move(b));
  }  // the others unmap as they go
}

void HostReserve::add_one(HostBufferPtr b) {
  const std::size_t n = b->size();
  kept_.emplace(n, std::move(b));
  bytes_ += n;
  g_kept_bytes += n;
}

void HostReserve::add(std::vector<HostBufferPtr> buffers) {
  for (HostBufferPtr& b : buffers) {
    if (b) add_one(std::move(b));
  }
}

std::vector<std::size_t> HostReserve::missing(const std::vector<std::size_t>& sizes) const {
  std::map<std::size_t, std::size_t> have;
  for (const auto& [n, b] : kept_) ++have[n];
  std::vector<std::size_t> out;
  for (std::size_t n : sizes) {
    auto it = have.find(n);
    if (it != have.end() && it->second > 0) {
      --it->second;
    } else {
      out.push_back(n);
    }
  }
  return out;
}

std::vector<HostBufferPtr> HostReserve::make_ready(const std::vector<std::size_t>& sizes, Driver& driver, int device) {
  std::vector<HostBufferPtr> out;
  std::vector<const HostBuffer*> fresh;
  std::size_t pending = 0;
  for (std::size_t n : sizes) {
    auto b = std::make_unique<HostBuffer>(n, pending);
    if (b->file_backed()) continue;  // more than RAM allows: a suspend will page it out to a file
    pending += n;
    fresh.push_back(b.get());
    out.push_back(std::move(b));
  }
  // Faulted in by threads first: pinning resident memory ran at 26 GB/s on the H200 host. A batch
  // too small for threads (one 32 MiB block) is faulted in by the pinning itself.
  FaultAhead faulting(fresh, FaultAhead::threads_from_env());
  faulting.finish();
  for (HostBufferPtr& b : out) b->pin(driver, device);
  return out;
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
