#include "shim/free_queue.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "shim/real_driver.h"

namespace glake::shim {

namespace {

/// Makes the calling thread's capture mode relaxed while it lives: the shim's own event queries and
/// records never invalidate a capture another thread (or this one) has under way.
class RelaxedCapture {
 public:
  explicit RelaxedCapture(const RealApi& api) : api_(api) {
    if (api_.cuThreadExchangeStreamCaptureMode) api_.cuThreadExchangeStreamCaptureMode(&mode_);
  }
  ~RelaxedCapture() {
    if (api_.cuThreadExchangeStreamCaptureMode) api_.cuThreadExchangeStreamCaptureMode(&mode_);
  }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;

 private:
  const RealApi& api_;
  CUstreamCaptureMode mode_ = CU_STREAM_CAPTURE_MODE_RELAXED;
};

}  // namespace

bool FreeQueue::enabled() {
  static const bool on = [] {
    const char* v = std::getenv("GLAKE_SHIM_FREE");
    if (!v || !*v || std::strcmp(v, "defer") == 0) return true;
    if (std::strcmp(v, "sync") != 0) {
      std::fprintf(stderr, "glake shim: GLAKE_SHIM_FREE=%s is neither defer nor sync; frees synchronise\n", v);
    }
    return false;
  }();
  return on;
}

FreeQueue::Mark::~Mark() {
  if (event && spare) spare->push_back(event);
}

void FreeQueue::stream_created(CUcontext ctx, CUstream s) {
  std::lock_guard<std::mutex> lock(mutex_);
  contexts_[ctx].streams.push_back(s);
  owner_[s] = ctx;
}

FreeQueue::MarkPtr FreeQueue::record(Context& c, CUstream s, const RealApi& api) {
  CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
  if (api.cuStreamIsCapturing(s, &status) != CUDA_SUCCESS || status != CU_STREAM_CAPTURE_STATUS_NONE) {
    return nullptr;  // an event recorded there would become a node of the graph, never to complete
  }
  auto m = std::make_shared<Mark>();
  if (!c.spare.empty()) {
    m->event = c.spare.back();
    c.spare.pop_back();
  } else if (api.cuEventCreate(&m->event, CU_EVENT_DISABLE_TIMING) != CUDA_SUCCESS) {
    m->event = nullptr;
    return nullptr;
  }
  m->spare = &c.spare;  // a map node's member: stays where it is
  // A failed record (a stream of another context) leaves the event as it was: spare again.
  if (api.cuEventRecord(m->event, s) != CUDA_SUCCESS) return nullptr;
  return m;
}

void FreeQueue::stream_destroying(CUstream s, const RealApi& api) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = owner_.find(s);
  if (it == owner_.end()) return;
  const CUcontext ctx = it->second;
  owner_.erase(it);
  Context& c = contexts_[ctx];
  c.streams.erase(std::remove(c.streams.begin(), c.streams.end(), s), c.streams.end());
  RelaxedCapture relaxed(api);
  CUcontext current = nullptr;
  MarkPtr m = api.cuCtxGetCurrent(&current) == CUDA_SUCCESS && current == ctx ? record(c, s, api) : nullptr;
  if (m) {
    c.retired.push_back(std::move(m));
  } else {
    c.retired.push_back(nullptr);  // its last work is unknown: the next free in the context synchronises
  }
}

bool FreeQueue::defer(CUcontext ctx, const ShimAllocation& a, const RealApi& api) {
  std::lock_guard<std::mutex> lock(mutex_);
  Context& c = contexts_[ctx];
  RelaxedCapture relaxed(api);
  // Retired streams whose last work has run need no event any more; an unknown one forces a sync.
  bool unknown = false;
  c.retired.erase(std::remove_if(c.retired.begin(), c.retired.end(), [&](const MarkPtr& m) {
                    if (!m) {
                      unknown = true;
                      return true;
                    }
                    return api.cuEventQuery(m->event) == CUDA_SUCCESS;
                  }),
                  c.retired.end());
  if (unknown) return false;
  Pending p{a, {}};
  p.marks.reserve(c.streams.size() + 1 + c.retired.size());
  MarkPtr legacy = record(c, nullptr, api);  // the legacy stream: blocking streams' work before it, too
  if (!legacy) return false;
  p.marks.push_back(std::move(legacy));
  for (CUstream s : c.streams) {
    MarkPtr m = record(c, s, api);
    if (!m) return false;
    p.marks.push_back(std::move(m));
  }
  p.marks.insert(p.marks.end(), c.retired.begin(), c.retired.end());
  c.queue.push_back(std::move(p));
  ++count_;
  bytes_ += static_cast<std::int64_t>(a.size);
  return true;
}

bool FreeQueue::done(const Pending& p, const RealApi& api) {
  for (const MarkPtr& m : p.marks) {
    if (api.cuEventQuery(m->event) != CUDA_SUCCESS) return false;
  }
  return true;
}

std::vector<ShimAllocation> FreeQueue::take_done(CUcontext ctx, const RealApi& api) {
  std::vector<ShimAllocation> out;
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = contexts_.find(ctx);
  if (it == contexts_.end() || it->second.queue.empty()) return out;
  RelaxedCapture relaxed(api);
  std::deque<Pending>& q = it->second.queue;
  // Oldest first, up to the first still running: a later free's events were recorded after an
  // earlier one's on the same streams, so they seldom finish first (and then wait one more call).
  while (!q.empty() && done(q.front(), api)) {
    out.push_back(q.front().alloc);
    --count_;
    bytes_ -= static_cast<std::int64_t>(q.front().alloc.size);
    q.pop_front();
  }
  return out;
}

bool FreeQueue::take_oldest(CUcontext ctx, const RealApi& api, ShimAllocation* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = contexts_.find(ctx);
  if (it == contexts_.end() || it->second.queue.empty()) return false;
  RelaxedCapture relaxed(api);
  std::deque<Pending>& q = it->second.queue;
  for (const MarkPtr& m : q.front().marks) api.cuEventSynchronize(m->event);
  *out = q.front().alloc;
  --count_;
  bytes_ -= static_cast<std::int64_t>(out->size);
  q.pop_front();
  return true;
}

void FreeQueue::totals(std::int64_t* count, std::int64_t* bytes) const {
  std::lock_guard<std::mutex> lock(mutex_);
  *count = count_;
  *bytes = bytes_;
}

}  // namespace glake::shim
