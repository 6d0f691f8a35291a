// Where suspended bytes live and how they get there: host buffers and the copier interface, shared by
// every layer that suspends (gmlake's allocator, kvcache's manager).
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "driver/driver.h"

namespace glake {

/// One copy of a suspend's or resume's batch: `n` bytes from `src` to `dst`.
struct HostCopy {
  DevPtr dst, src;
  std::size_t n;
};

/// How suspend() and resume() move live data between the device and host memory: a whole batch per
/// call, so a copier can pipeline many runs (the copies must not overlap each other). Without one the
/// caller copies with the driver (DriverCopier); glake.suspend passes multipath's engine (pageable
/// copies staged through pinned buffers by several threads, every run of a batch in one pipeline).
class GLAKE_API HostCopier {
 public:
  virtual ~HostCopier() = default;
  /// Copies each item from device memory to pageable host memory; returns when all have landed.
  virtual void to_host(const std::vector<HostCopy>& items) = 0;
  /// Copies each item from pageable host memory to device memory; returns when all have landed.
  virtual void to_device(const std::vector<HostCopy>& items) = 0;
};

/// The copier without a copy engine: the driver's synchronous memcpy, one call at a time.
class GLAKE_API DriverCopier final : public HostCopier {
 public:
  DriverCopier(Driver& driver, int device) : driver_(driver), device_(device) {}
  void to_host(const std::vector<HostCopy>& items) override { copy(items); }
  void to_device(const std::vector<HostCopy>& items) override { copy(items); }

 private:
  void copy(const std::vector<HostCopy>& items) {
    for (const HostCopy& c : items) driver_.memcpy(device_, c.dst, c.src, c.n);
  }
  Driver& driver_;
  int device_;
};

/// Host memory that suspends keep for the next suspend, when $GLAKE_SUSPEND_KEEP_HOST=1: a resume's
/// buffers stay mapped (their pages faulted in), and the next suspend's buffers of the same sizes
/// take them, so that its copies land in resident memory (on an H200 host 50 GB/s, against 24 GB/s
/// into fresh memory, which the kernel must fault in and zero page by page). The price is host RAM
/// held while the process is awake: as much as the last suspend took. Thread-safe.
class GLAKE_API HostReserve {
 public:
  /// The process's reserve.
  static HostReserve& instance();
  /// Whether buffers are kept ($GLAKE_SUSPEND_KEEP_HOST=1, read at each call).
  static bool keeping();
  /// A kept mapping of `size` bytes (exactly), or null.
  void* take(std::size_t size);
  /// Keeps `p` (`size` bytes, anonymous) for a later take().
  void put(void* p, std::size_t size);
  /// Unmaps every kept mapping no suspend has taken; returns the bytes given back. A suspend calls
  /// it once all its buffers are made, so the reserve never holds more than the last suspend used.
  std::size_t trim();
  /// Bytes kept now.
  std::size_t bytes() const;

 private:
  HostReserve() = default;
  mutable std::mutex mu_;
  std::multimap<std::size_t, void*> kept_;
  std::size_t bytes_ = 0;
};

/// Host memory for suspended data, unmapped on destruction (or kept, see HostReserve): anonymous, with transparent huge pages
/// asked for (faulted in by the copy that fills it, or first by $GLAKE_SUSPEND_PREFAULT_THREADS
/// threads when set: on an H200 host the copy's own faulting was the faster); or, when the bytes
/// would leave less than a tenth of RAM available (or exceed $GLAKE_SUSPEND_FILE_OVER bytes), a
/// shared mapping of an unnamed, preallocated file in $GLAKE_SUSPEND_DIR (default /var/tmp), so that
/// a suspend larger than RAM pages out to disk instead of failing. `pending`: bytes of other buffers
/// made for the same batch and not yet written (free RAM does not show them yet; reused ones do not
/// count). Throws OutOfMemoryError.
class GLAKE_API HostBuffer {
 public:
  explicit HostBuffer(std::size_t size, std::size_t pending = 0);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  /// First byte, as an address for the driver.
  DevPtr ptr() const { return reinterpret_cast<DevPtr>(p_); }
  std::size_t size() const { return size_; }
  /// True when a file backs the bytes.
  bool file_backed() const { return file_backed_; }
  /// True when taken from the HostReserve: resident already, so writing it takes no more RAM.
  bool reused() const { return reused_; }

 private:
  void* p_ = nullptr;
  std::size_t size_ = 0;
  bool file_backed_ = false;
  bool keep_ = false;    // anonymous: goes to the HostReserve when destroyed, if keeping
  bool reused_ = false;  // taken from the HostReserve
};

}  // namespace glake
