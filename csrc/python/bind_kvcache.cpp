// glake._C bindings of the KV-cache manager (kvcache/): glake.kvcache.KVCache is the Python face.
// Integer arguments are checked as Python's operator.index would (bools refused); calls that lock
// or reach the driver release the GIL; reserve's fast path and reserve_batch's loop run without
// creating a Python object per slot.
#include <pybind11/numpy.h>

#include "kvcache/kv_manager.h"
#include "python/common.h"
#include "python/engine_copier.h"

namespace glake::py_bind {
namespace {

namespace kv = glake::kvcache;
using ManagerPtr = std::shared_ptr<kv::KvManager>;

/// `h` as an int64, refusing bools and non-integers with "name=value must be an int".
std::int64_t index_arg(py::handle h, const char* name) {
  PyObject* o = h.ptr();
  if (!PyBool_Check(o)) {
    PyObject* idx = PyLong_Check(o) ? (Py_INCREF(o), o) : PyNumber_Index(o);
    if (idx) {
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
      Py_DECREF(idx);
      if (!overflow) return v;
      throw InvalidArgumentError(std::string(name) + "=" + py::repr(h).cast<std::string>() + " is out of range");
    }
    PyErr_Clear();
  }
  throw InvalidArgumentError(std::string(name) + "=" + py::repr(h).cast<std::string>() + " must be an int");
}

/// A 1-d int64 view of a list, tuple or integer numpy array (no copy for a contiguous int64 array).
py::array_t<std::int64_t> int_array(py::handle h, const char* name) {
  py::array a = py::array::ensure(h);
  if (!a || a.ndim() != 1) throw InvalidArgumentError(std::string(name) + " must be a 1-d sequence of ints");
  const char kind = a.dtype().kind();
  if (a.size() && kind != 'i' && kind != 'u') {
    throw InvalidArgumentError(std::string(name) + " must hold ints, not " + py::str(a.dtype()).cast<std::string>());
  }
  return py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
}

py::dict stats_dict(kv::KvManager& m) {
  kv::KvStats s;
  {
    py::gil_scoped_release nogil;
    s = m.stats();
  }
  const kv::KvLayout& l = m.layout();
  const kv::KvCounters& n = s.counters;
  const double held = static_cast<double>(s.chunks_physical) * static_cast<double>(l.chunk_bytes);
  py::dict d;
  d["chunks_physical"] = s.chunks_physical;
  d["chunks_mapped"] = s.chunks_mapped;
  d["chunks_shared"] = s.chunks_shared;
  d["chunks_active"] = s.chunks_active;
  d["chunks_released"] = s.chunks_released;
  d["chunks_reclaimable"] = s.chunks_reclaimable;
  d["chunks_surplus"] = s.chunks_surplus;
  d["chunks_free"] = s.chunks_free;
  d["chunks_budget"] = s.chunks_budget ? py::object(py::int_(*s.chunks_budget)) : py::object(py::none());
  d["pool_cached_chunks"] = s.pool_cached_chunks;
  d["slots_active"] = s.slots_active;
  d["slots_released"] = s.slots_released;
  d["slots_free"] = s.slots_free;
  d["tokens_reserved"] = s.tokens_reserved;
  d["tokens_mapped"] = held / static_cast<double>(l.row_bytes);
  d["utilisation"] = held ? static_cast<double>(s.tokens_reserved * l.row_bytes) / held : 0.0;
  d["maps"] = n.maps_background + n.maps_sync + n.maps_shared;
  const std::pair<const char*, std::uint64_t> counters[] = {
      {"maps_background", n.maps_background}, {"maps_sync", n.maps_sync}, {"maps_shared", n.maps_shared},
      {"unmaps", n.unmaps}, {"reclaimed_released", n.reclaimed_released},
      {"reclaimed_lookahead", n.reclaimed_lookahead}, {"moved", n.moved}, {"trimmed", n.trimmed},
      {"sync_waits", n.sync_waits}, {"wait_ns", n.wait_ns}, {"fence_waits", n.fence_waits},
      {"fences_recorded", n.fences_recorded}, {"mapper_errors", n.mapper_errors}, {"forks", n.forks},
      {"fork_tail_bytes", n.fork_tail_bytes}, {"releases", n.releases}, {"swaps_out", n.swaps_out},
      {"swaps_in", n.swaps_in}, {"bytes_swapped_out", n.bytes_swapped_out},
      {"bytes_swapped_in", n.bytes_swapped_in}, {"batches", n.batches},
      {"mapper_passes", s.mapper_passes}, {"mapper_wakeups", s.mapper_wakeups}, {"mapper_busy_ns", s.mapper_busy_ns}, {"lengths_waits", s.lengths_waits}};
  for (const auto& [key, value] : counters) d[key] = value;
  d["fences_pending"] = s.fences_pending;
  d["suspended"] = s.suspended ? 1 : 0;
  d["suspended_host_bytes"] = s.suspended_host_bytes;
  d["suspended_reused_bytes"] = s.suspended_reused_bytes;
  d["kept_host_bytes"] = s.kept_host_bytes;
  return d;
}

}  // namespace

void bind_kvcache(py::module_& m) {
  py::class_<kv::KvManager, ManagerPtr>(m, "KvManager", "The vTensor KV-cache mechanism (glake.kvcache.KVCache's core).")
      .def(py::init([](long long max_seqs, long long max_seq_len, long long row_bytes, std::optional<long long> budget,
                       long long lookahead, int device, Backend b) {
             kv::KvConfig c;
             c.max_seqs = max_seqs, c.max_seq_len = max_seq_len, c.row_bytes = row_bytes;
             if (budget) c.budget_bytes = *budget;
             c.lookahead_tokens = lookahead, c.device = device;
             py::gil_scoped_release nogil;
             return std::make_shared<kv::KvManager>(get_driver(b), c);
           }), py::arg("max_seqs"), py::arg("max_seq_len"), py::arg("row_bytes"), py::arg("budget_bytes"),
           py::arg("lookahead_tokens"), py::arg("device") = 0, py::arg("backend") = py::none(),
           "A cache of max_seqs slots of max_seq_len rows of row_bytes; budget None = the device is the limit.")
      .def_property_readonly("range", &kv::KvManager::range, "The reserved range (a glake.core.VirtualRange).")
      .def_property_readonly("chunk_bytes", [](const kv::KvManager& k) { return k.layout().chunk_bytes; })
      .def_property_readonly("slot_bytes", [](const kv::KvManager& k) { return k.layout().slot_bytes; })
      .def("allocate", &kv::KvManager::allocate, NoGil(), "A slot for a new sequence.")
      .def("release", [](kv::KvManager& k, py::handle slot, std::uintptr_t stream) {
             const auto s = index_arg(slot, "slot");
             py::gil_scoped_release nogil;
             k.release(s, stream);
           }, py::arg("slot"), py::arg("stream") = 0, "Ends a sequence; a fence is recorded on stream.")
      .def("reserve", [](kv::KvManager& k, py::handle slot, py::handle length) {
             if (k.mapper_failed()) return false;
             const auto s = index_arg(slot, "slot"), n = index_arg(length, "length");
             if (k.reserve_fast(s, n)) return true;
             py::gil_scoped_release nogil;
             k.reserve(s, n);
             return true;
           }, py::arg("slot"), py::arg("length"),
           "Guarantees backing for tokens [0, length); False (nothing done) when a mapper error is pending.")
      .def("reserve_batch", [](kv::KvManager& k, py::handle slots, py::handle lengths, DevPtr dst,
                               StreamHandle stream) {
             if (k.mapper_failed()) return false;
             auto s = int_array(slots, "slots"), n = int_array(lengths, "lengths");
             if (s.size() != n.size()) {
               throw InvalidArgumentError("reserve_batch: " + std::to_string(s.size()) + " slots but " +
                                          std::to_string(n.size()) + " lengths");
             }
             const std::int64_t* sp = s.data();
             const std::int64_t* np_ = n.data();
             const auto count = static_cast<std::size_t>(s.size());
             const kv::LengthsTarget to{dst, stream};
             py::gil_scoped_release nogil;
             k.reserve_batch(sp, np_, count, dst ? &to : nullptr);
             return true;
           }, py::arg("slots"), py::arg("lengths"), py::arg("dst") = 0, py::arg("stream") = StreamHandle{},
           "reserve() for every slot at once, all or nothing; then, when dst is given, publish_lengths(dst, stream).")
      .def("can_reserve", [](kv::KvManager& k, py::handle slot, py::handle length) {
             const auto s = index_arg(slot, "slot"), n = index_arg(length, "length");
             py::gil_scoped_release nogil;
             return k.can_reserve(s, n);
           }, py::arg("slot"), py::arg("length"), "Whether reserve(slot, length) would succeed now.")
      .def("free_tokens", &kv::KvManager::free_tokens, NoGil(), "Tokens the obtainable chunks would back.")
      .def("num_free_chunks", &kv::KvManager::num_free_chunks, NoGil(), "Chunks a reservation can still get.")
      .def("prefetch", [](kv::KvManager& k, py::handle slot, py::handle length) {
             k.prefetch(index_arg(slot, "slot"), index_arg(length, "length"));
           }, py::arg("slot"), py::arg("length"), "A background hint: back [0, length).")
      .def("capacity", [](kv::KvManager& k, py::handle slot) { return k.capacity(index_arg(slot, "slot")); })
      .def("reserved", [](kv::KvManager& k, py::handle slot) { return k.reserved(index_arg(slot, "slot")); })
      .def("fork", [](kv::KvManager& k, py::handle src, py::handle prefix) {
             const auto s = index_arg(src, "src"), p = index_arg(prefix, "prefix_len");
             kv::ForkResult r;
             {
               py::gil_scoped_release nogil;
               r = k.fork(s, p);
             }
             return py::make_tuple(r.slot, r.tail_src, r.tail_dst, r.tail_bytes);
           }, py::arg("src"), py::arg("prefix_len"), "(slot, tail_src, tail_dst, tail_bytes): the caller copies the tail.")
      .def("check_writable", [](kv::KvManager& k, py::handle slot, py::handle start, py::handle end) {
             const auto s = index_arg(slot, "slot"), a = index_arg(start, "start"), b = index_arg(end, "end");
             py::gil_scoped_release nogil;
             k.check_writable(s, a, b);
           }, py::arg("slot"), py::arg("start"), py::arg("end"))
      .def("first_writable", [](kv::KvManager& k, py::handle slot) {
             const auto s = index_arg(slot, "slot");
             py::gil_scoped_release nogil;
             return k.first_writable(s);
           }, py::arg("slot"))
      .def("swap_out_length", [](kv::KvManager& k, py::handle slot, py::handle length) {
             const auto s = index_arg(slot, "slot");
             std::optional<std::int64_t> n;
             if (!length.is_none()) n = index_arg(length, "length");
             py::gil_scoped_release nogil;
             return k.swap_out_length(s, n);
           }, py::arg("slot"), py::arg("length"))
      .def("swap_out_finish", &kv::KvManager::swap_out_finish, py::arg("slot"), py::arg("nbytes"), NoGil())
      .def("swap_in", &kv::KvManager::swap_in, py::arg("length"), py::arg("nbytes"), NoGil())
      .def("trim", &kv::KvManager::trim, NoGil())
      .def("publish_lengths", &kv::KvManager::publish_lengths, py::arg("dst"), py::arg("stream"), NoGil(),
           "Copies every slot's reserved length (int32) to dst, ordered on stream.")
      .def("wait_mapper", &kv::KvManager::wait_mapper, py::arg("timeout"), NoGil())
      .def_property_readonly("mapper_alive", &kv::KvManager::mapper_alive)
      .def_property_readonly("mapper_failed", &kv::KvManager::mapper_failed)
      .def("take_mapper_error", &kv::KvManager::take_mapper_error, NoGil())
      .def("chunk_ids", [](kv::KvManager& k, py::handle slot) {
             const auto s = index_arg(slot, "slot");
             py::gil_scoped_release nogil;
             return k.chunk_ids(s);
           }, py::arg("slot"))
      .def("chunk_refs", [](kv::KvManager& k) {
             std::vector<std::pair<std::uint64_t, int>> r;
             {
               py::gil_scoped_release nogil;
               r = k.chunk_refs();
             }
             py::dict d;
             for (const auto& [id, n] : r) d[py::int_(id)] = n;
             return d;
           }, "{chunk id: places it is mapped at}.")
      .def_property_readonly("physical_chunks", &kv::KvManager::physical_chunks)
      .def_property_readonly("sync_waits", &kv::KvManager::sync_waits)
      .def_property_readonly("locked_engine_calls", &kv::KvManager::locked_engine_calls)
      .def("stats", &stats_dict)
      .def("check_invariants", &kv::KvManager::check_invariants, NoGil(), "'' or the first broken invariant.")
      .def("test_fail_background_maps", &kv::KvManager::set_fail_background_maps, py::arg("fail"), NoGil())
      .def("test_hold_next_trim", &kv::KvManager::hold_next_trim, NoGil())
      .def("test_wait_trim_held", &kv::KvManager::wait_trim_held, py::arg("timeout"), NoGil())
      .def("test_release_trim", &kv::KvManager::release_trim, NoGil())
      .def("test_unmap_log", &kv::KvManager::set_unmap_log, py::arg("on"), NoGil())
      .def_property_readonly("test_unmaps", &kv::KvManager::unmap_log)
      .def("suspend", [](kv::KvManager& k, bool discard, const PyEngine* engine) {
             auto copier = copier_of(engine);
             py::gil_scoped_release nogil;
             k.suspend(copier.get(), discard);
           }, py::arg("discard") = false, py::arg("engine") = nullptr,
           "Gives the device memory back (live chunks to host memory unless discard, through `engine` when given).")
      .def("resume", [](kv::KvManager& k, const PyEngine* engine) {
             auto copier = copier_of(engine);
             py::gil_scoped_release nogil;
             k.resume(copier.get());
           }, py::arg("engine") = nullptr, "Maps every saved place again and copies the bytes back.")
      .def_property_readonly("suspended", &kv::KvManager::suspended, "True between suspend() and resume().")
      .def("close", &kv::KvManager::close, NoGil())
      .def_property_readonly("closed", &kv::KvManager::closed);
}

static RegisterBinder reg("kvcache", &bind_kvcache);

}  // namespace glake::py_bind
