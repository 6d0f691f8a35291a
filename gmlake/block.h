// The bookkeeping of the stitched allocator: blocks, segments and stitched ranges.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <tuple>
#include <vector>

#include "core/virtual_range.h"

namespace glake::gmlake {

/// Which pool a block or segment belongs to.
enum class PoolKind : std::uint8_t { Small, Large, Stitched };

struct Segment;
struct Stitch;
struct PrivatePool;

/// A contiguous piece of a segment (or the whole of a stitched range), free or allocated.
struct Block {
  PoolKind kind = PoolKind::Large;
  Segment* segment = nullptr;    ///< home segment (Small/Large)
  Stitch* stitch = nullptr;      ///< Stitched: the stitch it is; Large: the stitch using it, if any
  DevPtr ptr = 0;
  std::size_t size = 0;          ///< bytes (Large/Stitched: a multiple of the granularity)
  std::size_t requested = 0;     ///< bytes the caller asked for (allocated blocks)
  StreamHandle stream = 0;       ///< the stream it was allocated on (free blocks: last used on)
  bool allocated = false;        ///< handed out (to a caller, or to a stitch as a member)
  bool shared = false;           ///< some of its whole chunks are shared (share_chunk): see shared_chunks.cpp
  std::uint64_t free_seq = 0;    ///< when it was last freed (orders cross-stream reuse)
  PrivatePool* pool = nullptr;   ///< the private pool it belongs to, for life (null = the global cache)
  Block* prev = nullptr;         ///< neighbours inside the segment
  Block* next = nullptr;
  std::vector<StreamHandle> extra_streams;  ///< streams added by record_stream
};

/// Free blocks ordered by (stream, size, address): best fit on a stream is one lower_bound.
using FreeKey = std::tuple<StreamHandle, std::size_t, DevPtr>;
/// The order of a FreeSet (transparent: looks up by FreeKey too).
struct FreeLess {
  using is_transparent = void;
  bool operator()(const Block* a, const Block* b) const { return key(a) < key(b); }
  bool operator()(const Block* a, const FreeKey& b) const { return key(a) < b; }
  bool operator()(const FreeKey& a, const Block* b) const { return a < key(b); }
  /// A block's key.
  static FreeKey key(const Block* b) { return {b->stream, b->size, b->ptr}; }
};
/// A set of free blocks of one kind.
using FreeSet = std::set<Block*, FreeLess>;

/// The free blocks of one owner: the global cache, or one private pool.
struct FreeLists {
  FreeSet small, large;
  FreeSet stitched;  ///< held stitched blocks (see Stitch)
  /// The set for blocks of `kind`.
  FreeSet& of(PoolKind kind) { return kind == PoolKind::Small ? small : kind == PoolKind::Large ? large : stitched; }
  /// The set for blocks of `kind` (read only).
  const FreeSet& of(PoolKind kind) const {
    return kind == PoolKind::Small ? small : kind == PoolKind::Large ? large : stitched;
  }
};

/// A reserved range whose chunks are mapped back to back: the home of every physical chunk.
struct Segment {
  PoolKind kind = PoolKind::Large;
  std::unique_ptr<VirtualRange> range;
  Block* head = nullptr;  ///< first block; blocks tile the segment
  std::uint64_t id = 0;
};

/// A piece of a segment lent to a stitch: [offset, offset + size) of `segment`.
struct Span {
  Segment* segment;
  std::size_t offset;
  std::size_t size;
};

/// A second range into which chunks of several free blocks were mapped, so that they read as
/// one contiguous allocation. Kept mapped after its allocation is freed, for reuse:
///  - active:   allocated; its members (a prefix of its spans) are lent to it;
///  - held:     free, members still lent: a free block on the fast path (any request up to its
///              size takes it, giving back the members it does not need);
///  - detached: free, members back in the pool: reusable when the spans it needs are free again.
struct Stitch {
  std::unique_ptr<VirtualRange> range;
  std::vector<Span> spans;     ///< where its bytes live, in order
  Block* block = nullptr;      ///< the Stitched block (its size: the bytes in use, <= the range)
  std::vector<Block*> members; ///< the segment blocks lent to it (active or held)
  bool active = false;
  bool held = false;
  std::uint64_t last_used = 0;
  std::uint64_t id = 0;
};

}  // namespace glake::gmlake
