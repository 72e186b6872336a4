// A small synchronous Redis client over hiredis: connect and command timeouts, reconnects
// with backoff, latency metrics per operation. Thread-safe (one connection, serialised).
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

struct redisContext;

namespace sala::service {

struct RedisOptions {
  std::string host = "127.0.0.1";
  int port = 6379;
  double connect_timeout_seconds = 0.2;
  double command_timeout_seconds = 0.5;
  // After a failure, commands fail at once for this long instead of reconnecting each time.
  double retry_interval_seconds = 0.5;
};

struct RedisReply {
  enum class Type { kNil, kString, kInteger, kArray, kStatus };
  Type type = Type::kNil;
  std::string str;
  int64_t integer = 0;
  std::vector<RedisReply> elements;
};

class RedisClient {
 public:
  explicit RedisClient(RedisOptions options);
  ~RedisClient();
  RedisClient(const RedisClient&) = delete;
  RedisClient& operator=(const RedisClient&) = delete;

  // Runs one command. `op` names it in sala_redis_request_duration_seconds{op}.
  absl::StatusOr<RedisReply> Command(const std::vector<std::string>& args, const std::string& op);
  bool up() const;

 private:
  absl::Status ConnectLocked();
  void DropLocked(const std::string& why);
  RedisOptions options_;
  mutable std::mutex mu_;
  redisContext* ctx_ = nullptr;
  bool up_ = false;
  std::chrono::steady_clock::time_point last_failure_{};
};

// "host:port" -> options (defaults elsewhere).
absl::StatusOr<RedisOptions> ParseRedisAddress(const std::string& address);

}  // namespace sala::service
