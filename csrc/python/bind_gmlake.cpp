// glake._C bindings of the stitched allocator (gmlake/), and the C functions CuPy calls.
#include <Python.h>

#include <algorithm>
#include <vector>

#include "gmlake/registry.h"
#include "python/common.h"
#include "python/engine_copier.h"

namespace glake::py_bind {
namespace {

namespace gm = glake::gmlake;

using AllocatorPtr = std::shared_ptr<gm::StitchAllocator>;

/// A pool id as Python sees it: None for "no pool" ({0,0}), else (first, second) as torch's MempoolId.
py::object pool_tuple(gm::PoolId id) {
  if (!id) return py::none();
  return py::make_tuple(id.first, id.second);
}

void put(py::dict& d, const std::string& key, const gm::Stat& s) {
  d[py::str(key + ".current")] = s.current;
  d[py::str(key + ".peak")] = s.peak;
}

py::dict stats_dict(const gm::StitchAllocator& a) {
  gm::AllocatorStats s;
  std::size_t limit = 0;
  {
    py::gil_scoped_release nogil;  // the lock may be held by a thread in the slow path: copy without the GIL
    s = a.stats();
    limit = a.limit();
  }
  py::dict d;
  put(d, "allocated_bytes.all", s.allocated_bytes);
  put(d, "allocated_bytes.small_pool", s.allocated_small);
  put(d, "allocated_bytes.large_pool", s.allocated_large);
  put(d, "reserved_bytes.all", s.reserved_bytes);
  put(d, "reserved_bytes.small_pool", s.reserved_small);
  put(d, "reserved_bytes.large_pool", s.reserved_large);
  put(d, "active_bytes.all", s.active_bytes);
  put(d, "active_bytes.small_pool", s.active_small);
  put(d, "active_bytes.large_pool", s.active_large);
  put(d, "requested_bytes.all", s.requested_bytes);
  put(d, "requested_bytes.small_pool", s.requested_small);
  put(d, "requested_bytes.large_pool", s.requested_large);
  put(d, "segment.all", s.segments);
  put(d, "segment.small_pool", s.segments_small);
  put(d, "segment.large_pool", s.segments_large);
  put(d, "allocation.all", s.allocations);
  put(d, "allocation.small_pool", s.allocations_small);
  put(d, "allocation.large_pool", s.allocations_large);
  d["allocation.all.allocated"] = s.num_allocs;
  d["allocation.all.freed"] = s.num_frees;
  d["num_alloc_retries"] = s.num_alloc_retries;
  d["num_ooms"] = s.num_ooms;
  d["num_stitches"] = s.num_stitches;
  d["num_stitch_reuses"] = s.num_stitch_reuses;
  d["num_stitch_gc"] = s.num_stitch_gc;
  put(d, "stitched_bytes", s.stitched_bytes);
  put(d, "mapped_va_bytes", s.mapped_va_bytes);
  d["stitched_va_bytes.current"] = s.stitched_va_cached;
  d["num_segments_created"] = s.num_segments_created;
  d["num_segments_released"] = s.num_segments_released;
  d["num_cross_stream_reuses"] = s.num_cross_stream_reuses;
  d["num_sync_all_streams"] = s.num_sync_all_streams;
  d["num_events_created"] = s.num_events_created;
  d["private_pools"] = s.private_pools;
  d["private_pool_free_bytes"] = s.private_pool_free_bytes;
  d["suspended"] = s.suspended ? 1 : 0;
  d["suspended_host_bytes"] = s.suspended_host_bytes;
  d["suspended_file_bytes"] = s.suspended_file_bytes;
  d["suspended_reused_bytes"] = s.suspended_reused_bytes;
  d["kept_host_bytes"] = s.kept_host_bytes;
  d["shared_bytes"] = s.shared_bytes;
  d["shared_imported_bytes"] = s.shared_imported_bytes;
  d["limit_bytes"] = limit;
  return d;
}

py::list snapshot_list(const gm::StitchAllocator& a) {
  std::vector<gm::SegmentInfo> snap;
  {
    py::gil_scoped_release nogil;  // copied under the allocator's lock, converted with the GIL
    snap = a.snapshot();
  }
  py::list out;
  for (const gm::SegmentInfo& seg : snap) {
    py::list blocks;
    for (const gm::BlockInfo& b : seg.blocks) {
      py::dict bd;
      bd["address"] = b.ptr;
      bd["size"] = b.size;
      bd["requested"] = b.requested;
      bd["state"] = b.state;
      bd["stream"] = b.stream;
      bd["lent_to"] = b.lent_to;
      bd["pool"] = pool_tuple(b.pool);
      blocks.append(bd);
    }
    py::dict sd;
    sd["kind"] = seg.kind;
    sd["address"] = seg.ptr;
    sd["size"] = seg.size;
    sd["stitched"] = std::string(seg.kind) == "stitched";
    sd["active"] = seg.active;
    sd["blocks"] = blocks;
    out.append(sd);
  }
  return out;
}

AllocatorPtr global_allocator(int device) {
  return AllocatorPtr(&gm::device_allocator(device), [](gm::StitchAllocator*) {});  // process-lifetime
}

}  // namespace

void bind_gmlake(py::module_& m) {
  py::class_<gm::StitchAllocator, AllocatorPtr>(m, "Allocator", "The stitched caching allocator of one device.")
      .def(py::init([](int device, Backend b, const std::string& conf) {
             gm::AllocatorConfig c;
             c.apply(conf);
             py::gil_scoped_release nogil;  // the backend's first use initialises it
             return std::make_shared<gm::StitchAllocator>(get_driver(b), device, c);
           }), py::arg("device") = 0, py::arg("backend") = py::none(), py::arg("conf") = "",
           "A private allocator configured by a 'key:value,...' string (defaults otherwise).")
      .def("malloc", [](gm::StitchAllocator& a, long long size, std::uintptr_t stream) {
             const std::size_t bytes = to_size(size, "size");
             py::gil_scoped_release nogil;
             return a.malloc(bytes, stream);
           }, py::arg("size"), py::arg("stream") = 0, "Allocates size bytes for use on stream; returns the address.")
      .def("free", &gm::StitchAllocator::free, py::arg("ptr"), NoGil(), "Frees an allocation by its base address.")
      .def("record_stream", &gm::StitchAllocator::record_stream, py::arg("ptr"), py::arg("stream"), NoGil(),
           "Marks an allocation as used on another stream too.")
      .def("empty_cache", &gm::StitchAllocator::empty_cache, NoGil(), "Releases idle stitched ranges and free segments.")
      .def("whole_chunks", [](const gm::StitchAllocator& a, DevPtr ptr, std::size_t bytes) {
             std::vector<std::tuple<DevPtr, std::size_t, bool>> out;
             for (const gm::ChunkRef& r : a.whole_chunks(ptr, bytes)) out.emplace_back(r.ptr, r.chunk->size(), r.shared);
             return out;
           }, py::arg("ptr"), py::arg("bytes"), NoGil(),
           "(address, size, shared) of each chunk [ptr, ptr + bytes) covers whole, in one live allocation.")
      .def("share_chunk", [](gm::StitchAllocator& a, DevPtr at, std::optional<PyChunk> theirs) {
             std::shared_ptr<PhysChunk> c = theirs ? theirs->p : nullptr;
             py::gil_scoped_release nogil;
             a.share_chunk(at, std::move(c));
           }, py::arg("at"), py::arg("theirs") = py::none(),
           "Maps `theirs` read-only at chunk `at` in place of ours (None: makes ours read-only); free() makes it "
           "private again.")
      .def("suspend", [](gm::StitchAllocator& a, const PyEngine* engine, const std::vector<DevPtr>& discard) {
             auto copier = copier_of(engine);
             py::gil_scoped_release nogil;
             a.suspend(copier.get(), discard);
           }, py::arg("engine") = nullptr, py::arg("discard") = std::vector<DevPtr>{},
           "Gives the device memory back (live data to host memory, through `engine` when given), keeping every "
           "address; the allocations whose base addresses are in `discard` are not copied (undefined after resume).")
      .def("resume", [](gm::StitchAllocator& a, const PyEngine* engine) {
             auto copier = copier_of(engine);
             py::gil_scoped_release nogil;
             a.resume(copier.get());
           }, py::arg("engine") = nullptr, "Takes the memory again and restores the data (through `engine` when given).")
      .def_property_readonly("suspended", &gm::StitchAllocator::suspended, "True between suspend() and resume().")
      .def("prepare_suspend", &gm::StitchAllocator::prepare_suspend, NoGil(),
           "Makes the next suspend's host memory ready now (faulted in and page-locked, kept); returns its bytes.")
      .def("drop_host_reserve", &gm::StitchAllocator::drop_host_reserve, NoGil(),
           "Gives back the host memory kept for the next suspend.")
      .def("set_memory_fraction", &gm::StitchAllocator::set_memory_fraction, py::arg("fraction"), NoGil(),
           "Caps reserved memory at a fraction of the device (0 = no cap).")
      .def("stats", &stats_dict, "Counters with torch's key names plus glake's.")
      .def("reset_peak_stats", &gm::StitchAllocator::reset_peak_stats, NoGil(), "Sets every peak to its current value.")
      .def("snapshot", &snapshot_list, "Segments and stitched ranges with their blocks.")
      .def("allocation_of", &gm::StitchAllocator::allocation_of, py::arg("ptr"), NoGil(),
           "(base, requested bytes) of the allocation containing ptr, or (0, 0).")
      .def("create_or_incref_pool", [](gm::StitchAllocator& a, std::uint64_t first, std::uint64_t second) {
             a.create_or_incref_pool({first, second});
           }, py::arg("first"), py::arg("second"), NoGil(),
           "Creates private pool (first, second) with use count 1, or adds 1 to its use count.")
      .def("pool_use_count", [](const gm::StitchAllocator& a, std::uint64_t first, std::uint64_t second) {
             return a.pool_use_count({first, second});
           }, py::arg("first"), py::arg("second"), NoGil(), "The use count of a private pool (0 when unknown).")
      .def("begin_allocate_to_pool", [](gm::StitchAllocator& a, std::uint64_t first, std::uint64_t second,
                                        std::vector<std::uintptr_t> streams) {
             a.begin_allocate_to_pool({first, second}, [streams = std::move(streams)](StreamHandle s) {
               return std::find(streams.begin(), streams.end(), s) != streams.end();
             });
           }, py::arg("first"), py::arg("second"), py::arg("streams"), NoGil(),
           "Routes allocations on the given streams to private pool (first, second) until end_allocate_to_pool.")
      .def("end_allocate_to_pool", [](gm::StitchAllocator& a, std::uint64_t first, std::uint64_t second) {
             a.end_allocate_to_pool({first, second});
           }, py::arg("first"), py::arg("second"), NoGil(), "Stops routing allocations to a private pool.")
      .def("release_pool", [](gm::StitchAllocator& a, std::uint64_t first, std::uint64_t second) {
             a.release_pool({first, second});
           }, py::arg("first"), py::arg("second"), NoGil(),
           "Subtracts 1 from a pool's use count; at 0 its memory returns to the cache.")
      .def("pool_of", [](const gm::StitchAllocator& a, std::uintptr_t ptr) {
             gm::PoolId id;
             {
               py::gil_scoped_release nogil;
               id = a.pool_of(ptr);
             }
             return pool_tuple(id);
           }, py::arg("ptr"), "(first, second) of the private pool of the live allocation containing ptr, or None.")
      .def_property_readonly("limit", [](const gm::StitchAllocator& a) {
             py::gil_scoped_release nogil;  // takes the allocator's lock
             return a.limit();
           })
      .def_property_readonly("device", &gm::StitchAllocator::device)
      .def_property_readonly("backend", [](const gm::StitchAllocator& a) { return std::string(a.driver().name()); })
      .def_property_readonly("config", [](const gm::StitchAllocator& a) { return a.config().to_map(); });

  m.def("gmlake_global", &global_allocator, py::arg("device"), NoGil(),
        "The process-wide allocator of a device (the one torch and CuPy use), created on first use.");
  m.def("gmlake_global_exists", [](int device) { return gm::existing_device_allocator(device) != nullptr; },
        py::arg("device"), "Whether the process-wide allocator of device exists yet.");
  m.def("gmlake_begin_graph", [](int device, std::uint64_t graph) { gm::device_allocator(device).begin_graph(graph); },
        py::arg("device"), py::arg("graph"), NoGil(), "A CUDA graph starts capturing on device (called by glake.torch).");
  m.def("gmlake_end_graph", [](int device, std::uint64_t graph) { gm::device_allocator(device).end_graph(graph); },
        py::arg("device"), py::arg("graph"), NoGil(), "The capture of a graph ended.");
  m.def("gmlake_release_graph", [](int device, std::uint64_t graph) {
        gm::device_allocator(device).release_graph(graph);
      }, py::arg("device"), py::arg("graph"), NoGil(), "A graph was reset or destroyed: its memory returns to the cache.");
  m.def("gmlake_configure", &gm::configure_global, py::arg("conf"), NoGil(),
        "Applies 'key:value,...' to the process-wide configuration (before the first allocation).");
  m.def("gmlake_global_config", [] { return gm::global_config().to_map(); }, NoGil(), "The process-wide configuration.");
  m.def("parse_bytes", &gm::parse_bytes, py::arg("text"), "'512MB' -> 536870912.");
}

static RegisterBinder reg("gmlake", &bind_gmlake);

}  // namespace glake::py_bind
