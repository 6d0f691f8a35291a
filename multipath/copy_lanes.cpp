#include "multipath/copy_lanes.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace glake::multipath {

namespace {

/// Atomically raises `value` to at least `to`.
void raise_to(std::atomic<std::uint64_t>& value, std::uint64_t to) {
  std::uint64_t seen = value.load(std::memory_order_relaxed);
  while (seen < to && !value.compare_exchange_weak(seen, to, std::memory_order_release)) {
  }
}

void check_lane(int lane, int count) {
  if (lane < 0 || lane >= count) {
    throw InvalidArgumentError("copy lane " + std::to_string(lane) + " does not exist (" + std::to_string(count) + " lanes)");
  }
}

/// Lanes as CUDA streams. A copy's completion is the event recorded after it, in a ring of kRing
/// events per lane. Waiting on a ring slot that a later copy re-recorded waits for that later copy:
/// later than needed, never earlier, because a stream completes its work in order.
class StreamLanes final : public CopyLanes {
 public:
  static constexpr int kRing = 64;

  StreamLanes(Driver& driver, int device, int count) : CopyLanes(count), driver_(driver), device_(device) {
    try {
      start_ = driver_.event_create(device_);
      for (int i = 0; i < count; ++i) {
        auto lane = std::make_unique<Lane>();
        lanes_.push_back(std::move(lane));
        Lane& l = *lanes_.back();
        l.stream = driver_.stream_create(device_);
        l.end = driver_.event_create(device_);
        for (int k = 0; k < kRing; ++k) l.ring.push_back(driver_.event_create(device_));
      }
    } catch (...) {
      release();
      throw;
    }
  }

  ~StreamLanes() override {
    try {
      synchronize();
    } catch (...) {  // a failed device: free what we can below
    }
    release();
  }

  Ticket submit(int lane, DevPtr dst, DevPtr src, std::size_t n) override {
    check_lane(lane, count());
    Lane& l = *lanes_[lane];
    std::lock_guard<std::mutex> lock(l.mu);
    driver_.memcpy_async(device_, dst, src, n, l.stream);
    const std::uint64_t seq = l.seq + 1;
    driver_.event_record(device_, l.ring[seq % kRing], l.stream);
    l.seq = seq;  // only after both calls succeeded: a failed copy has no ticket
    return Ticket{lane, seq};
  }

  void wait(const Ticket& t) override {
    if (t.lane < 0) return;
    check_lane(t.lane, count());
    Lane& l = *lanes_[t.lane];
    if (l.done.load(std::memory_order_acquire) >= t.seq) return;
    driver_.event_synchronize(device_, l.ring[t.seq % kRing]);
    raise_to(l.done, t.seq);
  }

  void order_after(StreamHandle caller) override {
    driver_.event_record(device_, start_, caller);
    for (auto& l : lanes_) driver_.stream_wait_event(device_, l->stream, start_);
  }

  void order_before(StreamHandle caller) override {
    for (auto& l : lanes_) {
      std::lock_guard<std::mutex> lock(l->mu);
      driver_.event_record(device_, l->end, l->stream);
      driver_.stream_wait_event(device_, caller, l->end);
    }
  }

  void synchronize() override {
    for (auto& l : lanes_) {
      std::uint64_t seq;
      {
        std::lock_guard<std::mutex> lock(l->mu);
        seq = l->seq;
      }
      driver_.stream_synchronize(device_, l->stream);
      raise_to(l->done, seq);
    }
  }

  bool on_device() const override { return true; }

 private:
  struct Lane {
    StreamHandle stream = 0;
    EventHandle end = 0;
    std::vector<EventHandle> ring;
    std::mutex mu;                      // orders (copy, event record) pairs and guards seq
    std::uint64_t seq = 0;              // copies submitted
    std::atomic<std::uint64_t> done{0}; // copies known to be complete
  };

  /// Destroys every stream and event made so far; errors are ignored (nothing else can be done).
  void release() noexcept {
    for (auto& l : lanes_) {
      for (EventHandle e : l->ring) {
        try { driver_.event_destroy(device_, e); } catch (...) {}
      }
      if (l->end) {
        try { driver_.event_destroy(device_, l->end); } catch (...) {}
      }
      if (l->stream) {
        try { driver_.stream_destroy(device_, l->stream); } catch (...) {}
      }
    }
    lanes_.clear();
    if (start_) {
      try { driver_.event_destroy(device_, start_); } catch (...) {}
      start_ = 0;
    }
  }

  Driver& driver_;
  int device_;
  EventHandle start_ = 0;
  std::vector<std::unique_ptr<Lane>> lanes_;
};

/// Lanes as host threads: each drains a FIFO of copies through the driver's memcpy, so the
/// pipeline's "copy engine" step really runs concurrently with the CPU threads filling staging.
class ThreadLanes final : public CopyLanes {
 public:
  ThreadLanes(Driver& driver, int device, int count) : CopyLanes(count), driver_(driver), device_(device) {
    for (int i = 0; i < count; ++i) lanes_.push_back(std::make_unique<Lane>());
    for (auto& l : lanes_) {
      Lane* lane = l.get();
      l->thread = std::thread([this, lane] { run(*lane); });
    }
  }

  ~ThreadLanes() override {
    for (auto& l : lanes_) {
      {
        std::lock_guard<std::mutex> lock(l->mu);
        l->stop = true;  // the thread finishes its queue first
      }
      l->work.notify_all();
    }
    for (auto& l : lanes_) l->thread.join();
  }

  Ticket submit(int lane, DevPtr dst, DevPtr src, std::size_t n) override {
    check_lane(lane, count());
    Lane& l = *lanes_[lane];
    std::uint64_t seq;
    {
      std::lock_guard<std::mutex> lock(l.mu);
      l.queue.push_back(Task{dst, src, n});
      seq = ++l.seq;
    }
    l.work.notify_one();
    return Ticket{lane, seq};
  }

  void wait(const Ticket& t) override {
    if (t.lane < 0) return;
    check_lane(t.lane, count());
    Lane& l = *lanes_[t.lane];
    std::unique_lock<std::mutex> lock(l.mu);
    l.finished.wait(lock, [&] { return l.done >= t.seq; });
  }

  // The host has no streams: the engine itself is the caller's order. Work submitted after this
  // call must see the results of every earlier copy, so wait for all of them.
  void order_after(StreamHandle) override { synchronize(); }
  void order_before(StreamHandle) override {}

  void synchronize() override {
    for (auto& l : lanes_) {
      std::unique_lock<std::mutex> lock(l->mu);
      l->finished.wait(lock, [&] { return l->done >= l->seq; });
    }
  }

  bool on_device() const override { return false; }

 private:
  struct Task {
    DevPtr dst, src;
    std::size_t n;
  };
  struct Lane {
    std::thread thread;
    std::mutex mu;
    std::condition_variable work, finished;
    std::deque<Task> queue;
    std::uint64_t seq = 0, done = 0;
    bool stop = false;
  };

  void run(Lane& l) {
    std::unique_lock<std::mutex> lock(l.mu);
    for (;;) {
      l.work.wait(lock, [&] { return l.stop || !l.queue.empty(); });
      if (l.queue.empty()) return;  // stop, and nothing left
      const Task t = l.queue.front();
      l.queue.pop_front();
      lock.unlock();
      driver_.memcpy_async(device_, t.dst, t.src, t.n, 0);  // host driver: a plain memmove
      lock.lock();
      ++l.done;
      l.finished.notify_all();
    }
  }

  Driver& driver_;
  int device_;
  std::vector<std::unique_ptr<Lane>> lanes_;
};

}  // namespace

std::unique_ptr<CopyLanes> CopyLanes::create(Driver& driver, int device, int count) {
  if (count < 1) throw InvalidArgumentError("copy lanes: count=" + std::to_string(count) + " must be positive");
  if (std::strcmp(driver.name(), "host") == 0) return std::make_unique<ThreadLanes>(driver, device, count);
  return std::make_unique<StreamLanes>(driver, device, count);
}

}  // namespace glake::multipath
