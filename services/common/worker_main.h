// Start-up and shutdown shared by the prefill and decode workers' main(): engine options from
// flags, gRPC server, /metrics endpoint, Redis heartbeats, SIGTERM drain.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/impl/service_type.h"
#include "sala/engine.h"
#include "sala/v1/worker.pb.h"

namespace sala::service {

struct WorkerHooks {
  std::function<sala::v1::WorkerInfo()> info;
  std::function<void()> drain;  // stop taking new work
  std::function<bool()> idle;   // nothing in flight
};

// The part of a WorkerInfo that every worker fills the same way: who and where it is, and which
// model (name and layout) it serves.
sala::v1::WorkerInfo WorkerIdentity(const std::string& worker_id, const std::string& role, const std::string& address,
                                    const std::string& model_name, const Engine& engine);

// Loads the engine from the common worker flags.
absl::StatusOr<std::unique_ptr<Engine>> LoadEngineFromFlags();
std::string WorkerIdFromFlags(const std::string& role);
std::string AdvertisedAddressFromFlags();
std::string ModelNameFromFlags();

// Serves `service` until SIGTERM/SIGINT, then drains within --drain_timeout. Returns the exit code.
int ServeWorker(const std::string& role, grpc::Service& service, const std::string& grpc_service_name,
                const WorkerHooks& hooks);

}  // namespace sala::service
