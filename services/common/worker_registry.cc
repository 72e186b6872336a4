#include "worker_registry.h"

#include "absl/strings/str_cat.h"
#include "google/protobuf/util/json_util.h"
#include "log.h"

namespace sala::service {
namespace {

constexpr char kWorkerSet[] = "sala:workers";
std::string WorkerKey(const std::string& id) { return absl::StrCat("sala:worker:", id); }

}  // namespace

WorkerHeartbeat::WorkerHeartbeat(RedisClient& redis, std::function<sala::v1::WorkerInfo()> info,
                                 double interval_seconds, double ttl_seconds)
    : redis_(redis), info_(std::move(info)), interval_(interval_seconds), ttl_(ttl_seconds) {
  id_ = info_().worker_id();
  thread_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      lock.unlock();
      Beat();
      lock.lock();
      cv_.wait_for(lock, std::chrono::duration<double>(interval_), [this] { return stop_; });
    }
  });
}

void WorkerHeartbeat::Beat() {
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(info_(), &json).ok()) return;
  const auto ttl_ms = std::to_string(int64_t(ttl_ * 1000));
  auto set = redis_.Command({"SET", WorkerKey(id_), json, "PX", ttl_ms}, "heartbeat");
  if (set.ok()) redis_.Command({"SADD", kWorkerSet, id_}, "heartbeat").IgnoreError();
}

WorkerHeartbeat::~WorkerHeartbeat() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  redis_.Command({"DEL", WorkerKey(id_)}, "deregister").IgnoreError();
  redis_.Command({"SREM", kWorkerSet, id_}, "deregister").IgnoreError();
}

absl::StatusOr<std::vector<sala::v1::WorkerInfo>> ReadWorkers(RedisClient& redis) {
  auto ids = redis.Command({"SMEMBERS", kWorkerSet}, "workers");
  if (!ids.ok()) return ids.status();
  std::vector<sala::v1::WorkerInfo> workers;
  if (ids->elements.empty()) return workers;
  std::vector<std::string> args{"MGET"};
  for (const auto& e : ids->elements) args.push_back(WorkerKey(e.str));
  auto values = redis.Command(args, "workers");
  if (!values.ok()) return values.status();
  for (size_t i = 0; i < values->elements.size(); ++i) {
    const RedisReply& v = values->elements[i];
    if (v.type != RedisReply::Type::kString) {
      // Expired: forget the id too.
      redis.Command({"SREM", kWorkerSet, ids->elements[i].str}, "workers").IgnoreError();
      continue;
    }
    sala::v1::WorkerInfo info;
    if (google::protobuf::util::JsonStringToMessage(v.str, &info).ok()) workers.push_back(std::move(info));
  }
  return workers;
}

}  // namespace sala::service
