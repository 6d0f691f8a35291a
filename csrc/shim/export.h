// Visibility of the libcuda shim's entry points: only the driver's names (and glake_shim_*) leave
// libglake_shim.so; everything else in it is hidden (-fvisibility=hidden).
#pragma once

#define GLAKE_SHIM_EXPORT __attribute__((visibility("default")))
