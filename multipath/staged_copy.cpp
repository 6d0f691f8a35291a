#include "multipath/staged_copy.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>

namespace glake::multipath {

StagingBuffers::StagingBuffers(Driver& driver, int device, int count, std::size_t bytes)
    : driver_(driver), device_(device), bytes_(bytes) {
  try {
    for (int i = 0; i < count; ++i) buffers_.push_back(driver_.host_alloc_pinned(device_, bytes_));
  } catch (...) {
    for (DevPtr b : buffers_) driver_.host_free_pinned(device_, b);
    throw;
  }
  last_use_.assign(buffers_.size(), Ticket{});
}

StagingBuffers::~StagingBuffers() {
  for (DevPtr b : buffers_) {
    try {
      driver_.host_free_pinned(device_, b);
    } catch (...) {  // a failed device at exit: nothing else to do
    }
  }
}

namespace {

using Clock = std::chrono::steady_clock;

std::uint64_t ns_since(Clock::time_point t0) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
}

/// One staging buffer's worth of an extent: `len` bytes at `device` and `host`.
struct Chunk {
  DevPtr device, host;
  std::size_t len;
};

/// One piece of CPU work: bytes [offset, offset + len) of chunk `chunk`.
struct Piece {
  std::size_t chunk, offset, len;
};

/// The shared state of one staged copy. Pieces are handed out in order (chunk by chunk, the
/// extents' chunks one after another), so every piece of chunk c - B was handed out before any
/// piece of chunk c: waiting for chunk c - B never waits for work that has not started, and the
/// pipeline cannot deadlock.
class StagedJob {
 public:
  StagedJob(StagedDirection dir, const std::vector<StagedExtent>& extents, StagingBuffers& staging, CopyLanes& lanes,
            const StagedParams& params)
      : h2d_(dir == StagedDirection::HostToDevice), staging_(staging), lanes_(lanes), chunk_(staging.bytes()),
        piece_(std::clamp<std::size_t>(params.piece_bytes, 1, chunk_)),
        nbuf_(static_cast<std::size_t>(staging.count())), nlanes_(params.lanes) {
    for (const StagedExtent& x : extents) {
      for (std::size_t off = 0; off < x.n; off += chunk_) {
        const std::size_t len = std::min(chunk_, x.n - off);
        first_piece_.push_back(npieces_);
        npieces_ += (len + piece_ - 1) / piece_;
        chunks_.push_back(Chunk{x.device + off, x.host + off, len});
      }
    }
    nchunks_ = chunks_.size();
    remaining_ = std::make_unique<std::atomic<std::size_t>[]>(nchunks_);
    submitted_ = std::make_unique<std::atomic<bool>[]>(nchunks_);
    for (std::size_t c = 0; c < nchunks_; ++c) {
      remaining_[c] = (chunks_[c].len + piece_ - 1) / piece_;
      submitted_[c] = false;
    }
    tickets_.assign(nchunks_, Ticket{});
    for (std::size_t b = 0; b < nbuf_; ++b) prior_.push_back(staging_.last_use(static_cast<int>(b)));
  }

  /// Device to host: starts the lane copies of the first chunks, one per buffer.
  void prime() {
    if (h2d_) return;
    for (std::size_t c = 0; c < std::min(nbuf_, nchunks_); ++c) {
      lanes_.wait(prior_[c]);  // an earlier copy may still read or write this buffer
      submit(c);
    }
  }

  /// The loop every thread runs: take the next piece, wait for its buffer, copy it.
  void work(StagedCounters& counters) {
    std::uint64_t copy_ns = 0, wait_ns = 0;
    try {
      while (!abort_.load(std::memory_order_relaxed)) {
        const std::size_t p = next_.fetch_add(1, std::memory_order_relaxed);
        if (p >= npieces_) break;
        const Piece pc = piece_at(p);
        const std::size_t c = pc.chunk;
        const DevPtr buf = staging_.buffer(static_cast<int>(c % nbuf_)) + pc.offset;
        const DevPtr host = chunks_[c].host + pc.offset;
        auto t0 = Clock::now();
        if (!(h2d_ ? wait_buffer_free(c) : wait_chunk_landed(c))) break;
        auto t1 = Clock::now();
        wait_ns += static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
        if (h2d_) {
          std::memcpy(reinterpret_cast<void*>(buf), reinterpret_cast<const void*>(host), pc.len);
        } else {
          std::memcpy(reinterpret_cast<void*>(host), reinterpret_cast<const void*>(buf), pc.len);
        }
        copy_ns += ns_since(t1);
        if (remaining_[c].fetch_sub(1, std::memory_order_acq_rel) == 1) {
          // This thread finished chunk c: H2D sends it; D2H reuses its buffer for chunk c + B.
          if (h2d_) {
            submit(c);
          } else if (c + nbuf_ < nchunks_) {
            submit(c + nbuf_);
          }
        }
      }
    } catch (...) {
      fail();
      counters.cpu_copy_ns += copy_ns;
      counters.wait_ns += wait_ns;
      throw;
    }
    counters.cpu_copy_ns += copy_ns;
    counters.wait_ns += wait_ns;
  }

  /// Records in the staging buffers the last submitted lane copy of each (also after an error).
  void publish_last_uses() {
    for (std::size_t c = 0; c < nchunks_; ++c) {
      if (submitted_[c].load(std::memory_order_acquire)) staging_.last_use(static_cast<int>(c % nbuf_)) = tickets_[c];
    }
  }

  /// Stops every thread at its next piece or wait.
  void fail() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      abort_ = true;
    }
    cv_.notify_all();
  }

  std::size_t chunks() const { return nchunks_; }

 private:
  Piece piece_at(std::size_t p) const {
    const auto after = std::upper_bound(first_piece_.begin(), first_piece_.end(), p);
    const auto c = static_cast<std::size_t>(after - first_piece_.begin()) - 1;
    const std::size_t off = (p - first_piece_[c]) * piece_;
    return Piece{c, off, std::min(piece_, chunks_[c].len - off)};
  }

  /// Starts chunk c's lane copy (between its buffer and the device) and tells the waiting threads.
  void submit(std::size_t c) {
    const DevPtr buf = staging_.buffer(static_cast<int>(c % nbuf_));
    const Chunk& ch = chunks_[c];
    const int lane = static_cast<int>(c % static_cast<std::size_t>(nlanes_));
    const Ticket t = h2d_ ? lanes_.submit(lane, ch.device, buf, ch.len) : lanes_.submit(lane, buf, ch.device, ch.len);
    {
      std::lock_guard<std::mutex> lock(mu_);
      tickets_[c] = t;
      submitted_[c].store(true, std::memory_order_release);
    }
    cv_.notify_all();
  }

  /// Waits until chunk c's lane copy is submitted; false if the job failed meanwhile.
  bool wait_submitted(std::size_t c) {
    if (submitted_[c].load(std::memory_order_acquire)) return true;
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return submitted_[c].load(std::memory_order_acquire) || abort_.load(); });
    return submitted_[c].load(std::memory_order_acquire);
  }

  /// H2D: chunk c's buffer is free once the lane copy of its previous chunk (c - B, or an earlier
  /// copy's last use) has finished reading it.
  bool wait_buffer_free(std::size_t c) {
    if (c < nbuf_) {
      lanes_.wait(prior_[c]);
      return true;
    }
    if (!wait_submitted(c - nbuf_)) return false;
    lanes_.wait(tickets_[c - nbuf_]);
    return true;
  }

  /// D2H: chunk c's bytes are in its buffer once its lane copy has finished.
  bool wait_chunk_landed(std::size_t c) {
    if (!wait_submitted(c)) return false;
    lanes_.wait(tickets_[c]);
    return true;
  }

  const bool h2d_;
  StagingBuffers& staging_;
  CopyLanes& lanes_;
  const std::size_t chunk_, piece_, nbuf_;
  const int nlanes_;
  std::vector<Chunk> chunks_;             // every extent's chunks, in order
  std::vector<std::size_t> first_piece_;  // index of each chunk's first piece
  std::size_t nchunks_ = 0, npieces_ = 0;
  std::vector<Ticket> prior_;  // each buffer's last use before this copy
  std::unique_ptr<std::atomic<std::size_t>[]> remaining_;  // pieces of each chunk not yet copied
  std::unique_ptr<std::atomic<bool>[]> submitted_;         // chunk's lane copy submitted
  std::vector<Ticket> tickets_;                            // written before submitted_ is set
  std::atomic<std::size_t> next_{0};
  std::atomic<bool> abort_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace

void run_staged(StagedDirection dir, const std::vector<StagedExtent>& extents, StagingBuffers& staging,
                CopyLanes& lanes, WorkerPool& pool, const StagedParams& params, StagedCounters& counters) {
  if (params.lanes < 1 || params.lanes > lanes.count()) {
    throw InvalidArgumentError("staged copy: lanes=" + std::to_string(params.lanes) + " but the engine has " +
                               std::to_string(lanes.count()));
  }
  StagedJob job(dir, extents, staging, lanes, params);
  if (job.chunks() == 0) return;
  try {
    job.prime();
    pool.run([&](int) { job.work(counters); });
  } catch (...) {
    job.fail();
    job.publish_last_uses();
    throw;
  }
  job.publish_last_uses();
  counters.chunks += job.chunks();
}

}  // namespace glake::multipath
