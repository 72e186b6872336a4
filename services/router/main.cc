// sala-router: the cluster's front door (gRPC and OpenAI-compatible HTTP).
#include <chrono>
#include <filesystem>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/str_split.h"
#include "flags.h"
#include "grpc_front.h"
#include "grpcpp/grpcpp.h"
#include "http_front.h"
#include "log.h"
#include "metrics.h"
#include "process.h"
#include "redis_client.h"
#include "router.h"
#include "server.h"

ABSL_FLAG(std::string, model, "", "model directory (config.json and tokenizer; no weights are read)");
ABSL_FLAG(std::string, model_name, "", "model name served (default: the directory's name)");
ABSL_FLAG(std::string, grpc_listen, "127.0.0.1:50051", "gRPC listen address");
ABSL_FLAG(std::string, http_listen, "127.0.0.1:8000", "HTTP listen address (OpenAI API, /health, /metrics)");
ABSL_FLAG(std::string, redis, "127.0.0.1:6379", "Redis address (sessions, worker registry); empty: none");
ABSL_FLAG(std::string, prefill_workers, "", "comma-separated prefill worker addresses, besides the registry");
ABSL_FLAG(std::string, decode_workers, "", "comma-separated decode worker addresses, besides the registry");
ABSL_FLAG(int, max_queue, 256, "requests in flight before new ones get RESOURCE_EXHAUSTED / HTTP 429");
ABSL_FLAG(int, http_threads, 300, "HTTP worker threads (streams in flight)");
ABSL_FLAG(double, lease, 300, "seconds a prefill and its state transfer may take");
ABSL_FLAG(double, request_timeout, 3600, "seconds a request may take when the client sets no deadline");
ABSL_FLAG(int, max_attempts, 3, "tries on different workers before the first token");
ABSL_FLAG(int64_t, max_context, 0, "maximum context in tokens (0: the model's max_position_embeddings)");
ABSL_FLAG(double, session_ttl, 86400, "seconds a session record lives in Redis");
ABSL_FLAG(double, worker_refresh_interval, 0.5, "seconds between reads of the worker registry");
ABSL_FLAG(double, worker_failure_cooldown, 5, "seconds a failed worker stays out of routing");
ABSL_FLAG(double, worker_expiry, 3, "seconds a worker missing from the registry stays routable");
ABSL_FLAG(double, drain_timeout, 30, "seconds to finish in-flight requests after SIGTERM");

namespace {

std::pair<std::string, int> HostPort(const std::string& a) {
  const size_t colon = a.rfind(':');
  return {a.substr(0, colon), std::atoi(a.substr(colon + 1).c_str())};
}

std::vector<std::string> List(const std::string& s) {
  return absl::StrSplit(s, ',', absl::SkipWhitespace());
}

}  // namespace

int main(int argc, char** argv) {
  using namespace sala;
  service::BlockTerminationSignals();
  service::ParseFlags(argc, argv,
                      "Router of the SALA cluster: gRPC (sala.v1.Generation) and OpenAI-compatible HTTP.\n"
                      "  sala-router --model=models/small --redis=127.0.0.1:6379");
  service::SetLogService("router", "");
  service::Metrics::Init("router");
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  if (model_dir.empty()) {
    service::LogError("--model is required");
    return 2;
  }
  auto config = LoadModelConfig(model_dir);
  auto tokenizer = config.ok() ? Tokenizer::Load(model_dir) : absl::StatusOr<std::unique_ptr<Tokenizer>>(config.status());
  if (!config.ok() || !tokenizer.ok()) {
    service::LogError(std::string((config.ok() ? tokenizer.status() : config.status()).message()));
    return 2;
  }
  std::unique_ptr<service::RedisClient> redis;
  if (const std::string r = absl::GetFlag(FLAGS_redis); !r.empty()) {
    auto options = service::ParseRedisAddress(r);
    if (!options.ok()) {
      service::LogError(std::string(options.status().message()));
      return 2;
    }
    redis = std::make_unique<service::RedisClient>(*options);
  }
  router::WorkerPoolOptions pool_options;
  pool_options.static_prefill = List(absl::GetFlag(FLAGS_prefill_workers));
  pool_options.static_decode = List(absl::GetFlag(FLAGS_decode_workers));
  pool_options.refresh_interval_seconds = absl::GetFlag(FLAGS_worker_refresh_interval);
  pool_options.failure_cooldown_seconds = absl::GetFlag(FLAGS_worker_failure_cooldown);
  pool_options.expiry_seconds = absl::GetFlag(FLAGS_worker_expiry);
  pool_options.layout_hash = config->layout_hash_hex();
  router::WorkerPool pool(redis.get(), pool_options);
  router::SessionStore sessions(redis.get(), absl::GetFlag(FLAGS_session_ttl));
  router::RouterOptions options;
  options.model_name = absl::GetFlag(FLAGS_model_name).empty()
                           ? std::filesystem::path(model_dir).filename().string()
                           : absl::GetFlag(FLAGS_model_name);
  options.max_queue = absl::GetFlag(FLAGS_max_queue);
  options.lease_seconds = absl::GetFlag(FLAGS_lease);
  options.request_timeout_seconds = absl::GetFlag(FLAGS_request_timeout);
  options.max_attempts = std::max(1, absl::GetFlag(FLAGS_max_attempts));
  options.max_context_tokens = absl::GetFlag(FLAGS_max_context);
  router::Router router(std::move(*tokenizer), *config, &pool, &sessions, options);

  router::GrpcFront grpc_front(router);
  grpc::ServerBuilder builder;
  service::ConfigureServerBuilder(builder);
  int grpc_port = 0;
  builder.AddListeningPort(absl::GetFlag(FLAGS_grpc_listen), grpc::InsecureServerCredentials(), &grpc_port);
  builder.RegisterService(&grpc_front);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || grpc_port == 0) {
    service::LogError("cannot listen", {{"address", absl::GetFlag(FLAGS_grpc_listen)}});
    return 1;
  }
  service::SetServing(*server, "sala.v1.Generation", true);
  const auto [http_host, http_port] = HostPort(absl::GetFlag(FLAGS_http_listen));
  auto http = router::HttpFront::Start(router, http_host, http_port, absl::GetFlag(FLAGS_http_threads));
  if (!http.ok()) {
    service::LogError(std::string(http.status().message()));
    return 1;
  }
  service::LogInfo("serving", {{"grpc", absl::GetFlag(FLAGS_grpc_listen)}, {"http", absl::GetFlag(FLAGS_http_listen)},
                               {"model", options.model_name}});

  const int sig = service::WaitForTerminationSignal();
  service::LogInfo("draining", {{"signal", std::to_string(sig)}});
  router.Drain();
  service::SetServing(*server, "sala.v1.Generation", false);
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::duration_cast<std::chrono::system_clock::duration>(
                            std::chrono::duration<double>(absl::GetFlag(FLAGS_drain_timeout)));
  while (router.InFlight() > 0 && std::chrono::system_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  server->Shutdown(deadline);
  http->reset();
  service::LogInfo("stopped");
  return 0;
}
