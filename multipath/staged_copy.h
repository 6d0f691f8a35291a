// The staging pipeline for pageable host memory: CPU threads copy chunks into (or out of) pinned
// staging buffers while the copy lanes move the previous chunks to (or from) the device.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "driver/driver.h"
#include "multipath/copy_lanes.h"
#include "multipath/worker_pool.h"

namespace glake::multipath {

/// An engine's pinned staging buffers and, per buffer, the last lane copy that used it.
class StagingBuffers {
 public:
  /// Allocates `count` buffers of `bytes` each with driver.host_alloc_pinned.
  StagingBuffers(Driver& driver, int device, int count, std::size_t bytes);
  /// Frees the buffers; the caller must have waited for every lane copy that uses them.
  ~StagingBuffers();
  StagingBuffers(const StagingBuffers&) = delete;
  StagingBuffers& operator=(const StagingBuffers&) = delete;

  /// Address of buffer `i`.
  DevPtr buffer(int i) const { return buffers_[static_cast<std::size_t>(i)]; }
  /// Number of buffers.
  int count() const { return static_cast<int>(buffers_.size()); }
  /// Bytes per buffer.
  std::size_t bytes() const { return bytes_; }
  /// The last lane copy that reads or writes buffer `i`: wait for it before reusing the buffer.
  Ticket& last_use(int i) { return last_use_[static_cast<std::size_t>(i)]; }

 private:
  Driver& driver_;
  int device_;
  std::size_t bytes_;
  std::vector<DevPtr> buffers_;
  std::vector<Ticket> last_use_;
};

/// Which way a staged copy goes.
enum class StagedDirection { HostToDevice, DeviceToHost };

/// Counters a staged copy adds to (shared by the engine's copies).
struct StagedCounters {
  std::atomic<std::uint64_t> chunks{0};       ///< chunks moved through staging
  std::atomic<std::uint64_t> cpu_copy_ns{0};  ///< thread-time spent in memcpy to/from staging
  std::atomic<std::uint64_t> wait_ns{0};      ///< thread-time spent waiting for a buffer or a lane copy
};

/// The knobs of one staged copy.
struct StagedParams {
  std::size_t piece_bytes;  ///< CPU work item size (<= staging.bytes())
  int lanes;                ///< chunks go to lanes 0..lanes-1, round robin
};

/// One contiguous run of a staged copy: `n` bytes between device address `device` and pageable
/// host memory at `host`.
struct StagedExtent {
  DevPtr device, host;
  std::size_t n;
};

/// Copies every extent between pageable host memory and the device through `staging`, as one
/// pipeline: the chunks of all extents flow through the buffers back to back, so many runs cost
/// one pipeline fill and drain, not one each. HostToDevice returns once every host byte has been
/// read and every chunk's lane copy is submitted (the lanes may still be copying: order or
/// synchronize them). DeviceToHost returns once every byte has landed. Lane copies start in the
/// lanes' current order (the caller calls lanes.order_after first). On error the first exception
/// is rethrown after all threads stop; staging.last_use() still covers every submitted copy.
void run_staged(StagedDirection dir, const std::vector<StagedExtent>& extents, StagingBuffers& staging,
                CopyLanes& lanes, WorkerPool& pool, const StagedParams& params, StagedCounters& counters);

}  // namespace glake::multipath
