#include "worker_main.h"

#include <chrono>
#include <filesystem>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "log.h"
#include "metrics.h"
#include "process.h"
#include "redis_client.h"
#include "server.h"
#include "worker_registry.h"

ABSL_FLAG(std::string, model, "", "model directory");
ABSL_FLAG(std::string, model_name, "", "model name reported to clients (default: the directory's name)");
ABSL_FLAG(std::string, listen, "127.0.0.1:50061", "gRPC listen address");
ABSL_FLAG(std::string, advertise, "", "address peers use to reach this worker (default: --listen)");
ABSL_FLAG(std::string, metrics_listen, "", "host:port of the /metrics and /health HTTP endpoint (empty: none)");
ABSL_FLAG(std::string, redis, "127.0.0.1:6379", "Redis address for the worker registry (empty: no registry)");
ABSL_FLAG(std::string, worker_id, "", "worker id (default: role + random)");
ABSL_FLAG(std::string, backend, "cpu", "compute backend");
ABSL_FLAG(int, chunk_size, 0, "prefill chunk, tokens (0: the backend's choice: 8192 on the CPU, on a GPU 8192 rounded to 64 rows an SM, 8448 on an H100/H200)");
ABSL_FLAG(int64_t, random_weights_seed, -1,
          "draw the weights on the GPU from this seed instead of reading the checkpoint (cuda backend; "
          "for benchmarks of the 9B shape from its config.json alone); -1: read the checkpoint");
ABSL_FLAG(bool, dense_as_sparse, false, "send every length down the sparse attention path");
ABSL_FLAG(int64_t, max_context, 0, "maximum context in tokens (0: the model's max_position_embeddings)");
ABSL_FLAG(bool, cuda_graphs, true,
          "CUDA backend: replay decode steps from captured CUDA graphs (false: launch their kernels one by one)");
ABSL_FLAG(double, heartbeat_interval, 0.5, "seconds between registry heartbeats");
ABSL_FLAG(double, heartbeat_ttl, 2.0, "seconds after which a silent worker leaves the registry");
ABSL_FLAG(double, drain_timeout, 30.0, "seconds to finish in-flight work after SIGTERM");

namespace sala::service {

absl::StatusOr<std::unique_ptr<Engine>> LoadEngineFromFlags() {
  if (absl::GetFlag(FLAGS_model).empty()) return absl::InvalidArgumentError("--model is required");
  EngineOptions o;
  o.backend = absl::GetFlag(FLAGS_backend);
  o.chunk_size = absl::GetFlag(FLAGS_chunk_size);
  o.dense_as_sparse = absl::GetFlag(FLAGS_dense_as_sparse);
  o.max_context_tokens = absl::GetFlag(FLAGS_max_context);
  o.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  if (absl::GetFlag(FLAGS_random_weights_seed) >= 0) o.random_weights_seed = uint64_t(absl::GetFlag(FLAGS_random_weights_seed));
  return Engine::Load(absl::GetFlag(FLAGS_model), o);
}

sala::v1::WorkerInfo WorkerIdentity(const std::string& worker_id, const std::string& role, const std::string& address,
                                    const std::string& model_name, const Engine& engine) {
  sala::v1::WorkerInfo info;
  info.set_worker_id(worker_id);
  info.set_role(role);
  info.set_address(address);
  info.set_model(model_name);
  info.set_layout_hash(engine.config().layout_hash_hex());
  return info;
}

std::string WorkerIdFromFlags(const std::string& role) {
  static const std::string id =
      absl::GetFlag(FLAGS_worker_id).empty() ? RandomId(role + "-").substr(0, role.size() + 9) : absl::GetFlag(FLAGS_worker_id);
  return id;
}

std::string AdvertisedAddressFromFlags() {
  return absl::GetFlag(FLAGS_advertise).empty() ? absl::GetFlag(FLAGS_listen) : absl::GetFlag(FLAGS_advertise);
}

std::string ModelNameFromFlags() {
  if (!absl::GetFlag(FLAGS_model_name).empty()) return absl::GetFlag(FLAGS_model_name);
  return std::filesystem::path(absl::GetFlag(FLAGS_model)).filename().string();
}

int ServeWorker(const std::string& role, grpc::Service& service, const std::string& grpc_service_name,
                const WorkerHooks& hooks) {
  grpc::ServerBuilder builder;
  ConfigureServerBuilder(builder);
  int port = 0;
  builder.AddListeningPort(absl::GetFlag(FLAGS_listen), grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    LogError("cannot listen", {{"address", absl::GetFlag(FLAGS_listen)}});
    return 1;
  }
  SetServing(*server, grpc_service_name, true);
  std::atomic<bool> serving{true};
  std::unique_ptr<HttpEndpoint> http;
  if (const std::string m = absl::GetFlag(FLAGS_metrics_listen); !m.empty()) {
    const size_t colon = m.rfind(':');
    auto e = HttpEndpoint::Start(m.substr(0, colon), std::atoi(m.substr(colon + 1).c_str()),
                                 [&] { return serving.load(); });
    if (!e.ok()) {
      LogError(std::string(e.status().message()));
      return 1;
    }
    http = std::move(*e);
  }
  std::unique_ptr<RedisClient> redis;
  std::unique_ptr<WorkerHeartbeat> heartbeat;
  if (const std::string r = absl::GetFlag(FLAGS_redis); !r.empty()) {
    auto options = ParseRedisAddress(r);
    if (!options.ok()) {
      LogError(std::string(options.status().message()));
      return 2;
    }
    redis = std::make_unique<RedisClient>(*options);
    heartbeat = std::make_unique<WorkerHeartbeat>(*redis, hooks.info, absl::GetFlag(FLAGS_heartbeat_interval),
                                                  absl::GetFlag(FLAGS_heartbeat_ttl));
  }
  LogInfo("serving", {{"role", role}, {"address", AdvertisedAddressFromFlags()}});

  const int sig = WaitForTerminationSignal();
  LogInfo("draining", {{"signal", std::to_string(sig)}});
  serving = false;
  hooks.drain();
  SetServing(*server, grpc_service_name, false);
  heartbeat.reset();  // leave routing at once
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::duration_cast<std::chrono::system_clock::duration>(
                            std::chrono::duration<double>(absl::GetFlag(FLAGS_drain_timeout)));
  while (!hooks.idle() && std::chrono::system_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  server->Shutdown(deadline);
  LogInfo("stopped");
  return 0;
}

}  // namespace sala::service
