// glake's benchmark helpers as a Python module of their own (glake/libglake_bench.so, imported
// through glake._bench): timed loops in C++ that only benchmarks/ uses, kept out of glake._C and
// of the library. Its types (the allocator) are glake._C's, shared through pybind11.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "bench/alloc_bench.h"
#include "bench/vmm_bench.h"

namespace py = pybind11;

// The file is named lib*.so so that an editable install copies it next to glake/_C (setup.py
// copies the CMake-built lib*.so into the package); the module name must match the file name.
PYBIND11_MODULE(libglake_bench, m) {
  m.doc() = "glake benchmark helpers (timed in C++); import glake._bench";
  py::module_::import("glake._C");  // registers the allocator type and the error translation

  m.def("measure_alloc_free_ns", [](glake::gmlake::StitchAllocator& a, long long size, int iters) {
        if (size <= 0) throw glake::InvalidArgumentError("size=" + std::to_string(size) + " must be positive");
        py::gil_scoped_release nogil;
        return glake::bench::measure_alloc_free_ns(a, static_cast<std::size_t>(size), iters);
      }, py::arg("allocator"), py::arg("size"), py::arg("iters"),
      "Median ns of one cached malloc+free pair on a glake._C.Allocator, timed in C++.");
  m.def("measure_vmm_latency", [](int n, int device, std::optional<std::string> backend) {
        glake::Driver& d = glake::get_driver(backend);
        py::gil_scoped_release nogil;
        return glake::bench::measure_vmm_latency(d, device, n);
      }, py::arg("n"), py::arg("device") = 0, py::arg("backend") = py::none(),
      "Microseconds per call of create/map/set_access/set_access_again/unmap/release over n chunks.");
}
