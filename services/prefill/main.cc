// sala-prefill: the prefill worker.
#include <iostream>

#include "absl/flags/flag.h"
#include "device_state_transport.h"
#include "flags.h"
#include "grpc_state_transport.h"
#include "log.h"
#include "metrics.h"
#include "prefill_worker.h"
#include "process.h"
#include "worker_main.h"

ABSL_FLAG(std::string, state_transport, "auto",
          "how states reach decode workers: gpu (GPU to GPU: copy engines to a decode worker on this host, "
          "NCCL to others), nccl (GPU to GPU, NCCL only), grpc (through host memory), or auto (gpu where "
          "both workers have a GPU path, grpc otherwise)");

ABSL_FLAG(int64_t, state_step_mib, 1024,
          "GPU transfers ship the state in steps of at least this many MiB (the last step may be smaller): "
          "fewer, larger steps spend less of the link's time starting up; each leaves while prefill computes");

int main(int argc, char** argv) {
  sala::service::BlockTerminationSignals();
  sala::service::ParseFlags(argc, argv,
                            "Prefill worker of the SALA cluster: runs prompts in chunks and ships their state to "
                            "decode workers.\n  sala-prefill --model=models/small --listen=127.0.0.1:50061");
  const std::string id = sala::service::WorkerIdFromFlags("prefill");
  sala::service::SetLogService("prefill", id);
  sala::service::Metrics::Init("prefill");
  const std::string mode = absl::GetFlag(FLAGS_state_transport);
  if (mode != "auto" && mode != "gpu" && mode != "nccl" && mode != "grpc") {
    sala::service::LogError("--state_transport must be auto, gpu, nccl or grpc", {{"value", mode}});
    return 2;
  }
  if (absl::GetFlag(FLAGS_state_step_mib) < 0) {
    sala::service::LogError("--state_step_mib must not be negative");
    return 2;
  }
  auto engine = sala::service::LoadEngineFromFlags();
  if (!engine.ok()) {
    sala::service::LogError(std::string(engine.status().message()));
    return 2;
  }
  sala::Engine& e = **engine;
  std::unique_ptr<sala::StateTransport> transport;
  if (mode == "grpc") transport = std::make_unique<sala::service::GrpcStateTransport>(e);
  else
    transport = std::make_unique<sala::service::DeviceStateTransport>(
        e, id,
        sala::service::DeviceTransportOptions{.copy_engines = mode != "nccl",
                                              .fallback = mode == "auto",
                                              .min_step_bytes = absl::GetFlag(FLAGS_state_step_mib) << 20});
  sala::prefill::PrefillWorker worker(std::move(*engine), std::move(transport), id,
                                      sala::service::AdvertisedAddressFromFlags(),
                                      sala::service::ModelNameFromFlags());
  return sala::service::ServeWorker(
      "prefill", worker, "sala.v1.PrefillWorker",
      {[&] { return worker.Info(); }, [&] { worker.Drain(); },
       [&] {
         const auto info = worker.Info();
         return info.running() == 0 && info.waiting() == 0;
       }});
}
