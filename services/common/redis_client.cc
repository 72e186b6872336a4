#include "redis_client.h"

#include <hiredis/hiredis.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "log.h"
#include "metrics.h"

namespace sala::service {
namespace {

timeval ToTimeval(double seconds) {
  timeval tv;
  tv.tv_sec = time_t(seconds);
  tv.tv_usec = suseconds_t((seconds - double(tv.tv_sec)) * 1e6);
  return tv;
}

RedisReply Convert(const redisReply* r) {
  RedisReply out;
  switch (r->type) {
    case REDIS_REPLY_STRING:
      out.type = RedisReply::Type::kString;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_STATUS:
      out.type = RedisReply::Type::kStatus;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_INTEGER:
      out.type = RedisReply::Type::kInteger;
      out.integer = r->integer;
      break;
    case REDIS_REPLY_ARRAY:
      out.type = RedisReply::Type::kArray;
      for (size_t i = 0; i < r->elements; ++i) out.elements.push_back(Convert(r->element[i]));
      break;
    default:
      break;
  }
  return out;
}

}  // namespace

absl::StatusOr<RedisOptions> ParseRedisAddress(const std::string& address) {
  RedisOptions o;
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &o.port) || o.port <= 0 ||
      o.port > 65535)
    return absl::InvalidArgumentError(absl::StrCat("bad Redis address '", address, "' (want host:port)"));
  o.host = address.substr(0, colon);
  return o;
}

RedisClient::RedisClient(RedisOptions options) : options_(std::move(options)) {}

RedisClient::~RedisClient() {
  if (ctx_) redisFree(ctx_);
}

bool RedisClient::up() const {
  std::lock_guard<std::mutex> lock(mu_);
  return up_;
}

absl::Status RedisClient::ConnectLocked() {
  ctx_ = redisConnectWithTimeout(options_.host.c_str(), options_.port, ToTimeval(options_.connect_timeout_seconds));
  if (!ctx_ || ctx_->err) {
    const std::string why = ctx_ ? ctx_->errstr : "cannot allocate a Redis context";
    DropLocked(why);
    return absl::UnavailableError(absl::StrCat("Redis ", options_.host, ":", options_.port, ": ", why));
  }
  redisSetTimeout(ctx_, ToTimeval(options_.command_timeout_seconds));
  if (!up_) LogInfo("redis connected", {{"address", absl::StrCat(options_.host, ":", options_.port)}});
  return absl::OkStatus();
}

void RedisClient::DropLocked(const std::string& why) {
  if (ctx_) redisFree(ctx_);
  ctx_ = nullptr;
  if (up_) LogWarning("redis unavailable; serving on without it", {{"error", why}});
  up_ = false;
  last_failure_ = std::chrono::steady_clock::now();
  Metrics::Get().redis_up.Set(0);
}

absl::StatusOr<RedisReply> RedisClient::Command(const std::vector<std::string>& args, const std::string& op) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto start = std::chrono::steady_clock::now();
  if (!ctx_) {
    if (start - last_failure_ < std::chrono::duration<double>(options_.retry_interval_seconds))
      return absl::UnavailableError("Redis unavailable (retrying shortly)");
    if (absl::Status s = ConnectLocked(); !s.ok()) return s;
  }
  std::vector<const char*> argv;
  std::vector<size_t> lens;
  for (const std::string& a : args) {
    argv.push_back(a.data());
    lens.push_back(a.size());
  }
  auto* reply = static_cast<redisReply*>(redisCommandArgv(ctx_, int(argv.size()), argv.data(), lens.data()));
  Metrics::Get().Redis(op).Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  if (!reply) {
    const std::string why = ctx_->errstr;
    DropLocked(why);
    return absl::UnavailableError(absl::StrCat("Redis ", op, ": ", why));
  }
  if (reply->type == REDIS_REPLY_ERROR) {
    const std::string why(reply->str, reply->len);
    freeReplyObject(reply);
    return absl::InternalError(absl::StrCat("Redis ", op, ": ", why));
  }
  RedisReply out = Convert(reply);
  freeReplyObject(reply);
  up_ = true;
  Metrics::Get().redis_up.Set(1);
  return out;
}

}  // namespace sala::service
