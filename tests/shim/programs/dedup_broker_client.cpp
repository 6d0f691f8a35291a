// A driver of the shim's dedup broker client (csrc/shim/dedup_broker.cpp) for
// tests/shim/test_dedup_broker_client.py: one command per line on stdin, one answer line on stdout,
// "ok ..." or "error <what the client threw>". Chunks are memfds.
//
//   path                      BrokerClient::default_path()
//   memfd NAME SIZE BYTE      a memfd of SIZE bytes, each one BYTE
//   gone NAME                 closes memfd NAME: its makers return -1 from now on
//   lookup KEY...             per key: -1, or the first byte read through the fd it got
//   publish SIZE KEY=NAME...  per key: -1 (ours is canonical), or the first byte of the one published first
//   hold SIZE KEY=NAME...     per key: 1 held, 0 gone
//   drop KEY
//   ctrunc KEY...             lookup with room for one more fd only (RLIMIT_NOFILE)
//   reconnects                BrokerClient::reconnects()
//   fds                       open fds (/proc/self/fd)
//   fork COMMAND...           runs COMMAND in a forked child (which then exits) and answers its answer
//   quit                      destroys the client, closes the memfds, then answers the open fds
// Keys are %-escaped ("a%22b" is a"b).
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common/error.h"
#include "shim/dedup_broker.h"

namespace {

using glake::shim::dedup::BrokerClient;
using glake::shim::dedup::FdMaker;

std::map<std::string, int> memfds;

std::string unescape(const std::string& s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size()) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

int open_fds() {
  DIR* d = opendir("/proc/self/fd");
  int n = 0;
  while (readdir(d)) ++n;
  closedir(d);
  return n - 3;  // ".", ".." and the directory's own fd
}

/// The first byte of the chunk behind `fd`, which it closes.
int first_byte(int fd) {
  unsigned char b = 0;
  const bool ok = pread(fd, &b, 1, 0) == 1;
  close(fd);
  return ok ? b : -2;
}

FdMaker maker(const std::string& name) {
  return [name]() -> int {
    const auto it = memfds.find(name);
    return it == memfds.end() ? -1 : fcntl(it->second, F_DUPFD_CLOEXEC, 0);
  };
}

/// KEY=NAME arguments: their keys and makers.
void chunks(std::istringstream& in, std::vector<std::string>& keys, std::vector<FdMaker>& makers) {
  std::string arg;
  while (in >> arg) {
    const std::size_t eq = arg.find('=');
    keys.push_back(unescape(arg.substr(0, eq)));
    makers.push_back(maker(arg.substr(eq + 1)));
  }
}

std::vector<std::string> words(std::istringstream& in) {
  std::vector<std::string> out;
  std::string w;
  while (in >> w) out.push_back(unescape(w));
  return out;
}

std::string bytes_of(const std::vector<int>& fds) {
  std::string out = "ok";
  for (const int fd : fds) out += " " + std::to_string(fd < 0 ? -1 : first_byte(fd));
  return out;
}

std::string run(std::unique_ptr<BrokerClient>& client, const std::string& line) {
  std::istringstream in(line);
  std::string cmd;
  in >> cmd;
  if (cmd == "path") return "ok " + BrokerClient::default_path();
  if (cmd == "memfd") {
    std::string name;
    std::size_t size = 0;
    int byte = 0;
    in >> name >> size >> byte;
    const int fd = memfd_create(name.c_str(), MFD_CLOEXEC);
    const std::vector<unsigned char> bytes(size, static_cast<unsigned char>(byte));
    if (fd < 0 || pwrite(fd, bytes.data(), size, 0) != static_cast<ssize_t>(size)) return "error memfd";
    memfds[name] = fd;
    return "ok";
  }
  if (cmd == "gone") {
    std::string name;
    in >> name;
    close(memfds.at(name));
    memfds.erase(name);
    return "ok";
  }
  if (cmd == "lookup") return bytes_of(client->lookup(words(in)));
  if (cmd == "publish" || cmd == "hold") {
    std::size_t size = 0;
    in >> size;
    std::vector<std::string> keys;
    std::vector<FdMaker> makers;
    chunks(in, keys, makers);
    if (cmd == "publish") return bytes_of(client->publish(keys, size, makers));
    std::string out = "ok";
    for (const bool held : client->hold(keys, makers, size)) out += held ? " 1" : " 0";
    return out;
  }
  if (cmd == "drop") {
    const std::vector<std::string> keys = words(in);
    client->drop(keys.at(0));
    return "ok";
  }
  if (cmd == "ctrunc") {
    const std::vector<std::string> keys = words(in);
    int free_fd = 0;
    while (fcntl(free_fd, F_GETFD) >= 0) ++free_fd;
    rlimit saved{};
    getrlimit(RLIMIT_NOFILE, &saved);
    rlimit tight = saved;
    tight.rlim_cur = static_cast<rlim_t>(free_fd + 1);  // fds 0..free_fd: one more fits
    setrlimit(RLIMIT_NOFILE, &tight);
    std::string out;
    try {
      out = bytes_of(client->lookup(keys));
    } catch (const glake::Error& e) {
      out = std::string("error ") + e.what();
    }
    setrlimit(RLIMIT_NOFILE, &saved);
    return out;
  }
  if (cmd == "fork") {
    std::string rest;
    std::getline(in, rest);
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) return "error pipe";
    const pid_t child = fork();
    if (child == 0) {
      close(pipe_fds[0]);
      std::string out;
      try {
        out = run(client, rest);
      } catch (const glake::Error& e) {
        out = std::string("error ") + e.what();
      }
      const bool sent = write(pipe_fds[1], out.data(), out.size()) == static_cast<ssize_t>(out.size());
      _exit(sent ? 0 : 1);
    }
    close(pipe_fds[1]);
    std::string out;
    char buf[4096];
    for (ssize_t n; (n = read(pipe_fds[0], buf, sizeof(buf))) > 0;) out.append(buf, static_cast<std::size_t>(n));
    close(pipe_fds[0]);
    waitpid(child, nullptr, 0);
    return out;
  }
  if (cmd == "reconnects") return "ok " + std::to_string(client->reconnects());
  if (cmd == "fds") return "ok " + std::to_string(open_fds());
  if (cmd == "quit") {
    client.reset();
    for (const auto& [name, fd] : memfds) close(fd);
    memfds.clear();
    return "ok " + std::to_string(open_fds());
  }
  return "error unknown command " + cmd;
}

}  // namespace

int main() {
  auto client = std::make_unique<BrokerClient>();
  std::string line;
  while (std::getline(std::cin, line)) {
    std::string out;
    try {
      out = run(client, line);
    } catch (const glake::Error& e) {
      out = std::string("error ") + e.what();
    }
    for (char& c : out) {
      if (c == '\n') c = ' ';
    }
    std::cout << out << std::endl;
    if (!client) return 0;
  }
  return 0;
}
