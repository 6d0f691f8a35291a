/* glake's C ABI over the process-wide stitched allocators (one per device), exported by
 * libglake_torch.so. Frontends compiled against another C++ runtime or ABI (the torch frontend,
 * built against whichever torch is installed) reach the allocator only through this header: plain C
 * types, no exceptions across it. Every function returning int returns GLAKE_OK or an error code and,
 * on error, writes a NUL-terminated message into `err` (at most `errlen` bytes, may be NULL). */
#ifndef GLAKE_C_API_H
#define GLAKE_C_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define GLAKE_C_API_VERSION 1

enum { GLAKE_OK = 0, GLAKE_ERR_OOM = 1, GLAKE_ERR_INVALID = 2, GLAKE_ERR_OTHER = 3 };

/** A current value with its peak. */
typedef struct glake_stat {
  int64_t current, peak;
} glake_stat;

/** The allocator's counters; arrays are indexed [all, small pool, large pool]. */
typedef struct glake_stats {
  glake_stat allocated_bytes[3], reserved_bytes[3], active_bytes[3], requested_bytes[3];
  glake_stat allocations[3], segments[3];
  glake_stat stitched_bytes, mapped_va_bytes;
  int64_t num_allocs, num_frees, num_alloc_retries, num_ooms, num_sync_all_streams;
  int64_t num_segments_created, num_segments_released, num_stitches, num_stitch_reuses;
  int64_t limit_bytes;       /**< cap on reserved bytes now in force, 0 = none */
  double memory_fraction;    /**< the fraction set, 0 = none */
  int64_t device_total;      /**< bytes of device memory */
  int64_t largest_free;      /**< the largest free block in the cache */
} glake_stats;

/** One block of a segment, in address order; blocks tile their segment. */
typedef struct glake_block_info {
  uint64_t ptr, size, requested;
  const char *state;         /**< "allocated", "free", "stitched", "pending" or "held" */
  void *stream;
  uint64_t pool_first, pool_second; /**< the private pool that owns it ({0,0}: none) */
} glake_block_info;

/** A physical segment ("small", "large") or a stitched range ("stitched"). */
typedef struct glake_segment_info {
  const char *kind;
  uint64_t ptr, size;
  int active;
  size_t num_blocks;
  const glake_block_info *blocks;
} glake_segment_info;

typedef void (*glake_segment_fn)(void *ctx, const glake_segment_info *segment);
/** Whether an allocation on `stream` goes to the pool being allocated to (non-zero = yes). */
typedef int (*glake_stream_filter_fn)(void *ctx, void *stream);

/** The ABI version this library implements (GLAKE_C_API_VERSION). */
int glake_c_api_version(void);
/** Allocates `size` > 0 bytes on `device` for `stream` into *out. GLAKE_ERR_OOM carries glake's report. */
int glake_c_malloc(size_t size, int device, void *stream, void **out, char *err, size_t errlen);
/** Frees an allocation of `device` (exact base pointer). */
int glake_c_free(void *ptr, int device, char *err, size_t errlen);
/** Frees an allocation of whichever device holds it. */
int glake_c_free_any(void *ptr, char *err, size_t errlen);
/** The base and requested size of the live allocation containing ptr on `device` (*size 0: none). */
int glake_c_allocation_of(int device, void *ptr, void **base, size_t *size);
/** Marks the allocation at `ptr` (its base) as used on `stream` too. */
int glake_c_record_stream(int device, void *ptr, void *stream, char *err, size_t errlen);
/** Releases cached memory of every device whose allocator exists. */
int glake_c_empty_cache(char *err, size_t errlen);
/** Sets `device`'s cap as a fraction of device memory (0 = none). */
int glake_c_set_memory_fraction(int device, double fraction, char *err, size_t errlen);
/** Fills *out with `device`'s counters. */
int glake_c_stats(int device, glake_stats *out, char *err, size_t errlen);
/** Sets every peak of `device` to its current value. */
int glake_c_reset_peak_stats(int device, char *err, size_t errlen);
/** Calls fn(ctx, segment) for each segment and stitched range of `device`. */
int glake_c_snapshot(int device, glake_segment_fn fn, void *ctx, char *err, size_t errlen);
/** Whether `device`'s allocator exists yet (no allocation creates none). */
int glake_c_has_allocator(int device);
/** Private pools, with torch's MempoolId_t semantics (see gmlake/stitch_allocator.h). */
int glake_c_create_or_incref_pool(int device, uint64_t first, uint64_t second, char *err, size_t errlen);
int glake_c_pool_use_count(int device, uint64_t first, uint64_t second);
/** Routes allocations whose stream passes filter(ctx, stream) to the pool until the matching end;
 * `ctx` must stay valid until then. */
int glake_c_begin_allocate_to_pool(int device, uint64_t first, uint64_t second, glake_stream_filter_fn filter,
                                   void *ctx, char *err, size_t errlen);
int glake_c_end_allocate_to_pool(int device, uint64_t first, uint64_t second, char *err, size_t errlen);
int glake_c_release_pool(int device, uint64_t first, uint64_t second, char *err, size_t errlen);
/** The pool of the live allocation at `ptr` on `device` ({0,0}: none). */
int glake_c_pool_of(int device, void *ptr, uint64_t *first, uint64_t *second);

#ifdef __cplusplus
}
#endif

#endif /* GLAKE_C_API_H */
