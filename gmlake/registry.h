// The process-wide allocators, one per device, shared by every frontend (torch, CuPy, Python, shim).
#pragma once

#include <optional>

#include "gmlake/stitch_allocator.h"

namespace glake::gmlake {

/// Device ordinals the registry has room for.
constexpr int kMaxDevices = 64;

/// The global configuration: defaults, then $GLAKE_ALLOC_CONF, then configure_global() overrides.
GLAKE_API AllocatorConfig global_config();
/// Applies "key:value,..." to the global configuration. Refused once a device allocator exists.
GLAKE_API void configure_global(const std::string& conf);
/// The process-wide allocator of `device` on the default backend, created on first use.
GLAKE_API StitchAllocator& device_allocator(int device);
/// The allocator of `device` if it was created, else null.
GLAKE_API StitchAllocator* existing_device_allocator(int device);
/// Number of device slots (the default backend's device count).
GLAKE_API int device_slots();

}  // namespace glake::gmlake
