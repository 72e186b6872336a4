#include "worker_pool.h"

#include "grpcpp/grpcpp.h"
#include "channels.h"
#include "log.h"
#include "metrics.h"
#include "sala/v1/worker.grpc.pb.h"
#include "worker_registry.h"

namespace sala::router {

using service::LogInfo;
using service::LogWarning;
using Clock = std::chrono::steady_clock;

WorkerPool::WorkerPool(service::RedisClient* redis, WorkerPoolOptions options)
    : redis_(redis), options_(std::move(options)) {
  Refresh();
  thread_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      cv_.wait_for(lock, std::chrono::duration<double>(options_.refresh_interval_seconds));
      if (stop_) break;
      lock.unlock();
      Refresh();
      lock.lock();
    }
  });
}

WorkerPool::~WorkerPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void WorkerPool::RefreshNow() { Refresh(); }

void WorkerPool::Refresh() {
  std::vector<sala::v1::WorkerInfo> fresh;
  bool redis_ok = true;
  if (redis_) {
    auto workers = service::ReadWorkers(*redis_);
    if (workers.ok()) fresh = std::move(*workers);
    else redis_ok = false;
  }
  // Workers named on the command line: ask them directly for their load.
  auto probe = [&](const std::string& address, const char* role) {
    for (const auto& w : fresh)
      if (w.address() == address) return;
    sala::v1::WorkerInfo info;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
    grpc::Status s;
    if (std::string(role) == "prefill")
      s = sala::v1::PrefillWorker::NewStub(service::SharedChannel(address))->GetWorkerInfo(&ctx, {}, &info);
    else
      s = sala::v1::DecodeWorker::NewStub(service::SharedChannel(address))->GetWorkerInfo(&ctx, {}, &info);
    if (s.ok()) fresh.push_back(info);
  };
  for (const auto& a : options_.static_prefill) probe(a, "prefill");
  for (const auto& a : options_.static_decode) probe(a, "decode");

  std::lock_guard<std::mutex> lock(mu_);
  if (!redis_ok && !redis_was_down_) LogWarning("redis unavailable: routing with the last known workers");
  if (redis_ok && redis_was_down_) LogInfo("redis is back: worker registry refreshed");
  redis_was_down_ = !redis_ok;
  // Merge: fresh entries replace old ones; workers not heard of for `expiry_seconds` leave,
  // unless Redis is down, in which case the last known set stays.
  const auto now = Clock::now();
  for (const auto& w : fresh) {
    last_seen_[w.address()] = now;
    bool found = false;
    for (auto& old : workers_)
      if (old.address() == w.address()) {
        old = w;
        found = true;
      }
    if (!found) workers_.push_back(w);
  }
  if (!redis_ok) {
    // Silence from a registry we cannot read says nothing about the workers.
    for (const auto& w : workers_) last_seen_[w.address()] = now;
  } else {
    const auto expiry = std::chrono::duration<double>(options_.expiry_seconds);
    std::erase_if(workers_, [&](const sala::v1::WorkerInfo& w) { return now - last_seen_[w.address()] > expiry; });
  }
  int counts[2][2] = {};
  for (const auto& w : workers_) counts[w.role() == "decode"][UsableLocked(w)]++;
  auto& m = service::Metrics::Get();
  m.Workers("prefill", "usable").Set(counts[0][1]);
  m.Workers("prefill", "unusable").Set(counts[0][0]);
  m.Workers("decode", "usable").Set(counts[1][1]);
  m.Workers("decode", "unusable").Set(counts[1][0]);
}

bool WorkerPool::UsableLocked(const sala::v1::WorkerInfo& w) const {
  if (!w.serving()) return false;
  if (!options_.layout_hash.empty() && w.layout_hash() != options_.layout_hash) return false;
  auto it = failed_until_.find(w.address());
  return it == failed_until_.end() || Clock::now() >= it->second;
}

int WorkerPool::CountUsable(const std::string& role) {
  std::lock_guard<std::mutex> lock(mu_);
  int n = 0;
  for (const auto& w : workers_) n += w.role() == role && UsableLocked(w);
  return n;
}

void WorkerPool::MarkFailed(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  failed_until_[address] = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(options_.failure_cooldown_seconds));
  service::DropChannel(address);
  LogWarning("worker taken out of routing", {{"address", address}});
}

void WorkerPool::AddInflight(const std::string& address, int64_t tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  inflight_tokens_[address] += tokens;
}

std::optional<sala::v1::WorkerInfo> WorkerPool::PickPrefill(const std::set<std::string>& exclude) {
  std::lock_guard<std::mutex> lock(mu_);
  std::optional<sala::v1::WorkerInfo> best;
  int64_t best_load = 0;
  for (const auto& w : workers_) {
    if (w.role() != "prefill" || !UsableLocked(w) || exclude.count(w.address())) continue;
    // The registry's figure lags; this router's own in-flight tokens do not.
    const int64_t load = std::max(w.queued_prompt_tokens(), inflight_tokens_[w.address()]);
    if (!best || load < best_load) {
      best = w;
      best_load = load;
    }
  }
  return best;
}

std::optional<sala::v1::WorkerInfo> WorkerPool::PickDecode(const std::set<std::string>& exclude) {
  std::lock_guard<std::mutex> lock(mu_);
  std::optional<sala::v1::WorkerInfo> best;
  for (const auto& w : workers_) {
    if (w.role() != "decode" || !UsableLocked(w) || exclude.count(w.address())) continue;
    if (!best || w.free_state_bytes() > best->free_state_bytes()) best = w;
  }
  return best;
}

}  // namespace sala::router
