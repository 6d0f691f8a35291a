// glake error hierarchy: every failure the core reports is one of these.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#define GLAKE_API __attribute__((visibility("default")))

namespace glake {

/// Base of every error glake raises; maps to Python's glake.GlakeError.
class GLAKE_API Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what);
  ~Error() override;
};

/// Physical memory or a configured limit is exhausted (glake.OutOfMemoryError).
class GLAKE_API OutOfMemoryError : public Error {
 public:
  using Error::Error;
  ~OutOfMemoryError() override;
};

/// A caller passed something the operation cannot accept (glake.InvalidArgumentError).
class GLAKE_API InvalidArgumentError : public Error {
 public:
  using Error::Error;
  ~InvalidArgumentError() override;
};

/// The requested backend cannot be used on this machine (glake.BackendUnavailableError).
class GLAKE_API BackendUnavailableError : public Error {
 public:
  using Error::Error;
  ~BackendUnavailableError() override;
};

/// Formats an address as 0x-prefixed hex.
std::string hex(std::uintptr_t value);

/// Formats a byte count as "N (x.y MiB)" for error messages.
std::string bytes_str(std::size_t bytes);

}  // namespace glake
