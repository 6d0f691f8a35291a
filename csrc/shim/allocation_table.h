// The allocations the shim made with glake: which pointers are glake's, their requested size and device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <shared_mutex>

namespace glake::shim {

/// One live allocation the shim handed out.
struct ShimAllocation {
  std::uintptr_t base = 0;
  std::size_t size = 0;  ///< bytes the program asked for (cuMemAlloc's bytesize, pitch * height)
  int device = -1;
};

/// Thread-safe map of the shim's live allocations (readers share, writers exclude).
class AllocationTable {
 public:
  /// Records a new allocation.
  void insert(const ShimAllocation& a);
  /// Removes the allocation based at `base`; false if there is none.
  bool erase(std::uintptr_t base, ShimAllocation* removed = nullptr);
  /// The allocation containing `ptr` (interior pointers included); false if `ptr` is not glake's.
  bool find(std::uintptr_t ptr, ShimAllocation* out) const;
  /// Live allocations and their requested bytes.
  void totals(std::int64_t* count, std::int64_t* bytes) const;

 private:
  mutable std::shared_mutex mutex_;
  std::map<std::uintptr_t, ShimAllocation> by_base_;
  std::int64_t bytes_ = 0;
};

}  // namespace glake::shim
