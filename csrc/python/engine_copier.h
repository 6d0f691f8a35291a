// The HostCopier of the bindings that suspend (gmlake's allocator, kvcache's manager): their copies go
// through a multipath engine when Python passes one.
#pragma once

#include <memory>

#include "core/host_copy.h"
#include "python/engine_handle.h"

namespace glake::py_bind {

/// suspend()'s and resume()'s copies through a multipath engine: pageable host memory staged through
/// pinned buffers by several threads, a whole batch in one pipeline, instead of the driver's one
/// synchronous memcpy at a time; page-locked host memory (prepared buffers) DMA'd directly.
class EngineCopier final : public HostCopier {
 public:
  explicit EngineCopier(std::shared_ptr<multipath::CopyEngine> e) : e_(std::move(e)) {}
  void to_host(const std::vector<HostCopy>& items) override {
    for (bool pinned : {true, false}) {
      const auto b = batch(items, pinned);
      if (!b.empty()) e_->copy_many(b, host_kind(pinned), multipath::MemKind::Device, 0, false);
    }
  }
  void to_device(const std::vector<HostCopy>& items) override {
    for (bool pinned : {true, false}) {
      const auto b = batch(items, pinned);
      if (!b.empty()) e_->copy_many(b, multipath::MemKind::Device, host_kind(pinned), 0, false);
    }
  }

 private:
  static multipath::MemKind host_kind(bool pinned) {
    return pinned ? multipath::MemKind::Pinned : multipath::MemKind::Pageable;
  }
  static std::vector<multipath::CopyItem> batch(const std::vector<HostCopy>& items, bool pinned) {
    std::vector<multipath::CopyItem> out;
    for (const HostCopy& c : items) {
      if (c.pinned == pinned) out.push_back(multipath::CopyItem{c.dst, c.src, c.n});
    }
    return out;
  }
  std::shared_ptr<multipath::CopyEngine> e_;
};

/// The copier for an optional engine argument (null: the caller's default, the driver's memcpy).
inline std::unique_ptr<EngineCopier> copier_of(const PyEngine* engine) {
  return engine ? std::make_unique<EngineCopier>(engine->get()) : nullptr;
}

}  // namespace glake::py_bind
