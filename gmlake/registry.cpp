#include "gmlake/registry.h"

#include "common/conf.h"

#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

namespace glake::gmlake {

namespace {

struct Registry {
  std::mutex mutex;
  bool configured = false;
  AllocatorConfig config;
  std::vector<std::atomic<StitchAllocator*>> allocators;  // never destroyed: memory outlives statics

  Registry() : allocators(kMaxDevices) {}

  void load_env_locked() {
    if (configured) return;
    config = AllocatorConfig::from_env();  // throws on a bad $GLAKE_ALLOC_CONF, every time it is tried
    configured = true;
  }
};

Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

}  // namespace

AllocatorConfig global_config() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.load_env_locked();
  return r.config;
}

void configure_global(const std::string& conf) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.load_env_locked();
  for (auto& a : r.allocators) {
    if (a.load()) {
      throw InvalidArgumentError("the global glake allocator is already in use; configure it before the first allocation");
    }
  }
  r.config.apply(conf, conf::kKeyword);  // all or nothing; glake.torch.install(**conf) calls this
}

int device_slots() { return get_driver().device_count(); }

StitchAllocator* existing_device_allocator(int device) {
  Registry& r = registry();
  if (device < 0 || device >= static_cast<int>(r.allocators.size())) return nullptr;
  return r.allocators[device].load(std::memory_order_acquire);
}

StitchAllocator& device_allocator(int device) {
  if (StitchAllocator* a = existing_device_allocator(device)) return *a;
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.load_env_locked();
  Driver& driver = get_driver();
  if (device < 0 || device >= driver.device_count() || device >= static_cast<int>(r.allocators.size())) {
    throw InvalidArgumentError("glake allocator: device " + std::to_string(device) + " does not exist");
  }
  if (StitchAllocator* a = r.allocators[device].load()) return *a;
  auto* a = new StitchAllocator(driver, device, r.config);
  r.allocators[device].store(a, std::memory_order_release);
  return *a;
}

}  // namespace glake::gmlake
