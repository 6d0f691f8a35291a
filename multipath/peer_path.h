// Peer paths: part of a pinned host<->device copy travels through another GPU, which moves its
// share over its own PCIe link into (or out of) two buffers in its memory, then peer-to-peer.
//
// Everything is stream-ordered on the peer (two streams, events between them): the host thread only
// enqueues. Peers are used only where cuDeviceCanAccessPeer says both directions work.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "driver/driver.h"

namespace glake::multipath {

/// The peers of one device and their buffers and streams.
class PeerPaths {
 public:
  /// Detects which of `candidates` (empty = every other device) have peer access to and from
  /// `device`, enables it, and allocates two `chunk_bytes` buffers on each. No peer is fine.
  PeerPaths(Driver& driver, int device, const std::vector<int>& candidates, std::size_t chunk_bytes);
  /// Waits for the peers' work, then frees buffers, streams and events.
  ~PeerPaths();
  PeerPaths(const PeerPaths&) = delete;
  PeerPaths& operator=(const PeerPaths&) = delete;

  /// Devices in use as peers.
  std::vector<int> devices() const;
  /// Number of peers in use.
  int count() const { return static_cast<int>(peers_.size()); }
  /// Why each candidate that is not used was left out ("device 2: no peer access").
  const std::vector<std::string>& skipped() const { return skipped_; }

  /// Enqueues copying `n` bytes from `src` to `dst` through peer `index`, after `start` (an event of
  /// `device`) has completed. One side is pinned host memory, the other memory of `device`.
  void enqueue(int index, DevPtr dst, DevPtr src, std::size_t n, EventHandle start);
  /// Makes later work on `caller` (a stream of `device`) wait for every peer's work so far.
  void order_before(StreamHandle caller);
  /// Blocks until every peer's work so far is done.
  void synchronize();

 private:
  struct Peer {
    int device = -1;
    DevPtr buffer[2] = {0, 0};
    bool used[2] = {false, false};
    StreamHandle in = 0, out = 0;        // in: source -> buffer; out: buffer -> destination
    EventHandle filled[2] = {0, 0}, drained[2] = {0, 0}, end = 0;
    int next = 0;                          // buffer for the next step
  };
  void release(Peer& p) noexcept;

  Driver& driver_;
  int device_;
  std::size_t chunk_;
  std::vector<Peer> peers_;
  std::vector<std::string> skipped_;
};

}  // namespace glake::multipath
