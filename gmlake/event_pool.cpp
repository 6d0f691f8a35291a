#include "gmlake/event_pool.h"

namespace glake::gmlake {

EventPool::~EventPool() {
  for (EventHandle e : free_) {
    try {
      driver_.event_destroy(device_, e);
    } catch (...) {  // a context already torn down at exit
    }
  }
}

EventHandle EventPool::acquire() {
  if (!free_.empty()) {
    const EventHandle e = free_.back();
    free_.pop_back();
    return e;
  }
  const EventHandle e = driver_.event_create(device_);
  created_++;
  return e;
}

}  // namespace glake::gmlake
