#include "bench/vmm_bench.h"

#include <chrono>

namespace glake::bench {

namespace {

template <typename F>
double time_us(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

std::map<std::string, std::vector<double>> measure_vmm_latency(Driver& driver, int device, int n) {
  if (n <= 0) throw InvalidArgumentError("measure_vmm_latency: n=" + std::to_string(n) + " must be positive");
  const std::size_t g = driver.granularity(device);
  std::map<std::string, std::vector<double>> us;
  std::vector<PhysHandle> handles(n);
  const DevPtr base = driver.reserve(device, g * n);
  try {
    for (int i = 0; i < n; ++i) us["create"].push_back(time_us([&] { handles[i] = driver.create(device, g); }));
    for (int i = 0; i < n; ++i) us["map"].push_back(time_us([&] { driver.map(device, base + i * g, g, handles[i]); }));
    for (int i = 0; i < n; ++i) us["set_access"].push_back(time_us([&] { driver.set_access(device, base + i * g, g); }));
    for (int i = 0; i < n; ++i) us["set_access_again"].push_back(time_us([&] { driver.set_access(device, base + i * g, g); }));
    for (int i = 0; i < n; ++i) us["unmap"].push_back(time_us([&] { driver.unmap(device, base + i * g, g); }));
    for (int i = 0; i < n; ++i) us["release"].push_back(time_us([&] { driver.release(device, handles[i], g); }));
  } catch (...) {
    driver.free_va(device, base, g * n);  // best effort; a failed run is reported by the caller
    throw;
  }
  driver.free_va(device, base, g * n);
  return us;
}

}  // namespace glake::bench
