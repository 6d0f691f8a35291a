// ChunkTable: which physical chunk is mapped at which chunk index of which slot.
//
// It owns the cache's one VirtualRange and is the only code that maps into it or unmaps from it, so
// its tables always agree with the range. A refcount per physical chunk says at how many places it
// is mapped (more than one: a fork prefix). Each mutation updates the tables only after its driver
// call succeeded. Not thread-safe: the manager calls it with its lock held.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/virtual_range.h"
#include "kvcache/kv_layout.h"

namespace glake::kvcache {

using ChunkPtr = std::shared_ptr<PhysChunk>;

/// Per-slot chunk tables over one reserved range, with a refcount per physical chunk.
class ChunkTable {
 public:
  /// Reserves the range for `layout` on `device`.
  ChunkTable(Driver& driver, int device, const KvLayout& layout);

  /// The range (Python builds its views over it).
  const std::shared_ptr<VirtualRange>& range() const { return range_; }
  /// The chunk at `index` of `slot`, or null.
  const ChunkPtr& chunk(int slot, std::int64_t index) const;
  /// True when the chunk at `index` of `slot` is also mapped somewhere else.
  bool is_shared(int slot, std::int64_t index) const;
  /// Places the chunk `id` is mapped at (0 when nowhere).
  int refs(std::uint64_t id) const;
  /// Chunks mapped in `slot`.
  int count(int slot) const { return counts_[slot]; }
  /// One past the highest mapped index of `slot` (0 when empty).
  std::int64_t extent(int slot) const { return static_cast<std::int64_t>(rows_[slot].size()); }
  /// Leading mapped chunks of `slot`.
  std::int64_t ready(int slot) const { return ready_[slot]; }
  /// Mapped indices of `slot`, ascending.
  std::vector<std::int64_t> indices(int slot) const;
  /// Indices of `slot` whose chunk is mapped nowhere else, ascending.
  std::vector<std::int64_t> exclusive_indices(int slot) const;
  /// Unmapped indices of `slot` below `upto`, ascending.
  std::vector<std::int64_t> holes(int slot, std::int64_t upto) const;
  /// Physical chunks mapped anywhere.
  std::size_t unique_chunks() const { return refs_.size(); }
  /// Physical chunks mapped at more than one place.
  std::size_t shared_chunks() const;
  /// Mappings (a shared chunk counts once per place).
  std::size_t mapped_total() const { return mapped_total_; }
  /// Every chunk id with its refcount.
  const std::unordered_map<std::uint64_t, int>& refcounts() const { return refs_; }

  /// Maps `chunks[k]` at `indices[k]` (ascending), one map_many per consecutive run.
  void map_at(int slot, const std::vector<std::int64_t>& indices, const std::vector<ChunkPtr>& chunks);
  /// Unmaps the chunk at `index` of `slot` and returns it (the caller checked the slot's fences).
  ChunkPtr unmap(int slot, std::int64_t index);
  /// Unmaps every chunk of `slot`, highest index first; returns how many.
  int unmap_all(int slot);
  /// Unmaps everything and frees the addresses. Idempotent.
  void free();

  /// "" when the tables agree with the range and with every chunk's mapping count, else the first
  /// disagreement.
  std::string check() const;

 private:
  void map_run(int slot, std::int64_t first, const std::vector<ChunkPtr>& chunks);

  KvLayout layout_;
  std::shared_ptr<VirtualRange> range_;
  std::vector<std::vector<ChunkPtr>> rows_;  // rows_[slot][index]; no trailing null
  std::vector<int> counts_;
  std::vector<std::int64_t> ready_;
  std::unordered_map<std::uint64_t, int> refs_;
  std::size_t mapped_total_ = 0;
};

}  // namespace glake::kvcache
