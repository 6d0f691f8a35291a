#include "core/virtual_range.h"

namespace glake {

VirtualRange::VirtualRange(Driver& driver, int device, std::size_t size, std::size_t alignment)
    : driver_(driver), device_(device), size_(size) {
  ptr_ = driver_.reserve(device, size, alignment);
}

VirtualRange::~VirtualRange() {
  try {
    free();
  } catch (...) {
    // Leaves the addresses reserved rather than throwing from a destructor; the stats show them.
  }
}

void VirtualRange::check_live() const {
  if (freed_) throw InvalidArgumentError("the VirtualRange at " + hex(ptr_) + " was freed");
}

void VirtualRange::check_mappable(std::size_t offset, const PhysChunk& chunk) const {
  const std::size_t g = driver_.granularity(device_);
  const std::string where = "map(offset=" + std::to_string(offset) + ", chunk size=" + std::to_string(chunk.size()) +
                            ") into the range at " + hex(ptr_) + " of " + std::to_string(size_) + " bytes";
  if (&chunk.driver() != &driver_ || chunk.device() != device_) {
    throw InvalidArgumentError(where + ": the chunk belongs to another backend or device");
  }
  if (offset % g != 0) throw InvalidArgumentError(where + ": offset is not a multiple of the granularity (" + std::to_string(g) + ")");
  if (offset >= size_ || chunk.size() > size_ - offset) throw InvalidArgumentError(where + ": outside the range");
  auto next = chunks_.lower_bound(offset);
  if (next != chunks_.end() && next->first < offset + chunk.size()) {
    throw InvalidArgumentError(where + ": overlaps the chunk already mapped at offset " + std::to_string(next->first));
  }
  if (next != chunks_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second->size() > offset) {
      throw InvalidArgumentError(where + ": overlaps the chunk already mapped at offset " + std::to_string(prev->first));
    }
  }
}

void VirtualRange::map(std::size_t offset, const std::shared_ptr<PhysChunk>& chunk, bool set_access) {
  if (!chunk) throw InvalidArgumentError("map: chunk is null (was it released?)");
  std::lock_guard<std::mutex> lock(mutex_);
  check_live();
  check_mappable(offset, *chunk);
  const DevPtr va = ptr_ + offset;
  driver_.map(device_, va, chunk->size(), chunk->handle());
  if (set_access) {
    try {
      driver_.set_access(device_, va, chunk->size());
    } catch (...) {
      driver_.unmap(device_, va, chunk->size());
      throw;
    }
  }
  chunks_.emplace(offset, chunk);
  chunk->mappings_.fetch_add(1, std::memory_order_acq_rel);
  mapped_bytes_ += chunk->size();
}

void VirtualRange::map_many(std::size_t offset, const std::vector<std::shared_ptr<PhysChunk>>& chunks) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_live();
  std::size_t total = 0;
  for (const auto& c : chunks) {
    if (!c) throw InvalidArgumentError("map_many: a chunk is null (was it released?)");
    check_mappable(offset + total, *c);
    total += c->size();
  }
  std::size_t done = 0;
  try {
    for (const auto& c : chunks) {
      driver_.map(device_, ptr_ + offset + done, c->size(), c->handle());
      done += c->size();
    }
    if (total) driver_.set_access(device_, ptr_ + offset, total);
  } catch (...) {
    std::size_t undo = 0;
    for (const auto& c : chunks) {
      if (undo >= done) break;
      driver_.unmap(device_, ptr_ + offset + undo, c->size());
      undo += c->size();
    }
    throw;
  }
  std::size_t at = offset;
  for (const auto& c : chunks) {
    chunks_.emplace(at, c);
    c->mappings_.fetch_add(1, std::memory_order_acq_rel);
    at += c->size();
  }
  mapped_bytes_ += total;
}

void VirtualRange::unmap_locked(std::map<std::size_t, std::shared_ptr<PhysChunk>>::iterator it) {
  const std::size_t sz = it->second->size();
  driver_.unmap(device_, ptr_ + it->first, sz);
  it->second->mappings_.fetch_sub(1, std::memory_order_acq_rel);
  mapped_bytes_ -= sz;
  chunks_.erase(it);
}

std::shared_ptr<PhysChunk> VirtualRange::unmap(std::size_t offset) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_live();
  auto it = chunks_.find(offset);
  if (it == chunks_.end()) {
    throw InvalidArgumentError("unmap(offset=" + std::to_string(offset) + "): no chunk is mapped at that offset of the range at " +
                               hex(ptr_));
  }
  std::shared_ptr<PhysChunk> chunk = it->second;
  unmap_locked(it);
  return chunk;
}

void VirtualRange::set_access(std::size_t offset, std::size_t size, bool read_only) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_live();
  const std::string where = "set_access(offset=" + std::to_string(offset) + ", size=" + std::to_string(size) + ")";
  if (size == 0 || offset > size_ || size > size_ - offset) throw InvalidArgumentError(where + ": outside the range or empty");
  std::size_t at = offset;
  for (auto it = chunks_.find(offset); it != chunks_.end() && at < offset + size; ++it) {
    if (it->first != at) break;
    at += it->second->size();
  }
  if (at < offset + size) throw InvalidArgumentError(where + ": byte " + std::to_string(at) + " is not mapped");
  driver_.set_access(device_, ptr_ + offset, size, read_only);
}

std::shared_ptr<PhysChunk> VirtualRange::chunk_at(std::size_t offset) const { return mapping_at(offset).chunk; }

Mapping VirtualRange::mapping_at(std::size_t offset) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = chunks_.upper_bound(offset);
  if (it == chunks_.begin()) return {0, nullptr};
  --it;
  if (offset >= it->first + it->second->size()) return {0, nullptr};
  return {it->first, it->second};
}

std::vector<Mapping> VirtualRange::mappings() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<Mapping> out;
  out.reserve(chunks_.size());
  for (const auto& [offset, chunk] : chunks_) out.push_back({offset, chunk});
  return out;
}

std::size_t VirtualRange::mapped_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return mapped_bytes_;
}

void VirtualRange::free() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (freed_) return;
  while (!chunks_.empty()) unmap_locked(chunks_.begin());
  driver_.free_va(device_, ptr_, size_);
  freed_ = true;
}

bool VirtualRange::is_freed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return freed_;
}

}  // namespace glake
