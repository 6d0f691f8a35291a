// KvManager: fork (prefix sharing), the refusal to write into shared chunks, swap bookkeeping.
#include <algorithm>

#include "kvcache/kv_manager.h"

namespace glake::kvcache {

ForkResult KvManager::fork(std::int64_t src, std::int64_t prefix_len) {
  return locked_with_fences<ForkResult>([&](std::vector<int>& fenced) -> std::optional<ForkResult> {
    const int s = active_slot(src);
    const std::int64_t p = checked("prefix_len", prefix_len, 0, slots_[s].target.load());
    check_resident("fork");
    const std::int64_t n_full = layout_.full_chunks_of_prefix(p);
    const std::int64_t tail = p * layout_.row_bytes - n_full * layout_.chunk_bytes;
    std::vector<ChunkPtr> src_chunks;
    for (std::int64_t i = 0; i < n_full; ++i) src_chunks.push_back(table_.chunk(s, i));
    const std::optional<int> d_opt =
        take_slot(n_full ? std::optional<std::uint64_t>(src_chunks[0]->id()) : std::nullopt, fenced);
    if (!d_opt) return std::nullopt;
    const int d = *d_opt;
    // what must go from the destination: chunks in the prefix that are not the source's, and any
    // chunk shared with someone else (it would be written to)
    std::vector<std::int64_t> drop;
    for (auto i : table_.indices(d)) {
      const bool foreign = i < n_full && table_.chunk(d, i)->id() != src_chunks[i]->id();
      if (foreign || (i >= n_full && table_.is_shared(d, i))) drop.push_back(i);
    }
    const auto dropped = [&](std::int64_t i) { return std::find(drop.begin(), drop.end(), i) != drop.end(); };
    const bool tail_reuse = tail && table_.chunk(d, n_full) && !dropped(n_full);
    const std::string what = "the copied tail of fork(" + std::to_string(s) + ", " + std::to_string(p) + ")";
    if (tail && !tail_reuse) {
      std::int64_t freed = 0, own = 0;  // back to the pool when dropped / movable from past the tail
      for (auto i : drop) freed += !table_.is_shared(d, i);
      if (fences_.ready(d)) {
        for (auto i : table_.exclusive_indices(d)) own += i > n_full && !dropped(i);
      }
      if (supply_.check(1 - freed - own, d, n_full + 1, what, nullptr, &fenced) == Supply::AfterFences) {
        return std::nullopt;
      }
    }
    activate(d, false);
    ForkResult r;
    r.slot = d;
    try {
      for (auto it = drop.rbegin(); it != drop.rend(); ++it) unmap_checked(d, *it);
      const auto holes = table_.holes(d, n_full);
      std::vector<ChunkPtr> shared;
      for (auto i : holes) shared.push_back(src_chunks[i]);
      table_.map_at(d, holes, shared);
      n_.maps_shared += holes.size();
      if (tail) {
        if (!tail_reuse) {
          ChunkSupply::Taken t = supply_.obtain(1, d, n_full + 1, true, what);
          after_steal(t.stolen, d);
          table_.map_at(d, {n_full}, t.chunks);
          ++n_.maps_sync;
        }
        const std::size_t at = static_cast<std::size_t>(n_full * layout_.chunk_bytes);
        r.tail_src = layout_.slot_offset(s) + at;
        r.tail_dst = layout_.slot_offset(d) + at;
        r.tail_bytes = static_cast<std::size_t>(tail);
        n_.fork_tail_bytes += r.tail_bytes;
      }
    } catch (...) {
      park(d);
      throw;
    }
    set_target(d, p);
    refresh(d);
    ++n_.forks;
    return r;
  });
}

std::int64_t KvManager::first_writable_locked(int i) const {
  std::int64_t last_shared = -1;
  for (auto j : table_.indices(i)) {
    if (table_.is_shared(i, j)) last_shared = j;
  }
  return layout_.first_token_after_chunks(last_shared + 1);
}

void KvManager::check_writable(std::int64_t slot, std::int64_t start, std::int64_t end) {
  Lock lock(mu_);
  const int i = active_slot(slot);
  const std::int64_t a = checked("start", start, 0, std::nullopt);
  const std::int64_t b = checked("end", end, a, std::nullopt);
  check_resident("write");
  const std::int64_t cap = slots_[i].capacity.load();
  if (b > cap) {
    throw InvalidArgumentError("tokens [" + std::to_string(a) + ", " + std::to_string(b) + ") of slot " +
                               std::to_string(i) + " are not all backed (capacity " + std::to_string(cap) +
                               "): reserve(" + std::to_string(i) + ", " + std::to_string(b) + ") first");
  }
  if (b <= a) return;
  for (std::int64_t j = a * layout_.row_bytes / layout_.chunk_bytes; j < layout_.chunks_for(b); ++j) {
    if (table_.is_shared(i, j)) {
      throw InvalidArgumentError("refusing to write tokens [" + std::to_string(a) + ", " + std::to_string(b) +
                                 ") of slot " + std::to_string(i) + ": chunk " + std::to_string(j) + " is shared by " +
                                 std::to_string(table_.refs(table_.chunk(i, j)->id())) +
                                 " slots (a fork prefix); the first writable token is " +
                                 std::to_string(first_writable_locked(i)));
    }
  }
}

std::int64_t KvManager::first_writable(std::int64_t slot) {
  Lock lock(mu_);
  return first_writable_locked(active_slot(slot));
}

std::int64_t KvManager::swap_out_length(std::int64_t slot, std::optional<std::int64_t> length) {
  Lock lock(mu_);
  const int i = active_slot(slot);
  check_resident("swap_out");
  const std::int64_t target = slots_[i].target.load();
  return length ? checked("length", *length, 0, target) : target;
}

void KvManager::swap_out_finish(std::int64_t slot, std::size_t nbytes) {
  locked_with_fences<bool>([&](std::vector<int>& fenced) -> std::optional<bool> {
    const int i = active_slot(slot);
    check_resident("swap_out");
    if (!fences_.ready(i)) {  // chunks of the slot's previous sequence may still be read
      fenced.push_back(i);
      return std::nullopt;
    }
    n_.unmaps += static_cast<std::uint64_t>(table_.unmap_all(i));
    park(i);
    wake_starved();
    ++n_.swaps_out;
    n_.bytes_swapped_out += nbytes;
    return true;
  });
}

int KvManager::swap_in(std::int64_t length, std::size_t nbytes) {
  return locked_with_fences<int>([&](std::vector<int>& fenced) -> std::optional<int> {
    const std::int64_t n = checked("length", length, 0, layout_.max_seq_len);
    check_resident("swap_in");
    const std::optional<int> slot = take_slot(std::nullopt, fenced);
    if (!slot) return std::nullopt;
    const int i = *slot;
    // The slot's shared chunks stay mapped until the budget check has passed, so a swap_in that fails
    // leaves the released slot with what it kept (its shared chunks become holes to fill).
    activate(i, false);
    try {
      const std::int64_t want = layout_.chunks_for(n);
      const std::string what = "swap_in of " + std::to_string(n) + " tokens into slot " + std::to_string(i);
      const auto holes = static_cast<std::int64_t>(table_.holes(i, want).size()) + shared_below(i, want);
      if (holes > 0 && supply_.check(holes, i, want, what, nullptr, &fenced) == Supply::AfterFences) {
        park(i);
        return std::nullopt;
      }
      drop_shared(i);
      refresh(i);
      if (n > slots_[i].capacity.load()) grow(i, want, true, what);
    } catch (...) {
      park(i);
      throw;
    }
    set_target(i, n);
    refresh(i);
    ++n_.swaps_in;
    n_.bytes_swapped_in += nbytes;
    return i;
  });
}

std::size_t KvManager::trim() {
  Lock lock(mu_);
  check_open();
  const std::vector<int> released = slots_.released();
  for (int i : released) {
    if (!fences_.ready(i)) continue;  // behind a pending fence: left for a later trim()
    n_.unmaps += static_cast<std::uint64_t>(table_.unmap_all(i));
    park(i);
  }
  gauge();
  return supply_.trim_pool();
}

}  // namespace glake::kvcache
