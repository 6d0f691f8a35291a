// KvLayout: where every byte of the KV cache lives in its one reserved range (integer arithmetic).
//
// Slots lie back to back, `slot_bytes` apart; a token's row (K and V of every layer) is `row_bytes`;
// chunk i of a slot backs the slot's bytes [i * chunk_bytes, (i + 1) * chunk_bytes). Rows are never
// padded, so a row may straddle two chunks. The Python twin is glake/kvcache/layout.py.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace glake::kvcache {

/// The byte geometry of one cache; every function is exact integer arithmetic.
struct KvLayout {
  std::int64_t max_seqs = 0;
  std::int64_t max_seq_len = 0;
  std::int64_t row_bytes = 0;
  std::int64_t chunk_bytes = 0;
  std::int64_t slot_bytes = 0;  ///< max_seq_len * row_bytes rounded up to a chunk

  /// A layout for `max_seqs` slots of `max_seq_len` rows of `row_bytes` over `chunk_bytes` chunks.
  static KvLayout make(std::int64_t max_seqs, std::int64_t max_seq_len, std::int64_t row_bytes,
                       std::int64_t chunk_bytes) {
    KvLayout l{max_seqs, max_seq_len, row_bytes, chunk_bytes, 0};
    l.slot_bytes = (max_seq_len * row_bytes + chunk_bytes - 1) / chunk_bytes * chunk_bytes;
    return l;
  }
  /// Bytes of addresses for all slots.
  std::size_t total_bytes() const { return static_cast<std::size_t>(max_seqs * slot_bytes); }
  /// Chunks that back a whole slot.
  std::int64_t chunks_per_slot() const { return slot_bytes / chunk_bytes; }
  /// Chunks a slot needs mapped from its start to back tokens [0, tokens).
  std::int64_t chunks_for(std::int64_t tokens) const { return (tokens * row_bytes + chunk_bytes - 1) / chunk_bytes; }
  /// Tokens [0, n) fully backed by a slot's first `chunks` chunks (at most max_seq_len).
  std::int64_t tokens_backed(std::int64_t chunks) const {
    return std::min(max_seq_len, chunks * chunk_bytes / row_bytes);
  }
  /// Chunks holding only bytes of tokens [0, prefix): the ones a fork can share.
  std::int64_t full_chunks_of_prefix(std::int64_t prefix) const { return prefix * row_bytes / chunk_bytes; }
  /// The first token with no byte in a slot's first `chunks` chunks.
  std::int64_t first_token_after_chunks(std::int64_t chunks) const {
    return (chunks * chunk_bytes + row_bytes - 1) / row_bytes;
  }
  /// Byte offset of a slot in the range.
  std::size_t slot_offset(std::int64_t slot) const { return static_cast<std::size_t>(slot * slot_bytes); }
  /// Byte offset of chunk `index` of `slot` in the range.
  std::size_t chunk_offset(std::int64_t slot, std::int64_t index) const {
    return static_cast<std::size_t>(slot * slot_bytes + index * chunk_bytes);
  }
};

}  // namespace glake::kvcache
