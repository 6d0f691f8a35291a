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
    swapped_ = api_.cuThreadExchangeStreamCaptureMode && api_.cuThreadExchangeStreamCaptureMode(&mode_) == CUDA_SUCCESS;
  }
  ~RelaxedCapture() {
    if (swapped_) api_.cuThreadExchangeStreamCaptureMode(&mode_);  // the thread's own mode back
  }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;

 private:
  const RealApi& api_;
  CUstreamCaptureMode mode_ = CU_STREAM_CAPTURE_MODE_RELAXED;
  bool swapped_ = false;
};

/// Whether a query or wait on a mark says its work is done. An error (the event became a capture's
/// node when a capture began between the check and the record, its context is gone, ...) is answered
/// by synchronising the current context, the free's own: done if that worked.
bool settled(CUresult r, const RealApi& api) {
  if (r == CUDA_SUCCESS) return true;
  if (r == CUDA_ERROR_NOT_READY) return false;
  return api.cuCtxSynchronize() == CUDA_SUCCESS;
}

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

bool FreeQueue::supported(const RealApi& api) {
  return api.cuStreamIsCapturing && api.cuEventCreate && api.cuEventRecord && api.cuEventQuery &&
         api.cuEventSynchronize && api.cuEventDestroy && api.cuCtxGetCurrent && api.cuCtxSynchronize;
}

FreeQueue::Mark::~Mark() {
  if (event && spare) spare->push_back(event);
}

void FreeQueue::stream_created(CUcontext ctx, CUstream s) {
  if (!enabled()) return;
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
  if (api.cuEventRecord(m->event, s) != CUDA_SUCCESS) {  // a stream of another context, or gone
    api.cuEventDestroy(m->event);  // not spare: its context may be the stale one
    m->event = nullptr;
    return nullptr;
  }
  m->spare = &c.spare;  // a map node's member: stays where it is
  return m;
}

void FreeQueue::stream_destroying(CUstream s, const RealApi& api) {
  if (!enabled() || !supported(api)) return;
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = owner_.find(s);
  if (it == owner_.end()) return;
  const CUcontext ctx = it->second;
  owner_.erase(it);
  Context& c = contexts_[ctx];
  c.streams.erase(std::remove(c.streams.begin(), c.streams.end(), s), c.streams.end());
  RelaxedCapture relaxed(api);
  // Earlier destroyed streams whose last work has run need no event any more.
  c.retired.erase(std::remove_if(c.retired.begin(), c.retired.end(),
                                 [&](const MarkPtr& m) { return m && api.cuEventQuery(m->event) == CUDA_SUCCESS; }),
                  c.retired.end());
  CUcontext current = nullptr;
  MarkPtr m = api.cuCtxGetCurrent(&current) == CUDA_SUCCESS && current == ctx ? record(c, s, api) : nullptr;
  c.retired.push_back(std::move(m));  // null: its last work is unknown, the next free synchronises
}

bool FreeQueue::defer(CUcontext ctx, const ShimAllocation& a, const RealApi& api) {
  if (!supported(api)) return false;
  std::lock_guard<std::mutex> lock(mutex_);
  Context& c = contexts_[ctx];
  RelaxedCapture relaxed(api);
  c.retired.erase(std::remove_if(c.retired.begin(), c.retired.end(),
                                 [&](const MarkPtr& m) { return m && api.cuEventQuery(m->event) == CUDA_SUCCESS; }),
                  c.retired.end());
  if (std::find(c.retired.begin(), c.retired.end(), nullptr) != c.retired.end()) return false;  // synchronised() clears
  Pending p{a, {}};
  p.marks.reserve(c.streams.size() + 1 + c.retired.size());
  MarkPtr legacy = record(c, nullptr, api);  // the legacy stream: it follows the blocking streams too
  if (!legacy) return false;
  p.marks.push_back(std::move(legacy));
  for (auto s = c.streams.begin(); s != c.streams.end(); ++s) {
    MarkPtr m = record(c, *s, api);
    if (!m) {
      CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
      if (api.cuStreamIsCapturing(*s, &status) == CUDA_SUCCESS && status != CU_STREAM_CAPTURE_STATUS_NONE) {
        return false;  // capturing: the caller's synchronisation is refused, as cudaFree's would be
      }
      owner_.erase(*s);  // unusable (its context destroyed or reset): forgotten; this free synchronises
      c.streams.erase(s);
      return false;
    }
    p.marks.push_back(std::move(m));
  }
  p.marks.insert(p.marks.end(), c.retired.begin(), c.retired.end());
  c.queue.push_back(std::move(p));
  ++count_;
  bytes_ += static_cast<std::int64_t>(a.size);
  return true;
}

void FreeQueue::synchronised(CUcontext ctx) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = contexts_.find(ctx);
  if (it == contexts_.end()) return;
  std::vector<MarkPtr>& r = it->second.retired;
  r.erase(std::remove(r.begin(), r.end(), nullptr), r.end());
}

bool FreeQueue::done(const Pending& p, const RealApi& api) {
  for (const MarkPtr& m : p.marks) {
    if (!settled(api.cuEventQuery(m->event), api)) return false;
  }
  return true;
}

void FreeQueue::pop_front(std::deque<Pending>& q) {
  --count_;
  bytes_ -= static_cast<std::int64_t>(q.front().alloc.size);
  q.pop_front();
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
    pop_front(q);
  }
  return out;
}

bool FreeQueue::take_oldest(CUcontext ctx, const RealApi& api, ShimAllocation* out) {
  std::vector<CUevent> wait;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = contexts_.find(ctx);
    if (it == contexts_.end() || it->second.queue.empty()) return false;
    for (const MarkPtr& m : it->second.queue.front().marks) wait.push_back(m->event);
  }
  // Unlocked: other threads' frees and stream calls go on meanwhile. An event recorded again
  // meanwhile (its free was given back by another thread) is waited for longer, never shorter.
  RelaxedCapture relaxed(api);
  for (CUevent e : wait) {
    if (!settled(api.cuEventSynchronize(e), api)) return false;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = contexts_.find(ctx);
  if (it == contexts_.end() || it->second.queue.empty() || !done(it->second.queue.front(), api)) return false;
  *out = it->second.queue.front().alloc;
  pop_front(it->second.queue);
  return true;
}

void FreeQueue::totals(std::int64_t* count, std::int64_t* bytes) const {
  *count = count_.load();
  *bytes = bytes_.load();
}

void FreeQueue::after_fork_child() {
  contexts_.clear();  // Marks go to the cleared contexts' spare lists, destroyed with them
  owner_.clear();
  count_ = 0;
  bytes_ = 0;
  mutex_.unlock();
}

}  // namespace glake::shim
