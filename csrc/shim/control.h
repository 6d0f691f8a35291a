// The control block of the shim's stats page: how `glake suspend PID` / `glake resume PID` reach a
// process that has no Python (and so no gRPC control socket).
//
// It sits at kControlOffset of the page file (<runtime dir>/<pid>.shim, 0600 in a 0700 directory of
// this user: only the same user can open it). A requester (glake/stats/shim_page.py) takes an flock on
// the file, writes `op` and `device`, then bumps `request_seq`; the page's publisher thread sees
// request_seq != done_seq within 50 ms, carries the request out with glake's process-wide allocators,
// writes the answer, then sets done_seq = request_seq.
#pragma once

#include <cstddef>
#include <cstdint>

namespace glake::shim {

inline constexpr std::uint32_t kControlOffset = 3072;  ///< inside the page's first 4 KiB, after PageHeader

enum class ControlOp : std::int32_t { Suspend = 1, Resume = 2 };
enum class ControlStatus : std::int32_t { Ok = 0, Failed = 1, OutOfMemory = 2 };

/// Little-endian, read and written by glake/stats/shim_page.py at these offsets.
struct ControlBlock {
  std::uint64_t request_seq;  ///< bumped by the requester, last
  std::int32_t op;            ///< a ControlOp
  std::int32_t device;        ///< -1: every device
  std::uint64_t done_seq;     ///< = request_seq once answered, written last
  std::int32_t status;        ///< a ControlStatus
  std::int32_t reserved;
  std::uint64_t device_mask;  ///< bit d: device d was suspended / resumed by this request
  std::int64_t host_bytes;    ///< live data now held in host memory, every device
  char message[256];          ///< why it failed
};
static_assert(offsetof(ControlBlock, done_seq) == 16 && offsetof(ControlBlock, message) == 48,
              "ControlBlock layout is read by glake/stats/shim_page.py");

/// Answers a pending request in `block`, if any (called by the publisher thread); true when it did.
bool serve_control(ControlBlock* block);

}  // namespace glake::shim
