#include "core/phys_chunk.h"

namespace glake {

namespace {
std::atomic<std::uint64_t> next_chunk_id{1};
}

PhysChunk::PhysChunk(Driver& driver, int device, std::size_t size, PhysHandle handle)
    : driver_(driver), device_(device), size_(size), handle_(handle), id_(next_chunk_id.fetch_add(1)) {}

std::shared_ptr<PhysChunk> PhysChunk::create(Driver& driver, int device, std::size_t size) {
  const PhysHandle h = driver.create(device, size);
  return std::shared_ptr<PhysChunk>(new PhysChunk(driver, device, size, h));
}

std::shared_ptr<PhysChunk> PhysChunk::import_fd(Driver& driver, int device, int fd, std::size_t size) {
  const PhysHandle h = driver.import_fd(device, fd, size);
  return std::shared_ptr<PhysChunk>(new PhysChunk(driver, device, size, h));
}

PhysChunk::~PhysChunk() {
  try {
    driver_.release(device_, handle_, size_);
  } catch (...) {
    // A destructor must not throw; the failed release stays visible as a live chunk in the stats.
  }
}

int PhysChunk::export_fd() const { return driver_.export_fd(device_, handle_); }

}  // namespace glake
