// Mapper: queue, wake-up, retry polling and shutdown of the background mapping thread.
#include "kvcache/mapper.h"

#include <pthread.h>

#include <algorithm>

namespace glake::kvcache {

Mapper::Mapper(Pass pass, OnError on_error, std::string name)
    : pass_(std::move(pass)), on_error_(std::move(on_error)), name_(std::move(name)) {
  running_ = true;
  thread_ = std::thread([this] { run(); });
  pthread_setname_np(thread_.native_handle(), name_.substr(0, 15).c_str());  // named before anyone looks
}

Mapper::~Mapper() { stop(); }

void Mapper::request(int slot) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(slot);
    ++wakeups_;
  }
  wake_.notify_one();
}

void Mapper::request(const std::vector<int>& slots) {
  if (slots.empty()) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.insert(queue_.end(), slots.begin(), slots.end());
    ++wakeups_;
  }
  wake_.notify_one();
}

void Mapper::retry_later(int slot) {
  std::lock_guard<std::mutex> lock(mutex_);
  retry_.insert(slot);
}

bool Mapper::wait_idle(double timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  std::unique_lock<std::mutex> lock(mutex_);
  const std::uint64_t round = retry_rounds_;
  wake_.notify_one();
  return idle_.wait_until(lock, deadline, [&] {
    return !running_ || (queue_.empty() && !busy_ && (retry_.empty() || retry_rounds_ > round));
  });
}

void Mapper::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable() && std::this_thread::get_id() != thread_.get_id()) thread_.join();
}

bool Mapper::alive() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return running_;
}

std::uint64_t Mapper::passes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return passes_;
}

std::uint64_t Mapper::wakeups() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return wakeups_;
}

std::uint64_t Mapper::busy_ns() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return busy_ns_;
}

void Mapper::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    if (retry_.empty()) {
      wake_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    } else {
      wake_.wait_for(lock, kRetryPoll, [&] { return stop_ || !queue_.empty(); });
    }
    if (stop_) break;
    std::vector<int> slots;
    slots.swap(queue_);
    const bool retrying = !retry_.empty();
    slots.insert(slots.end(), retry_.begin(), retry_.end());
    retry_.clear();
    std::vector<int> unique;
    for (int s : slots) {
      if (std::find(unique.begin(), unique.end(), s) == unique.end()) unique.push_back(s);
    }
    busy_ = true;
    lock.unlock();
    const auto t0 = std::chrono::steady_clock::now();
    try {
      pass_(unique);
    } catch (...) {
      on_error_(std::current_exception());
    }
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0);
    lock.lock();
    busy_ = false;
    ++passes_;
    busy_ns_ += static_cast<std::uint64_t>(ns.count());
    if (retrying) ++retry_rounds_;
    idle_.notify_all();
  }
  running_ = false;
  idle_.notify_all();
}

}  // namespace glake::kvcache
