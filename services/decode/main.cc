// sala-decode: the decode worker.
#include "absl/flags/flag.h"
#include "decode_worker.h"
#include "flags.h"
#include "log.h"
#include "metrics.h"
#include "process.h"
#include "worker_main.h"

ABSL_FLAG(int, max_running_requests, 32, "sequences decoded together in one step at most");
ABSL_FLAG(int64_t, state_memory_bytes, int64_t(4) << 30, "memory budget for sequence states, bytes");
ABSL_FLAG(double, kept_session_ttl, 600, "seconds a kept session waits for its next turn before it is freed");
ABSL_FLAG(int64_t, copy_ring_mib, 128,
          "device memory (MiB) of the staging ring offered to each prefill worker on this host, whose states then "
          "move on the GPUs' copy engines; 0 offers NCCL links only");

int main(int argc, char** argv) {
  sala::service::BlockTerminationSignals();
  sala::service::ParseFlags(argc, argv,
                            "Decode worker of the SALA cluster: receives sequence states, decodes them in a "
                            "continuous batch and streams tokens.\n"
                            "  sala-decode --model=models/small --listen=127.0.0.1:50071");
  const std::string id = sala::service::WorkerIdFromFlags("decode");
  sala::service::SetLogService("decode", id);
  sala::service::Metrics::Init("decode");
  if (absl::GetFlag(FLAGS_max_running_requests) <= 0 || absl::GetFlag(FLAGS_state_memory_bytes) <= 0 ||
      absl::GetFlag(FLAGS_copy_ring_mib) < 0) {
    sala::service::LogError(
        "--max_running_requests and --state_memory_bytes must be positive, --copy_ring_mib not negative");
    return 2;
  }
  auto engine = sala::service::LoadEngineFromFlags();
  if (!engine.ok()) {
    sala::service::LogError(std::string(engine.status().message()));
    return 2;
  }
  sala::decode::DecodeWorker worker(std::move(*engine), id, sala::service::AdvertisedAddressFromFlags(),
                                    sala::service::ModelNameFromFlags(),
                                    {absl::GetFlag(FLAGS_max_running_requests), absl::GetFlag(FLAGS_state_memory_bytes),
                                     absl::GetFlag(FLAGS_kept_session_ttl), absl::GetFlag(FLAGS_copy_ring_mib) << 20});
  return sala::service::ServeWorker("decode", worker, "sala.v1.DecodeWorker",
                                    {[&] { return worker.Info(); }, [&] { worker.Drain(); },
                                     [&] { return worker.Idle(); }});
}
