// SlotTable: slot state transitions.
#include "kvcache/slot_table.h"

#include <algorithm>
#include <set>

#include "common/error.h"

namespace glake::kvcache {

const char* state_name(SlotState s) {
  switch (s) {
    case SlotState::Free: return "free";
    case SlotState::Active: return "active";
    case SlotState::Released: return "released";
  }
  return "?";
}

SlotTable::SlotTable(int n) : n_(n), slots_(new Slot[n]) {
  for (int i = n - 1; i >= 0; --i) free_.push_back(i);
}

void SlotTable::erase(std::vector<int>& v, int i) {
  auto it = std::find(v.begin(), v.end(), i);
  if (it != v.end()) v.erase(it);
}

void SlotTable::activate(int i) {
  Slot& s = slots_[i];
  const SlotState st = s.state.load();
  if (st == SlotState::Active) throw Error("SlotTable::activate(" + std::to_string(i) + "): already active");
  erase(st == SlotState::Released ? released_ : free_, i);
  s.target.store(0);
  s.hint.store(0);
  s.state.store(SlotState::Active, std::memory_order_release);
  active_.push_back(i);
}

void SlotTable::park(int i, bool has_chunks) {
  Slot& s = slots_[i];
  const SlotState st = s.state.load();
  if (st == SlotState::Active) erase(active_, i);
  if (st == SlotState::Released) erase(released_, i);
  if (st == SlotState::Free) erase(free_, i);
  s.target.store(0);
  s.hint.store(0);
  s.watermark.store(kNever);
  if (has_chunks) {
    released_.push_back(i);
    s.state.store(SlotState::Released, std::memory_order_release);
  } else {
    free_.push_back(i);
    s.state.store(SlotState::Free, std::memory_order_release);
  }
}

std::string SlotTable::check() const {
  std::set<int> seen;
  auto listed = [&](const std::vector<int>& v, SlotState want, const char* what) -> std::string {
    for (int i : v) {
      if (!seen.insert(i).second) return "slot " + std::to_string(i) + " is listed twice";
      if (state(i) != want) {
        return "slot " + std::to_string(i) + " is " + state_name(state(i)) + " but in the " + what + " list";
      }
    }
    return "";
  };
  for (const std::string& e : {listed(active_, SlotState::Active, "live"), listed(released_, SlotState::Released,
                               "released"), listed(free_, SlotState::Free, "free")}) {
    if (!e.empty()) return e;
  }
  if (static_cast<int>(seen.size()) != n_) return "some slot is in no list";
  return "";
}

}  // namespace glake::kvcache
