// glake's C ABI (glake_c_api.h) over the process-wide stitched allocators: what the torch frontend,
// compiled against whichever torch is installed, calls. No C++ exception crosses it.
#include "plugin/glake_c_api.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "gmlake/registry.h"

using glake::DevPtr;
using glake::StreamHandle;
namespace gm = glake::gmlake;

namespace {

void put_error(char* err, std::size_t errlen, const char* msg) {
  if (!err || errlen == 0) return;
  std::strncpy(err, msg, errlen - 1);
  err[errlen - 1] = '\0';
}

/// Runs `fn`, turning glake's exceptions into an error code and message.
template <typename Fn>
int guarded(char* err, std::size_t errlen, Fn&& fn) {
  try {
    fn();
    return GLAKE_OK;
  } catch (const glake::OutOfMemoryError& e) {
    put_error(err, errlen, e.what());
    return GLAKE_ERR_OOM;
  } catch (const glake::InvalidArgumentError& e) {
    put_error(err, errlen, e.what());
    return GLAKE_ERR_INVALID;
  } catch (const std::exception& e) {
    put_error(err, errlen, e.what());
    return GLAKE_ERR_OTHER;
  }
}

gm::PoolId pool_id(std::uint64_t first, std::uint64_t second) {
  gm::PoolId id;
  id.first = first;
  id.second = second;
  return id;
}

glake_stat c_stat(const gm::Stat& s) { return {s.current, s.peak}; }

}  // namespace

extern "C" {

#define GLAKE_C __attribute__((visibility("default")))

GLAKE_C int glake_c_api_version(void) { return GLAKE_C_API_VERSION; }

GLAKE_C int glake_c_malloc(size_t size, int device, void* stream, void** out, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    *out = reinterpret_cast<void*>(gm::device_allocator(device).malloc(size, reinterpret_cast<StreamHandle>(stream)));
  });
}

GLAKE_C int glake_c_free(void* ptr, int device, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { gm::device_allocator(device).free(reinterpret_cast<DevPtr>(ptr)); });
}

GLAKE_C int glake_c_free_any(void* ptr, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    for (int d = 0; d < gm::kMaxDevices; ++d) {
      gm::StitchAllocator* a = gm::existing_device_allocator(d);
      if (a && a->allocation_of(reinterpret_cast<DevPtr>(ptr)).first == reinterpret_cast<DevPtr>(ptr)) {
        a->free(reinterpret_cast<DevPtr>(ptr));
        return;
      }
    }
    throw glake::InvalidArgumentError("free(" + glake::hex(reinterpret_cast<DevPtr>(ptr)) +
                                      "): not allocated by glake on any device");
  });
}

GLAKE_C int glake_c_allocation_of(int device, void* ptr, void** base, size_t* size) {
  return guarded(nullptr, 0, [&] {
    gm::StitchAllocator* a = gm::existing_device_allocator(device);
    const auto found = a ? a->allocation_of(reinterpret_cast<DevPtr>(ptr)) : std::pair<DevPtr, std::size_t>{0, 0};
    *base = reinterpret_cast<void*>(found.first);
    *size = found.second;
  });
}

GLAKE_C int glake_c_record_stream(int device, void* ptr, void* stream, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    gm::device_allocator(device).record_stream(reinterpret_cast<DevPtr>(ptr), reinterpret_cast<StreamHandle>(stream));
  });
}

GLAKE_C int glake_c_empty_cache(char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    for (int d = 0; d < gm::kMaxDevices; ++d) {
      if (gm::StitchAllocator* a = gm::existing_device_allocator(d)) a->empty_cache();
    }
  });
}

GLAKE_C int glake_c_set_memory_fraction(int device, double fraction, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { gm::device_allocator(device).set_memory_fraction(fraction); });
}

GLAKE_C int glake_c_stats(int device, glake_stats* out, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    gm::StitchAllocator& a = gm::device_allocator(device);
    const gm::AllocatorStats s = a.stats();
    std::memset(out, 0, sizeof(*out));
    out->allocated_bytes[0] = c_stat(s.allocated_bytes);
    out->allocated_bytes[1] = c_stat(s.allocated_small);
    out->allocated_bytes[2] = c_stat(s.allocated_large);
    out->reserved_bytes[0] = c_stat(s.reserved_bytes);
    out->reserved_bytes[1] = c_stat(s.reserved_small);
    out->reserved_bytes[2] = c_stat(s.reserved_large);
    out->active_bytes[0] = c_stat(s.active_bytes);
    out->active_bytes[1] = c_stat(s.active_small);
    out->active_bytes[2] = c_stat(s.active_large);
    out->requested_bytes[0] = c_stat(s.requested_bytes);
    out->requested_bytes[1] = c_stat(s.requested_small);
    out->requested_bytes[2] = c_stat(s.requested_large);
    out->allocations[0] = c_stat(s.allocations);
    out->allocations[1] = c_stat(s.allocations_small);
    out->allocations[2] = c_stat(s.allocations_large);
    out->segments[0] = c_stat(s.segments);
    out->segments[1] = c_stat(s.segments_small);
    out->segments[2] = c_stat(s.segments_large);
    out->stitched_bytes = c_stat(s.stitched_bytes);
    out->mapped_va_bytes = c_stat(s.mapped_va_bytes);
    out->num_allocs = s.num_allocs;
    out->num_frees = s.num_frees;
    out->num_alloc_retries = s.num_alloc_retries;
    out->num_ooms = s.num_ooms;
    out->num_sync_all_streams = s.num_sync_all_streams;
    out->num_segments_created = s.num_segments_created;
    out->num_segments_released = s.num_segments_released;
    out->num_stitches = s.num_stitches;
    out->num_stitch_reuses = s.num_stitch_reuses;
    out->limit_bytes = static_cast<int64_t>(a.limit());
    out->memory_fraction = a.config().memory_fraction;
    out->device_total = static_cast<int64_t>(a.device_total());
    out->largest_free = static_cast<int64_t>(a.largest_free_block());
  });
}

GLAKE_C int glake_c_reset_peak_stats(int device, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { gm::device_allocator(device).reset_peak_stats(); });
}

GLAKE_C int glake_c_snapshot(int device, glake_segment_fn fn, void* ctx, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    gm::StitchAllocator* a = gm::existing_device_allocator(device);
    if (!a) return;
    std::vector<glake_block_info> blocks;
    for (const gm::SegmentInfo& seg : a->snapshot()) {
      blocks.clear();
      for (const gm::BlockInfo& b : seg.blocks) {
        blocks.push_back({b.ptr, b.size, b.requested, b.state, reinterpret_cast<void*>(b.stream), b.pool.first,
                          b.pool.second});
      }
      const glake_segment_info info{seg.kind, seg.ptr, seg.size, seg.active ? 1 : 0, blocks.size(), blocks.data()};
      fn(ctx, &info);
    }
  });
}

GLAKE_C int glake_c_has_allocator(int device) { return gm::existing_device_allocator(device) ? 1 : 0; }

GLAKE_C int glake_c_create_or_incref_pool(int device, uint64_t first, uint64_t second, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { gm::device_allocator(device).create_or_incref_pool(pool_id(first, second)); });
}

GLAKE_C int glake_c_pool_use_count(int device, uint64_t first, uint64_t second) {
  gm::StitchAllocator* a = gm::existing_device_allocator(device);
  return a ? a->pool_use_count(pool_id(first, second)) : 0;
}

GLAKE_C int glake_c_begin_allocate_to_pool(int device, uint64_t first, uint64_t second, glake_stream_filter_fn filter,
                                           void* ctx, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    gm::device_allocator(device).begin_allocate_to_pool(
        pool_id(first, second), [filter, ctx](StreamHandle s) { return filter(ctx, reinterpret_cast<void*>(s)) != 0; });
  });
}

GLAKE_C int glake_c_end_allocate_to_pool(int device, uint64_t first, uint64_t second, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { gm::device_allocator(device).end_allocate_to_pool(pool_id(first, second)); });
}

GLAKE_C int glake_c_release_pool(int device, uint64_t first, uint64_t second, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { gm::device_allocator(device).release_pool(pool_id(first, second)); });
}

GLAKE_C int glake_c_pool_of(int device, void* ptr, uint64_t* first, uint64_t* second) {
  return guarded(nullptr, 0, [&] {
    gm::StitchAllocator* a = gm::existing_device_allocator(device);
    const gm::PoolId id = a ? a->pool_of(reinterpret_cast<DevPtr>(ptr)) : gm::PoolId{};
    *first = id.first;
    *second = id.second;
  });
}

}  // extern "C"
