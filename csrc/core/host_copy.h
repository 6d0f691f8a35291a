// Where suspended bytes live and how they get there: host buffers and the copier interface, shared by
// every layer that suspends (gmlake's allocator, kvcache's manager).
#pragma once

#include <atomic>
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <thread>
#include <vector>

#include "driver/driver.h"

namespace glake {

/// One copy of a suspend's or resume's batch: `n` bytes from `src` to `dst`. `pinned`: the host side
/// is page-locked (HostBuffer::pin), so a copier may DMA straight into or out of it.
struct HostCopy {
  DevPtr dst, src;
  std::size_t n;
  bool pinned = false;
};

/// How suspend() and resume() move live data between the device and host memory: a whole batch per
/// call, so a copier can pipeline many runs (the copies must not overlap each other). Without one the
/// caller copies with the driver (DriverCopier); glake.suspend passes multipath's engine (pageable
/// copies staged through pinned buffers by several threads, every run of a batch in one pipeline).
class GLAKE_API HostCopier {
 public:
  virtual ~HostCopier() = default;
  /// Copies each item from device memory to host memory (pageable unless the item says pinned);
  /// returns when all have landed.
  virtual void to_host(const std::vector<HostCopy>& items) = 0;
  /// Copies each item from host memory (pageable unless the item says pinned) to device memory;
  /// returns when all have landed.
  virtual void to_device(const std::vector<HostCopy>& items) = 0;
};

/// The copier without a copy engine: the driver's synchronous memcpy, one call at a time.
class GLAKE_API DriverCopier final : public HostCopier {
 public:
  DriverCopier(Driver& driver, int device) : driver_(driver), device_(device) {}
  void to_host(const std::vector<HostCopy>& items) override { copy(items); }
  void to_device(const std::vector<HostCopy>& items) override { copy(items); }

 private:
  void copy(const std::vector<HostCopy>& items) {
    for (const HostCopy& c : items) driver_.memcpy(device_, c.dst, c.src, c.n);
  }
  Driver& driver_;
  int device_;
};

/// Copies a resume's batch to the device while a thread prepares its destinations, so that the copy
/// starts after a little of the device memory exists instead of all of it (creating and mapping
/// 80 GiB of 2 MiB chunks takes the driver 120-185 ms on an H200). `prepare(k)` for k in [0, steps),
/// in order and on that thread, makes some destination bytes usable (creates and maps chunks); items
/// (in copy order) whose destinations step k prepared have `needs[i]` = k + 1. The items go to
/// `io.to_device` in parts of growing size (64 MiB, then 4x each), each once the steps it needs are
/// done: mapping runs an order of magnitude faster than the copy, so only the first part waits. It
/// returns once every step is done, those no item needs included. When `prepare` or a copy throws,
/// no further step or copy starts, the thread is joined and the first exception rethrown; undoing
/// the steps done is the caller's (it knows what they made).
/// $GLAKE_RESUME_OVERLAP=0 (read at each call): every step first, on the calling thread, then the
/// items in one batch (the order before the overlap, kept to compare the two on a host).
GLAKE_API void copy_to_device_behind(HostCopier& io, const std::vector<HostCopy>& items,
                                     const std::vector<std::size_t>& needs, std::size_t steps,
                                     const std::function<void(std::size_t)>& prepare);

/// Host memory for suspended data, unmapped on destruction: anonymous, with transparent huge pages
/// asked for (faulted in by the copy that fills it, and ahead of it by a FaultAhead); or, when the bytes
/// would leave less than a tenth of RAM available (or exceed $GLAKE_SUSPEND_FILE_OVER bytes), a
/// shared mapping of an unnamed, preallocated file in $GLAKE_SUSPEND_DIR (default /var/tmp), so that
/// a suspend larger than RAM pages out to disk instead of failing. `pending`: bytes of other buffers
/// made for the same batch and not yet written (free RAM does not show them yet). Throws
/// OutOfMemoryError.
class GLAKE_API HostBuffer {
 public:
  explicit HostBuffer(std::size_t size, std::size_t pending = 0);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  /// First byte, as an address for the driver.
  DevPtr ptr() const { return reinterpret_cast<DevPtr>(p_); }
  std::size_t size() const { return size_; }
  /// True when a file backs the bytes.
  bool file_backed() const { return file_backed_; }
  /// Page-locks the bytes for `device`'s copies (Driver::host_register), so that they are DMA'd
  /// without staging; unregistered on destruction. Throws what the driver throws.
  void pin(Driver& driver, int device);
  /// True after pin().
  bool pinned() const { return pinned_by_ != nullptr; }

 private:
  void* p_ = nullptr;
  std::size_t size_ = 0;
  bool file_backed_ = false;
  Driver* pinned_by_ = nullptr;
  int pinned_device_ = 0;
};

using HostBufferPtr = std::unique_ptr<HostBuffer>;

/// Threads that fault fresh host buffers in while a copy fills them: the buffers' bytes in 32 MiB
/// blocks, taken in order (the order the batch copies them in) from a shared cursor, each faulted in
/// with MADV_POPULATE_WRITE, so that the copy finds its pages present instead of faulting and zeroing
/// them itself, page by page, inside its pipeline. Faulting a page in never changes bytes already
/// written, so the copy and these threads may touch the same pages in any order. Stops (and joins)
/// on destruction, which must come before the buffers are unmapped; once the copy has returned the
/// rest of its work is moot. No threads for fewer than two blocks, or when `threads` is 0; fewer when
/// the system has no more to give.
class GLAKE_API FaultAhead {
 public:
  FaultAhead(const std::vector<const HostBuffer*>& buffers, unsigned threads);
  ~FaultAhead();
  FaultAhead(const FaultAhead&) = delete;
  FaultAhead& operator=(const FaultAhead&) = delete;
  /// Waits until every block is faulted in (the threads run out of work), instead of stopping them.
  void finish();
  /// $GLAKE_SUSPEND_PREFAULT_THREADS, else 8 (capped at the hardware's threads).
  static unsigned threads_from_env();

 private:
  struct Block {
    char* p;
    std::size_t n;
  };
  void work();
  std::vector<Block> blocks_;
  std::atomic<std::size_t> next_{0};
  std::atomic<bool> stop_{false};
  std::vector<std::thread> pool_;
};

/// The host buffers of one suspending object (an allocator, a KV cache), which owns its reserve and
/// guards it with its own lock. suspend() asks it for one buffer per run to copy; resume() hands the
/// buffers back. With $GLAKE_SUSPEND_KEEP_HOST=1 (read at each give_back) they stay mapped, their
/// pages resident, and the next suspend takes those of exactly the sizes it needs, so that its
/// copies do not wait for the kernel to fault in and zero fresh memory page by page (H200 host:
/// 45.8 GB/s into kept memory against 7.8-15.7 GB/s into fresh). A suspend unmaps the kept buffers
/// it does not take before it makes any new one. The price is host RAM held while the object is
/// awake: as much as its last suspend took. File-backed buffers are never kept.
class GLAKE_API HostReserve {
 public:
  HostReserve() = default;
  ~HostReserve();
  HostReserve(const HostReserve&) = delete;
  HostReserve& operator=(const HostReserve&) = delete;
  /// What take() hands out: one buffer per size asked for, the bytes of them that were kept ones, and
  /// the threads faulting the new ones in (let it go once the copy into them has returned, and before
  /// the buffers: declare the buffers' owner first).
  struct Taken {
    std::vector<HostBufferPtr> buffers;
    std::size_t reused = 0;
    std::unique_ptr<FaultAhead> faulting;
  };
  /// One buffer per entry of `sizes`, in order: a kept one of exactly that size where there is one,
  /// else a new HostBuffer, the new anonymous ones faulted in ahead of the copy
  /// (FaultAhead::threads_from_env() threads). Kept buffers left over are unmapped first. Throws
  /// OutOfMemoryError (the buffers made so far are unmapped; the reserve is then empty).
  Taken take(const std::vector<std::size_t>& sizes);
  /// A resume's buffers, its data copied back: kept when $GLAKE_SUSPEND_KEEP_HOST=1 and the pinned
  /// ones always (unregistering is as slow as the copy; a prepared object stays prepared), else unmapped.
  void give_back(std::vector<HostBufferPtr> buffers);
  /// Host buffers for a suspend ahead of it, made without the owner's lock (it takes seconds for
  /// tens of GiB): one per size, anonymous (a size that would need a file is left out), faulted in by
  /// FaultAhead::threads_from_env() threads, then page-locked with `driver` for `device`. A suspend
  /// into them writes resident, pinned memory, DMA'd without staging, and so does its resume back.
  /// Throws OutOfMemoryError (nothing is left made).
  static std::vector<HostBufferPtr> make_ready(const std::vector<std::size_t>& sizes, Driver& driver, int device);
  /// Adds buffers (from make_ready) to the kept ones, for the next take().
  void add(std::vector<HostBufferPtr> buffers);
  /// The sizes of `sizes` that no kept buffer matches (each kept buffer matches one size).
  std::vector<std::size_t> missing(const std::vector<std::size_t>& sizes) const;
  /// Unmaps every kept buffer; returns the bytes given back.
  std::size_t drop();
  /// Bytes kept by this reserve.
  std::size_t bytes() const { return bytes_; }
  /// Bytes kept by every reserve of the process.
  static std::size_t process_bytes();

 private:
  void add_one(HostBufferPtr b);
  std::multimap<std::size_t, HostBufferPtr> kept_;
  std::size_t bytes_ = 0;
};

}  // namespace glake
