#include "multipath/engine.h"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace glake::multipath {

namespace {

constexpr std::size_t kSplitAlign = 64u << 10;  // pieces of a split pinned copy start 64 KiB-aligned

std::size_t round_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

bool is_host_kind(MemKind k) { return k == MemKind::Host || k == MemKind::Pageable || k == MemKind::Pinned; }

}  // namespace

MemKind parse_mem_kind(const std::string& s) {
  if (s == "auto") return MemKind::Auto;
  if (s == "host") return MemKind::Host;
  if (s == "pageable") return MemKind::Pageable;
  if (s == "pinned") return MemKind::Pinned;
  if (s == "device") return MemKind::Device;
  throw InvalidArgumentError("unknown memory kind '" + s + "' (expected auto, host, pageable, pinned or device)");
}

const char* mem_kind_name(MemKind k) {
  switch (k) {
    case MemKind::Auto: return "auto";
    case MemKind::Host: return "host";
    case MemKind::Pageable: return "pageable";
    case MemKind::Pinned: return "pinned";
    case MemKind::Device: return "device";
  }
  return "?";
}

const char* copy_path_name(CopyPath p) {
  switch (p) {
    case CopyPath::Plain: return "plain";
    case CopyPath::StagedH2D: return "staged_h2d";
    case CopyPath::StagedD2H: return "staged_d2h";
    case CopyPath::PinnedSplit: return "pinned_split";
    case CopyPath::Peer: return "peer";
    default: return "?";
  }
}

CopyEngine::CopyEngine(Driver& driver, int device, EngineConfig config)
    : driver_(driver), device_(device), config_(std::move(config)), on_host_(std::strcmp(driver.name(), "host") == 0) {
  config_.validate();
  if (device_ < 0 || device_ >= driver_.device_count()) {
    throw InvalidArgumentError(std::string(driver_.name()) + " backend: device " + std::to_string(device_) +
                               " does not exist (" + std::to_string(driver_.device_count()) + " device(s))");
  }
  if (config_.peers) {
    peers_ = std::make_unique<PeerPaths>(driver_, device_, config_.peer_devices, config_.peer_chunk_bytes);
    if (peers_->count() > 0) peer_start_ = driver_.event_create(device_);
  }
}

CopyEngine::~CopyEngine() {
  std::lock_guard<std::mutex> lock(mu_);
  try {
    if (lanes_) lanes_->synchronize();
  } catch (...) {  // a failed device: free what we can
  }
  pool_.reset();
  lanes_.reset();    // joins host lane threads / destroys streams after their work
  staging_.reset();  // no lane uses the buffers any more
  peers_.reset();
  if (peer_start_) {
    try {
      driver_.event_destroy(device_, peer_start_);
    } catch (...) {
    }
  }
}

MemKind CopyEngine::resolve_one(const char* side, DevPtr ptr, MemKind kind, bool& managed) {
  const std::string who = std::string(side) + "=" + hex(ptr);
  if (on_host_) {
    if (kind == MemKind::Auto) {
      throw InvalidArgumentError("host backend: cannot tell device from host memory for " + who +
                                 ": name the kind (h2d, d2h, or the memory kinds of both sides)");
    }
    return kind == MemKind::Host ? MemKind::Pageable : kind;
  }
  const PointerInfo info = driver_.pointer_info(device_, ptr);
  const std::string is = who + " is " + memory_type_name(info.type) + " memory";
  auto device_side = [&]() {
    if (info.type == MemoryType::Managed) {
      managed = true;
      return MemKind::Device;
    }
    if (info.type != MemoryType::Device) throw InvalidArgumentError(is + ", not device memory");
    if (info.device != device_) {
      throw InvalidArgumentError(who + " is memory of device " + std::to_string(info.device) +
                                 "; this engine copies for device " + std::to_string(device_));
    }
    return MemKind::Device;
  };
  switch (kind) {
    case MemKind::Auto:
      if (info.type == MemoryType::Device || info.type == MemoryType::Managed) return device_side();
      return info.type == MemoryType::Pinned ? MemKind::Pinned : MemKind::Pageable;
    case MemKind::Host:
      if (info.type == MemoryType::Device || info.type == MemoryType::Managed) throw InvalidArgumentError(is + ", not host memory");
      return info.type == MemoryType::Pinned ? MemKind::Pinned : MemKind::Pageable;
    case MemKind::Device:
      return device_side();
    case MemKind::Pinned:
      if (info.type != MemoryType::Pinned) throw InvalidArgumentError(is + ", not pinned host memory");
      return MemKind::Pinned;
    case MemKind::Pageable:  // pinned memory declared pageable is staged as asked
      if (info.type == MemoryType::Device || info.type == MemoryType::Managed) throw InvalidArgumentError(is + ", not host memory");
      return MemKind::Pageable;
  }
  throw InvalidArgumentError("unknown memory kind for " + who);
}

CopyEngine::Resolved CopyEngine::resolve(DevPtr dst, MemKind dst_kind, DevPtr src, MemKind src_kind, std::size_t n) {
  if (is_host_kind(dst_kind) && is_host_kind(src_kind)) {
    throw InvalidArgumentError(std::string("unsupported copy kind ") + mem_kind_name(src_kind) + " -> " +
                               mem_kind_name(dst_kind) + ": both sides are host memory (multipath copies between "
                               "host and device; on the host backend call one side 'device')");
  }
  Resolved r{dst_kind, src_kind, false};
  if (n == 0) {
    if (on_host_ && (dst_kind == MemKind::Auto || src_kind == MemKind::Auto)) {
      throw InvalidArgumentError("host backend: cannot tell device from host memory: name the kinds");
    }
    return r;  // nothing to check further: no byte will move
  }
  if (!dst || !src) throw InvalidArgumentError("null pointer: dst=" + hex(dst) + ", src=" + hex(src) + " for " + bytes_str(n));
  if (dst + n < dst || src + n < src) throw InvalidArgumentError("address range wraps around: n=" + bytes_str(n));
  if (std::max(dst, src) < std::min(dst + n, src + n)) {
    throw InvalidArgumentError("overlapping ranges: dst=[" + hex(dst) + ", " + hex(dst + n) + ") and src=[" + hex(src) +
                               ", " + hex(src + n) + ")");
  }
  r.dst = resolve_one("dst", dst, dst_kind, r.managed);
  r.src = resolve_one("src", src, src_kind, r.managed);
  if (r.dst != MemKind::Device && r.src != MemKind::Device) {
    throw InvalidArgumentError(std::string("unsupported copy: src is ") + mem_kind_name(r.src) + " and dst is " +
                               mem_kind_name(r.dst) + " host memory; multipath copies between host and device");
  }
  return r;
}

CopyPath CopyEngine::choose(const Resolved& r, std::size_t n, bool batched) const {
  if (n == 0 || r.managed || (r.dst == MemKind::Device && r.src == MemKind::Device)) return CopyPath::Plain;
  const bool h2d = r.dst == MemKind::Device;
  const MemKind host = h2d ? r.src : r.dst;
  if (host == MemKind::Pinned) {
    if (peers_ && peers_->count() > 0 && n >= config_.peer_min_bytes) return CopyPath::Peer;
    if (config_.pinned_streams > 1 && n >= config_.pinned_split_min_bytes) return CopyPath::PinnedSplit;
    return CopyPath::Plain;
  }
  // Alone, a small pageable copy is faster through the driver than through a pipeline it cannot
  // fill; in a batch it joins the pipeline that the others fill.
  if (n < config_.small_copy_bytes && !batched) return CopyPath::Plain;
  return h2d ? CopyPath::StagedH2D : CopyPath::StagedD2H;
}

std::string CopyEngine::plan(DevPtr dst, MemKind dst_kind, DevPtr src, MemKind src_kind, std::size_t n) {
  return copy_path_name(choose(resolve(dst, dst_kind, src, src_kind, n), n));
}

void CopyEngine::ensure_lanes() {
  if (!lanes_) lanes_ = CopyLanes::create(driver_, device_, std::max(config_.streams, config_.pinned_streams));
}

void CopyEngine::ensure_staging() {
  if (!staging_) staging_ = std::make_unique<StagingBuffers>(driver_, device_, config_.buffers, config_.chunk_bytes);
  if (!pool_) pool_ = std::make_unique<WorkerPool>(config_.effective_threads());
}

void CopyEngine::check_not_capturing(StreamHandle stream) {
  if (!on_host_ && driver_.stream_is_capturing(device_, stream)) {
    throw InvalidArgumentError("stream " + hex(stream) + " is capturing a CUDA graph: multipath copies wait on the "
                               "host and cannot be captured; copy with torch inside graphs");
  }
}

void CopyEngine::count(CopyPath path, std::size_t n) {
  calls_[static_cast<int>(path)]++;
  bytes_[static_cast<int>(path)] += n;
}

void CopyEngine::copy(DevPtr dst, MemKind dst_kind, DevPtr src, MemKind src_kind, std::size_t n, StreamHandle stream,
                      bool non_blocking) {
  const auto t0 = std::chrono::steady_clock::now();
  const Resolved r = resolve(dst, dst_kind, src, src_kind, n);
  if (n == 0) {
    calls_[static_cast<int>(CopyPath::Plain)]++;
    return;
  }
  check_not_capturing(stream);
  std::lock_guard<std::mutex> lock(mu_);
  const CopyPath path = choose(r, n);
  try {
    if (path == CopyPath::StagedH2D || path == CopyPath::StagedD2H) {
      const bool h2d = path == CopyPath::StagedH2D;
      copy_staged(h2d, {StagedExtent{h2d ? dst : src, h2d ? src : dst, n}}, stream, non_blocking);
    } else {
      copy_unstaged(path, dst, src, n, stream, non_blocking);
    }
  } catch (...) {
    errors_++;
    throw;
  }
  count(path, n);
  busy_ns_ += static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
}

void CopyEngine::copy_many(const std::vector<CopyItem>& items, MemKind dst_kind, MemKind src_kind, StreamHandle stream,
                           bool non_blocking) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<CopyPath> paths;
  std::vector<StagedExtent> to_device, to_host;
  for (const CopyItem& it : items) {  // every item is checked before any byte moves
    const Resolved r = resolve(it.dst, dst_kind, it.src, src_kind, it.n);
    paths.push_back(choose(r, it.n, true));
    if (paths.back() == CopyPath::StagedH2D) to_device.push_back(StagedExtent{it.dst, it.src, it.n});
    if (paths.back() == CopyPath::StagedD2H) to_host.push_back(StagedExtent{it.src, it.dst, it.n});
  }
  check_not_capturing(stream);
  std::lock_guard<std::mutex> lock(mu_);
  try {
    for (std::size_t i = 0; i < items.size(); ++i) {
      const CopyPath path = paths[i];
      if (path != CopyPath::StagedH2D && path != CopyPath::StagedD2H && items[i].n > 0) {
        copy_unstaged(path, items[i].dst, items[i].src, items[i].n, stream, true);
      }
    }
    if (!to_host.empty()) copy_staged(false, to_host, stream, true);
    if (!to_device.empty()) copy_staged(true, to_device, stream, true);
    if (!non_blocking) drain(stream);
  } catch (...) {
    errors_++;
    // Copies of earlier items may still be running into or out of the caller's buffers, which it
    // frees once this throws: wait for them (their own failure changes nothing now).
    try {
      drain(stream);
    } catch (...) {
    }
    throw;
  }
  for (std::size_t i = 0; i < items.size(); ++i) count(paths[i], items[i].n);
  busy_ns_ += static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
}

void CopyEngine::drain(StreamHandle stream) {
  // The plain copies run on the caller's stream, the others on the lanes and the peers' streams.
  if (lanes_) lanes_->synchronize();
  if (peers_) peers_->synchronize();
  if (!on_host_) driver_.stream_synchronize(device_, stream);
}

void CopyEngine::copy_unstaged(CopyPath path, DevPtr dst, DevPtr src, std::size_t n, StreamHandle stream,
                               bool non_blocking) {
  switch (path) {
    case CopyPath::Plain:
      copy_plain(dst, src, n, stream, non_blocking);
      return;
    case CopyPath::PinnedSplit:
      copy_split(dst, src, n, stream, non_blocking);
      return;
    case CopyPath::Peer:
      copy_peers(dst, src, n, stream, non_blocking);
      return;
    default:
      throw Error("multipath: no such copy path");
  }
}

void CopyEngine::copy_staged(bool h2d, const std::vector<StagedExtent>& extents, StreamHandle stream,
                             bool non_blocking) {
  ensure_lanes();
  ensure_staging();
  lanes_->order_after(stream);
  run_staged(h2d ? StagedDirection::HostToDevice : StagedDirection::DeviceToHost, extents, *staging_, *lanes_, *pool_,
             StagedParams{config_.effective_piece_bytes(), config_.streams}, staged_);
  if (h2d) {  // D2H data has landed already; H2D lane copies may still run
    lanes_->order_before(stream);
    if (!non_blocking) lanes_->synchronize();
  }
}

void CopyEngine::copy_plain(DevPtr dst, DevPtr src, std::size_t n, StreamHandle stream, bool non_blocking) {
  if (on_host_) {
    if (lanes_) lanes_->order_after(stream);  // earlier non-blocking copies land first
    driver_.memcpy(device_, dst, src, n);
    return;
  }
  driver_.memcpy_async(device_, dst, src, n, stream);
  if (!non_blocking) driver_.stream_synchronize(device_, stream);
}

void CopyEngine::copy_split(DevPtr dst, DevPtr src, std::size_t n, StreamHandle stream, bool non_blocking) {
  ensure_lanes();
  const std::size_t parts = static_cast<std::size_t>(std::min(config_.pinned_streams, lanes_->count()));
  const std::size_t part = round_up((n + parts - 1) / parts, kSplitAlign);
  lanes_->order_after(stream);
  for (std::size_t i = 0; i < parts && i * part < n; ++i) {
    const std::size_t off = i * part;
    lanes_->submit(static_cast<int>(i), dst + off, src + off, std::min(part, n - off));
  }
  lanes_->order_before(stream);
  if (!non_blocking) lanes_->synchronize();
}

void CopyEngine::copy_peers(DevPtr dst, DevPtr src, std::size_t n, StreamHandle stream, bool non_blocking) {
  ensure_lanes();
  const std::size_t parts = static_cast<std::size_t>(peers_->count()) + 1;
  const std::size_t share = round_up((n + parts - 1) / parts, kSplitAlign);
  lanes_->order_after(stream);
  driver_.event_record(device_, peer_start_, stream);
  for (int i = 0; i < peers_->count(); ++i) {
    const std::size_t off = static_cast<std::size_t>(i + 1) * share;
    if (off >= n) break;
    peers_->enqueue(i, dst + off, src + off, std::min(share, n - off), peer_start_);
  }
  lanes_->submit(0, dst, src, std::min(share, n));  // the device's own link carries the first share
  lanes_->order_before(stream);
  peers_->order_before(stream);
  if (!non_blocking) {
    lanes_->synchronize();
    peers_->synchronize();
  }
}

void CopyEngine::synchronize() {
  std::lock_guard<std::mutex> lock(mu_);
  if (lanes_) lanes_->synchronize();
  if (peers_) peers_->synchronize();
}

EngineStats CopyEngine::stats() const {
  EngineStats s;
  for (int i = 0; i < static_cast<int>(CopyPath::kCount); ++i) {
    s.calls[i] = calls_[i].load();
    s.bytes[i] = bytes_[i].load();
  }
  s.chunks = staged_.chunks.load();
  s.cpu_copy_ns = staged_.cpu_copy_ns.load();
  s.wait_ns = staged_.wait_ns.load();
  s.busy_ns = busy_ns_.load();
  s.errors = errors_.load();
  return s;
}

void CopyEngine::reset_stats() {
  for (int i = 0; i < static_cast<int>(CopyPath::kCount); ++i) {
    calls_[i] = 0;
    bytes_[i] = 0;
  }
  staged_.chunks = 0;
  staged_.cpu_copy_ns = 0;
  staged_.wait_ns = 0;
  busy_ns_ = 0;
  errors_ = 0;
}

std::vector<int> CopyEngine::peer_devices() const { return peers_ ? peers_->devices() : std::vector<int>{}; }

std::vector<std::string> CopyEngine::peers_skipped() const {
  return peers_ ? peers_->skipped() : std::vector<std::string>{};
}

}  // namespace glake::multipath
