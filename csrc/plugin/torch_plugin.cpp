// libglake_torch.so: the C ABI that torch.cuda.memory.CUDAPluggableAllocator loads.
// Linked to glake_core, never to libtorch, so one build serves every torch version.
#include <sys/types.h>

#include "gmlake/registry.h"

using glake::DevPtr;
using glake::StreamHandle;
namespace gm = glake::gmlake;

extern "C" {

/// torch's alloc_fn: throws (a C++ exception torch turns into RuntimeError) when out of memory.
__attribute__((visibility("default"))) void* glake_malloc(ssize_t size, int device, void* stream) {
  if (size <= 0) return nullptr;  // torch asks for 0 bytes for empty tensors
  return reinterpret_cast<void*>(
      gm::device_allocator(device).malloc(static_cast<std::size_t>(size), reinterpret_cast<StreamHandle>(stream)));
}

/// torch's free_fn.
__attribute__((visibility("default"))) void glake_free(void* ptr, size_t, int device, void*) {
  if (!ptr) return;
  gm::device_allocator(device).free(reinterpret_cast<DevPtr>(ptr));
}

/// torch.cuda.empty_cache().
__attribute__((visibility("default"))) void glake_empty_cache() {
  for (int d = 0; d < gm::kMaxDevices; ++d) {
    if (gm::StitchAllocator* a = gm::existing_device_allocator(d)) a->empty_cache();
  }
}

/// torch.cuda.set_per_process_memory_fraction(fraction, device).
__attribute__((visibility("default"))) void glake_set_memory_fraction(double fraction, int device) {
  gm::device_allocator(device).set_memory_fraction(fraction);
}

/// Tensor.record_stream(stream): the allocation is found on whichever device holds it.
__attribute__((visibility("default"))) void glake_record_stream(void* ptr, void* stream) {
  for (int d = 0; d < gm::kMaxDevices; ++d) {
    gm::StitchAllocator* a = gm::existing_device_allocator(d);
    if (a && a->allocation_of(reinterpret_cast<DevPtr>(ptr)).second) {
      a->record_stream(reinterpret_cast<DevPtr>(ptr), reinterpret_cast<StreamHandle>(stream));
      return;
    }
  }
}

}  // extern "C"
