// Helpers of the out-of-memory report shared by the allocator's files (not part of the API).
#pragma once

#include <cstddef>
#include <string>

namespace glake::gmlake {

/// "1.50 GiB" or "14.00 MiB": readable at any size.
std::string gib(std::size_t bytes);

}  // namespace glake::gmlake
