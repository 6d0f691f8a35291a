// The out-of-memory report: what was asked, what is held and where, the cause and a hint.
#include "gmlake/stitch_allocator.h"

#include "gmlake/oom_report.h"

#include <cstdio>

namespace glake::gmlake {

std::string gib(std::size_t bytes) {
  char buf[48];
  const double mib = static_cast<double>(bytes) / (1024.0 * 1024);
  if (mib >= 1024) std::snprintf(buf, sizeof(buf), "%.2f GiB", mib / 1024);
  else std::snprintf(buf, sizeof(buf), "%.2f MiB", mib);
  return buf;
}

std::string StitchAllocator::oom_message(std::size_t size, std::size_t rounded, const std::string& cause) const {
  std::size_t free_dev = 0;
  try {
    free_dev = driver_.mem_info(device_).free;
  } catch (...) {
  }
  std::size_t cached_free = 0;
  for (const Block* b : free_.large) cached_free += b->size;
  for (const Block* b : free_.small) cached_free += b->size;
  std::size_t pool_free = 0;
  for (const auto& [id, pool] : pools_) {
    for (const FreeSet* set : {&pool->free.small, &pool->free.large, &pool->free.stitched}) {
      for (const Block* b : *set) pool_free += b->size;
    }
  }
  const std::size_t cap = cap_bytes();
  std::string msg = "glake: out of memory on " + std::string(driver_.name()) + ":" + std::to_string(device_) +
                    " allocating " + std::to_string(size) + " bytes (" + gib(rounded) + " rounded). Allocated " +
                    gib(stats_.allocated_bytes.current) + ", reserved " + gib(stats_.reserved_bytes.current) +
                    " (free in cache " + gib(cached_free) + ", largest free block " + gib(largest_free()) +
                    (pool_free ? ", free in private pools " + gib(pool_free) : std::string()) +
                    "), device free " + gib(free_dev) + " of " + gib(device_total_) + ", limit " +
                    (cap ? gib(cap) : std::string("none")) + ". Cause: " + cause + ".";
  if (!config_.stitch && cached_free >= rounded) {
    msg += " Hint: the cache holds enough free memory in pieces; enable stitching (GLAKE_ALLOC_CONF=stitch:true).";
  } else if (cap && cap < device_total_) {
    msg += " Hint: raise the limit (limit_bytes / memory_fraction) or reduce the batch size.";
  } else {
    msg += " Hint: reduce the batch size or sequence length, or free tensors you no longer need.";
  }
  return msg;
}

}  // namespace glake::gmlake
