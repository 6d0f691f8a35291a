// The shim's dedup (GLAKE_DEDUP=1): glake_shim_dedup_share shares the whole chunks of an allocation
// by content with the other processes of the user (csrc/shim/glake_shim.h is the program's side).
#pragma once

#include <cstdint>
#include <mutex>

namespace glake::shim::dedup {

/// What dedup did in this process (the stats page shows it).
struct Figures {
  std::int64_t shared_bytes = 0;  ///< bytes of live allocations now shared
  std::int64_t saved_bytes = 0;   ///< of them, mapped from other processes' chunks
  std::int64_t mismatches = 0;    ///< chunks whose digest matched but whose bytes did not (kept private)
};

/// True when GLAKE_DEDUP=1.
bool enabled();
/// The allocation based at `base` was given back to the allocator (which made its shared chunks
/// private again): gives back its holds on the broker's chunks.
void forget(std::uintptr_t base);
/// This process's figures.
Figures figures();
/// Waits for a glake_shim_dedup_share in progress and holds others off while the lock lives (a
/// suspend must not unmap chunks a share is digesting).
std::unique_lock<std::mutex> exclusive();

}  // namespace glake::shim::dedup
