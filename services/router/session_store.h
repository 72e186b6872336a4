// Session records: kept in the router's memory and written to Redis (hash sala:session:<id>,
// with a TTL) by a background thread, so that a slow or absent Redis never holds up a request.
#pragma once

#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "redis_client.h"
#include "sala/v1/generate.pb.h"

namespace sala::router {

struct SessionRecord {
  sala::v1::Session session;
  std::string decode_address;  // where a kept session's state lives
  std::string worker_key;      // the sequence's id on the decode worker
};

class SessionStore {
 public:
  SessionStore(service::RedisClient* redis, double ttl_seconds);
  ~SessionStore();

  // Creates or replaces a record and queues its write.
  void Put(const SessionRecord& record);
  // Local record, else the one in Redis.
  std::optional<SessionRecord> Get(const std::string& session_id);

 private:
  void WriteLoop();
  service::RedisClient* redis_;
  const double ttl_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, SessionRecord> local_;
  std::deque<std::string> order_;  // insertion order, to bound `local_`
  std::deque<SessionRecord> pending_;
  bool stop_ = false;
  std::thread thread_;
};

const char* SessionStatusName(sala::v1::SessionStatus s);

}  // namespace sala::router
