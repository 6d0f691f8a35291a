// Shared by the binding files of glake._C: argument helpers and the per-layer binder registry.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>

#include "core/phys_chunk.h"

namespace glake::py_bind {

namespace py = pybind11;

/// A backend argument: None = $GLAKE_BACKEND, else auto-detect.
using Backend = std::optional<std::string>;
/// Releases the GIL for the call (for anything that reaches the driver).
using NoGil = py::call_guard<py::gil_scoped_release>;

/// A Python int that must be a positive (or, with allow_zero, non-negative) byte count.
std::size_t to_size(long long v, const char* what, bool allow_zero = false);

/// Python's handle on a chunk; release() drops this owner's reference early.
struct PyChunk {
  std::shared_ptr<PhysChunk> p;
  PhysChunk& get() const;
};

/// A layer's binding function, called once when glake._C is imported.
using Binder = void (*)(py::module_&);

/// Registers a layer's binder at load time: `static RegisterBinder reg("gmlake", &bind_gmlake);`.
struct RegisterBinder {
  RegisterBinder(const char* name, Binder binder);
};

}  // namespace glake::py_bind
