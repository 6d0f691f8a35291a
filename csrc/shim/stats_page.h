// The shim's stats page: one file per process, `<runtime dir>/<pid>.shim`, mapped shared, written by
// one publisher thread under a seqlock and read by `glake ps` / `glake stats PID`
// (glake/stats/shim_page.py), so a process without Python still shows its allocator.
//
// Layout (all little-endian, offsets in the header so readers need not hard-code them):
//   header (PageHeader, below) | shim counter names | allocator counter names |
//   shim counter values (int64) | allocator values (int64[max_devices][allocator counters])
// A reader copies the page while `seq` is even and unchanged before and after the copy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "shim/shim_state.h"

namespace glake::shim {

inline constexpr char kPageMagic[8] = {'G', 'L', 'K', 'S', 'H', 'I', 'M', '1'};
inline constexpr std::uint32_t kPageVersion = 1;
inline constexpr std::uint32_t kPageDevices = 16;   ///< device ordinals published (0..15)
inline constexpr std::uint32_t kNameBytes = 48;     ///< one counter name, NUL-padded
inline constexpr std::uint32_t kMaxShimCounters = 32;
inline constexpr std::uint32_t kMaxAllocCounters = 64;

/// The page's fixed header.
struct PageHeader {
  char magic[8];
  std::uint32_t version;
  std::uint32_t page_bytes;
  std::int32_t pid;
  std::uint32_t max_devices;
  std::uint32_t name_bytes;
  std::uint32_t n_shim_counters;
  std::uint32_t n_alloc_counters;
  std::uint32_t shim_names_offset;
  std::uint32_t alloc_names_offset;
  std::uint32_t shim_values_offset;
  std::uint32_t alloc_values_offset;
  std::uint32_t mode;          ///< a Mode
  std::uint64_t device_mask;   ///< bit d: device d's allocator exists (its values are valid)
  std::uint64_t seq;           ///< seqlock: odd while the publisher writes
  std::uint64_t start_time_unix_ns;
  std::uint64_t updated_unix_ns;
  std::uint64_t publishes;     ///< pages written so far
  char real_driver[256];       ///< path of the real libcuda
  char reason[256];            ///< why the shim passes everything through (mode 2)
  char glake_version[32];
  char argv[1024];             ///< /proc/self/cmdline, NUL-separated
};

// Readers (glake/stats/shim_page.py) rely on these offsets.
static_assert(offsetof(PageHeader, device_mask) == 56 && offsetof(PageHeader, seq) == 64 &&
                  offsetof(PageHeader, real_driver) == 96, "PageHeader layout is read by glake/stats/shim_page.py");

/// Creates this process's page and starts its publisher thread (once; no-op when the page cannot be
/// made: said once on stderr). `real_driver` is the real libcuda's path.
void start_stats_page(const std::string& real_driver);

/// Tells the page (if any) that the shim now runs in `mode` (e.g. pass-through and why).
void publish_state(Mode mode, const std::string& reason);

/// The page's path for this process ("" before start_stats_page made it).
std::string stats_page_path();

}  // namespace glake::shim
