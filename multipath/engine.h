// The multipath copy engine: host<->device copies of any mix of pageable, pinned and device memory,
// stream-ordered like Tensor.copy_(non_blocking=...), at close to the link's bandwidth.
//
// Paths, chosen per copy:
//   plain        one driver copy on the caller's stream (small copies, device<->device, managed memory)
//   staged       pageable memory: CPU threads fill/drain pinned staging buffers while copy lanes move
//                the previous chunks (StagedJob)
//   pinned_split a large pinned copy split over several copy lanes (streams -> copy engines)
//   peer         a large pinned copy partly routed through peer GPUs (PeerPaths)
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "driver/driver.h"
#include "multipath/config.h"
#include "multipath/copy_lanes.h"
#include "multipath/peer_path.h"
#include "multipath/staged_copy.h"
#include "multipath/worker_pool.h"

namespace glake::multipath {

/// What one side of a copy is. Auto and Host are resolved by asking the driver (cuda); the host
/// backend cannot tell, so there Host means pageable and Auto is refused.
enum class MemKind : int { Auto = 0, Host, Pageable, Pinned, Device };

/// Parses "auto", "host", "pageable", "pinned" or "device"; throws InvalidArgumentError otherwise.
GLAKE_API MemKind parse_mem_kind(const std::string& s);
/// Name of a MemKind.
GLAKE_API const char* mem_kind_name(MemKind k);

/// The paths a copy can take; index into EngineStats arrays.
enum class CopyPath : int { Plain = 0, StagedH2D, StagedD2H, PinnedSplit, Peer, kCount };
/// Name of a CopyPath ("plain", "staged_h2d", ...).
GLAKE_API const char* copy_path_name(CopyPath p);

/// A snapshot of an engine's counters.
struct EngineStats {
  std::array<std::uint64_t, static_cast<int>(CopyPath::kCount)> calls{}, bytes{};
  std::uint64_t chunks = 0;       ///< staging chunks moved
  std::uint64_t cpu_copy_ns = 0;  ///< thread-time in memcpy to/from staging
  std::uint64_t wait_ns = 0;      ///< thread-time waiting for staging buffers or lane copies
  std::uint64_t busy_ns = 0;      ///< wall time inside copy() (not including queued device work)
  std::uint64_t errors = 0;       ///< copies that failed after validation
};

/// One copy of a batch (CopyEngine::copy_many): `n` bytes from `src` to `dst`.
struct CopyItem {
  DevPtr dst, src;
  std::size_t n;
};

/// One device's copy engine: staging buffers, worker threads, copy lanes and peer paths.
/// copy() is thread-safe; copies on one engine run one at a time.
class GLAKE_API CopyEngine {
 public:
  /// Validates `config`; buffers, threads and lanes are made on the first copy that needs them,
  /// peer paths (config.peers) at once.
  CopyEngine(Driver& driver, int device, EngineConfig config);
  /// Waits for outstanding copies, then frees everything.
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  /// Copies `n` bytes from `src` to `dst`, ordered after the work already on `stream` and before
  /// the work enqueued on it later. Blocking (non_blocking=false) returns when the data has landed.
  /// Non-blocking returns as soon as the host side may be reused for a pageable source (its bytes
  /// are in staging) and at once for pinned memory; a pageable destination is always complete on
  /// return. Bad arguments throw InvalidArgumentError before any byte moves.
  void copy(DevPtr dst, MemKind dst_kind, DevPtr src, MemKind src_kind, std::size_t n, StreamHandle stream,
            bool non_blocking);
  /// Copies every item, all of one direction (`dst_kind` and `src_kind` apply to each), as copy()
  /// would one after another, but the pageable ones flow through staging as one pipeline: many
  /// runs of a few MiB then move at the speed of one large copy. The items must not overlap each
  /// other. Every item is validated before any byte moves. Blocking returns when all have landed.
  void copy_many(const std::vector<CopyItem>& items, MemKind dst_kind, MemKind src_kind, StreamHandle stream,
                 bool non_blocking);
  /// What a copy with these arguments would do: the path name, after validating like copy().
  std::string plan(DevPtr dst, MemKind dst_kind, DevPtr src, MemKind src_kind, std::size_t n);
  /// Blocks until every copy submitted so far is complete (host backend: the only way to wait for
  /// non-blocking copies, since the host has no streams).
  void synchronize();

  /// Counters since creation (or reset_stats).
  EngineStats stats() const;
  /// Zeroes the counters.
  void reset_stats();
  /// The configuration.
  const EngineConfig& config() const { return config_; }
  /// Devices used as peers (empty unless config.peers and peer access exists).
  std::vector<int> peer_devices() const;
  /// Why candidate peers were left out.
  std::vector<std::string> peers_skipped() const;
  /// The driver and device this engine copies for.
  Driver& driver() const { return driver_; }
  int device() const { return device_; }

 private:
  struct Resolved {
    MemKind dst, src;
    bool managed = false;
  };
  Resolved resolve(DevPtr dst, MemKind dst_kind, DevPtr src, MemKind src_kind, std::size_t n);
  MemKind resolve_one(const char* side, DevPtr ptr, MemKind kind, bool& managed);
  CopyPath choose(const Resolved& r, std::size_t n, bool batched = false) const;
  void ensure_lanes();
  void ensure_staging();
  void check_not_capturing(StreamHandle stream);
  void count(CopyPath path, std::size_t n);
  /// Waits for every copy this engine started on `stream`, the lanes and the peers.
  void drain(StreamHandle stream);
  void copy_unstaged(CopyPath path, DevPtr dst, DevPtr src, std::size_t n, StreamHandle stream, bool non_blocking);
  void copy_staged(bool h2d, const std::vector<StagedExtent>& extents, StreamHandle stream, bool non_blocking);
  void copy_plain(DevPtr dst, DevPtr src, std::size_t n, StreamHandle stream, bool non_blocking);
  void copy_split(DevPtr dst, DevPtr src, std::size_t n, StreamHandle stream, bool non_blocking);
  void copy_peers(DevPtr dst, DevPtr src, std::size_t n, StreamHandle stream, bool non_blocking);

  Driver& driver_;
  const int device_;
  const EngineConfig config_;
  const bool on_host_;  // the host backend: no streams, caller says what memory is what
  mutable std::mutex mu_;  // one copy at a time; guards the lazily made members below
  std::unique_ptr<CopyLanes> lanes_;
  std::unique_ptr<StagingBuffers> staging_;
  std::unique_ptr<WorkerPool> pool_;
  std::unique_ptr<PeerPaths> peers_;
  EventHandle peer_start_ = 0;

  StagedCounters staged_;
  std::array<std::atomic<std::uint64_t>, static_cast<int>(CopyPath::kCount)> calls_{}, bytes_{};
  std::atomic<std::uint64_t> busy_ns_{0}, errors_{0};
};

}  // namespace glake::multipath
