// Per-call latency of the driver's VMM primitives, measured in C++ (no Python in the timed region).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "driver/driver.h"

namespace glake::bench {

/// Times create, map, first set_access, repeated set_access, unmap and release for `n` chunks of
/// one granularity each, mapped side by side into one reservation. Returns microseconds per call,
/// by operation name.
std::map<std::string, std::vector<double>> measure_vmm_latency(Driver& driver, int device, int n);

}  // namespace glake::bench
