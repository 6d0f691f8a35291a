// Mapper: the background thread that maps chunks ahead of growing sequences.
//
// The engine's fast path only queues a slot (a short queue lock and a notify); the thread wakes and
// runs the owner's pass over the queued slots. It never touches Python. Work that waits on a
// pending fence is put back with retry_later() and polled every kRetryPoll until it goes through.
// An exception escaping a pass goes to the owner's error handler; the thread keeps serving.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace glake::kvcache {

/// A thread running `pass(slots)` whenever slots are queued.
class Mapper {
 public:
  using Pass = std::function<void(const std::vector<int>&)>;
  using OnError = std::function<void(std::exception_ptr)>;
  static constexpr std::chrono::microseconds kRetryPoll{500};

  /// Starts the thread (named `name` where the OS allows).
  Mapper(Pass pass, OnError on_error, std::string name = "glake-kv-mapper");
  ~Mapper();
  Mapper(const Mapper&) = delete;
  Mapper& operator=(const Mapper&) = delete;

  /// Asks the thread to serve `slot` (any thread; cheap).
  void request(int slot);
  /// Asks for all of `slots` at once: one lock, one wake-up (nothing when empty).
  void request(const std::vector<int>& slots);
  /// From inside a pass: serve `slot` again once a fence may have completed.
  void retry_later(int slot);
  /// Blocks until nothing is queued and no pass runs, and any work waiting on a fence has been
  /// retried since this call (it may still wait: a fence not yet done); false on timeout.
  bool wait_idle(double timeout_s);
  /// Stops the thread after the pass in progress and joins it. Idempotent.
  void stop();
  /// True while the thread runs.
  bool alive() const;
  /// Passes run so far.
  std::uint64_t passes() const;
  /// Wake-ups asked for so far (request() calls that queued something).
  std::uint64_t wakeups() const;
  /// Nanoseconds spent in passes.
  std::uint64_t busy_ns() const;

 private:
  void run();

  Pass pass_;
  OnError on_error_;
  std::string name_;
  mutable std::mutex mutex_;
  std::condition_variable wake_, idle_;
  std::vector<int> queue_;
  std::set<int> retry_;
  std::uint64_t retry_rounds_ = 0;  // passes over the retry set finished
  bool busy_ = false, stop_ = false, running_ = false;
  std::uint64_t passes_ = 0, busy_ns_ = 0, wakeups_ = 0;
  std::thread thread_;
};

}  // namespace glake::kvcache
