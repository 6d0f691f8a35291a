// The host backend: VMM semantics on host memory, so every policy runs without a GPU.
//
// physical chunk = memfd_create (sealed against resizing), reserve = mmap(PROT_NONE, MAP_NORESERVE),
// map = mmap(MAP_FIXED|MAP_SHARED) of the memfd, set_access = mprotect(RW), unmap = an anonymous
// PROT_NONE mapping over the same addresses (they stay reserved), export/import = dup'd fds.
#pragma once

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <unordered_set>

#include "driver/driver.h"

namespace glake {

/// VMM primitives over host memory; one "device", 2 MiB granularity.
/// This machine's RAM: total, and available (MemAvailable, else free + buffers): the host backend's
/// "device memory", and what suspend checks before it puts more bytes in RAM.
GLAKE_API MemInfo host_memory();

class HostDriver final : public Driver {
 public:
  static constexpr std::size_t kGranularity = 2u << 20;

  const char* name() const override { return "host"; }
  int device_count() override { return 1; }
  std::size_t granularity(int) override { return kGranularity; }
  MemInfo mem_info(int device) override;

  void memcpy(int device, DevPtr dst, DevPtr src, std::size_t n) override;
  void memcpy_async(int device, DevPtr dst, DevPtr src, std::size_t n, StreamHandle stream) override;
  void memset(int device, DevPtr dst, int value, std::size_t n) override;

  StreamHandle stream_create(int device) override;
  void stream_destroy(int, StreamHandle) override {}
  void stream_synchronize(int, StreamHandle) override {}
  void device_synchronize(int) override {}
  bool stream_is_capturing(int, StreamHandle) override { return false; }
  EventHandle event_create(int device) override;
  void event_record(int device, EventHandle event, StreamHandle stream) override;
  bool event_query(int device, EventHandle event) override;
  void event_synchronize(int device, EventHandle event) override;
  void event_destroy(int device, EventHandle event) override;

  // A test hook: host work is done when it is issued, so host events are complete at once. While
  // events are held, an event recorded from then on stays incomplete (event_query false,
  // event_synchronize blocks) until complete_held_events(): an in-flight kernel, on demand.

  /// Holds (true) or stops holding (false) events recorded from now on; stopping completes none.
  void hold_events(bool hold);
  /// Completes every held event and wakes whoever waits on one; returns how many.
  std::size_t complete_held_events();
  /// Events recorded while held and not yet completed.
  std::size_t held_events() const;

  void stream_wait_event(int, StreamHandle, EventHandle) override {}  // host events are always complete
  DevPtr host_alloc_pinned(int device, std::size_t size) override;
  void host_free_pinned(int device, DevPtr ptr) override;
  void host_register(int device, DevPtr, std::size_t) override { check_device(device); }  // all of it is host memory
  void host_unregister(int, DevPtr) override {}
  DevPtr device_alloc(int device, std::size_t size) override;
  void device_free(int device, DevPtr ptr) override;
  PointerInfo pointer_info(int, DevPtr) override { return PointerInfo{}; }  // cannot tell: all is host memory
  bool can_access_peer(int device, int peer) override;
  void enable_peer_access(int device, int peer) override;

 protected:
  PhysHandle do_create(int device, std::size_t size) override;
  void do_release(int device, PhysHandle handle) override;
  DevPtr do_reserve(int device, std::size_t size, std::size_t alignment) override;
  void do_free_va(int device, DevPtr va, std::size_t size) override;
  void do_map(int device, DevPtr va, std::size_t size, PhysHandle handle) override;
  void do_unmap(int device, DevPtr va, std::size_t size) override;
  void do_set_access(int device, DevPtr va, std::size_t size, bool read_only) override;
  int do_export_fd(int device, PhysHandle handle) override;
  PhysHandle do_import_fd(int device, int fd, std::size_t size) override;

 private:
  std::atomic<std::uintptr_t> next_id_{1};  // host streams and events are plain ids
  std::atomic<bool> holding_{false};
  mutable std::mutex held_mutex_;
  std::condition_variable held_done_;
  std::unordered_set<EventHandle> held_;  // recorded while holding, not yet completed
};

}  // namespace glake
