#include "session_store.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "log.h"

namespace sala::router {
namespace {

constexpr size_t kMaxLocal = 100000;
constexpr size_t kMaxPending = 100000;

std::string Key(const std::string& id) { return absl::StrCat("sala:session:", id); }

}  // namespace

const char* SessionStatusName(sala::v1::SessionStatus s) {
  switch (s) {
    case sala::v1::SESSION_STATUS_QUEUED: return "queued";
    case sala::v1::SESSION_STATUS_PREFILLING: return "prefilling";
    case sala::v1::SESSION_STATUS_TRANSFERRING: return "transferring";
    case sala::v1::SESSION_STATUS_DECODING: return "decoding";
    case sala::v1::SESSION_STATUS_DONE: return "done";
    case sala::v1::SESSION_STATUS_FAILED: return "failed";
    case sala::v1::SESSION_STATUS_CANCELLED: return "cancelled";
    default: return "unknown";
  }
}

SessionStore::SessionStore(service::RedisClient* redis, double ttl_seconds) : redis_(redis), ttl_(ttl_seconds) {
  if (redis_) thread_ = std::thread([this] { WriteLoop(); });
}

SessionStore::~SessionStore() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void SessionStore::Put(const SessionRecord& record) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string& id = record.session.session_id();
  if (!local_.count(id)) {
    order_.push_back(id);
    if (order_.size() > kMaxLocal) {
      local_.erase(order_.front());
      order_.pop_front();
    }
  }
  local_[id] = record;
  if (!redis_) return;
  if (pending_.size() >= kMaxPending) pending_.pop_front();  // Redis down for long: keep the newest
  pending_.push_back(record);
  cv_.notify_all();
}

void SessionStore::WriteLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return stop_ || !pending_.empty(); });
    if (pending_.empty()) return;  // stopping, all written
    SessionRecord r = pending_.front();
    lock.unlock();
    const sala::v1::Session& s = r.session;
    auto st = redis_->Command({"HSET", Key(s.session_id()), "status", SessionStatusName(s.status()), "prefill_worker",
                               s.prefill_worker(), "decode_worker", s.decode_worker(), "decode_address",
                               r.decode_address, "worker_key", r.worker_key, "prompt_tokens",
                               absl::StrCat(s.prompt_tokens()), "generated_tokens", absl::StrCat(s.generated_tokens()),
                               "created_unix_ms", absl::StrCat(s.created_unix_ms()), "updated_unix_ms",
                               absl::StrCat(s.updated_unix_ms()), "error", s.error(), "kept", s.kept() ? "1" : "0"},
                              "session_write");
    if (st.ok())
      redis_->Command({"PEXPIRE", Key(s.session_id()), absl::StrCat(int64_t(ttl_ * 1000))}, "session_write")
          .IgnoreError();
    lock.lock();
    if (st.ok()) {
      pending_.pop_front();
    } else if (stop_) {
      return;  // Redis is down and we are stopping: give up on the rest
    } else {
      // Redis unavailable: try again shortly (the client fails fast meanwhile).
      cv_.wait_for(lock, std::chrono::milliseconds(200), [this] { return stop_; });
    }
  }
}

std::optional<SessionRecord> SessionStore::Get(const std::string& session_id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = local_.find(session_id);
    if (it != local_.end()) return it->second;
  }
  if (!redis_) return std::nullopt;
  auto reply = redis_->Command({"HGETALL", Key(session_id)}, "session_read");
  if (!reply.ok() || reply->elements.empty()) return std::nullopt;
  std::map<std::string, std::string> f;
  for (size_t i = 0; i + 1 < reply->elements.size(); i += 2) f[reply->elements[i].str] = reply->elements[i + 1].str;
  SessionRecord r;
  sala::v1::Session& s = r.session;
  s.set_session_id(session_id);
  for (int v = sala::v1::SessionStatus_MIN; v <= sala::v1::SessionStatus_MAX; ++v)
    if (f["status"] == SessionStatusName(sala::v1::SessionStatus(v))) s.set_status(sala::v1::SessionStatus(v));
  s.set_prefill_worker(f["prefill_worker"]);
  s.set_decode_worker(f["decode_worker"]);
  int64_t n = 0;
  if (absl::SimpleAtoi(f["prompt_tokens"], &n)) s.set_prompt_tokens(n);
  if (absl::SimpleAtoi(f["generated_tokens"], &n)) s.set_generated_tokens(n);
  if (absl::SimpleAtoi(f["created_unix_ms"], &n)) s.set_created_unix_ms(n);
  if (absl::SimpleAtoi(f["updated_unix_ms"], &n)) s.set_updated_unix_ms(n);
  s.set_error(f["error"]);
  s.set_kept(f["kept"] == "1");
  r.decode_address = f["decode_address"];
  r.worker_key = f["worker_key"];
  return r;
}

}  // namespace sala::router
