// A fixed pool of CPU threads that run one parallel body at a time, the calling thread included.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace glake::multipath {

/// `size` threads in all: size - 1 background std::threads plus whichever thread calls run().
/// The threads never touch Python, so copies run without the GIL.
class WorkerPool {
 public:
  /// Starts size - 1 threads (size >= 1).
  explicit WorkerPool(int size);
  /// Joins the threads.
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  /// Runs body(i) on every thread at once (i = 0 on the caller, 1.. on the pool) and returns when
  /// all have returned; rethrows the first exception a body threw. One run() at a time.
  void run(const std::function<void(int)>& body);
  /// Threads taking part in run(), the caller included.
  int size() const { return static_cast<int>(threads_.size()) + 1; }

 private:
  void loop(int index);

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable start_, finished_;
  const std::function<void(int)>* body_ = nullptr;
  unsigned long generation_ = 0;
  int running_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace glake::multipath
