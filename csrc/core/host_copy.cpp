// HostBuffer: anonymous host memory for suspended device data.
#include "core/host_copy.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "common/error.h"

namespace glake {

HostBuffer::HostBuffer(std::size_t size) : size_(size) {
  p_ = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p_ == MAP_FAILED) {
    p_ = nullptr;
    throw OutOfMemoryError("suspend: cannot get " + std::to_string(size) + " bytes of host memory for the device's data (" +
                           std::strerror(errno) + ")");
  }
#ifdef MADV_HUGEPAGE
  madvise(p_, size, MADV_HUGEPAGE);  // a hint: refused (no THP) changes nothing but the fault count
#endif
}

HostBuffer::~HostBuffer() {
  if (p_) munmap(p_, size_);
}

}  // namespace glake
