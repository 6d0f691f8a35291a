#include "multipath/config.h"

#include <algorithm>
#include <cstdlib>
#include <thread>

#include "common/conf.h"
#include "common/error.h"

namespace glake::multipath {

namespace {
constexpr std::size_t kMinChunk = 4096;
constexpr std::size_t kMinPiece = 256u << 10;

void require(bool ok, const std::string& what) {
  if (!ok) throw InvalidArgumentError("multipath config: " + what);
}
}  // namespace

EngineConfig EngineConfig::from_env() {
  EngineConfig c;
  c.apply(conf::env(kConfEnv), kConfEnv);
  return c;
}

std::vector<std::string> EngineConfig::apply(const std::string& text, const std::string& source) {
  EngineConfig next = *this;  // all or nothing
  std::vector<std::string> keys;
  for (const auto& [key, value] : conf::split(text, source)) {
    next.set(key, value, source);
    keys.push_back(key);
  }
  *this = next;
  return keys;
}

void EngineConfig::set(const std::string& key, const std::string& value, const std::string& source) {
  auto to_int = [&](long long lo, long long hi) {
    return static_cast<int>(conf::parse_int(value, key, source, lo, hi));
  };
  if (key == "chunk_bytes") chunk_bytes = conf::parse_bytes(value, key, source);
  else if (key == "buffers") buffers = to_int(1, 64);
  else if (key == "threads") threads = to_int(0, 256);
  else if (key == "piece_bytes") piece_bytes = conf::parse_bytes(value, key, source);
  else if (key == "streams") streams = to_int(1, 16);
  else if (key == "pinned_streams") pinned_streams = to_int(1, 16);
  else if (key == "pinned_split_min_bytes") pinned_split_min_bytes = conf::parse_bytes(value, key, source);
  else if (key == "small_copy_bytes") small_copy_bytes = conf::parse_bytes(value, key, source);
  else if (key == "peers") peers = conf::parse_bool(value, key, source);
  else if (key == "peer_devices") {
    std::vector<int> devices;
    std::size_t start = 0;
    while (start <= value.size()) {
      std::size_t end = value.find('+', start);
      if (end == std::string::npos) end = value.size();
      const std::string item = conf::trim(value.substr(start, end - start));
      start = end + 1;
      if (item.empty()) continue;
      const std::string what = "peer_devices is a '+'-separated list of device ordinals (e.g. 1+2)";
      char* stop = nullptr;
      const long v = std::strtol(item.c_str(), &stop, 10);
      if (stop != item.c_str() + item.size() || v < 0 || v > 1024) conf::fail(key, value, source, what);
      devices.push_back(static_cast<int>(v));
    }
    peer_devices = devices;
  } else if (key == "peer_min_bytes") peer_min_bytes = conf::parse_bytes(value, key, source);
  else if (key == "peer_chunk_bytes") peer_chunk_bytes = conf::parse_bytes(value, key, source);
  else {
    throw InvalidArgumentError("unknown multipath option '" + key + "' in " + conf::describe(key, value, source) +
                               " (known: chunk_bytes, buffers, threads, piece_bytes, streams, pinned_streams, "
                               "pinned_split_min_bytes, small_copy_bytes, peers, peer_devices, peer_min_bytes, "
                               "peer_chunk_bytes)");
  }
}

int EngineConfig::effective_threads() const {
  if (threads > 0) return threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return static_cast<int>(std::clamp(hw, 1u, 16u));
}

std::size_t EngineConfig::effective_piece_bytes() const {
  std::size_t p = piece_bytes ? piece_bytes : chunk_bytes / static_cast<std::size_t>(effective_threads());
  if (!piece_bytes) p = std::max(p, kMinPiece);
  p = (p + 4095) / 4096 * 4096;  // whole pages: threads never share a page of the staging buffer
  return std::min(p, chunk_bytes);
}

void EngineConfig::validate() const {
  require(chunk_bytes >= kMinChunk, "chunk_bytes=" + std::to_string(chunk_bytes) + " must be at least 4096");
  require(buffers >= 1 && buffers <= 64, "buffers=" + std::to_string(buffers) + " must be in [1, 64]");
  require(threads >= 0 && threads <= 256, "threads=" + std::to_string(threads) + " must be in [0, 256] (0 = auto)");
  require(piece_bytes == 0 || piece_bytes >= 4096,
          "piece_bytes=" + std::to_string(piece_bytes) + " must be 0 (auto) or at least 4096");
  require(streams >= 1 && streams <= 16, "streams=" + std::to_string(streams) + " must be in [1, 16]");
  require(pinned_streams >= 1 && pinned_streams <= 16,
          "pinned_streams=" + std::to_string(pinned_streams) + " must be in [1, 16]");
  require(peer_chunk_bytes >= kMinChunk,
          "peer_chunk_bytes=" + std::to_string(peer_chunk_bytes) + " must be at least 4096");
  for (int d : peer_devices) require(d >= 0, "peer_devices contains " + std::to_string(d));
}

std::string EngineConfig::describe() const {
  std::string peers_list;
  for (int d : peer_devices) peers_list += (peers_list.empty() ? "" : " ") + std::to_string(d);
  return "chunk_bytes=" + std::to_string(chunk_bytes) + ", buffers=" + std::to_string(buffers) +
         ", threads=" + std::to_string(effective_threads()) + ", piece_bytes=" + std::to_string(effective_piece_bytes()) +
         ", streams=" + std::to_string(streams) + ", pinned_streams=" + std::to_string(pinned_streams) +
         ", pinned_split_min_bytes=" + std::to_string(pinned_split_min_bytes) +
         ", small_copy_bytes=" + std::to_string(small_copy_bytes) + ", peers=" + (peers ? "on" : "off") +
         ", peer_devices=[" + peers_list + "], peer_min_bytes=" + std::to_string(peer_min_bytes) +
         ", peer_chunk_bytes=" + std::to_string(peer_chunk_bytes);
}

}  // namespace glake::multipath
