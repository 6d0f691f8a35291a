// LengthsMirror: each slot's reserved length as an int32 array, published to a device tensor
// (attention's seqused_k) without a host synchronisation.
//
// publish() copies the host array into one of kRing pinned staging buffers, enqueues an async copy
// from it to the device array on the engine's stream and records an event after it. A staging
// buffer is reused kRing publishes later, after its event completed (polled; waited for only when
// the GPU is kRing steps behind). On the host backend the copy is a plain memcpy.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "driver/driver.h"

namespace glake::kvcache {

/// Pinned staging ring + events for publishing an int32 array to device memory on a stream.
class LengthsMirror {
 public:
  static constexpr int kRing = 4;

  /// A mirror for `n` int32 values on `device`.
  LengthsMirror(Driver& driver, int device, std::size_t n);
  ~LengthsMirror();
  LengthsMirror(const LengthsMirror&) = delete;
  LengthsMirror& operator=(const LengthsMirror&) = delete;

  /// Enqueues a copy of `values` (n of them) to `dst` on `stream`; returns once it is enqueued.
  void publish(const std::int32_t* values, DevPtr dst, StreamHandle stream);
  /// Publishes that had to wait for a staging buffer (the GPU was kRing publishes behind).
  std::uint64_t waits() const { return waits_; }

 private:
  Driver& driver_;
  int device_;
  std::size_t bytes_;
  bool host_;
  std::array<DevPtr, kRing> staging_{};
  std::array<EventHandle, kRing> events_{};
  std::array<bool, kRing> recorded_{};
  int next_ = 0;
  std::uint64_t waits_ = 0;
};

}  // namespace glake::kvcache
