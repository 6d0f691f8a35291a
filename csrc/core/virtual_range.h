// VirtualRange: a reserved range of virtual addresses with chunks mapped at chosen offsets.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "core/phys_chunk.h"

namespace glake {

/// One chunk mapped into a range.
struct Mapping {
  std::size_t offset;
  std::shared_ptr<PhysChunk> chunk;
};

/// A reserved VA range. Maps whole chunks at granularity-aligned offsets, remembers which chunk is
/// where (holding a reference to each), and unmaps everything and frees the VA on destruction.
/// Every method is thread-safe; bad arguments throw InvalidArgumentError and change nothing.
class GLAKE_API VirtualRange {
 public:
  /// Reserves `size` bytes on `device` (alignment 0 = the granularity).
  VirtualRange(Driver& driver, int device, std::size_t size, std::size_t alignment = 0);
  ~VirtualRange();
  VirtualRange(const VirtualRange&) = delete;
  VirtualRange& operator=(const VirtualRange&) = delete;

  /// First address of the range.
  DevPtr ptr() const { return ptr_; }
  /// Bytes reserved.
  std::size_t size() const { return size_; }
  /// Device ordinal.
  int device() const { return device_; }
  /// The backend.
  Driver& driver() const { return driver_; }

  /// Maps `chunk` at `offset` and, unless told not to, makes it readable and writable.
  void map(std::size_t offset, const std::shared_ptr<PhysChunk>& chunk, bool set_access = true);
  /// Maps chunks back to back from `offset`, then sets access once over all of them.
  /// All or nothing: on failure the chunks mapped so far are unmapped again.
  void map_many(std::size_t offset, const std::vector<std::shared_ptr<PhysChunk>>& chunks);
  /// Unmaps the chunk mapped exactly at `offset` and returns it.
  std::shared_ptr<PhysChunk> unmap(std::size_t offset);
  /// Makes [offset, offset+size) readable and writable, or readable only (every byte must be mapped).
  void set_access(std::size_t offset, std::size_t size, bool read_only = false);
  /// The chunk covering byte `offset`, or null when that byte is not mapped.
  std::shared_ptr<PhysChunk> chunk_at(std::size_t offset) const;
  /// The mapping covering byte `offset` (its start and chunk), or {0, null} when that byte is not mapped.
  Mapping mapping_at(std::size_t offset) const;
  /// Every mapping, by offset.
  std::vector<Mapping> mappings() const;
  /// Bytes currently mapped.
  std::size_t mapped_bytes() const;
  /// Unmaps every chunk and frees the addresses; later calls fail. Idempotent.
  void free();
  /// True after free().
  bool is_freed() const;

 private:
  void check_live() const;
  void check_mappable(std::size_t offset, const PhysChunk& chunk) const;
  void unmap_locked(std::map<std::size_t, std::shared_ptr<PhysChunk>>::iterator it);

  Driver& driver_;
  int device_;
  std::size_t size_;
  DevPtr ptr_ = 0;
  bool freed_ = false;
  std::size_t mapped_bytes_ = 0;
  mutable std::mutex mutex_;
  std::map<std::size_t, std::shared_ptr<PhysChunk>> chunks_;  // offset -> chunk
};

}  // namespace glake
