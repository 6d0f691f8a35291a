#include "multipath/worker_pool.h"

#include "common/error.h"

namespace glake::multipath {

WorkerPool::WorkerPool(int size) {
  if (size < 1) throw InvalidArgumentError("worker pool: size=" + std::to_string(size) + " must be positive");
  threads_.reserve(static_cast<std::size_t>(size - 1));
  try {
    for (int i = 1; i < size; ++i) threads_.emplace_back([this, i] { loop(i); });
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& t : threads_) t.join();
    throw;
  }
}

WorkerPool::~WorkerPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  start_.notify_all();
  for (auto& t : threads_) t.join();
}

void WorkerPool::run(const std::function<void(int)>& body) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    body_ = &body;
    error_ = nullptr;
    running_ = static_cast<int>(threads_.size());
    ++generation_;
  }
  start_.notify_all();
  std::exception_ptr mine;
  try {
    body(0);
  } catch (...) {
    mine = std::current_exception();
  }
  std::unique_lock<std::mutex> lock(mu_);
  finished_.wait(lock, [&] { return running_ == 0; });
  body_ = nullptr;
  if (mine) std::rethrow_exception(mine);
  if (error_) std::rethrow_exception(error_);
}

void WorkerPool::loop(int index) {
  unsigned long seen = 0;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    start_.wait(lock, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    const std::function<void(int)>* body = body_;
    lock.unlock();
    std::exception_ptr err;
    try {
      (*body)(index);
    } catch (...) {
      err = std::current_exception();
    }
    lock.lock();
    if (err && !error_) error_ = err;
    if (--running_ == 0) finished_.notify_all();
  }
}

}  // namespace glake::multipath
