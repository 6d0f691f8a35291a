#include "common/error.h"

#include <cstdio>

namespace glake {

Error::Error(const std::string& what) : std::runtime_error(what) {}
Error::~Error() = default;
OutOfMemoryError::~OutOfMemoryError() = default;
InvalidArgumentError::~InvalidArgumentError() = default;
BackendUnavailableError::~BackendUnavailableError() = default;

std::string hex(std::uintptr_t value) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(value));
  return buf;
}

std::string bytes_str(std::size_t bytes) {
  char buf[64];
  const double mib = static_cast<double>(bytes) / (1024.0 * 1024.0);
  if (mib >= 1024.0) {
    std::snprintf(buf, sizeof(buf), "%zu (%.2f GiB)", bytes, mib / 1024.0);
  } else {
    std::snprintf(buf, sizeof(buf), "%zu (%.2f MiB)", bytes, mib);
  }
  return buf;
}

}  // namespace glake
