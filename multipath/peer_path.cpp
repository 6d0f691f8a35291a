#include "multipath/peer_path.h"

#include <algorithm>

namespace glake::multipath {

PeerPaths::PeerPaths(Driver& driver, int device, const std::vector<int>& candidates, std::size_t chunk_bytes)
    : driver_(driver), device_(device), chunk_(chunk_bytes) {
  std::vector<int> wanted = candidates;
  if (wanted.empty()) {
    for (int d = 0; d < driver_.device_count(); ++d) wanted.push_back(d);
  }
  for (int d : wanted) {
    if (d == device_) continue;
    if (d >= driver_.device_count()) {
      skipped_.push_back("device " + std::to_string(d) + ": does not exist");
      continue;
    }
    if (!driver_.can_access_peer(d, device_) || !driver_.can_access_peer(device_, d)) {
      skipped_.push_back("device " + std::to_string(d) + ": no peer access with device " + std::to_string(device_));
      continue;
    }
    Peer p;
    p.device = d;
    try {
      driver_.enable_peer_access(d, device_);
      driver_.enable_peer_access(device_, d);
      p.in = driver_.stream_create(d);
      p.out = driver_.stream_create(d);
      p.end = driver_.event_create(d);
      for (int b = 0; b < 2; ++b) {
        p.buffer[b] = driver_.device_alloc(d, chunk_);
        p.filled[b] = driver_.event_create(d);
        p.drained[b] = driver_.event_create(d);
      }
    } catch (...) {
      release(p);
      for (auto& q : peers_) release(q);
      throw;
    }
    peers_.push_back(p);
  }
}

PeerPaths::~PeerPaths() {
  try {
    synchronize();
  } catch (...) {  // a failed device: free what we can
  }
  for (auto& p : peers_) release(p);
}

void PeerPaths::release(Peer& p) noexcept {
  auto quiet = [](auto&& f) {
    try {
      f();
    } catch (...) {
    }
  };
  for (int b = 0; b < 2; ++b) {
    if (p.buffer[b]) quiet([&] { driver_.device_free(p.device, p.buffer[b]); });
    if (p.filled[b]) quiet([&] { driver_.event_destroy(p.device, p.filled[b]); });
    if (p.drained[b]) quiet([&] { driver_.event_destroy(p.device, p.drained[b]); });
    p.buffer[b] = 0;
    p.filled[b] = p.drained[b] = 0;
  }
  if (p.end) quiet([&] { driver_.event_destroy(p.device, p.end); });
  if (p.in) quiet([&] { driver_.stream_destroy(p.device, p.in); });
  if (p.out) quiet([&] { driver_.stream_destroy(p.device, p.out); });
  p.end = 0;
  p.in = p.out = 0;
}

std::vector<int> PeerPaths::devices() const {
  std::vector<int> out;
  for (const auto& p : peers_) out.push_back(p.device);
  return out;
}

void PeerPaths::enqueue(int index, DevPtr dst, DevPtr src, std::size_t n, EventHandle start) {
  if (index < 0 || index >= count()) {
    throw InvalidArgumentError("peer path " + std::to_string(index) + " does not exist (" + std::to_string(count()) + ")");
  }
  Peer& p = peers_[static_cast<std::size_t>(index)];
  driver_.stream_wait_event(p.device, p.in, start);
  driver_.stream_wait_event(p.device, p.out, start);
  for (std::size_t off = 0; off < n; off += chunk_) {
    const std::size_t len = std::min(chunk_, n - off);
    const int b = p.next;
    p.next ^= 1;
    // The buffer is free once the out-copy of its previous step has read it.
    if (p.used[b]) driver_.stream_wait_event(p.device, p.in, p.drained[b]);
    driver_.memcpy_async(p.device, p.buffer[b], src + off, len, p.in);
    driver_.event_record(p.device, p.filled[b], p.in);
    driver_.stream_wait_event(p.device, p.out, p.filled[b]);
    driver_.memcpy_async(p.device, dst + off, p.buffer[b], len, p.out);
    driver_.event_record(p.device, p.drained[b], p.out);
    p.used[b] = true;
  }
}

void PeerPaths::order_before(StreamHandle caller) {
  for (auto& p : peers_) {
    driver_.event_record(p.device, p.end, p.out);  // out follows in for every step
    driver_.stream_wait_event(device_, caller, p.end);
  }
}

void PeerPaths::synchronize() {
  for (auto& p : peers_) {
    driver_.stream_synchronize(p.device, p.in);
    driver_.stream_synchronize(p.device, p.out);
  }
}

}  // namespace glake::multipath
