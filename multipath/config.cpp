#include "multipath/config.h"

#include <algorithm>
#include <thread>

#include "common/error.h"

namespace glake::multipath {

namespace {
constexpr std::size_t kMinChunk = 4096;
constexpr std::size_t kMinPiece = 256u << 10;

void require(bool ok, const std::string& what) {
  if (!ok) throw InvalidArgumentError("multipath config: " + what);
}
}  // namespace

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
