#include "shim/dedup_broker.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "common/error.h"
#include "shim/runtime_dir.h"

namespace glake::shim::dedup {

namespace {

/// One owned file descriptor, closed when it goes.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = o.release();
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

/// The connection went away (the broker exited or restarted): the request may reconnect.
struct Lost {
  std::string why;
};

/// A reply that is not one of the shapes the broker sends.
struct Malformed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// A value of a reply: what the broker's replies hold (no nested objects, arrays of bools only).
struct Value {
  enum class Kind { Null, Bool, Number, String, Bools } kind = Kind::Null;
  bool flag = false;
  long long number = 0;
  std::string text;
  std::vector<bool> bools;
};
using Object = std::map<std::string, Value>;

/// Reads one JSON object of the shapes above.
class Reader {
 public:
  explicit Reader(const std::string& s) : s_(s) {}

  Object object() {
    Object out;
    skip_space();
    expect('{');
    skip_space();
    if (peek() == '}') {
      ++pos_;
    } else {
      for (;;) {
        skip_space();
        std::string key = string();
        skip_space();
        expect(':');
        skip_space();
        out[std::move(key)] = value();
        skip_space();
        const char c = next();
        if (c == '}') break;
        if (c != ',') throw Malformed("expected ',' or '}' at byte " + std::to_string(pos_ - 1));
      }
    }
    skip_space();
    if (pos_ != s_.size()) throw Malformed("bytes after the object at byte " + std::to_string(pos_));
    return out;
  }

 private:
  char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  char next() {
    if (pos_ >= s_.size()) throw Malformed("it ends early");
    return s_[pos_++];
  }
  void expect(char c) {
    if (next() != c) throw Malformed(std::string("expected '") + c + "' at byte " + std::to_string(pos_ - 1));
  }
  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }
  void literal(const char* word) {
    for (const char* p = word; *p; ++p) expect(*p);
  }

  Value value() {
    Value v;
    const char c = peek();
    if (c == '"') {
      v.kind = Value::Kind::String;
      v.text = string();
    } else if (c == 't' || c == 'f') {
      v.kind = Value::Kind::Bool;
      v.flag = boolean();
    } else if (c == 'n') {
      literal("null");
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      v.kind = Value::Kind::Number;
      v.number = number();
    } else if (c == '[') {
      v.kind = Value::Kind::Bools;
      ++pos_;
      skip_space();
      if (peek() == ']') {
        ++pos_;
        return v;
      }
      for (;;) {
        skip_space();
        v.bools.push_back(boolean());
        skip_space();
        const char d = next();
        if (d == ']') break;
        if (d != ',') throw Malformed("expected ',' or ']' at byte " + std::to_string(pos_ - 1));
      }
    } else {
      throw Malformed("unexpected value at byte " + std::to_string(pos_));
    }
    return v;
  }

  bool boolean() {
    if (peek() == 't') {
      literal("true");
      return true;
    }
    literal("false");
    return false;
  }

  long long number() {
    const std::size_t start = pos_;
    if (peek() == '-') ++pos_;
    while (peek() >= '0' && peek() <= '9') ++pos_;
    const std::string digits = s_.substr(start, pos_ - start);
    if (digits.empty() || digits == "-" || digits.size() > 19 || peek() == '.' || peek() == 'e' || peek() == 'E') {
      throw Malformed("not an integer at byte " + std::to_string(start));
    }
    return std::strtoll(digits.c_str(), nullptr, 10);
  }

  unsigned hex4() {
    unsigned u = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = next();
      u <<= 4;
      if (c >= '0' && c <= '9') {
        u |= static_cast<unsigned>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        u |= static_cast<unsigned>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        u |= static_cast<unsigned>(c - 'A' + 10);
      } else {
        throw Malformed("bad \\u escape at byte " + std::to_string(pos_ - 1));
      }
    }
    return u;
  }

  static void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string string() {
    expect('"');
    std::string out;
    for (;;) {
      const char c = next();
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) throw Malformed("control byte in a string at byte " + std::to_string(pos_ - 1));
      if (c != '\\') {
        out += c;
        continue;
      }
      const char e = next();
      switch (e) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(pos_, 2, "\\u") == 0) {  // a surrogate pair
            const std::size_t back = pos_;
            pos_ += 2;
            const unsigned low = hex4();
            if (low >= 0xDC00 && low < 0xE000) {
              cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            } else {
              pos_ = back;
            }
          }
          utf8(out, cp >= 0xD800 && cp < 0xE000 ? 0xFFFD : cp);  // a lone surrogate
          break;
        }
        default: throw Malformed("bad escape at byte " + std::to_string(pos_ - 1));
      }
    }
  }

  const std::string& s_;
  std::size_t pos_ = 0;
};

/// `s` as a JSON string.
std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
      out += buf;
    } else {
      out += c;
    }
  }
  return out + '"';
}

/// {"op":OP,"keys":[...]} plus `extra` (",\"size\":N" or "").
std::string keys_message(const char* op, const std::vector<std::string>& keys, const std::string& extra = "") {
  std::string out = std::string("{\"op\":\"") + op + "\",\"keys\":[";
  for (std::size_t i = 0; i < keys.size(); ++i) out += (i ? "," : "") + quoted(keys[i]);
  return out + "]" + extra + "}";
}

std::string publish_message(const std::vector<std::string>& keys, std::size_t size) {
  return keys_message("publish", keys, ",\"size\":" + std::to_string(size));
}

std::string errno_text(int err) { return std::strerror(err); }

/// Space for the fds of one message.
union Control {
  cmsghdr align;
  char buf[CMSG_SPACE(sizeof(int) * kMaxKeys)];
};

/// Sends one message with `fds` (which stay the caller's).
void send_message(int sock, const std::string& where, const std::string& data, const std::vector<int>& fds) {
  iovec iov{const_cast<char*>(data.data()), data.size()};
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  Control control;
  std::memset(&control, 0, sizeof(control));
  if (!fds.empty()) {
    m.msg_control = control.buf;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  for (;;) {
    if (sendmsg(sock, &m, MSG_NOSIGNAL) >= 0) return;
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EPIPE || err == ECONNRESET || err == ENOTCONN) throw Lost{"sendmsg: " + errno_text(err)};
    throw Error(where + ": sendmsg failed: " + errno_text(err));
  }
}

/// One message as it came: its bytes, the fds it carried (now ours) and whether anything was cut.
struct Received {
  std::string data;
  std::vector<Fd> fds;
  bool fds_dropped = false;  // MSG_CTRUNC
  bool cut = false;          // MSG_TRUNC: longer than kMaxMessage
};

Received receive_message(int sock, const std::string& where) {
  Received r;
  r.data.resize(kMaxMessage);
  iovec iov{r.data.data(), r.data.size()};
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  Control control;
  m.msg_control = control.buf;
  m.msg_controllen = sizeof(control.buf);
  ssize_t n;
  do {
    n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    const int err = errno;
    if (err == ECONNRESET) throw Lost{"recvmsg: " + errno_text(err)};
    throw Error(where + ": recvmsg failed: " + errno_text(err));
  }
  for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      r.fds.emplace_back(fd);
    }
  }
  r.data.resize(static_cast<std::size_t>(n));
  r.fds_dropped = (m.msg_flags & MSG_CTRUNC) != 0;
  r.cut = (m.msg_flags & MSG_TRUNC) != 0;
  return r;
}

/// A connected socket to the broker on `path`.
Fd connect_to(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    throw Error("dedup broker socket path " + path + " has " + std::to_string(path.size()) + " bytes (1 to " +
                std::to_string(sizeof(addr.sun_path) - 1) + " fit a unix socket)");
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  Fd s(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (s.get() < 0) throw Error("socket(AF_UNIX, SOCK_SEQPACKET) for the dedup broker on " + path + " failed: " + errno_text(errno));
  int rc;
  do {
    rc = ::connect(s.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    const int err = errno;
    if (err == ENOENT || err == ECONNREFUSED) {
      throw Error("no dedup broker answers on " + path + ": start one with `glake dedupd` (or point " +
                  std::string(kSocketEnv) + " at a running one)");
    }
    throw Error("connect(" + path + ") to the dedup broker failed: " + errno_text(err));
  }
  return s;
}

/// Refuses more keys than one request carries, or a maker count that does not match.
void check_keys(const char* op, std::size_t keys, std::size_t makers) {
  if (keys > kMaxKeys) {
    throw InvalidArgumentError(std::string("dedup ") + op + " of " + std::to_string(keys) + " keys: at most " +
                               std::to_string(kMaxKeys) + " per request");
  }
  if (makers != keys) {
    throw InvalidArgumentError(std::string("dedup ") + op + " of " + std::to_string(keys) + " keys with " +
                               std::to_string(makers) + " fd makers (one per key)");
  }
}

}  // namespace

struct BrokerClient::Reply {
  std::vector<bool> flags;
  std::vector<Fd> fds;
};

BrokerClient::BrokerClient(std::string path) : path_(std::move(path)), pid_(static_cast<int>(getpid())) {}

BrokerClient::~BrokerClient() { close_socket(); }

std::string BrokerClient::default_path() {
  if (const char* env = std::getenv(kSocketEnv); env && *env) return env;
  std::string why;
  const std::string dir = private_runtime_dir(why);
  if (dir.empty()) throw Error("no dedup broker socket: " + why + " (or set " + std::string(kSocketEnv) + ")");
  return dir + "/dedup-v" + std::to_string(kProtocol) + ".sock";
}

const std::string& BrokerClient::path() const { return path_; }

int BrokerClient::reconnects() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return reconnects_;
}

void BrokerClient::close_socket() noexcept {
  if (sock_ >= 0) ::close(sock_);
  sock_ = -1;
}

void BrokerClient::forget_after_fork() noexcept {
  if (pid_ == static_cast<int>(getpid())) return;
  pid_ = static_cast<int>(getpid());
  close_socket();  // this copy only: the parent's connection, and the holds on it, stay the parent's
  held_.clear();
  connected_once_ = false;
  reconnects_ = 0;
}

void BrokerClient::ensure() {
  forget_after_fork();
  if (sock_ >= 0) return;
  sock_ = connect_to(path_).release();
  if (connected_once_) ++reconnects_;
  connected_once_ = true;
  if (held_.empty()) return;
  try {
    republish();
  } catch (...) {
    close_socket();  // what was republished goes with it: the next attempt starts over
    throw;
  }
}

void BrokerClient::republish() {
  for (auto it = held_.begin(); it != held_.end();) {
    const std::string& key = it->first;
    Held& held = it->second;
    std::vector<FdMaker> live;  // a holder whose chunk is gone no longer counts
    Fd mine;
    for (const FdMaker& make : held.makers) {
      Fd f(make());
      if (f.get() < 0) continue;
      live.push_back(make);
      if (mine.get() < 0) mine = std::move(f);
    }
    if (mine.get() < 0) {
      it = held_.erase(it);
      continue;
    }
    const Reply r = roundtrip("publish", publish_message({key}, held.size), {mine.get()}, Shape::Canonical, 1);
    mine.reset();
    if (!r.flags[0]) roundtrip("hold", keys_message("hold", {key}), {}, Shape::OkList, 1);  // the same bytes, first
    for (std::size_t i = 1; i < live.size(); ++i) roundtrip("hold", keys_message("hold", {key}), {}, Shape::OkList, 1);
    held.makers = std::move(live);
    ++it;
  }
}

BrokerClient::Reply BrokerClient::request(const char* op, const std::string& msg, const std::vector<int>& fds,
                                          Shape shape, std::size_t n) {
  for (int attempt = 0;; ++attempt) {
    try {
      ensure();
      return roundtrip(op, msg, fds, shape, n);
    } catch (const Lost& lost) {
      close_socket();
      if (attempt) {
        throw Error("the dedup broker on " + path_ + " closed the connection during " + op +
                    ", again after a reconnect (" + lost.why + ")");
      }
    }
  }
}

BrokerClient::Reply BrokerClient::roundtrip(const char* op, const std::string& msg, const std::vector<int>& fds,
                                            Shape shape, std::size_t n) {
  const std::string where = std::string("dedup broker on ") + path_ + ", " + op;
  if (msg.size() > kMaxMessage) {
    throw InvalidArgumentError(where + ": a message of " + std::to_string(msg.size()) + " bytes exceeds " +
                               std::to_string(kMaxMessage));
  }
  send_message(sock_, where, msg, fds);
  Received rx = receive_message(sock_, where);
  if (rx.fds_dropped) {
    close_socket();  // the broker counted what it handed out: let it forget this connection's holds
    throw Error(where + ": a file descriptor was dropped on the way (MSG_CTRUNC): too many open files "
                "(raise `ulimit -n`)");
  }
  if (rx.data.empty() && !rx.cut) throw Lost{"the broker closed the connection"};
  const auto malformed = [&](const std::string& why) {
    close_socket();
    return Error(where + ": malformed reply (" + why + "): " + rx.data.substr(0, 200));
  };
  if (rx.cut) throw malformed("longer than " + std::to_string(kMaxMessage) + " bytes");
  Object obj;
  try {
    obj = Reader(rx.data).object();
  } catch (const Malformed& e) {
    throw malformed(e.what());
  }
  if (const auto e = obj.find("error"); e != obj.end()) {
    if (e->second.kind != Value::Kind::String) throw malformed("\"error\" is not a string");
    throw Error(where + ": the broker answered: " + e->second.text);  // it kept nothing of the request
  }
  static const char* const kField[] = {"found", "canonical", "ok", "ok"};
  const char* field = kField[static_cast<int>(shape)];
  const auto f = obj.find(field);
  if (f == obj.end()) throw malformed(std::string("no \"") + field + "\"");
  Reply r;
  if (shape == Shape::OkFlag) {
    if (f->second.kind != Value::Kind::Bool) throw malformed(std::string("\"") + field + "\" is not a bool");
    r.flags = {f->second.flag};
  } else {
    if (f->second.kind != Value::Kind::Bools || f->second.bools.size() != n) {
      throw malformed(std::string("\"") + field + "\" is not a list of " + std::to_string(n) + " bools");
    }
    r.flags = f->second.bools;
  }
  std::size_t want = 0;  // found: one fd per true; canonical: one per false; ok: none
  for (const bool b : r.flags) {
    if ((shape == Shape::Found && b) || (shape == Shape::Canonical && !b)) ++want;
  }
  if (rx.fds.size() != want) {
    throw malformed(std::to_string(rx.fds.size()) + " fds where " + std::to_string(want) + " belong");
  }
  r.fds = std::move(rx.fds);
  return r;
}

void BrokerClient::remember(const std::string& key, std::size_t size, const FdMaker& maker) {
  Held& held = held_[key];
  held.size = size;
  held.makers.push_back(maker);
}

std::vector<int> BrokerClient::lookup(const std::vector<std::string>& keys) {
  check_keys("lookup", keys.size(), keys.size());
  std::lock_guard<std::mutex> lock(mutex_);
  Reply r = request("lookup", keys_message("lookup", keys), {}, Shape::Found, keys.size());
  std::vector<int> out(keys.size(), -1);
  std::size_t next = 0;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (r.flags[i]) out[i] = r.fds[next++].release();
  }
  return out;
}

std::vector<int> BrokerClient::publish(const std::vector<std::string>& keys, std::size_t size,
                                       const std::vector<FdMaker>& makers) {
  check_keys("publish", keys.size(), makers.size());
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<Fd> mine;
  std::vector<int> raw;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    Fd fd(makers[i]());
    if (fd.get() < 0) throw Error("dedup publish: the chunk of key " + keys[i] + " is gone");
    raw.push_back(fd.get());
    mine.push_back(std::move(fd));
  }
  Reply r = request("publish", publish_message(keys, size), raw, Shape::Canonical, keys.size());
  mine.clear();
  std::vector<int> out(keys.size(), -1);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (r.flags[i]) remember(keys[i], size, makers[i]);
  }
  std::size_t next = 0;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (!r.flags[i]) out[i] = r.fds[next++].release();
  }
  return out;
}

std::vector<bool> BrokerClient::hold(const std::vector<std::string>& keys, const std::vector<FdMaker>& makers,
                                     std::size_t size) {
  check_keys("hold", keys.size(), makers.size());
  std::lock_guard<std::mutex> lock(mutex_);
  const Reply r = request("hold", keys_message("hold", keys), {}, Shape::OkList, keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (r.flags[i]) remember(keys[i], size, makers[i]);
  }
  return r.flags;
}

void BrokerClient::drop(const std::string& key) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  forget_after_fork();
  if (const auto it = held_.find(key); it != held_.end()) {
    // The hold given back is one whose chunk is gone, if any (the caller's: it unmapped it first),
    // so that the makers left can still export the chunk for a republish.
    std::vector<FdMaker>& makers = it->second.makers;
    auto gone = makers.end() - 1;
    for (auto m = makers.begin(); m != makers.end(); ++m) {
      int fd = -1;
      try {
        fd = (*m)();
      } catch (...) {  // cannot be exported any more: as good as gone
      }
      if (fd < 0) {
        gone = m;
        break;
      }
      ::close(fd);
    }
    makers.erase(gone);
    if (makers.empty()) held_.erase(it);
  }
  if (sock_ < 0) return;  // no connection: the broker holds nothing of ours
  try {
    roundtrip("drop", "{\"op\":\"drop\",\"key\":" + quoted(key) + "}", {}, Shape::OkFlag, 1);
  } catch (...) {
    close_socket();  // the broker is gone (it dropped our holds with the connection) or unreadable
  }
}

}  // namespace glake::shim::dedup
