// dedup's content operations on device memory: the digest of chunks (dedup_digest.h defines it) and
// the byte-by-byte comparison of pairs of chunks, by the kernels of dedup_kernels.cu when the shim has
// them built in and the driver loads them, else on the host; both give the same results. Every driver
// call goes to the real driver (real_driver.h), on the legacy default stream, and completes before the
// call returns.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <vector>

#include "shim/dedup_digest.h"

namespace glake::shim::dedup {

/// Digests of the `chunk`-byte pieces at device addresses `ptrs` (at most 64 per call), on the current
/// context's device: by the kernel when the PTX is built in and loads (module loaded once per context,
/// kept), else each chunk copied to the host (cuMemcpyDtoH) and digested there. Synchronous. Throws glake::Error.
std::vector<Digest> digests(const std::vector<CUdeviceptr>& ptrs, std::size_t chunk);

/// Whether a[i] and b[i] (`chunk` bytes each) hold the same bytes, for every i (at most 64): same way.
std::vector<bool> equal_chunks(const std::vector<CUdeviceptr>& a, const std::vector<CUdeviceptr>& b, std::size_t chunk);

}  // namespace glake::shim::dedup
