// glake._C bindings of the multipath copy engine (glake.multipath is the public front).
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "common/conf.h"
#include "multipath/engine.h"
#include "python/common.h"
#include "python/engine_handle.h"

namespace glake::py_bind {

namespace {

using multipath::CopyEngine;
using multipath::CopyPath;
using multipath::EngineConfig;

/// The engine configuration: defaults, then $GLAKE_MULTIPATH_CONF, then keyword arguments (as text, the
/// same syntax the variable takes: glake.units.conf_text converts Python values).
EngineConfig config_from(const std::map<std::string, std::string>& kwargs) {
  EngineConfig c = EngineConfig::from_env();
  for (const auto& [key, value] : kwargs) c.set(key, value, conf::kKeyword);
  c.validate();
  return c;
}

py::dict config_dict(const EngineConfig& c, bool effective) {
  py::dict d;
  d["chunk_bytes"] = c.chunk_bytes;
  d["buffers"] = c.buffers;
  d["threads"] = effective ? c.effective_threads() : c.threads;
  d["piece_bytes"] = effective ? c.effective_piece_bytes() : c.piece_bytes;
  d["streams"] = c.streams;
  d["pinned_streams"] = c.pinned_streams;
  d["pinned_split_min_bytes"] = c.pinned_split_min_bytes;
  d["small_copy_bytes"] = c.small_copy_bytes;
  d["peers"] = c.peers;
  d["peer_devices"] = c.peer_devices;
  d["peer_min_bytes"] = c.peer_min_bytes;
  d["peer_chunk_bytes"] = c.peer_chunk_bytes;
  return d;
}

py::dict stats_dict(const CopyEngine& e) {
  const multipath::EngineStats s = e.stats();
  py::dict d;
  d["backend"] = e.driver().name();
  d["device"] = e.device();
  std::uint64_t calls = 0, bytes = 0;
  for (int i = 0; i < static_cast<int>(CopyPath::kCount); ++i) {
    const std::string p = multipath::copy_path_name(static_cast<CopyPath>(i));
    d[py::str("calls." + p)] = s.calls[i];
    d[py::str("bytes." + p)] = s.bytes[i];
    calls += s.calls[i];
    bytes += s.bytes[i];
  }
  d["calls"] = calls;
  d["bytes"] = bytes;
  d["chunks"] = s.chunks;
  d["cpu_copy_ns"] = s.cpu_copy_ns;
  d["wait_ns"] = s.wait_ns;
  d["busy_ns"] = s.busy_ns;
  d["errors"] = s.errors;
  d["peer_devices"] = e.peer_devices();
  return d;
}

}  // namespace

void bind_multipath(py::module_& m) {
  m.def("multipath_default_config", [] { return config_dict(EngineConfig{}, false); },
        "The built-in multipath engine configuration (threads=0 and piece_bytes=0 mean automatic).");
  m.def("multipath_parse_conf", [](const std::string& text, const std::string& source) {
        EngineConfig c;
        const std::vector<std::string> keys = c.apply(text, source);
        const py::dict all = config_dict(c, false);
        py::dict out;
        for (const auto& k : keys) out[py::str(k)] = all[py::str(k)];
        return out;
      }, py::arg("text"), py::arg("source") = multipath::kConfEnv,
      "The keys a 'key:value,...' text sets, with their parsed values (not validated as a whole).");
  m.def("multipath_pointer_kind", [](std::uintptr_t ptr, int device, Backend b) {
        Driver& d = get_driver(b);
        py::gil_scoped_release nogil;
        const PointerInfo info = d.pointer_info(device, ptr);
        return std::make_pair(std::string(memory_type_name(info.type)), info.device);
      }, py::arg("ptr"), py::arg("device") = 0, py::arg("backend") = py::none(),
      "(kind, device) of an address: kind is device, pinned, pageable, managed or unknown (host backend).");

  py::class_<PyEngine>(m, "MultipathEngine", "One device's multipath copy engine (see glake.multipath.Engine).")
      .def(py::init([](const std::map<std::string, std::string>& config, int device, Backend b) {
             Driver& d = get_driver(b);
             EngineConfig c = config_from(config);
             py::gil_scoped_release nogil;
             return PyEngine{std::make_shared<CopyEngine>(d, device, std::move(c))};
           }), py::arg("config"), py::arg("device") = 0, py::arg("backend") = py::none())
      .def("copy", [](const PyEngine& pe, std::uintptr_t dst, std::uintptr_t src, long long n, const std::string& dst_kind,
                      const std::string& src_kind, std::uintptr_t stream, bool non_blocking) {
             std::shared_ptr<CopyEngine> e = pe.get();
             const std::size_t bytes = to_size(n, "nbytes", true);
             const auto dk = multipath::parse_mem_kind(dst_kind);
             const auto sk = multipath::parse_mem_kind(src_kind);
             py::gil_scoped_release nogil;
             e->copy(dst, dk, src, sk, bytes, stream, non_blocking);
           }, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("dst_kind"), py::arg("src_kind"),
           py::arg("stream") = 0, py::arg("non_blocking") = false,
           "Copies nbytes from src to dst; kinds are auto, host, pageable, pinned or device.")
      .def("copy_many", [](const PyEngine& pe, const std::vector<std::tuple<std::uintptr_t, std::uintptr_t, long long>>& items,
                           const std::string& dst_kind, const std::string& src_kind, std::uintptr_t stream, bool non_blocking) {
             std::shared_ptr<CopyEngine> e = pe.get();
             std::vector<multipath::CopyItem> batch;
             for (const auto& [dst, src, n] : items) batch.push_back(multipath::CopyItem{dst, src, to_size(n, "nbytes", true)});
             const auto dk = multipath::parse_mem_kind(dst_kind);
             const auto sk = multipath::parse_mem_kind(src_kind);
             py::gil_scoped_release nogil;
             e->copy_many(batch, dk, sk, stream, non_blocking);
           }, py::arg("items"), py::arg("dst_kind"), py::arg("src_kind"), py::arg("stream") = 0,
           py::arg("non_blocking") = false,
           "Copies each (dst, src, nbytes) of one direction; pageable ones share one staging pipeline.")
      .def("plan", [](const PyEngine& pe, std::uintptr_t dst, std::uintptr_t src, long long n, const std::string& dst_kind,
                      const std::string& src_kind) {
             std::shared_ptr<CopyEngine> e = pe.get();
             const std::size_t bytes = to_size(n, "nbytes", true);
             const auto dk = multipath::parse_mem_kind(dst_kind);
             const auto sk = multipath::parse_mem_kind(src_kind);
             py::gil_scoped_release nogil;
             return e->plan(dst, dk, src, sk, bytes);
           }, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("dst_kind"), py::arg("src_kind"),
           "The path copy() would take (plain, staged_h2d, staged_d2h, pinned_split, peer), after validation.")
      .def("synchronize", [](const PyEngine& pe) {
             std::shared_ptr<CopyEngine> e = pe.get();
             py::gil_scoped_release nogil;
             e->synchronize();
           }, "Waits until every copy submitted so far is complete.")
      .def("stats", [](const PyEngine& pe) { return stats_dict(*pe.get()); }, "The engine's counters.")
      .def("reset_stats", [](const PyEngine& pe) { pe.get()->reset_stats(); }, "Zeroes the counters.")
      .def("config", [](const PyEngine& pe) { return config_dict(pe.get()->config(), true); },
           "The configuration in use (threads and piece_bytes resolved).")
      .def("peers_skipped", [](const PyEngine& pe) { return pe.get()->peers_skipped(); },
           "Why candidate peer devices are not used.")
      .def("close", [](PyEngine& pe) {
             std::shared_ptr<CopyEngine> last = std::move(pe.e);
             py::gil_scoped_release nogil;
             last.reset();  // waits for outstanding copies, frees buffers, joins threads
           }, "Waits for outstanding copies and frees buffers, threads and streams (idempotent).")
      .def_property_readonly("closed", [](const PyEngine& pe) { return !pe.e; })
      .def_property_readonly("device", [](const PyEngine& pe) { return pe.get()->device(); })
      .def_property_readonly("backend", [](const PyEngine& pe) { return std::string(pe.get()->driver().name()); });
}

static RegisterBinder reg("multipath", &bind_multipath);

}  // namespace glake::py_bind
