// LengthsMirror: each slot's reserved length as an int32 array, published to a device tensor
// (attention's seqused_k) without a host synchronisation.
//
// publish() copies the host array into the next of kRing pinned staging buffers, enqueues an async
// copy from it to the device array on the engine's stream and records the event of the buffer's
// group after it. The buffers form kGroups groups of kGroup; a group's event, recorded after each of
// its copies, covers them all (they share a stream: a publish on another stream than the open
// group's starts the next group), and the group is reused kRing publishes later, after that event
// completed: polled once, when the group is opened again, and waited for only when the GPU is that
// far behind. Two driver calls per publish (the copy, the record) and a query per kGroup. On the host
// backend the copy is a plain memcpy.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "driver/driver.h"

namespace glake::kvcache {

/// Pinned staging ring + one event per group of buffers, feeding async H2D copies on a stream.
class LengthsMirror {
 public:
  static constexpr int kGroup = 16, kGroups = 4, kRing = kGroup * kGroups;

  /// A mirror for `n` int32 values on `device`.
  LengthsMirror(Driver& driver, int device, std::size_t n);
  ~LengthsMirror();
  LengthsMirror(const LengthsMirror&) = delete;
  LengthsMirror& operator=(const LengthsMirror&) = delete;

  /// Enqueues a copy of `values` (n of them) to `dst` on `stream`; returns once it is enqueued.
  void publish(const std::int32_t* values, DevPtr dst, StreamHandle stream);
  /// Publishes that had to wait for a staging buffer (the GPU was a whole ring of publishes behind).
  std::uint64_t waits() const { return waits_; }

 private:
  Driver& driver_;
  int device_;
  std::size_t bytes_;
  bool host_;
  DevPtr staging_ = 0;  // kRing buffers of bytes_, one pinned allocation
  std::array<EventHandle, kGroups> events_{};
  std::array<bool, kGroups> recorded_{};
  int next_ = 0;           // the buffer the next publish fills
  int open_ = -1;          // the group being filled (-1: none: the next publish opens one)
  StreamHandle stream_{};  // the open group's stream
  std::uint64_t waits_ = 0;
};

}  // namespace glake::kvcache
