// Configuration of the stitched allocator: GLAKE_ALLOC_CONF="key:value,..." and keyword arguments.
#pragma once

#include <cstddef>
#include <map>
#include <string>

#include "common/error.h"

namespace glake::gmlake {

/// The environment variable holding the allocator's configuration (read only by AllocatorConfig::from_env).
inline constexpr const char* kConfEnv = "GLAKE_ALLOC_CONF";

/// Every knob of the allocator. Keys (GLAKE_ALLOC_CONF and keyword arguments) are the field names.
struct GLAKE_API AllocatorConfig {
  bool stitch = true;                     ///< stitch free chunks when no single free block fits
  std::size_t stitch_min_bytes = 4u << 20;  ///< requests below this are never stitched
  std::size_t stitch_va_limit = 0;        ///< bound on cached stitched VA (0 = device memory size)
  std::size_t limit_bytes = 0;            ///< reserved-bytes cap (0 = none)
  double memory_fraction = 0.0;           ///< cap as a fraction of device memory (0 = none)
  std::size_t small_size = 1u << 20;      ///< requests <= this go to the small pool
  /// Largest physical chunk (one cuMemCreate) of a large-pool segment. The driver's costs are per
  /// chunk, not per byte, and cuMemMap maps a chunk only whole, so a stitch maps whole chunks.
  std::size_t chunk_bytes = 32u << 20;
  bool release_on_oom = true;             ///< free cached memory and retry before failing

  /// The defaults with $GLAKE_ALLOC_CONF applied: the one place that variable is read.
  static AllocatorConfig from_env();
  /// Applies "key:value,key:value" on top of this config, all or nothing; errors name the key, the value
  /// and `source` (where the text came from: "GLAKE_ALLOC_CONF", "glake run --conf", ...).
  void apply(const std::string& conf, const std::string& source = "allocator configuration");
  /// Applies one key (values as strings: "true", "512MB", "0.8", ...); errors name `source`.
  void set(const std::string& key, const std::string& value, const std::string& source = "allocator configuration");
  /// The config as key -> value strings (for stats, docs and round trips).
  std::map<std::string, std::string> to_map() const;
  /// The config as "key:value,..." text that apply() reads back to the same config.
  std::string to_string() const;
};

/// Parses a byte count: "1048576", "512KB", "4MiB", "2GB", "1.5GiB" (K/M/G/T are powers of 1024).
std::size_t parse_bytes(const std::string& text);

}  // namespace glake::gmlake
