// LengthsMirror: a ring of pinned buffers in event-guarded groups, feeding async H2D copies.
#include "kvcache/lengths_mirror.h"

#include <cstring>
#include <string>

namespace glake::kvcache {

LengthsMirror::LengthsMirror(Driver& driver, int device, std::size_t n)
    : driver_(driver), device_(device), bytes_(n * sizeof(std::int32_t)), host_(std::string(driver.name()) == "host") {
  if (host_) return;
  staging_ = driver_.host_alloc_pinned(device_, bytes_ * kRing);
  try {
    for (auto& e : events_) e = driver_.event_create(device_);
  } catch (...) {
    for (auto e : events_) {
      if (e) driver_.event_destroy(device_, e);
    }
    driver_.host_free_pinned(device_, staging_);
    throw;
  }
}

LengthsMirror::~LengthsMirror() {
  if (host_) return;
  try {
    for (int g = 0; g < kGroups; ++g) {
      if (recorded_[g]) driver_.event_synchronize(device_, events_[g]);  // copies may still read the buffers
      driver_.event_destroy(device_, events_[g]);
    }
    driver_.host_free_pinned(device_, staging_);
  } catch (...) {  // a destructor must not throw
  }
}

void LengthsMirror::publish(const std::int32_t* values, DevPtr dst, StreamHandle stream) {
  if (host_) {  // the "device" tensor is host memory: the copy is done when this returns
    std::memcpy(reinterpret_cast<void*>(dst), values, bytes_);
    return;
  }
  if (open_ >= 0 && stream != stream_) {  // the group's event was recorded after its last copy there
    next_ = ((open_ + 1) % kGroups) * kGroup;
    open_ = -1;
  }
  if (open_ < 0) {  // the group's buffers were last read by copies its event covers
    const int group = next_ / kGroup;
    if (recorded_[group] && !driver_.event_query(device_, events_[group])) {
      ++waits_;
      driver_.event_synchronize(device_, events_[group]);
    }
    open_ = group;
    stream_ = stream;
  }
  const DevPtr buf = staging_ + static_cast<DevPtr>(next_) * bytes_;
  std::memcpy(reinterpret_cast<void*>(buf), values, bytes_);
  driver_.memcpy_async(device_, dst, buf, bytes_, stream);
  driver_.event_record(device_, events_[open_], stream);  // after every copy: a stream may go away
  recorded_[open_] = true;
  next_ = (next_ + 1) % kRing;
  if (next_ % kGroup == 0) open_ = -1;
}

}  // namespace glake::kvcache
