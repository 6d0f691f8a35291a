// KvManager: construction, slot lifecycle, reserve (fast, locked and batched), prefetch, close.
#include "kvcache/kv_manager.h"

#include <algorithm>
#include <chrono>
#include <map>

namespace glake::kvcache {
namespace {

KvLayout make_layout(Driver& driver, const KvConfig& c) {
  auto positive = [](const char* name, std::int64_t v) {
    if (v <= 0) throw InvalidArgumentError(std::string(name) + "=" + std::to_string(v) + " must be positive");
  };
  positive("max_seqs", c.max_seqs);
  positive("max_seq_len", c.max_seq_len);
  positive("row_bytes", c.row_bytes);
  if (c.lookahead_tokens < 0) {
    throw InvalidArgumentError("lookahead_tokens=" + std::to_string(c.lookahead_tokens) + " must be >= 0");
  }
  const auto g = static_cast<std::int64_t>(driver.granularity(c.device));
  if (c.budget_bytes && *c.budget_bytes < g) {
    throw InvalidArgumentError("memory_budget=" + std::to_string(*c.budget_bytes) + " is below one chunk (" +
                               std::to_string(g) + " bytes)");
  }
  return KvLayout::make(c.max_seqs, c.max_seq_len, c.row_bytes, g);
}

std::optional<std::int64_t> budget_chunks(const KvConfig& c, const KvLayout& l) {
  if (!c.budget_bytes) return std::nullopt;
  return *c.budget_bytes / l.chunk_bytes;
}

std::uint64_t since_ns(std::chrono::steady_clock::time_point t0) {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
}

}  // namespace

KvManager::KvManager(Driver& driver, const KvConfig& config)
    : driver_(driver),
      config_(config),
      layout_(make_layout(driver, config)),
      slots_(static_cast<int>(layout_.max_seqs)),
      table_(driver, config.device, layout_),
      fences_(driver, config.device, static_cast<std::size_t>(layout_.max_seqs)),
      supply_(driver, config.device, layout_, budget_chunks(config, layout_), table_, slots_, fences_, n_),
      mirror_(driver, config.device, static_cast<std::size_t>(layout_.max_seqs)),
      lengths_(static_cast<std::size_t>(layout_.max_seqs), 0) {
  if (config.lookahead_tokens > 0) {
    mapper_ = std::make_unique<Mapper>([this](const std::vector<int>& s) { background_pass(s); },
                                       [this](std::exception_ptr e) { record_mapper_error(e); });
  }
}

KvManager::~KvManager() {
  try {
    close();
  } catch (...) {  // a destructor must not throw
  }
}

std::shared_ptr<VirtualRange> KvManager::range() const {
  check_open();
  return table_.range();
}

// ---- helpers (lock held) ---------------------------------------------------------------------

void KvManager::check_open() const {
  if (closed_.load()) throw InvalidArgumentError("this KVCache is closed");
}

std::int64_t KvManager::checked(const char* name, std::int64_t v, std::int64_t lo,
                                std::optional<std::int64_t> hi) const {
  if (v < lo || (hi && v > *hi)) {
    const std::string bound = hi ? "[" + std::to_string(lo) + ", " + std::to_string(*hi) + "]"
                                 : ">= " + std::to_string(lo);
    throw InvalidArgumentError(std::string(name) + "=" + std::to_string(v) + " is out of range " + bound);
  }
  return v;
}

int KvManager::active_slot(std::int64_t slot) const {
  check_open();
  const int i = static_cast<int>(checked("slot", slot, 0, layout_.max_seqs - 1));
  const SlotState s = slots_.state(i);
  if (s != SlotState::Active) {
    throw InvalidArgumentError("slot " + std::to_string(i) + " holds no live sequence (it is " + state_name(s) +
                               "): allocate() first");
  }
  return i;
}

bool KvManager::has_shared(int i) const {
  for (auto j : table_.indices(i)) {
    if (table_.is_shared(i, j)) return true;
  }
  return false;
}

std::optional<int> KvManager::take_slot(std::optional<std::uint64_t> prefer_chunk0, std::vector<int>& fenced) {
  // A released slot can be handed out now when its fence is done, or (a plain allocation) when it
  // has nothing to unmap; the others would need a wait.
  auto usable = [&](int i) { return fences_.ready(i) || (!prefer_chunk0 && !has_shared(i)); };
  const auto& rel = slots_.released();
  if (prefer_chunk0) {
    for (auto it = rel.rbegin(); it != rel.rend(); ++it) {
      const ChunkPtr& c = table_.chunk(*it, 0);
      if (c && c->id() == *prefer_chunk0 && usable(*it)) return *it;
    }
    if (!slots_.free_stack().empty()) return slots_.free_stack().back();
  }
  for (auto it = rel.rbegin(); it != rel.rend(); ++it) {
    if (usable(*it)) return *it;
  }
  if (!slots_.free_stack().empty()) return slots_.free_stack().back();
  if (!rel.empty()) {
    fenced = rel;
    return std::nullopt;
  }
  throw OutOfMemoryError("KVCache: all " + std::to_string(layout_.max_seqs) +
                         " slots hold live sequences (max_seqs); release one first");
}

void KvManager::unmap_checked(int i, std::int64_t j) {
  if (!fences_.ready(i)) {
    throw Error("KVCache: internal error: unmapping chunk " + std::to_string(j) + " of slot " + std::to_string(i) +
                " behind a pending fence");
  }
  table_.unmap(i, j);
  ++n_.unmaps;
}

void KvManager::drop_shared(int i) {
  // A new sequence writes from token 0: it may not keep chunks shared with others.
  const auto idx = table_.indices(i);
  for (auto it = idx.rbegin(); it != idx.rend(); ++it) {
    if (table_.is_shared(i, *it)) unmap_checked(i, *it);
  }
}

std::int64_t KvManager::shared_below(int i, std::int64_t upto) const {
  std::int64_t n = 0;
  for (auto j : table_.indices(i)) n += j < upto && table_.is_shared(i, j);
  return n;
}

void KvManager::activate(int i, bool unmap_shared) {
  if (unmap_shared) drop_shared(i);
  slots_.activate(i);
  lengths_[i] = 0;
  refresh(i);
}

void KvManager::park(int i) {
  slots_.park(i, table_.count(i) > 0);
  slots_[i].capacity.store(layout_.tokens_backed(table_.ready(i)));
  lengths_[i] = 0;
}

void KvManager::set_target(int i, std::int64_t t) {
  slots_[i].target.store(t);
  lengths_[i] = static_cast<std::int32_t>(t);
}

std::int64_t KvManager::surplus_start(int i) const {
  const Slot& s = slots_[i];
  const std::int64_t n = std::max(s.target.load(), s.hint.load()) + config_.lookahead_tokens;
  return layout_.chunks_for(std::min(layout_.max_seq_len, n));
}

void KvManager::refresh(int i, bool starved) {
  Slot& s = slots_[i];
  const std::int64_t cap = layout_.tokens_backed(table_.ready(i));
  s.capacity.store(cap);
  if (!mapper_ || starved || suspended_.load() || slots_.state(i) != SlotState::Active) {
    s.watermark.store(kNever);
    return;
  }
  const std::int64_t target = s.target.load(), hint = s.hint.load();
  if (table_.extent(i) > surplus_start(i)) {
    if (target || hint) {  // trim now
      s.watermark.store(kNever);
      mapper_->request(i);
    } else {  // a reused slot: its first reserve (the prompt) uses the kept chunks, then the mapper trims
      s.watermark.store(0);
    }
    return;
  }
  if (cap >= layout_.max_seq_len) {
    s.watermark.store(kNever);
    return;
  }
  s.watermark.store(cap - config_.lookahead_tokens);
  if (std::max(target, hint) > cap - config_.lookahead_tokens) {
    s.watermark.store(kNever);
    mapper_->request(i);
  }
}

std::int64_t KvManager::grow(int i, std::int64_t want, bool strict, const std::string& what, const KeepList* keep,
                             std::vector<std::pair<int, std::int64_t>>* mapped) {
  auto holes = table_.holes(i, want);
  if (holes.empty()) return 0;
  if (!strict && hooks_.fail_background_maps) {
    throw Error("cuMemMap(slot " + std::to_string(i) + ", " + std::to_string(holes.size()) +
                " chunks) failed: CUDA_ERROR_INJECTED (a test hook)");
  }
  ChunkSupply::Taken t = supply_.obtain(static_cast<std::int64_t>(holes.size()), i, want, strict, what, keep);
  after_steal(t.stolen, i);
  if (t.chunks.empty()) return 0;
  holes.resize(t.chunks.size());
  table_.map_at(i, holes, t.chunks);
  (strict ? n_.maps_sync : n_.maps_background) += t.chunks.size();
  if (mapped) {
    for (auto j : holes) mapped->emplace_back(i, j);
  }
  return static_cast<std::int64_t>(t.chunks.size());
}

void KvManager::after_steal(const std::vector<Victim>& stolen, int for_slot) {
  for (const Victim& v : stolen) {
    if (v.state == SlotState::Released) {
      ++n_.reclaimed_released;
      if (!table_.count(v.slot) && slots_.state(v.slot) == SlotState::Released) {
        park(v.slot);
      } else {
        slots_[v.slot].capacity.store(layout_.tokens_backed(table_.ready(v.slot)));
      }
    } else if (v.slot == for_slot) {
      ++n_.moved;  // its own chunk, from past the needed range into a hole below it
    } else {
      ++n_.reclaimed_lookahead;
      starved_.insert(v.slot);  // the mapper retries it when chunks are freed
      refresh(v.slot, true);
    }
  }
}

void KvManager::wake_starved() {
  if (!mapper_ || starved_.empty()) return;
  for (int i : starved_) {
    if (slots_.state(i) == SlotState::Active) mapper_->request(i);
  }
  starved_.clear();
}

void KvManager::gauge() { physical_.store(static_cast<std::int64_t>(table_.unique_chunks())); }

// ---- slot lifecycle --------------------------------------------------------------------------

int KvManager::allocate() {
  return locked_with_fences<int>([&](std::vector<int>& fenced) -> std::optional<int> {
    const std::optional<int> i = take_slot(std::nullopt, fenced);
    if (i) activate(*i, true);
    return i;
  });
}

void KvManager::release(std::int64_t slot, StreamHandle stream) {
  locked_with_fences<bool>([&](std::vector<int>&) -> std::optional<bool> {
    const int i = active_slot(slot);
    if (table_.count(i)) {
      fences_.record(i, stream);  // before any of its chunks is unmapped
      ++n_.fences_recorded;
    }
    if (saved_) saved_->drop_slot(i);  // suspended: resume() does not map the ended sequence again
    park(i);
    ++n_.releases;
    wake_starved();
    return true;
  });
}

bool KvManager::reserve_fast(std::int64_t slot, std::int64_t length, std::vector<int>* wake) {
  if (slot < 0 || slot >= layout_.max_seqs || length < 0 || length > layout_.max_seq_len || closed_.load() ||
      suspended_.load()) {  // the locked path raises (suspend() runs on this thread: no race)
    return false;
  }
  const int i = static_cast<int>(slot);
  Slot& s = slots_[i];
  if (s.state.load(std::memory_order_acquire) != SlotState::Active) return false;
  const std::int64_t t = s.target.load(std::memory_order_relaxed);
  if (length <= t) return true;  // guaranteed by an earlier call
  s.target.store(length);        // publish the target *before* reading the capacity (see the header)
  if (length <= s.capacity.load()) {
    lengths_[i] = static_cast<std::int32_t>(length);
    if (length > s.watermark.load(std::memory_order_relaxed)) {
      s.watermark.store(kNever, std::memory_order_relaxed);
      if (wake) {
        wake->push_back(i);
      } else {
        mapper_->request(i);  // watermark < kNever only with a mapper
      }
    }
    return true;
  }
  s.target.store(t);  // not backed: undo, and map under the lock
  return false;
}

void KvManager::reserve(std::int64_t slot, std::int64_t length) {
  if (reserve_fast(slot, length)) return;
  const auto t0 = std::chrono::steady_clock::now();
  locked_with_fences<bool>([&](std::vector<int>& fenced) -> std::optional<bool> {
    const int i = active_slot(slot);
    const std::int64_t n = checked("length", length, 0, layout_.max_seq_len);
    check_resident("reserve");
    Slot& s = slots_[i];
    if (n <= s.capacity.load()) {
      if (n > s.target.load()) {
        set_target(i, n);
        refresh(i);
      }
      return true;
    }
    const std::int64_t want = layout_.chunks_for(n);
    const std::string what = std::to_string(n) + " tokens of slot " + std::to_string(i);
    const auto holes = static_cast<std::int64_t>(table_.holes(i, want).size());
    if (supply_.check(holes, i, want, what, nullptr, &fenced) == Supply::AfterFences) return std::nullopt;
    grow(i, want, true, what);
    set_target(i, std::max(s.target.load(), n));
    refresh(i);
    ++n_.sync_waits;
    sync_waits_.store(n_.sync_waits);
    n_.wait_ns += since_ns(t0);
    return true;
  });
}

void KvManager::reserve_batch(const std::int64_t* slots, const std::int64_t* lengths, std::size_t n,
                              const LengthsTarget* publish) {
  // Slots whose watermark the fast path crossed (it set them to kNever: they must reach the mapper,
  // whatever happens next), asked for once, after the publish.
  struct WakeAtExit {
    Mapper* mapper;
    std::vector<int> slots;
    ~WakeAtExit() {
      if (mapper) mapper->request(slots);
    }
  } wake{mapper_.get(), {}};
  std::vector<std::pair<int, std::int64_t>> undo;  // (slot, target before) of fast reservations made
  std::size_t k = 0;
  for (; k < n; ++k) {
    const std::int64_t s = slots[k];
    const std::int64_t before = (s >= 0 && s < layout_.max_seqs) ? slots_[static_cast<int>(s)].target.load() : 0;
    if (!reserve_fast(s, lengths[k], &wake.slots)) break;
    if (lengths[k] > before) undo.emplace_back(static_cast<int>(s), before);
  }
  if (k == n) {  // the common case: every sequence already backed
    if (publish) publish_lengths(publish->dst, publish->stream);
    return;
  }
  const auto t0 = std::chrono::steady_clock::now();
  locked_with_fences<bool>([&](std::vector<int>& fenced) -> std::optional<bool> {
    for (auto it = undo.rbegin(); it != undo.rend(); ++it) set_target(it->first, it->second);  // start from scratch
    undo.clear();
    check_resident("reserve_batch");
    std::map<int, std::int64_t> want_len;  // slot -> the length it will have
    for (std::size_t j = 0; j < n; ++j) {
      const int i = active_slot(slots[j]);
      const std::int64_t len = checked("length", lengths[j], 0, layout_.max_seq_len);
      auto [it, fresh] = want_len.emplace(i, std::max(len, slots_[i].target.load()));
      if (!fresh) it->second = std::max(it->second, len);
    }
    KeepList keep(static_cast<std::size_t>(layout_.max_seqs), -1);
    std::int64_t holes = 0;
    std::vector<int> growing;
    for (const auto& [i, len] : want_len) {
      keep[i] = layout_.chunks_for(len);
      if (len > slots_[i].capacity.load()) {
        growing.push_back(i);
        holes += static_cast<std::int64_t>(table_.holes(i, keep[i]).size());
      }
    }
    const std::string what = "reserve_batch of " + std::to_string(n) + " sequences (" +
                             std::to_string(growing.size()) + " growing)";
    if (supply_.check(holes, -1, 0, what, &keep, &fenced) == Supply::AfterFences) return std::nullopt;
    std::vector<std::pair<int, std::int64_t>> mapped;  // undone if the device refuses midway
    try {
      for (int i : growing) grow(i, keep[i], true, what, &keep, &mapped);
    } catch (...) {
      for (auto it = mapped.rbegin(); it != mapped.rend(); ++it) unmap_checked(it->first, it->second);
      for (int i : growing) refresh(i);
      throw;
    }
    for (const auto& [i, len] : want_len) {
      if (len > slots_[i].target.load()) set_target(i, len);
      refresh(i);
    }
    ++n_.batches;
    if (!growing.empty()) {
      ++n_.sync_waits;
      sync_waits_.store(n_.sync_waits);
      n_.wait_ns += since_ns(t0);
    }
    return true;
  });
  if (publish) publish_lengths(publish->dst, publish->stream);
}

bool KvManager::can_reserve(std::int64_t slot, std::int64_t length) {
  Lock lock(mu_);
  const int i = active_slot(slot);
  const std::int64_t n = checked("length", length, 0, layout_.max_seq_len);
  if (suspended_.load()) return false;
  if (n <= slots_[i].capacity.load()) return true;
  const std::int64_t want = layout_.chunks_for(n);
  const auto holes = static_cast<std::int64_t>(table_.holes(i, want).size());
  return supply_.obtainable(i, want, nullptr) >= holes;
}

std::int64_t KvManager::num_free_chunks() {
  Lock lock(mu_);
  check_open();
  return supply_.obtainable(-1, 0, nullptr);
}

std::int64_t KvManager::free_tokens() {
  const std::int64_t chunks = num_free_chunks();
  return chunks * layout_.chunk_bytes / layout_.row_bytes;
}

void KvManager::prefetch(std::int64_t slot, std::int64_t length) {
  const bool live = slot >= 0 && slot < layout_.max_seqs && slots_.state(static_cast<int>(slot)) == SlotState::Active;
  if (!live || length < 0 || length > layout_.max_seq_len || suspended_.load()) {
    Lock lock(mu_);
    active_slot(slot);
    checked("length", length, 0, layout_.max_seq_len);
    check_resident("prefetch");
  }
  Slot& s = slots_[static_cast<int>(slot)];
  if (length > s.hint.load() && mapper_) {
    s.hint.store(length);
    s.watermark.store(kNever);
    mapper_->request(static_cast<int>(slot));
  }
}

std::int64_t KvManager::capacity(std::int64_t slot) { return slots_[active_slot(slot)].capacity.load(); }

std::int64_t KvManager::reserved(std::int64_t slot) { return slots_[active_slot(slot)].target.load(); }

void KvManager::publish_lengths(DevPtr dst, StreamHandle stream) {
  check_open();
  mirror_.publish(lengths_.data(), dst, stream);
}

bool KvManager::wait_mapper(double timeout_s) { return !mapper_ || mapper_->wait_idle(timeout_s); }

bool KvManager::mapper_alive() const { return mapper_ && mapper_->alive(); }

void KvManager::close() {
  if (closed_.load()) return;
  if (mapper_) mapper_->stop();
  std::vector<FencePtr> wait;
  {
    Lock lock(mu_);
    wait = fences_.all_pending();
  }
  wait_all(wait);  // kernels that may still read a released slot (unlocked)
  Lock lock(mu_);
  closed_.store(true);
  saved_.reset();
  table_.free();
  supply_.trim_pool();
  gauge();
}

}  // namespace glake::kvcache
