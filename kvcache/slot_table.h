// SlotTable: the state of every slot, and the orders slots are handed out in.
//
// A slot is Free (no sequence, no chunk), Active (a live sequence) or Released (no sequence, but it
// kept its chunks for the next one: deferred reclamation). Released slots are kept oldest release
// first, free slots as a stack (slot 0 comes out first), live ones in activation order.
//
// Threading: states and the lists change only with the manager's lock held, on the engine's thread
// or the mapper's. `target`, `capacity`, `watermark` and `hint` are atomics because the engine's
// lock-free fast path reads and writes them while the mapper may run (see KvManager::reserve_fast).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace glake::kvcache {

/// What a slot holds.
enum class SlotState : std::uint8_t { Free, Active, Released };

/// Name of a state ("free", "active", "released").
const char* state_name(SlotState s);

/// A watermark no length reaches.
constexpr std::int64_t kNever = std::int64_t{1} << 62;

/// What the manager knows about one slot.
struct Slot {
  std::atomic<SlotState> state{SlotState::Free};
  std::atomic<std::int64_t> target{0};        ///< tokens the engine reserved (max over reserve calls)
  std::atomic<std::int64_t> hint{0};          ///< tokens announced by prefetch (backed in the background)
  std::atomic<std::int64_t> capacity{0};      ///< tokens [0, capacity) are backed
  std::atomic<std::int64_t> watermark{kNever};///< a reserve beyond this queues the slot for the mapper
};

/// Slot states and the free / released / live orders.
class SlotTable {
 public:
  /// `n` free slots.
  explicit SlotTable(int n);

  /// Number of slots.
  int size() const { return n_; }
  /// Slot `i` (unchecked).
  Slot& operator[](int i) { return slots_[i]; }
  const Slot& operator[](int i) const { return slots_[i]; }
  /// State of slot `i`.
  SlotState state(int i) const { return slots_[i].state.load(std::memory_order_acquire); }
  /// Live slots, in activation order.
  const std::vector<int>& active() const { return active_; }
  /// Released slots, oldest release first.
  const std::vector<int>& released() const { return released_; }
  /// Free slots; the last one is handed out first.
  const std::vector<int>& free_stack() const { return free_; }

  /// A free or released slot becomes Active with nothing reserved.
  void activate(int i);
  /// A slot that is not live goes to Released (it keeps chunks) or Free (it has none); a released
  /// slot that is parked again becomes the most recently released.
  void park(int i, bool has_chunks);
  /// "" when states and lists agree, else the first disagreement.
  std::string check() const;

 private:
  static void erase(std::vector<int>& v, int i);

  int n_;
  std::unique_ptr<Slot[]> slots_;
  std::vector<int> active_, released_, free_;
};

}  // namespace glake::kvcache
