// LengthsMirror: a ring of pinned buffers, each guarded by an event, feeding async H2D copies.
#include "kvcache/lengths_mirror.h"

#include <cstring>
#include <string>

namespace glake::kvcache {

LengthsMirror::LengthsMirror(Driver& driver, int device, std::size_t n)
    : driver_(driver), device_(device), bytes_(n * sizeof(std::int32_t)), host_(std::string(driver.name()) == "host") {
  if (host_) return;
  for (int k = 0; k < kRing; ++k) {
    staging_[k] = driver_.host_alloc_pinned(device_, bytes_);
    events_[k] = driver_.event_create(device_);
  }
}

LengthsMirror::~LengthsMirror() {
  if (host_) return;
  for (int k = 0; k < kRing; ++k) {
    try {
      if (recorded_[k]) driver_.event_synchronize(device_, events_[k]);  // the copy still reads the buffer
      driver_.event_destroy(device_, events_[k]);
      driver_.host_free_pinned(device_, staging_[k]);
    } catch (...) {  // a destructor must not throw
    }
  }
}

void LengthsMirror::publish(const std::int32_t* values, DevPtr dst, StreamHandle stream) {
  if (host_) {  // the "device" tensor is host memory: the copy is done when this returns
    std::memcpy(reinterpret_cast<void*>(dst), values, bytes_);
    return;
  }
  const int k = next_;
  next_ = (next_ + 1) % kRing;
  if (recorded_[k] && !driver_.event_query(device_, events_[k])) {
    ++waits_;
    driver_.event_synchronize(device_, events_[k]);
  }
  std::memcpy(reinterpret_cast<void*>(staging_[k]), values, bytes_);
  driver_.memcpy_async(device_, dst, staging_[k], bytes_, stream);
  driver_.event_record(device_, events_[k], stream);
  recorded_[k] = true;
}

}  // namespace glake::kvcache
