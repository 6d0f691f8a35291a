// KvManager, the mapper thread's side: top up queued slots to reserved + lookahead, trim surplus.
#include <algorithm>

#include "kvcache/kv_manager.h"

namespace glake::kvcache {
namespace {
constexpr std::size_t kTrimBatch = 16;  // surplus chunks unmapped from one slot per pass (bounds the lock hold)
}  // namespace

void KvManager::background_pass(const std::vector<int>& slots) {
  for (int i : slots) {
    Lock lock(mu_);
    if (closed_.load() || suspended_.load()) return;  // suspended: resume() asks again for what is due
    if (slots_.state(i) != SlotState::Active) continue;
    const std::int64_t want = surplus_start(i);
    bool starved = false;
    if (want > table_.ready(i)) {
      grow(i, want, false, "lookahead of slot " + std::to_string(i));
      starved = table_.ready(i) < want;
      if (starved) {
        starved_.insert(i);
        if (supply_.released_victims(i).fenced) mapper_->retry_later(i);  // chunks come back with a fence
      }
    }
    bool deferred = false;
    if (slots_[i].target.load() || slots_[i].hint.load()) deferred = !trim_live(i, want);
    refresh(i, starved || deferred);
    gauge();
  }
}

bool KvManager::trim_live(int i, std::int64_t keep) {
  // Runs while the engine may be in reserve_fast() for this slot: publish the capacity about to be
  // left, then re-read the target the engine may have raised meanwhile and keep what it needs.
  std::vector<std::int64_t> extra;
  for (auto j : table_.exclusive_indices(i)) {
    if (j >= keep) extra.push_back(j);
  }
  if (extra.empty()) return true;
  if (extra.size() > kTrimBatch) extra.erase(extra.begin(), extra.end() - kTrimBatch);
  if (!fences_.ready(i)) {  // chunks of the slot's previous sequence a kernel may still read
    mapper_->retry_later(i);
    return false;
  }
  Slot& s = slots_[i];
  s.capacity.store(layout_.tokens_backed(std::min(table_.ready(i), extra.front())));
  keep = std::max(keep, layout_.chunks_for(s.target.load()));
  for (auto it = extra.rbegin(); it != extra.rend(); ++it) {
    if (*it < keep) continue;
    {
      std::unique_lock<std::mutex> h(hooks_mu_);
      if (hooks_.hold_next_trim) {  // a test holds the mapper here, the manager's lock held
        hooks_.hold_next_trim = false;
        hooks_.trim_held = true;
        hooks_cv_.notify_all();
        hooks_cv_.wait_for(h, std::chrono::seconds(10), [&] { return hooks_.trim_release; });
        hooks_.trim_held = false;
      }
      if (hooks_.log_unmaps) hooks_.unmap_log.emplace_back(i, *it);
    }
    unmap_checked(i, *it);
    ++n_.trimmed;
  }
  return true;
}

void KvManager::record_mapper_error(std::exception_ptr e) {
  std::string type = "RuntimeError", message = "unknown error";
  try {
    std::rethrow_exception(e);
  } catch (const OutOfMemoryError& x) {
    type = "OutOfMemoryError", message = x.what();
  } catch (const InvalidArgumentError& x) {
    type = "InvalidArgumentError", message = x.what();
  } catch (const Error& x) {
    type = "GlakeError", message = x.what();
  } catch (const std::exception& x) {
    message = x.what();
  } catch (...) {
  }
  Lock lock(mu_);
  ++n_.mapper_errors;
  if (!mapper_failed_.load()) {
    mapper_error_type_ = type;
    mapper_error_message_ = message;
    mapper_failed_.store(true);
  }
}

std::pair<std::string, std::string> KvManager::take_mapper_error() {
  Lock lock(mu_);
  mapper_failed_.store(false);
  return {std::move(mapper_error_type_), std::move(mapper_error_message_)};
}

// ---- test hooks ------------------------------------------------------------------------------

void KvManager::set_fail_background_maps(bool fail) {
  Lock lock(mu_);
  hooks_.fail_background_maps = fail;
}

void KvManager::hold_next_trim() {
  std::lock_guard<std::mutex> h(hooks_mu_);
  hooks_.hold_next_trim = true;
  hooks_.trim_release = false;
}

bool KvManager::wait_trim_held(double timeout_s) {
  std::unique_lock<std::mutex> h(hooks_mu_);
  return hooks_cv_.wait_for(h, std::chrono::duration<double>(timeout_s), [&] { return hooks_.trim_held; });
}

void KvManager::release_trim() {
  std::lock_guard<std::mutex> h(hooks_mu_);
  hooks_.trim_release = true;
  hooks_.hold_next_trim = false;
  hooks_cv_.notify_all();
}

void KvManager::set_unmap_log(bool on) {
  std::lock_guard<std::mutex> h(hooks_mu_);
  hooks_.log_unmaps = on;
  hooks_.unmap_log.clear();
}

std::vector<std::pair<int, std::int64_t>> KvManager::unmap_log() {
  std::lock_guard<std::mutex> h(hooks_mu_);
  return hooks_.unmap_log;
}

}  // namespace glake::kvcache
