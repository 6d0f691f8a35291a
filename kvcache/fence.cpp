// Fence and FenceSet: release fences recorded through the Driver and polled with event_query.
#include "kvcache/fence.h"

#include <algorithm>

namespace glake::kvcache {

Fence::Fence(Driver& driver, int device, StreamHandle stream)
    : driver_(driver), device_(device), event_(driver.event_create(device)) {
  try {
    driver_.event_record(device_, event_, stream);
  } catch (...) {
    driver_.event_destroy(device_, event_);
    throw;
  }
}

Fence::~Fence() {
  try {
    driver_.event_destroy(device_, event_);
  } catch (...) {  // a destructor must not throw; the event is lost at worst
  }
}

bool Fence::done() {
  if (!done_.load() && driver_.event_query(device_, event_)) done_.store(true);
  return done_.load();
}

void Fence::wait() {
  if (done_.load()) return;
  driver_.event_synchronize(device_, event_);
  done_.store(true);
}

FenceSet::FenceSet(Driver& driver, int device, std::size_t slots)
    : driver_(driver), device_(device), fences_(slots) {}

void FenceSet::record(int slot, StreamHandle stream) {
  fences_.at(slot).push_back(std::make_shared<Fence>(driver_, device_, stream));
}

bool FenceSet::ready(int slot) {
  auto& f = fences_.at(slot);
  if (f.empty()) return true;
  f.erase(std::remove_if(f.begin(), f.end(), [](const FencePtr& p) { return p->done(); }), f.end());
  return f.empty();
}

std::vector<FencePtr> FenceSet::pending(int slot) {
  ready(slot);
  return fences_.at(slot);
}

std::size_t FenceSet::pending_slots() const {
  return static_cast<std::size_t>(
      std::count_if(fences_.begin(), fences_.end(), [](const auto& f) { return !f.empty(); }));
}

std::vector<FencePtr> FenceSet::all_pending() {
  std::vector<FencePtr> out;
  for (std::size_t i = 0; i < fences_.size(); ++i) {
    for (auto& p : pending(static_cast<int>(i))) out.push_back(p);
  }
  return out;
}

void wait_all(const std::vector<FencePtr>& fences) {
  for (const auto& f : fences) f->wait();
}

}  // namespace glake::kvcache
