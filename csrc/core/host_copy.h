// Where suspended bytes live and how they get there: host buffers and the copier interface, shared by
// every layer that suspends (gmlake's allocator, kvcache's manager).
#pragma once

#include <cstddef>
#include <memory>

#include "driver/driver.h"

namespace glake {

/// How suspend() and resume() move live data between the device and host memory. Without one the
/// caller copies with the driver (DriverCopier); glake.suspend passes multipath's engine (pageable
/// copies staged through pinned buffers by several threads).
class GLAKE_API HostCopier {
 public:
  virtual ~HostCopier() = default;
  /// Copies `n` bytes from device address `src` to pageable host memory at `dst`; returns when landed.
  virtual void to_host(DevPtr dst, DevPtr src, std::size_t n) = 0;
  /// Copies `n` bytes from pageable host memory at `src` to device address `dst`; returns when landed.
  virtual void to_device(DevPtr dst, DevPtr src, std::size_t n) = 0;
};

/// The copier without a copy engine: the driver's synchronous memcpy, one call at a time.
class GLAKE_API DriverCopier final : public HostCopier {
 public:
  DriverCopier(Driver& driver, int device) : driver_(driver), device_(device) {}
  void to_host(DevPtr dst, DevPtr src, std::size_t n) override { driver_.memcpy(device_, dst, src, n); }
  void to_device(DevPtr dst, DevPtr src, std::size_t n) override { driver_.memcpy(device_, dst, src, n); }

 private:
  Driver& driver_;
  int device_;
};

/// Host memory for suspended data, unmapped on destruction: anonymous, with transparent huge pages
/// asked for and faulted in by several threads before the copy (a fresh page is zeroed on first touch,
/// which the copy's own threads paid for before); or, when the bytes would leave less
/// than a tenth of RAM available (or exceed $GLAKE_SUSPEND_FILE_OVER bytes), a shared mapping of an
/// unnamed, preallocated file in $GLAKE_SUSPEND_DIR (default /var/tmp), so that a suspend larger than
/// RAM pages out to disk instead of failing. Throws OutOfMemoryError.
class GLAKE_API HostBuffer {
 public:
  explicit HostBuffer(std::size_t size);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  /// First byte, as an address for the driver.
  DevPtr ptr() const { return reinterpret_cast<DevPtr>(p_); }
  std::size_t size() const { return size_; }
  /// True when a file backs the bytes.
  bool file_backed() const { return file_backed_; }

 private:
  void* p_ = nullptr;
  std::size_t size_ = 0;
  bool file_backed_ = false;
};

}  // namespace glake
