// Configuration of the multipath copy engine: staging pipeline, copy lanes, pinned and peer paths.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "common/error.h"

namespace glake::multipath {

/// The environment variable configuring every engine (keyword arguments override it).
inline constexpr const char* kConfEnv = "GLAKE_MULTIPATH_CONF";

/// Every knob of a CopyEngine. Defaults come from measurements on an H100 (see docs/multipath.md).
struct GLAKE_API EngineConfig {
  /// Bytes per pinned staging buffer: one pipeline step of a pageable copy.
  std::size_t chunk_bytes = 16u << 20;
  /// Staging buffers: how many chunks can be in flight between the CPU threads and the copy lanes.
  int buffers = 4;
  /// CPU threads copying into/out of staging, the calling thread included (0 = min(16, cores)).
  int threads = 0;
  /// Bytes one CPU thread copies per work item (0 = chunk_bytes / threads, at least 256 KiB).
  std::size_t piece_bytes = 0;
  /// Copy lanes (streams) the chunks of a staged copy are spread over, round robin.
  int streams = 2;
  /// Lanes a large pinned copy is split over; 1 = pinned copies always take the plain path.
  int pinned_streams = 1;
  /// Pinned copies smaller than this take the plain path even when pinned_streams > 1.
  std::size_t pinned_split_min_bytes = 64u << 20;
  /// Pageable copies smaller than this take the plain path (the driver's own staging); 0 = never.
  std::size_t small_copy_bytes = 8u << 20;
  /// Route part of large pinned copies through peer GPUs that have peer access (off by default).
  bool peers = false;
  /// Peer devices to consider (empty = every other device); each is used only if access exists.
  std::vector<int> peer_devices;
  /// Pinned copies smaller than this never use peers.
  std::size_t peer_min_bytes = 64u << 20;
  /// Bytes per step through a peer's two device buffers.
  std::size_t peer_chunk_bytes = 16u << 20;

  /// The defaults with $GLAKE_MULTIPATH_CONF applied (not validated: keyword arguments may follow).
  static EngineConfig from_env();
  /// Applies "key:value,key:value" (sizes with units, peers true/false, peer_devices as "1+2");
  /// errors name the key, the value and `source`. Returns the keys set, in order.
  std::vector<std::string> apply(const std::string& text, const std::string& source);
  /// Applies one key given as text; errors name the key, the value and `source`.
  void set(const std::string& key, const std::string& value, const std::string& source);

  /// The threads value in use: `threads`, or min(16, hardware threads) when 0.
  int effective_threads() const;
  /// The piece size in use (see piece_bytes).
  std::size_t effective_piece_bytes() const;
  /// Throws InvalidArgumentError naming the first out-of-range field.
  void validate() const;
  /// "key=value, ..." of every field, for errors and logs.
  std::string describe() const;
};

}  // namespace glake::multipath
