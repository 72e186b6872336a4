// The router's view of the workers: the Redis registry (refreshed periodically; the last known
// set is kept while Redis is down), plus workers named on the command line, minus workers that
// failed recently (a circuit breaker with a cool-down).
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "redis_client.h"
#include "sala/v1/worker.pb.h"

namespace sala::router {

struct WorkerPoolOptions {
  std::vector<std::string> static_prefill, static_decode;  // addresses
  double refresh_interval_seconds = 0.5;
  double failure_cooldown_seconds = 5.0;
  // A worker missing from the registry stays routable this long (Redis may have restarted empty).
  double expiry_seconds = 3.0;
  std::string layout_hash;  // workers of another model layout are ignored
};

class WorkerPool {
 public:
  WorkerPool(service::RedisClient* redis, WorkerPoolOptions options);
  ~WorkerPool();

  // Least queued prompt tokens (counting what this router sent and has not heard back about).
  std::optional<sala::v1::WorkerInfo> PickPrefill(const std::set<std::string>& exclude);
  // Most free state memory.
  std::optional<sala::v1::WorkerInfo> PickDecode(const std::set<std::string>& exclude);
  // Takes a worker out of routing for the cool-down.
  void MarkFailed(const std::string& address);
  // Local accounting of prompt tokens in flight on a prefill worker.
  void AddInflight(const std::string& address, int64_t tokens);
  int CountUsable(const std::string& role);
  void RefreshNow();

 private:
  void Refresh();
  bool UsableLocked(const sala::v1::WorkerInfo& w) const;
  service::RedisClient* redis_;
  WorkerPoolOptions options_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<sala::v1::WorkerInfo> workers_;
  std::map<std::string, std::chrono::steady_clock::time_point> last_seen_;
  std::map<std::string, std::chrono::steady_clock::time_point> failed_until_;
  std::map<std::string, int64_t> inflight_tokens_;
  bool stop_ = false, redis_was_down_ = false;
  std::thread thread_;
};

}  // namespace sala::router
