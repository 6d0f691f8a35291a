#include "shim/control.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "common/error.h"
#include "core/host_copy.h"
#include "gmlake/registry.h"
#include "shim/dedup_share.h"
#include "shim/shim_state.h"
#include "shim/stats_page.h"

namespace glake::shim {

namespace {

void answer(ControlBlock* b, std::uint64_t seq, ControlStatus status, std::uint64_t mask, const std::string& message) {
  std::int64_t host_bytes = 0;
  for (std::uint32_t d = 0; d < kPageDevices; ++d) {
    if (const gmlake::StitchAllocator* a = gmlake::existing_device_allocator(static_cast<int>(d))) {
      host_bytes += a->stats().suspended_host_bytes;
    }
  }
  b->status = static_cast<std::int32_t>(status);
  b->device_mask = mask;
  b->host_bytes = host_bytes;
  std::memset(b->message, 0, sizeof(b->message));
  std::memcpy(b->message, message.data(), std::min(sizeof(b->message) - 1, message.size()));
  __atomic_store_n(&b->done_seq, seq, __ATOMIC_RELEASE);
}

}  // namespace

bool serve_control(ControlBlock* b) {
  const std::uint64_t seq = __atomic_load_n(&b->request_seq, __ATOMIC_ACQUIRE);
  if (seq == __atomic_load_n(&b->done_seq, __ATOMIC_RELAXED)) return false;
  const auto op = static_cast<ControlOp>(b->op);
  const int device = b->device;
  if (op != ControlOp::Suspend && op != ControlOp::Resume) {
    answer(b, seq, ControlStatus::Failed, 0, "unknown control op " + std::to_string(b->op));
    return true;
  }
  std::uint64_t mask = 0;
  const auto no_share = dedup::exclusive();  // not while glake_shim_dedup_share reads the chunks
  GlakeScope scope;  // glake's own driver calls go to the real driver
  try {
    for (std::uint32_t d = 0; d < kPageDevices; ++d) {
      if (device >= 0 && static_cast<int>(d) != device) continue;
      gmlake::StitchAllocator* a = gmlake::existing_device_allocator(static_cast<int>(d));
      if (!a || a->suspended() == (op == ControlOp::Suspend)) continue;
      // No multipath engine in a shim process: the driver's memcpy moves the data (HostCopier default).
      if (op == ControlOp::Suspend) {
        a->suspend();
      } else {
        a->resume();
      }
      mask |= std::uint64_t{1} << d;
    }
  } catch (const OutOfMemoryError& e) {
    answer(b, seq, ControlStatus::OutOfMemory, mask, e.what());
    return true;
  } catch (const std::exception& e) {
    answer(b, seq, ControlStatus::Failed, mask, e.what());
    return true;
  }
  answer(b, seq, ControlStatus::Ok, mask, "");
  return true;
}

}  // namespace glake::shim
