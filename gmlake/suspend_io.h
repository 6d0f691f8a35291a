// Where suspended bytes live and how they get there: host buffers and the copier interface.
#pragma once

#include <cstddef>
#include <memory>

#include "driver/driver.h"

namespace glake::gmlake {

/// How suspend() and resume() move live data between the device and host memory. Without one the
/// allocator copies with the driver, one run of chunks at a time; glake.suspend passes multipath's
/// engine (pageable copies staged through pinned buffers by several threads).
class GLAKE_API HostCopier {
 public:
  virtual ~HostCopier() = default;
  /// Copies `n` bytes from device address `src` to pageable host memory at `dst`; returns when landed.
  virtual void to_host(DevPtr dst, DevPtr src, std::size_t n) = 0;
  /// Copies `n` bytes from pageable host memory at `src` to device address `dst`; returns when landed.
  virtual void to_device(DevPtr dst, DevPtr src, std::size_t n) = 0;
};

/// Anonymous host memory for suspended data: mmap'd, with transparent huge pages asked for (fewer page
/// faults while the copy first touches it), unmapped on destruction. Throws OutOfMemoryError.
class HostBuffer {
 public:
  explicit HostBuffer(std::size_t size);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  /// First byte, as an address for the driver.
  DevPtr ptr() const { return reinterpret_cast<DevPtr>(p_); }
  std::size_t size() const { return size_; }

 private:
  void* p_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace glake::gmlake
