// PhysChunk: one physical allocation (a cuMemCreate handle or a memfd), refcounted.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "driver/driver.h"

namespace glake {

/// One physical handle of `size` bytes on a device. Shared ownership: owners and every mapping
/// (VirtualRange) hold a std::shared_ptr; the handle is released when the last one lets go.
class GLAKE_API PhysChunk {
 public:
  /// Creates a new physical chunk (size: a positive multiple of the granularity).
  static std::shared_ptr<PhysChunk> create(Driver& driver, int device, std::size_t size);
  /// Imports a chunk exported by export_fd (here or in another process); `fd` stays the caller's.
  static std::shared_ptr<PhysChunk> import_fd(Driver& driver, int device, int fd, std::size_t size);

  ~PhysChunk();
  PhysChunk(const PhysChunk&) = delete;
  PhysChunk& operator=(const PhysChunk&) = delete;

  /// Bytes of physical memory.
  std::size_t size() const { return size_; }
  /// Device ordinal the memory lives on.
  int device() const { return device_; }
  /// The backend that made it.
  Driver& driver() const { return driver_; }
  /// The backend's handle (for the driver layer only).
  PhysHandle handle() const { return handle_; }
  /// A process-unique serial number, for snapshots and messages.
  std::uint64_t id() const { return id_; }
  /// Number of places the chunk is mapped at right now.
  int mappings() const { return mappings_.load(std::memory_order_acquire); }
  /// A new file descriptor for the chunk, owned by the caller (send it with SCM_RIGHTS).
  int export_fd() const;

 private:
  friend class VirtualRange;
  PhysChunk(Driver& driver, int device, std::size_t size, PhysHandle handle);

  Driver& driver_;
  int device_;
  std::size_t size_;
  PhysHandle handle_;
  std::uint64_t id_;
  std::atomic<int> mappings_{0};
};

}  // namespace glake
