// This process's client of the per-user dedup broker (glake/dedup/broker.py), for the shim. It speaks
// the protocol of glake/dedup/wire.py and client.py (version 2): one JSON object per SOCK_SEQPACKET
// datagram of at most kMaxMessage bytes, the chunks' fds riding along (SCM_RIGHTS) in the order of
// their keys, at most kMaxKeys keys per request.
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace glake::shim::dedup {

inline constexpr std::size_t kMaxMessage = 1 << 16;           ///< bytes of one message (wire.MAX_MESSAGE)
inline constexpr std::size_t kMaxKeys = 64;                   ///< keys, so fds, per request (wire.MAX_FDS)
inline constexpr int kProtocol = 2;                           ///< in the default socket's name (wire.PROTOCOL)
inline constexpr char kSocketEnv[] = "GLAKE_DEDUP_SOCKET";    ///< overrides the socket (wire.SOCKET_ENV)

/// Exports the chunk of one hold as a new fd owned by the caller, or returns -1 once the chunk is gone.
/// Called with the client's lock held: it must not call the client.
using FdMaker = std::function<int()>;

/// This process's connection to the dedup broker, requests one at a time (thread-safe with a mutex).
/// Connects on first use; does NOT start a broker (no Python here): when none answers it throws
/// glake::Error("no dedup broker answers on PATH: start one with `glake dedupd` ...").
/// After the broker closed the connection (restart), a request reconnects once and first publishes
/// again every chunk this process holds (once per key, then "hold" for each further hold), as
/// client.py's _republish does. A reply this process cannot take in whole (fds dropped by the kernel,
/// malformed) also closes the connection: the broker then forgets this connection's holds, and the
/// next request publishes again what this process remembers, so both agree again. A forked child
/// leaves the parent's connection and holds to the parent and connects on its own.
class BrokerClient {
 public:
  /// A client of the broker on `path` (nothing is connected yet).
  explicit BrokerClient(std::string path = default_path());
  ~BrokerClient();  // closes the socket
  BrokerClient(const BrokerClient&) = delete;
  BrokerClient& operator=(const BrokerClient&) = delete;

  /// $GLAKE_DEDUP_SOCKET, else "<runtime dir>/dedup-v2.sock" (same as glake/dedup/wire.py socket_path()).
  static std::string default_path();
  /// The broker's socket.
  const std::string& path() const;

  /// For each key, an fd of its canonical chunk (the caller closes it), or -1.
  std::vector<int> lookup(const std::vector<std::string>& keys);
  /// Offers our chunks (makers[i]() exports the one of keys[i]; those fds are closed by publish) as
  /// canonical. For each key: -1 = ours is canonical now, held once by this process (remembered with
  /// its maker for republishing); else an fd of the chunk someone published first (caller closes).
  std::vector<int> publish(const std::vector<std::string>& keys, std::size_t size, const std::vector<FdMaker>& makers);
  /// One more hold on each key; false where the chunk is gone. Held ones are remembered with their maker.
  std::vector<bool> hold(const std::vector<std::string>& keys, const std::vector<FdMaker>& makers, std::size_t size);
  /// Gives back one hold on `key` and forgets one remembered maker: one whose chunk is gone if there is
  /// one (the holder dropping it unmapped its chunk first), so the others can still republish. Best
  /// effort: a broker that is gone already dropped our holds with the connection (never throws).
  void drop(const std::string& key) noexcept;
  /// Number of reconnects done (for stats/tests).
  int reconnects() const;

 private:
  /// What a reply must look like: {"found":[..]}, {"canonical":[..]}, {"ok":[..]} or {"ok":bool}.
  enum class Shape { Found, Canonical, OkList, OkFlag };
  struct Reply;  // its flags and the fds it carried (closed unless taken)
  /// The size and one maker per hold of a chunk this process holds.
  struct Held {
    std::size_t size = 0;
    std::vector<FdMaker> makers;
  };

  Reply request(const char* op, const std::string& msg, const std::vector<int>& fds, Shape shape, std::size_t n);
  Reply roundtrip(const char* op, const std::string& msg, const std::vector<int>& fds, Shape shape, std::size_t n);
  void ensure();
  void republish();
  void close_socket() noexcept;
  void forget_after_fork() noexcept;
  void remember(const std::string& key, std::size_t size, const FdMaker& maker);

  const std::string path_;
  mutable std::mutex mutex_;
  int sock_ = -1;
  int pid_;  // the process whose connection and holds these are
  bool connected_once_ = false;
  int reconnects_ = 0;
  std::map<std::string, Held> held_;
};

}  // namespace glake::shim::dedup
