// The worker registry in Redis. Each worker writes `sala:worker:<id>` (its WorkerInfo as JSON)
// with a TTL on every heartbeat and adds its id to the set `sala:workers`; a worker that stops
// heartbeating disappears when its key expires. The router reads the registry periodically.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "redis_client.h"
#include "sala/v1/worker.pb.h"

namespace sala::service {

class WorkerHeartbeat {
 public:
  WorkerHeartbeat(RedisClient& redis, std::function<sala::v1::WorkerInfo()> info, double interval_seconds,
                  double ttl_seconds);
  // Stops heartbeating and removes the worker's key, so that it leaves routing at once.
  ~WorkerHeartbeat();

 private:
  void Beat();
  RedisClient& redis_;
  std::function<sala::v1::WorkerInfo()> info_;
  double interval_, ttl_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::string id_;
  std::thread thread_;
};

// Every live worker in the registry.
absl::StatusOr<std::vector<sala::v1::WorkerInfo>> ReadWorkers(RedisClient& redis);

}  // namespace sala::service
