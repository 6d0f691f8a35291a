// Stress of the stitched caching allocator on the host backend, built with -fsanitize=thread or
// address,undefined by test_gmlake_sanitizers.py. Under a reserved-bytes limit small enough that
// requests stitch, hit OOM and retry after emptying the cache:
//  - workers malloc and free mixed small and large sizes on two streams, each block carrying a
//    canary (a word per stride, from a per-allocation seed) checked before it is freed; some blocks
//    are recorded on the other stream (deferred frees), some are freed by another worker;
//  - a reader empties the cache and checks stats() and snapshot() invariants meanwhile;
//  - a "capturer" routes one stream's allocations to private pools (begin/end/release in a loop),
//    so blocks move between pools and the cache while the workers free them;
//  - at the end everything is freed and the cache emptied: no allocator or driver state may remain;
//  - a second allocator is destroyed with live, stitched and pending blocks (its destructor frees all);
//  - a ChunkPool is shared by threads while another lowers and raises its limit.
// Prints "mismatches=0 errors=0 ooms=N allocs=M ..." and exits nonzero on any failure.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/chunk_pool.h"
#include "core/virtual_range.h"
#include "gmlake/registry.h"

using namespace glake;
using namespace glake::gmlake;

namespace {

constexpr std::size_t MiB = 1u << 20;
constexpr std::size_t kLimit = 64 * MiB;
constexpr int kWorkers = 4;
constexpr int kOpsPerWorker = 1200;
constexpr std::size_t kMaxLive = 4;  // per worker

std::atomic<int> mismatches{0}, errors{0}, ooms{0}, allocs{0}, pool_ooms{0};
std::atomic<std::uint64_t> next_seed{1};

void fail(const std::string& what) {
  if (errors.fetch_add(1) < 20) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

// ---- canaries ----------------------------------------------------------------------------------

std::uint64_t word(std::uint64_t seed, std::size_t off) {
  return (seed * 0x9E3779B97F4A7C15ull) ^ (off * 0xC2B2AE3D27D4EB4Full) ^ (off >> 7);
}

/// Canary offsets of an n-byte block: a word every stride bytes, and the last word.
template <typename F>
void each_slot(std::size_t n, F f) {
  // Small blocks start at multiples of 512, so two that overlap share a 256-byte slot; large ones
  // start and split at chunk boundaries, so two that overlap share a 64 KiB slot (a sparse stride
  // keeps TSan's shadow page faults few).
  const std::size_t stride = n <= MiB ? 256 : 64 << 10;
  if (n < 8) return f(0);
  std::size_t off = 0;
  for (; off + 8 <= n; off += stride) f(off);
  if (off - stride + 16 <= n) f(n - 8);  // the last word, where it does not overlap the last slot
}

void fill(DevPtr p, std::size_t n, std::uint64_t seed) {
  each_slot(n, [&](std::size_t off) {
    const std::uint64_t w = word(seed, off);
    std::memcpy(reinterpret_cast<void*>(p + off), &w, n >= 8 ? 8 : n);
  });
}

bool check(DevPtr p, std::size_t n, std::uint64_t seed) {
  bool ok = true;
  each_slot(n, [&](std::size_t off) {
    std::uint64_t want = word(seed, off), got = 0;
    std::memcpy(&got, reinterpret_cast<const void*>(p + off), n >= 8 ? 8 : n);
    if (n < 8) want &= (1ull << (8 * n)) - 1, got &= (1ull << (8 * n)) - 1;
    if (got != want && ok) {
      ok = false;
      if (mismatches.load() < 10) {
        std::fprintf(stderr, "canary mismatch: block %#zx of %zu bytes, offset %zu: %#llx != %#llx\n",
                     static_cast<std::size_t>(p), n, off, static_cast<unsigned long long>(got),
                     static_cast<unsigned long long>(want));
      }
    }
  });
  return ok;
}

// ---- the shared allocator ----------------------------------------------------------------------

struct Live {
  DevPtr ptr;
  std::size_t size;
  std::uint64_t seed;
};

struct Mailbox {  // blocks one worker hands to another to free
  std::mutex mutex;
  std::vector<Live> items;
};

void release(StitchAllocator& a, const Live& l) {
  if (!check(l.ptr, l.size, l.seed)) mismatches++;
  const auto owner = a.allocation_of(l.ptr + l.size - 1);
  if (owner.first != l.ptr || owner.second != l.size) fail("allocation_of disagrees for " + hex(l.ptr));
  a.free(l.ptr);
}

void worker(int id, const StreamHandle* streams, Mailbox& box, std::vector<Live>& left) {
  std::mt19937_64 rng(1000 + static_cast<unsigned>(id));
  StitchAllocator& a = device_allocator(0);  // first use from several threads at once
  std::vector<Live> mine;
  auto pick = [&](std::size_t n) { return static_cast<std::size_t>(rng() % n); };
  try {
    for (int op = 0; op < kOpsPerWorker; ++op) {
      const int r = static_cast<int>(rng() % 100);
      if (r < 50 && mine.size() < kMaxLive) {
        const bool large = rng() % 5 < 2;
        const std::size_t size = large ? 2 * MiB + pick(22 * MiB) + 1 : pick(MiB - 1) + 1;
        const int s = static_cast<int>(rng() % 2);
        DevPtr p = 0;
        try {
          p = a.malloc(size, streams[s]);
        } catch (const OutOfMemoryError&) {
          ooms++;
          continue;
        }
        allocs++;
        const std::uint64_t seed = next_seed.fetch_add(1);
        fill(p, size, seed);
        if (rng() % 5 == 0) a.record_stream(p, streams[1 - s]);  // its free waits for the other stream
        mine.push_back({p, size, seed});
      } else if (r < 88 && !mine.empty()) {
        const std::size_t i = pick(mine.size());
        release(a, mine[i]);
        mine[i] = mine.back();
        mine.pop_back();
      } else if (r < 94 && !mine.empty()) {
        std::lock_guard<std::mutex> lock(box.mutex);
        box.items.push_back(mine.back());
        mine.pop_back();
      } else {
        Live l{};
        {
          std::lock_guard<std::mutex> lock(box.mutex);
          if (box.items.empty()) continue;
          l = box.items.back();
          box.items.pop_back();
        }
        release(a, l);  // allocated by another worker, maybe on the other stream
      }
    }
  } catch (const std::exception& e) {
    fail(std::string("worker ") + std::to_string(id) + ": " + e.what());
  }
  left = std::move(mine);
}

void check_stats(const AllocatorStats& s) {
  auto expect = [](bool ok, const char* what) {
    if (!ok) fail(std::string("stats: ") + what);
  };
  expect(s.reserved_bytes.current >= 0 && static_cast<std::size_t>(s.reserved_bytes.current) <= kLimit,
         "0 <= reserved <= limit");
  expect(s.reserved_small.current + s.reserved_large.current == s.reserved_bytes.current, "reserved = small + large");
  expect(s.allocated_small.current + s.allocated_large.current == s.allocated_bytes.current,
         "allocated = small + large");
  expect(s.allocated_bytes.current >= 0 && s.allocated_bytes.current <= s.reserved_bytes.current,
         "0 <= allocated <= reserved");
  expect(s.active_bytes.current >= s.allocated_bytes.current, "active >= allocated");
  expect(s.stitched_bytes.current >= 0 && s.stitched_bytes.current <= s.allocated_large.current,
         "0 <= stitched <= allocated large");
  expect(s.allocations.current >= 0, "allocations >= 0");
  expect(s.segments.current == s.num_segments_created - s.num_segments_released, "segments = created - released");
  expect(s.mapped_va_bytes.current == s.reserved_bytes.current + s.stitched_va_cached, "mapped VA = segments + stitched");
}

void check_snapshot(const std::vector<SegmentInfo>& snap) {
  for (const SegmentInfo& seg : snap) {
    if (std::strcmp(seg.kind, "stitched") == 0) {
      if (seg.blocks.size() != 1 || seg.blocks[0].ptr != seg.ptr || seg.blocks[0].size > seg.size) {
        fail("snapshot: a stitched range is not one block at its start");
      }
      continue;
    }
    DevPtr at = seg.ptr;
    for (const BlockInfo& b : seg.blocks) {
      if (b.ptr != at || b.size == 0) fail("snapshot: blocks do not tile segment " + hex(seg.ptr));
      at = b.ptr + b.size;
    }
    if (at != seg.ptr + seg.size) fail("snapshot: blocks do not cover segment " + hex(seg.ptr));
  }
}

void reader(Driver& d, std::atomic<bool>& done, int& rounds) {
  try {
    StitchAllocator* a = nullptr;
    while (!(a = existing_device_allocator(0)) && !done.load()) std::this_thread::yield();
    while (a && !done.load()) {
      a->empty_cache();
      check_stats(a->stats());
      check_snapshot(a->snapshot());
      // Every chunk alive now belongs to this allocator: whatever maps them, they count against the limit.
      if (static_cast<std::size_t>(d.stats().snapshot().physical_bytes) > kLimit) fail("physical bytes above the limit");
      if (++rounds % 8 == 0) a->reset_peak_stats();
      std::this_thread::sleep_for(std::chrono::microseconds(300));
    }
  } catch (const std::exception& e) {
    fail(std::string("reader: ") + e.what());
  }
}

void capturer(StreamHandle stream, std::atomic<bool>& done, int& cycles) {
  try {
    StitchAllocator* a = nullptr;
    while (!(a = existing_device_allocator(0)) && !done.load()) std::this_thread::yield();
    while (a && !done.load()) {
      const PoolId id{7, static_cast<std::uint64_t>(cycles % 3) + 1};
      a->begin_allocate_to_pool(id, [stream](StreamHandle s) { return s == stream; });
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      if (a->pool_use_count(id) < 1) fail("a pool being allocated to has no use count");
      a->end_allocate_to_pool(id);
      a->release_pool(id);
      ++cycles;
      // Pending record_stream frees are processed only while no pool is allocated to: without a
      // gap they pile up until every worker's malloc fails (and the stress stops stitching).
      std::this_thread::sleep_for(std::chrono::microseconds(600));
    }
  } catch (const std::exception& e) {
    fail(std::string("capturer: ") + e.what());
  }
}

bool same_driver_state(const DriverStatsSnapshot& x, const DriverStatsSnapshot& y, const char* when) {
  const bool ok = x.chunks_live == y.chunks_live && x.physical_bytes == y.physical_bytes &&
                  x.ranges_live == y.ranges_live && x.reserved_va_bytes == y.reserved_va_bytes &&
                  x.mapped_bytes == y.mapped_bytes;
  if (!ok) {
    fail(std::string(when) + ": driver state left behind: chunks_live " + std::to_string(x.chunks_live) + " -> " +
         std::to_string(y.chunks_live) + ", ranges_live " + std::to_string(x.ranges_live) + " -> " +
         std::to_string(y.ranges_live) + ", mapped " + std::to_string(x.mapped_bytes) + " -> " +
         std::to_string(y.mapped_bytes) + ", physical " + std::to_string(x.physical_bytes) + " -> " +
         std::to_string(y.physical_bytes) + ", reserved VA " + std::to_string(x.reserved_va_bytes) + " -> " +
         std::to_string(y.reserved_va_bytes));
  }
  return ok;
}

// ---- phases ------------------------------------------------------------------------------------

AllocatorStats shared_allocator_phase(Driver& d) {
  // 4 MiB chunks: segments of several chunks (block edges inside chunks) that still stitch often.
  configure_global("limit_bytes:64MiB,stitch_va_limit:48MiB,stitch_min_bytes:4MiB,chunk_bytes:4MiB");
  const StreamHandle streams[2] = {d.stream_create(0), d.stream_create(0)};
  Mailbox box;
  std::vector<std::vector<Live>> left(kWorkers);
  std::atomic<bool> done{false};
  int rounds = 0, cycles = 0;
  std::thread r(reader, std::ref(d), std::ref(done), std::ref(rounds));
  std::thread c(capturer, streams[0], std::ref(done), std::ref(cycles));
  std::vector<std::thread> ts;
  for (int i = 0; i < kWorkers; ++i) ts.emplace_back(worker, i, streams, std::ref(box), std::ref(left[i]));
  for (auto& t : ts) t.join();
  done = true;
  r.join();
  c.join();

  StitchAllocator& a = device_allocator(0);
  try {
    for (auto& mine : left) {
      for (const Live& l : mine) release(a, l);
    }
    for (const Live& l : box.items) release(a, l);
    a.empty_cache();  // also returns the released pools' memory
    if (a.stats().private_pools != 0) fail("private pools remain after their release");
  } catch (const std::exception& e) {
    fail(std::string("final frees: ") + e.what());
  }
  const AllocatorStats s = a.stats();
  check_stats(s);
  if (s.allocations.current != 0 || s.allocated_bytes.current != 0 || s.active_bytes.current != 0 ||
      s.requested_bytes.current != 0 || s.stitched_bytes.current != 0) {
    fail("allocations remain after freeing everything");
  }
  if (s.reserved_bytes.current != 0 || s.segments.current != 0 || s.num_segments_created != s.num_segments_released ||
      s.mapped_va_bytes.current != 0 || s.stitched_va_cached != 0 || !a.snapshot().empty()) {
    fail("the emptied cache still holds segments or stitched ranges");
  }
  if (s.num_allocs != allocs.load() || s.num_frees != allocs.load()) fail("num_allocs/num_frees disagree with the workers");
  if (s.num_ooms != ooms.load()) fail("num_ooms disagrees with the OOMs the workers caught");
  std::printf("reader_rounds=%d pool_cycles=%d ", rounds, cycles);
  return s;
}

void destructor_phase(Driver& d) {
  // Destroyed with live blocks, an active and a held stitch, and a pending (recorded) free.
  AllocatorConfig c;
  c.limit_bytes = 32 * MiB;
  auto a = std::make_unique<StitchAllocator>(d, 0, c);
  std::vector<DevPtr> ps;
  for (int i = 0; i < 4; ++i) ps.push_back(a->malloc(4 * MiB, 1));
  a->free(ps[0]);
  a->free(ps[2]);
  const DevPtr stitched = a->malloc(8 * MiB, 1);  // two free 4 MiB blocks, not adjacent
  fill(stitched, 8 * MiB, 7);
  if (!check(stitched, 8 * MiB, 7)) mismatches++;
  a->free(stitched);                                // held
  const DevPtr again = a->malloc(6 * MiB, 1);       // takes the held stitch
  const DevPtr small = a->malloc(1000, 2);
  a->record_stream(ps[1], 2);
  a->free(ps[1]);                                   // pending until the next malloc or empty_cache
  if (a->stats().num_stitches < 1) fail("destructor phase: no stitch was made");
  (void)again;
  (void)small;
  a.reset();
}

void chunk_pool_phase(Driver& d) {
  const std::size_t g = d.granularity(0);
  auto pool = ChunkPool::create(d, 0, 12 * g);
  std::atomic<bool> done{false};
  std::vector<std::thread> ts;
  for (int t = 0; t < 3; ++t) {
    ts.emplace_back([&, t] {
      std::mt19937 rng(77 + t);
      try {
        for (int i = 0; i < 40; ++i) {
          std::vector<std::shared_ptr<PhysChunk>> cs;
          try {
            cs = pool->acquire_many(1 + rng() % 3);
          } catch (const OutOfMemoryError&) {
            pool_ooms++;
            continue;
          }
          VirtualRange range(d, 0, cs.size() * g);
          range.map_many(0, cs);
          const std::uint64_t seed = next_seed.fetch_add(1);
          fill(range.ptr(), range.size(), seed);
          if (!check(range.ptr(), range.size(), seed)) mismatches++;
        }  // range and chunks go: the chunks return to the pool (or are released over the limit)
      } catch (const std::exception& e) {
        fail(std::string("chunk pool user: ") + e.what());
      }
    });
  }
  std::thread limiter([&] {
    try {
      for (int i = 0; !done.load(); ++i) {
        pool->set_limit((i % 2 ? 12 : 4) * g);
        const ChunkPoolStats s = pool->stats();
        if (s.created < s.released || s.created - s.released != s.in_use_chunks + s.cached_chunks) {
          fail("chunk pool: created - released != in use + cached");
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    } catch (const std::exception& e) {
      fail(std::string("chunk pool limiter: ") + e.what());
    }
  });
  for (auto& t : ts) t.join();
  done = true;
  limiter.join();
  pool->trim(0);
  const ChunkPoolStats s = pool->stats();
  if (s.in_use_chunks != 0 || s.cached_chunks != 0 || s.created != s.released) {
    fail("chunk pool: chunks remain after trim(0): created " + std::to_string(s.created) + ", released " +
         std::to_string(s.released) + ", in use " + std::to_string(s.in_use_chunks));
  }
}

}  // namespace

int main() {
  Driver& d = get_driver(std::string("host"));
  const DriverStatsSnapshot before = d.stats().snapshot();
  const AllocatorStats s = shared_allocator_phase(d);
  same_driver_state(before, d.stats().snapshot(), "shared allocator");
  if (s.num_stitches == 0 || s.num_alloc_retries == 0 || s.num_cross_stream_reuses == 0) {
    fail("the stress did not reach stitching, OOM retries and cross-stream reuse");  // the test lost its point
  }
  destructor_phase(d);
  same_driver_state(before, d.stats().snapshot(), "destroyed allocator");
  chunk_pool_phase(d);
  same_driver_state(before, d.stats().snapshot(), "chunk pool");
  std::printf("mismatches=%d errors=%d ooms=%d allocs=%d stitches=%lld stitch_reuses=%lld stitch_gc=%lld "
              "retries=%lld cross_stream=%lld segments=%lld pool_ooms=%d\n",
              mismatches.load(), errors.load(), ooms.load(), allocs.load(), static_cast<long long>(s.num_stitches),
              static_cast<long long>(s.num_stitch_reuses), static_cast<long long>(s.num_stitch_gc),
              static_cast<long long>(s.num_alloc_retries), static_cast<long long>(s.num_cross_stream_reuses),
              static_cast<long long>(s.num_segments_created), pool_ooms.load());
  return mismatches.load() == 0 && errors.load() == 0 ? 0 : 1;
}
