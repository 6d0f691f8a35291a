// glake._C: the one pybind11 module. Thin: argument checks, GIL release, error translation.
// This file binds the core; each layer above binds itself in its own bind_*.cpp (RegisterBinder).
#include <cstring>
#include <map>
#include <utility>
#include <vector>

#include "python/common.h"

#include "core/chunk_pool.h"
#include "core/host_copy.h"
#include "core/virtual_range.h"
#include "common/conf.h"
#include "driver/driver.h"
#include "driver/host_driver.h"
#include "gmlake/config.h"

using namespace glake;
using namespace glake::py_bind;

namespace glake::py_bind {

std::size_t to_size(long long v, const char* what, bool allow_zero) {
  if (v < 0 || (v == 0 && !allow_zero)) {
    throw InvalidArgumentError(std::string(what) + "=" + std::to_string(v) + " must be " +
                               (allow_zero ? "non-negative" : "positive"));
  }
  return static_cast<std::size_t>(v);
}

PhysChunk& PyChunk::get() const {
  if (!p) throw InvalidArgumentError("this PhysChunk was released");
  return *p;
}

namespace {
std::vector<std::pair<const char*, Binder>>& binders() {
  static std::vector<std::pair<const char*, Binder>> all;
  return all;
}
}  // namespace

RegisterBinder::RegisterBinder(const char* name, Binder binder) { binders().emplace_back(name, binder); }

}  // namespace glake::py_bind

namespace {

PyObject* exc_glake = nullptr;
PyObject* exc_oom = nullptr;
PyObject* exc_invalid = nullptr;
PyObject* exc_unavailable = nullptr;

std::optional<PyChunk> wrap_chunk(std::shared_ptr<PhysChunk> c) {
  if (!c) return std::nullopt;
  return PyChunk{std::move(c)};
}

py::dict driver_stats_dict(Driver& d) {
  const DriverStatsSnapshot s = d.stats().snapshot();
  py::dict out;
  out["backend"] = d.name();
  out["chunks_live"] = s.chunks_live;
  out["chunks_created"] = s.chunks_created;
  out["chunks_released"] = s.chunks_released;
  out["physical_bytes.current"] = s.physical_bytes;
  out["physical_bytes.peak"] = s.physical_bytes_peak;
  out["reserved_va_bytes.current"] = s.reserved_va_bytes;
  out["reserved_va_bytes.peak"] = s.reserved_va_bytes_peak;
  out["ranges_live"] = s.ranges_live;
  out["mapped_bytes.current"] = s.mapped_bytes;
  out["mapped_bytes.peak"] = s.mapped_bytes_peak;
  std::uint64_t total_ns = 0;
  for (int i = 0; i < static_cast<int>(DriverOp::kCount); ++i) {
    const std::string op = op_name(static_cast<DriverOp>(i));
    out[py::str("calls." + op)] = s.calls[i];
    out[py::str("time_ns." + op)] = s.time_ns[i];
    total_ns += s.time_ns[i];
  }
  out["time_ns.total"] = total_ns;
  return out;
}

py::dict array_interface(const VirtualRange& r) {
  py::dict d;
  d["shape"] = py::make_tuple(r.size());
  d["typestr"] = "|u1";
  d["data"] = py::make_tuple(r.ptr(), false);
  d["version"] = 3;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "glake core: physical chunks, virtual ranges and chunk pools over the cuda or host backend";

  exc_glake = PyErr_NewException("glake._C.GlakeError", PyExc_RuntimeError, nullptr);
  exc_oom = PyErr_NewException("glake._C.OutOfMemoryError", py::make_tuple(py::handle(exc_glake), py::handle(PyExc_MemoryError)).release().ptr(), nullptr);
  exc_invalid = PyErr_NewException("glake._C.InvalidArgumentError", py::make_tuple(py::handle(exc_glake), py::handle(PyExc_ValueError)).release().ptr(), nullptr);
  exc_unavailable = PyErr_NewException("glake._C.BackendUnavailableError", exc_glake, nullptr);
  m.attr("GlakeError") = py::handle(exc_glake);
  m.attr("OutOfMemoryError") = py::handle(exc_oom);
  m.attr("InvalidArgumentError") = py::handle(exc_invalid);
  m.attr("BackendUnavailableError") = py::handle(exc_unavailable);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OutOfMemoryError& e) {
      PyErr_SetString(exc_oom, e.what());
    } catch (const InvalidArgumentError& e) {
      PyErr_SetString(exc_invalid, e.what());
    } catch (const BackendUnavailableError& e) {
      PyErr_SetString(exc_unavailable, e.what());
    } catch (const Error& e) {
      PyErr_SetString(exc_glake, e.what());
    }
  });

  m.def("host_hold_events", [](bool hold) { dynamic_cast<HostDriver&>(get_driver("host")).hold_events(hold); },
        py::arg("hold"), NoGil(),
        "Test hook: host events recorded from now on stay incomplete until host_complete_events() (hold=False stops).");
  m.def("host_complete_events", [] { return dynamic_cast<HostDriver&>(get_driver("host")).complete_held_events(); },
        NoGil(), "Test hook: completes every held host event; returns how many.");
  m.def("host_held_events", [] { return dynamic_cast<HostDriver&>(get_driver("host")).held_events(); }, NoGil(),
        "Test hook: host events recorded while held and not yet completed.");
  m.def("host_reserve_bytes", &HostReserve::process_bytes,
        "Bytes of host memory the process's allocators and KV caches keep for their next suspend "
        "($GLAKE_SUSPEND_KEEP_HOST=1); each one's own is its stats()['kept_host_bytes'].");
  m.def("cuda_backend_built", &cuda_backend_built, "Whether this build contains the cuda backend.");
  m.def("cuda_unavailable_reason", &cuda_unavailable_reason, NoGil(),
        "Why the cuda backend cannot be used here, or '' when it can.");
  m.def("backend_name", [](Backend b) { return std::string(get_driver(b).name()); }, py::arg("backend") = py::none(),
        NoGil(), "The backend that `backend` (None = $GLAKE_BACKEND, else auto-detect) resolves to.");
  m.def("conf_bytes", [](const std::string& text, const std::string& key, const std::string& source) {
        return conf::parse_bytes(text, key, source);
      }, py::arg("text"), py::arg("key") = "", py::arg("source") = conf::kKeyword,
      "'512MB' -> 536870912: the byte-count syntax of every glake setting; errors name key and source.");
  m.def("alloc_config", [](const std::map<std::string, std::string>& kwargs) {
        gmlake::AllocatorConfig c = gmlake::AllocatorConfig::from_env();
        for (const auto& [key, value] : kwargs) c.set(key, value, conf::kKeyword);
        return c.to_string();
      }, py::arg("kwargs"),
      "The allocator configuration: defaults, then $GLAKE_ALLOC_CONF, then keyword arguments (as text), "
      "as 'key:value,...'.");
  m.def("alloc_conf_check", [](const std::string& text, const std::string& source) {
        gmlake::AllocatorConfig c;
        c.apply(text, source);
        return c.to_map();
      }, py::arg("text"), py::arg("source"),
      "Parses 'key:value,...' over the defaults; raises InvalidArgumentError naming key, value and source.");
  m.def("device_count", [](Backend b) { return get_driver(b).device_count(); }, py::arg("backend") = py::none(), NoGil(),
        "Number of devices of the backend.");
  m.def("granularity", [](Backend b, int device) { return get_driver(b).granularity(device); },
        py::arg("backend") = py::none(), py::arg("device") = 0, NoGil(), "Mapping granularity in bytes.");
  m.def("mem_info", [](Backend b, int device) {
        const MemInfo i = get_driver(b).mem_info(device);
        return std::make_pair(i.free, i.total);
      }, py::arg("backend") = py::none(), py::arg("device") = 0, NoGil(), "(free, total) bytes of the device.");
  m.def("stats", [](Backend b) { return driver_stats_dict(get_driver(b)); }, py::arg("backend") = py::none(),
        "The backend's counters: chunks, bytes, calls and time per driver operation.");
  m.def("reset_peak_stats", [](Backend b) { get_driver(b).stats().reset_peaks_and_times(); },
        py::arg("backend") = py::none(), NoGil(), "Resets peaks to current values and zeroes call counts and times.");
  m.def("memcpy", [](std::uintptr_t dst, std::uintptr_t src, long long n, int device, Backend b) {
        const std::size_t bytes = to_size(n, "n", true);
        py::gil_scoped_release nogil;
        get_driver(b).memcpy(device, dst, src, bytes);
      }, py::arg("dst"), py::arg("src"), py::arg("n"), py::arg("device") = 0, py::arg("backend") = py::none(),
      "Copies n bytes between any two addresses of the backend, synchronously.");
  m.def("memset", [](std::uintptr_t dst, int value, long long n, int device, Backend b) {
        const std::size_t bytes = to_size(n, "n", true);
        py::gil_scoped_release nogil;
        get_driver(b).memset(device, dst, value, bytes);
      }, py::arg("dst"), py::arg("value"), py::arg("n"), py::arg("device") = 0, py::arg("backend") = py::none(),
      "Sets n bytes at dst to value, synchronously.");
  m.def("read", [](std::uintptr_t src, long long n, int device, Backend b) {
        const std::size_t bytes = to_size(n, "n", true);
        std::string buf(bytes, '\0');
        {
          py::gil_scoped_release nogil;
          if (bytes) get_driver(b).memcpy(device, reinterpret_cast<std::uintptr_t>(buf.data()), src, bytes);
        }
        return py::bytes(buf);
      }, py::arg("src"), py::arg("n"), py::arg("device") = 0, py::arg("backend") = py::none(),
      "Copies n bytes at src into a new bytes object.");
  m.def("write", [](std::uintptr_t dst, py::bytes data, int device, Backend b) {
        std::string buf = data;
        py::gil_scoped_release nogil;
        if (!buf.empty()) get_driver(b).memcpy(device, dst, reinterpret_cast<std::uintptr_t>(buf.data()), buf.size());
      }, py::arg("dst"), py::arg("data"), py::arg("device") = 0, py::arg("backend") = py::none(),
      "Copies the bytes of `data` to dst.");

  py::class_<PyChunk>(m, "PhysChunk", "One physical allocation, refcounted; freed when no owner and no mapping holds it.")
      .def(py::init([](std::optional<long long> size, int device, Backend b) {
             Driver& d = get_driver(b);
             const std::size_t bytes = size ? to_size(*size, "size") : d.granularity(device);
             py::gil_scoped_release nogil;
             return PyChunk{PhysChunk::create(d, device, bytes)};
           }), py::arg("size") = py::none(), py::arg("device") = 0, py::arg("backend") = py::none(),
           "Creates a chunk of `size` bytes (default: one granularity).")
      .def_static("import_fd", [](int fd, std::optional<long long> size, int device, Backend b) {
             Driver& d = get_driver(b);
             const std::size_t bytes = size ? to_size(*size, "size") : d.granularity(device);
             py::gil_scoped_release nogil;
             return PyChunk{PhysChunk::import_fd(d, device, fd, bytes)};
           }, py::arg("fd"), py::arg("size") = py::none(), py::arg("device") = 0, py::arg("backend") = py::none(),
           "Imports a chunk exported by export_fd (this or another process); the fd stays the caller's.")
      .def("export_fd", [](const PyChunk& c) { return c.get().export_fd(); }, NoGil(),
           "A new file descriptor for the chunk, owned by the caller.")
      .def("release", [](PyChunk& c) {
             if (!c.p) throw InvalidArgumentError("double release: this PhysChunk was already released");
             if (c.p->mappings() > 0) {
               throw InvalidArgumentError("cannot release chunk #" + std::to_string(c.p->id()) + ": it is still mapped at " +
                                          std::to_string(c.p->mappings()) + " place(s); unmap it first");
             }
             std::shared_ptr<PhysChunk> last = std::move(c.p);
             py::gil_scoped_release nogil;
             last.reset();
           }, "Drops this owner's reference now; the memory is freed once nothing else holds it.")
      .def_property_readonly("size", [](const PyChunk& c) { return c.get().size(); })
      .def_property_readonly("device", [](const PyChunk& c) { return c.get().device(); })
      .def_property_readonly("backend", [](const PyChunk& c) { return std::string(c.get().driver().name()); })
      .def_property_readonly("id", [](const PyChunk& c) { return c.get().id(); }, "Process-unique serial number.")
      .def_property_readonly("mappings", [](const PyChunk& c) { return c.get().mappings(); }, "Places it is mapped at.")
      .def_property_readonly("released", [](const PyChunk& c) { return !c.p; })
      .def("__repr__", [](const PyChunk& c) {
        if (!c.p) return std::string("<glake.core.PhysChunk released>");
        return "<glake.core.PhysChunk #" + std::to_string(c.p->id()) + " " + std::to_string(c.p->size()) + " B on " +
               c.p->driver().name() + ":" + std::to_string(c.p->device()) + ", " + std::to_string(c.p->mappings()) +
               " mapping(s)>";
      });

  py::class_<VirtualRange, std::shared_ptr<VirtualRange>>(m, "VirtualRange",
                                                          "A reserved range of virtual addresses with chunks mapped at offsets.")
      .def(py::init([](long long size, int device, Backend b, long long alignment) {
             Driver& d = get_driver(b);
             const std::size_t bytes = to_size(size, "size");
             const std::size_t align = to_size(alignment, "alignment", true);
             py::gil_scoped_release nogil;
             return std::make_shared<VirtualRange>(d, device, bytes, align);
           }), py::arg("size"), py::arg("device") = 0, py::arg("backend") = py::none(), py::arg("alignment") = 0,
           "Reserves `size` bytes of addresses (a multiple of the granularity).")
      .def("map", [](VirtualRange& r, long long offset, const PyChunk& c, bool access) {
             const std::size_t off = to_size(offset, "offset", true);
             std::shared_ptr<PhysChunk> chunk = c.p;
             if (!chunk) throw InvalidArgumentError("map: this PhysChunk was released");
             py::gil_scoped_release nogil;
             r.map(off, chunk, access);
           }, py::arg("offset"), py::arg("chunk"), py::arg("set_access") = true,
           "Maps `chunk` at `offset` (and makes it readable/writable unless set_access=False).")
      .def("map_many", [](VirtualRange& r, long long offset, const std::vector<PyChunk>& cs) {
             const std::size_t off = to_size(offset, "offset", true);
             std::vector<std::shared_ptr<PhysChunk>> chunks;
             for (const auto& c : cs) chunks.push_back(c.p);
             py::gil_scoped_release nogil;
             r.map_many(off, chunks);
           }, py::arg("offset"), py::arg("chunks"), "Maps chunks back to back from `offset`, all or nothing.")
      .def("unmap", [](VirtualRange& r, long long offset) {
             const std::size_t off = to_size(offset, "offset", true);
             py::gil_scoped_release nogil;
             return PyChunk{r.unmap(off)};
           }, py::arg("offset"), "Unmaps the chunk mapped at `offset` and returns it.")
      .def("set_access", [](VirtualRange& r, long long offset, long long size, bool read_only) {
             const std::size_t off = to_size(offset, "offset", true);
             const std::size_t bytes = to_size(size, "size");
             py::gil_scoped_release nogil;
             r.set_access(off, bytes, read_only);
           }, py::arg("offset"), py::arg("size"), py::arg("read_only") = false,
           "Makes mapped bytes readable and writable (read_only=True: readable only; a write faults).")
      .def("chunk_at", [](const VirtualRange& r, long long offset) {
             return wrap_chunk(r.chunk_at(to_size(offset, "offset", true)));
           }, py::arg("offset"), "The chunk covering byte `offset`, or None.")
      .def("mappings", [](const VirtualRange& r) {
             std::vector<std::pair<std::size_t, PyChunk>> out;
             for (auto& mp : r.mappings()) out.emplace_back(mp.offset, PyChunk{mp.chunk});
             return out;
           }, "[(offset, chunk)] of every mapping, by offset.")
      .def("free", &VirtualRange::free, NoGil(), "Unmaps everything and frees the addresses.")
      .def("__enter__", [](std::shared_ptr<VirtualRange> r) { return r; })
      .def("__exit__", [](VirtualRange& r, py::args) {
        py::gil_scoped_release nogil;  // unmaps and frees through the driver
        r.free();
      })
      .def_property_readonly("ptr", &VirtualRange::ptr)
      .def_property_readonly("size", &VirtualRange::size)
      .def_property_readonly("device", &VirtualRange::device)
      .def_property_readonly("backend", [](const VirtualRange& r) { return std::string(r.driver().name()); })
      .def_property_readonly("mapped_bytes", &VirtualRange::mapped_bytes)
      .def_property_readonly("freed", &VirtualRange::is_freed)
      .def_property_readonly("__array_interface__", [](const VirtualRange& r) {
        if (std::strcmp(r.driver().name(), "host") != 0) throw py::attribute_error("a cuda range has no __array_interface__");
        return array_interface(r);
      })
      .def_property_readonly("__cuda_array_interface__", [](const VirtualRange& r) {
        if (std::strcmp(r.driver().name(), "cuda") != 0) throw py::attribute_error("a host range has no __cuda_array_interface__");
        py::dict d = array_interface(r);
        d["stream"] = py::none();
        return d;
      })
      .def("__repr__", [](const VirtualRange& r) {
        return "<glake.core.VirtualRange " + hex(r.ptr()) + " size=" + std::to_string(r.size()) + " mapped=" +
               std::to_string(r.mapped_bytes()) + " on " + r.driver().name() + ":" + std::to_string(r.device()) + ">";
      });

  py::class_<ChunkPool, std::shared_ptr<ChunkPool>>(m, "ChunkPool", "A cache of free physical chunks under a byte limit.")
      .def(py::init([](long long limit_bytes, long long chunk_size, int device, Backend b) {
             const std::size_t limit = to_size(limit_bytes, "limit_bytes", true);
             const std::size_t size = to_size(chunk_size, "chunk_size", true);
             py::gil_scoped_release nogil;  // the backend's first use initialises it; the pool asks the driver
             return ChunkPool::create(get_driver(b), device, limit, size);
           }), py::arg("limit_bytes") = 0, py::arg("chunk_size") = 0, py::arg("device") = 0, py::arg("backend") = py::none(),
           "A pool of chunk_size chunks (0 = granularity) holding at most limit_bytes (0 = no limit).")
      .def("acquire", [](ChunkPool& p) { return PyChunk{p.acquire()}; }, NoGil(),
           "One chunk, cached or new; it returns to the pool when nothing holds it any more.")
      .def("acquire_many", [](ChunkPool& p, long long n) {
             const std::size_t count = to_size(n, "n", true);
             std::vector<std::shared_ptr<PhysChunk>> cs;
             {
               py::gil_scoped_release nogil;
               cs = p.acquire_many(count);
             }
             std::vector<PyChunk> out;
             for (auto& c : cs) out.push_back(PyChunk{std::move(c)});
             return out;
           }, py::arg("n"), "n chunks, all or none.")
      .def("prefill", [](ChunkPool& p, long long n) {
             const std::size_t count = to_size(n, "n", true);
             py::gil_scoped_release nogil;
             return p.prefill(count);
           }, py::arg("n"), "Creates chunks until n are cached (within the limit); returns the cached count.")
      .def("trim", [](ChunkPool& p, long long keep) {
             const std::size_t k = to_size(keep, "keep_bytes", true);
             py::gil_scoped_release nogil;
             return p.trim(k);
           }, py::arg("keep_bytes") = 0, "Releases cached chunks beyond keep_bytes; returns bytes released.")
      .def("set_limit", [](ChunkPool& p, long long limit) {
             const std::size_t l = to_size(limit, "limit_bytes", true);
             py::gil_scoped_release nogil;
             p.set_limit(l);
           }, py::arg("limit_bytes"), "Changes the limit (0 = none); trims the cache to fit.")
      .def_property_readonly("chunk_size", &ChunkPool::chunk_size)
      .def_property_readonly("device", &ChunkPool::device)
      .def_property_readonly("backend", [](const ChunkPool& p) { return std::string(p.driver().name()); })
      .def("stats", [](const ChunkPool& p) {
        ChunkPoolStats s;
        {
          py::gil_scoped_release nogil;  // the pool's lock may be held by a thread creating chunks
          s = p.stats();
        }
        py::dict d;
        d["chunk_size"] = s.chunk_size;
        d["limit_bytes"] = s.limit_bytes;
        d["cached_chunks"] = s.cached_chunks;
        d["in_use_chunks"] = s.in_use_chunks;
        d["created"] = s.created;
        d["released"] = s.released;
        d["hits"] = s.hits;
        return d;
      }, "The pool's counters.");

  for (auto& [name, binder] : binders()) binder(m);
}
