#include "shim/allocation_table.h"

#include <mutex>

namespace glake::shim {

void AllocationTable::insert(const ShimAllocation& a) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  by_base_[a.base] = a;
  bytes_ += static_cast<std::int64_t>(a.size);
}

bool AllocationTable::erase(std::uintptr_t base, ShimAllocation* removed) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  auto it = by_base_.find(base);
  if (it == by_base_.end()) return false;
  if (removed) *removed = it->second;
  bytes_ -= static_cast<std::int64_t>(it->second.size);
  by_base_.erase(it);
  return true;
}

bool AllocationTable::find(std::uintptr_t ptr, ShimAllocation* out) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  auto it = by_base_.upper_bound(ptr);
  if (it == by_base_.begin()) return false;
  --it;
  // A zero-size request never reaches the table, so [base, base + size) is never empty.
  if (ptr >= it->second.base + it->second.size) return false;
  if (out) *out = it->second;
  return true;
}

void AllocationTable::totals(std::int64_t* count, std::int64_t* bytes) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  *count = static_cast<std::int64_t>(by_base_.size());
  *bytes = bytes_;
}

}  // namespace glake::shim
