// The HostCopier of the bindings that suspend (gmlake's allocator, kvcache's manager): their copies go
// through a multipath engine when Python passes one.
#pragma once

#include <memory>

#include "core/host_copy.h"
#include "python/engine_handle.h"

namespace glake::py_bind {

/// suspend()'s and resume()'s copies through a multipath engine: pageable host memory staged through
/// pinned buffers by several threads, a whole batch in one pipeline, instead of the driver's one
/// synchronous memcpy at a time.
class EngineCopier final : public HostCopier {
 public:
  explicit EngineCopier(std::shared_ptr<multipath::CopyEngine> e) : e_(std::move(e)) {}
  void to_host(const std::vector<HostCopy>& items) override {
    e_->copy_many(batch(items), multipath::MemKind::Pageable, multipath::MemKind::Device, 0, false);
  }
  void to_device(const std::vector<HostCopy>& items) override {
    e_->copy_many(batch(items), multipath::MemKind::Device, multipath::MemKind::Pageable, 0, false);
  }

 private:
  static std::vector<multipath::CopyItem> batch(const std::vector<HostCopy>& items) {
    std::vector<multipath::CopyItem> out;
    out.reserve(items.size());
    for (const HostCopy& c : items) out.push_back(multipath::CopyItem{c.dst, c.src, c.n});
    return out;
  }
  std::shared_ptr<multipath::CopyEngine> e_;
};

/// The copier for an optional engine argument (null: the caller's default, the driver's memcpy).
inline std::unique_ptr<EngineCopier> copier_of(const PyEngine* engine) {
  return engine ? std::make_unique<EngineCopier>(engine->get()) : nullptr;
}

}  // namespace glake::py_bind
