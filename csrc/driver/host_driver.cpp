#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "driver/host_driver.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

namespace glake {

namespace {

constexpr unsigned kChunkSeals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;

/// "call(args) failed: ENAME (message)" for the current errno.
[[noreturn]] void throw_errno(const std::string& call) {
  const int err = errno;
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  const char* ename = strerrorname_np(err);
#else
  const char* ename = nullptr;
#endif
  std::string msg = call + " failed: " + (ename ? ename : ("errno " + std::to_string(err))) + " (" +
                    std::strerror(err) + ")";
  if (err == ENOMEM || err == ENOSPC) throw OutOfMemoryError(msg);
  if (err == EBADF || err == EINVAL) throw InvalidArgumentError(msg);
  throw Error(msg);
}

std::string va_args(DevPtr va, std::size_t size) { return "va=" + hex(va) + ", size=" + std::to_string(size); }

/// Page-aligned host memory for the host backend's "pinned" and "device" buffers.
DevPtr aligned_host_alloc(const char* call, std::size_t size) {
  void* p = nullptr;
  const int err = posix_memalign(&p, 4096, size ? size : 1);
  if (err != 0) {
    errno = err;
    throw_errno(std::string(call) + "(size=" + std::to_string(size) + ")");
  }
  return reinterpret_cast<DevPtr>(p);
}

}  // namespace

MemInfo HostDriver::mem_info(int device) {
  check_device(device);
  return host_memory();
}

MemInfo host_memory() {
  MemInfo info;
  std::ifstream in("/proc/meminfo");
  std::string key;
  std::size_t kb = 0;
  std::string unit;
  while (in >> key >> kb) {
    std::getline(in, unit);
    if (key == "MemTotal:") info.total = kb * 1024;
    if (key == "MemAvailable:") info.free = kb * 1024;
  }
  if (info.total == 0 || info.free == 0) {  // no /proc or no MemAvailable (some VMs): ask the kernel
    struct sysinfo si {};
    if (sysinfo(&si) == 0) {
      if (info.total == 0) info.total = static_cast<std::size_t>(si.totalram) * si.mem_unit;
      if (info.free == 0) info.free = static_cast<std::size_t>(si.freeram + si.bufferram) * si.mem_unit;
    }
  }
  return info;
}

PhysHandle HostDriver::do_create(int, std::size_t size) {
  const int fd = memfd_create("glake-chunk", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) throw_errno("memfd_create(size=" + std::to_string(size) + ")");
  if (ftruncate(fd, static_cast<off_t>(size)) != 0 || fcntl(fd, F_ADD_SEALS, kChunkSeals) != 0) {
    const int err = errno;
    close(fd);
    errno = err;
    throw_errno("ftruncate/seal(memfd, size=" + std::to_string(size) + ")");
  }
  return static_cast<PhysHandle>(fd);
}

void HostDriver::do_release(int, PhysHandle handle) {
  if (close(static_cast<int>(handle)) != 0) throw_errno("close(fd=" + std::to_string(handle) + ")");
}

DevPtr HostDriver::do_reserve(int, std::size_t size, std::size_t alignment) {
  const std::size_t span = size + alignment;
  void* p = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw_errno("mmap(reserve, size=" + std::to_string(size) + ")");
  const auto base = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t aligned = (base + alignment - 1) & ~(alignment - 1);
  if (aligned > base) munmap(p, aligned - base);
  const std::uintptr_t end = aligned + size;
  if (base + span > end) munmap(reinterpret_cast<void*>(end), base + span - end);
  return aligned;
}

void HostDriver::do_free_va(int, DevPtr va, std::size_t size) {
  if (munmap(reinterpret_cast<void*>(va), size) != 0) throw_errno("munmap(" + va_args(va, size) + ")");
}

void HostDriver::do_map(int, DevPtr va, std::size_t size, PhysHandle handle) {
  void* p = mmap(reinterpret_cast<void*>(va), size, PROT_NONE, MAP_SHARED | MAP_FIXED, static_cast<int>(handle), 0);
  if (p == MAP_FAILED) throw_errno("mmap(" + va_args(va, size) + ", fd=" + std::to_string(handle) + ")");
}

void HostDriver::do_unmap(int, DevPtr va, std::size_t size) {
  void* p = mmap(reinterpret_cast<void*>(va), size, PROT_NONE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw_errno("mmap(unmap, " + va_args(va, size) + ")");
}

void HostDriver::do_set_access(int, DevPtr va, std::size_t size, bool read_only) {
  if (mprotect(reinterpret_cast<void*>(va), size, read_only ? PROT_READ : PROT_READ | PROT_WRITE) != 0) {
    throw_errno("mprotect(" + va_args(va, size) + (read_only ? ", READ)" : ", READ|WRITE)"));
  }
}

int HostDriver::do_export_fd(int, PhysHandle handle) {
  const int fd = fcntl(static_cast<int>(handle), F_DUPFD_CLOEXEC, 0);
  if (fd < 0) throw_errno("fcntl(F_DUPFD_CLOEXEC, fd=" + std::to_string(handle) + ")");
  return fd;
}

PhysHandle HostDriver::do_import_fd(int, int fd, std::size_t size) {
  const std::string call = "import_fd(fd=" + std::to_string(fd) + ", size=" + std::to_string(size) + ")";
  const int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) {
    if (errno == EINVAL) throw InvalidArgumentError(call + " failed: the fd is not a glake chunk (not a memfd)");
    throw_errno(call);
  }
  if ((static_cast<unsigned>(seals) & kChunkSeals) != kChunkSeals) {
    throw InvalidArgumentError(call + " failed: the fd is a memfd but not a sealed glake chunk");
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) throw_errno(call);
  if (static_cast<std::size_t>(st.st_size) != size) {
    throw InvalidArgumentError(call + " failed: the chunk holds " + std::to_string(st.st_size) + " bytes");
  }
  const int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) throw_errno(call);
  return static_cast<PhysHandle>(own);
}

void HostDriver::memcpy(int, DevPtr dst, DevPtr src, std::size_t n) {
  std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
}

void HostDriver::memcpy_async(int device, DevPtr dst, DevPtr src, std::size_t n, StreamHandle) {
  memcpy(device, dst, src, n);
}

void HostDriver::memset(int, DevPtr dst, int value, std::size_t n) {
  std::memset(reinterpret_cast<void*>(dst), value, n);
}

DevPtr HostDriver::host_alloc_pinned(int device, std::size_t size) {
  check_device(device);
  return aligned_host_alloc("host_alloc_pinned", size);
}

void HostDriver::host_free_pinned(int, DevPtr ptr) { std::free(reinterpret_cast<void*>(ptr)); }

DevPtr HostDriver::device_alloc(int device, std::size_t size) {
  check_device(device);
  return aligned_host_alloc("device_alloc", size);
}

void HostDriver::device_free(int, DevPtr ptr) { std::free(reinterpret_cast<void*>(ptr)); }

bool HostDriver::can_access_peer(int device, int peer) {
  check_device(device);
  check_device(peer);
  return false;  // one device: it has no peers
}

void HostDriver::enable_peer_access(int device, int peer) {
  check_device(device);
  check_device(peer);
  throw InvalidArgumentError("host backend: device " + std::to_string(device) + " has no peer " + std::to_string(peer));
}

StreamHandle HostDriver::stream_create(int device) {
  check_device(device);
  return next_id_.fetch_add(1);
}

EventHandle HostDriver::event_create(int device) {
  check_device(device);
  return next_id_.fetch_add(1);
}

void HostDriver::event_record(int device, EventHandle event, StreamHandle) {
  check_device(device);
  std::lock_guard<std::mutex> lock(held_mutex_);
  if (holding_.load()) {
    held_.insert(event);
  } else {
    held_.erase(event);  // a new record replaces a held one, as on a stream
  }
}

bool HostDriver::event_query(int, EventHandle event) {
  std::lock_guard<std::mutex> lock(held_mutex_);
  return held_.count(event) == 0;
}

void HostDriver::event_synchronize(int, EventHandle event) {
  std::unique_lock<std::mutex> lock(held_mutex_);
  held_done_.wait(lock, [&] { return held_.count(event) == 0; });
}

void HostDriver::event_destroy(int, EventHandle event) {
  std::lock_guard<std::mutex> lock(held_mutex_);
  held_.erase(event);
  held_done_.notify_all();
}

void HostDriver::hold_events(bool hold) { holding_.store(hold); }

std::size_t HostDriver::complete_held_events() {
  std::lock_guard<std::mutex> lock(held_mutex_);
  const std::size_t n = held_.size();
  held_.clear();
  held_done_.notify_all();
  return n;
}

std::size_t HostDriver::held_events() const {
  std::lock_guard<std::mutex> lock(held_mutex_);
  return held_.size();
}

}  // namespace glake
