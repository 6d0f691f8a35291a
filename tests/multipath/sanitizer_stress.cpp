// Stress of the multipath engine on the host backend, built with -fsanitize=thread or
// address,undefined by test_multipath_sanitizers.py: concurrent copies from several threads on one
// engine (staged both ways, split pinned, non-blocking) and on a second engine, checked byte by byte.
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "multipath/engine.h"

using namespace glake;
using namespace glake::multipath;

namespace {

DevPtr p(std::vector<unsigned char>& v) { return reinterpret_cast<DevPtr>(v.data()); }

int run(CopyEngine& e, int seed, int iterations) {
  std::mt19937 rng(static_cast<unsigned>(seed));
  int bad = 0;
  for (int it = 0; it < iterations; ++it) {
    const std::size_t n = rng() % (1u << 20) + 1;
    std::vector<unsigned char> src(n), mid(n), back(n);
    for (auto& x : src) x = static_cast<unsigned char>(rng());
    const bool pinned_src = it % 4 == 3;
    const bool non_blocking = it % 2 == 1;
    e.copy(p(mid), MemKind::Device, p(src), pinned_src ? MemKind::Pinned : MemKind::Pageable, n, 0, non_blocking);
    // A non-blocking pageable source is reusable at return; a pinned one is not (it is read later).
    const bool cleared = non_blocking && !pinned_src;
    const std::vector<unsigned char> expect = src;
    if (cleared) std::memset(src.data(), 0, n);
    e.copy(p(back), it % 3 == 0 ? MemKind::Pinned : MemKind::Pageable, p(mid), MemKind::Device, n, 0, false);
    bad += std::memcmp(back.data(), expect.data(), n) != 0;
  }
  e.synchronize();
  return bad;
}

}  // namespace

int main() {
  Driver& d = get_driver(std::string("host"));
  EngineConfig c;
  c.chunk_bytes = 64 << 10;
  c.piece_bytes = 16 << 10;
  c.buffers = 2;
  c.threads = 4;
  c.streams = 2;
  c.small_copy_bytes = 0;
  c.pinned_streams = 3;
  c.pinned_split_min_bytes = 64 << 10;
  CopyEngine shared(d, 0, c);
  CopyEngine other(d, 0, c);
  std::vector<int> bad(5, 0);
  std::vector<std::thread> ts;
  for (int i = 0; i < 4; ++i) ts.emplace_back([&, i] { bad[i] = run(shared, i, 16); });
  ts.emplace_back([&] { bad[4] = run(other, 99, 16); });
  for (auto& t : ts) t.join();
  int total = 0;
  for (int b : bad) total += b;
  std::printf("mismatches=%d\n", total);
  return total == 0 ? 0 : 1;
}
