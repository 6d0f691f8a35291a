#include "core/chunk_pool.h"

namespace glake {

ChunkPool::ChunkPool(Driver& driver, int device, std::size_t limit_bytes, std::size_t chunk_size)
    : driver_(driver), device_(device), chunk_size_(chunk_size), limit_bytes_(limit_bytes) {}

std::shared_ptr<ChunkPool> ChunkPool::create(Driver& driver, int device, std::size_t limit_bytes, std::size_t chunk_size) {
  if (device < 0 || device >= driver.device_count()) {
    throw InvalidArgumentError("ChunkPool: device " + std::to_string(device) + " does not exist");
  }
  const std::size_t g = driver.granularity(device);
  if (chunk_size == 0) chunk_size = g;
  if (chunk_size % g != 0) {
    throw InvalidArgumentError("ChunkPool: chunk_size=" + std::to_string(chunk_size) +
                               " must be a multiple of the granularity (" + std::to_string(g) + ")");
  }
  return std::shared_ptr<ChunkPool>(new ChunkPool(driver, device, limit_bytes, chunk_size));
}

ChunkPool::~ChunkPool() = default;  // cached chunks are released with cache_

std::shared_ptr<PhysChunk> ChunkPool::wrap(std::shared_ptr<PhysChunk> raw) {
  // The handed-out pointer owns `raw`; when the last holder lets go, raw goes back to the cache
  // (or is released, if the pool is gone).
  std::weak_ptr<ChunkPool> weak = weak_from_this();
  PhysChunk* p = raw.get();
  return std::shared_ptr<PhysChunk>(p, [weak, raw](PhysChunk*) mutable {
    if (auto pool = weak.lock()) pool->give_back(std::move(raw));
  });
}

void ChunkPool::give_back(std::shared_ptr<PhysChunk> chunk) {
  std::lock_guard<std::mutex> lock(mutex_);
  counts_.in_use_chunks--;
  const std::size_t total = (counts_.in_use_chunks + cache_.size() + 1) * chunk_size_;
  if (limit_bytes_ != 0 && total > limit_bytes_) {
    counts_.released++;
    return;  // over a lowered limit: `chunk` is the last reference and releases the handle here
  }
  cache_.push_back(std::move(chunk));
}

std::shared_ptr<PhysChunk> ChunkPool::take_locked() {
  if (!cache_.empty()) {
    std::shared_ptr<PhysChunk> c = std::move(cache_.back());
    cache_.pop_back();
    counts_.hits++;
    counts_.in_use_chunks++;
    return c;
  }
  const std::size_t used = (counts_.in_use_chunks + cache_.size()) * chunk_size_;
  if (limit_bytes_ != 0 && used + chunk_size_ > limit_bytes_) {
    throw OutOfMemoryError("ChunkPool on " + std::string(driver_.name()) + " device " + std::to_string(device_) +
                           ": limit of " + bytes_str(limit_bytes_) + " reached (" + std::to_string(counts_.in_use_chunks) +
                           " chunks of " + bytes_str(chunk_size_) + " in use, none cached)");
  }
  std::shared_ptr<PhysChunk> c = PhysChunk::create(driver_, device_, chunk_size_);
  counts_.created++;
  counts_.in_use_chunks++;
  return c;
}

std::shared_ptr<PhysChunk> ChunkPool::acquire() {
  std::shared_ptr<PhysChunk> raw;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    raw = take_locked();
  }
  return wrap(std::move(raw));
}

std::vector<std::shared_ptr<PhysChunk>> ChunkPool::acquire_many(std::size_t n) {
  std::vector<std::shared_ptr<PhysChunk>> raws;
  raws.reserve(n);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::size_t used = (counts_.in_use_chunks + cache_.size()) * chunk_size_;
    const std::size_t creatable = limit_bytes_ == 0 ? n : (limit_bytes_ > used ? (limit_bytes_ - used) / chunk_size_ : 0);
    if (cache_.size() + creatable < n) {
      throw OutOfMemoryError("ChunkPool on " + std::string(driver_.name()) + " device " + std::to_string(device_) +
                             ": cannot hand out " + std::to_string(n) + " chunks under the limit of " +
                             bytes_str(limit_bytes_) + " (" + std::to_string(counts_.in_use_chunks) + " in use, " +
                             std::to_string(cache_.size()) + " cached)");
    }
    try {  // the driver may still refuse a creation
      for (std::size_t i = 0; i < n; ++i) raws.push_back(take_locked());
    } catch (...) {
      for (auto& r : raws) cache_.push_back(std::move(r));
      counts_.in_use_chunks -= raws.size();
      throw;
    }
  }
  std::vector<std::shared_ptr<PhysChunk>> out;
  out.reserve(n);
  for (auto& r : raws) out.push_back(wrap(std::move(r)));
  return out;
}

std::size_t ChunkPool::prefill(std::size_t n) {
  std::lock_guard<std::mutex> lock(mutex_);
  while (cache_.size() < n) {
    const std::size_t used = (counts_.in_use_chunks + cache_.size()) * chunk_size_;
    if (limit_bytes_ != 0 && used + chunk_size_ > limit_bytes_) break;
    cache_.push_back(PhysChunk::create(driver_, device_, chunk_size_));
    counts_.created++;
  }
  return cache_.size();
}

std::size_t ChunkPool::trim(std::size_t keep_bytes) {
  std::vector<std::shared_ptr<PhysChunk>> doomed;  // released outside the lock
  {
    std::lock_guard<std::mutex> lock(mutex_);
    while (!cache_.empty() && cache_.size() * chunk_size_ > keep_bytes) {
      doomed.push_back(std::move(cache_.back()));
      cache_.pop_back();
    }
    counts_.released += doomed.size();
  }
  return doomed.size() * chunk_size_;
}

void ChunkPool::set_limit(std::size_t limit_bytes) {
  std::size_t keep = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_bytes_ = limit_bytes;
    if (limit_bytes == 0) return;
    const std::size_t in_use = counts_.in_use_chunks * chunk_size_;
    keep = limit_bytes > in_use ? limit_bytes - in_use : 0;
  }
  trim(keep);
}

ChunkPoolStats ChunkPool::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  ChunkPoolStats s = counts_;
  s.chunk_size = chunk_size_;
  s.limit_bytes = limit_bytes_;
  s.cached_chunks = cache_.size();
  return s;
}

}  // namespace glake
