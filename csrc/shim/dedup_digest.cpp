#include "shim/dedup_digest.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace glake::shim::dedup {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the digest reads words as the GPU does: little-endian");

std::string Digest::hex() const {
  char buf[33];
  std::snprintf(buf, sizeof(buf), "%016llx%016llx", static_cast<unsigned long long>(lane[0]),
                static_cast<unsigned long long>(lane[1]));
  return buf;
}

bool forced_collisions() {
  static const bool on = [] {
    const char* v = std::getenv("GLAKE_DEDUP_TEST_COLLIDE");
    return v && std::strcmp(v, "1") == 0;
  }();
  return on;
}

Digest host_digest(const void* data, std::size_t n) {
  Digest d;
  if (forced_collisions()) return d;
  const auto* bytes = static_cast<const unsigned char*>(data);
  std::uint64_t s0 = 0, s1 = 0;
  for (std::size_t i = 0; i < n / 8; ++i) {
    std::uint64_t x;
    std::memcpy(&x, bytes + 8 * i, 8);
    s0 += x * weight(i, 0);
    s1 += x * weight(i, 1);
  }
  d.lane[0] = s0;
  d.lane[1] = s1;
  return d;
}

}  // namespace glake::shim::dedup
