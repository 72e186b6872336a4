// sala-prefill: the prefill worker.
#include <iostream>

#include "flags.h"
#include "grpc_state_transport.h"
#include "log.h"
#include "metrics.h"
#include "prefill_worker.h"
#include "process.h"
#include "worker_main.h"

int main(int argc, char** argv) {
  sala::service::BlockTerminationSignals();
  sala::service::ParseFlags(argc, argv,
                            "Prefill worker of the SALA cluster: runs prompts in chunks and ships their state to "
                            "decode workers.\n  sala-prefill --model=models/small --listen=127.0.0.1:50061");
  const std::string id = sala::service::WorkerIdFromFlags("prefill");
  sala::service::SetLogService("prefill", id);
  sala::service::Metrics::Init("prefill");
  auto engine = sala::service::LoadEngineFromFlags();
  if (!engine.ok()) {
    sala::service::LogError(std::string(engine.status().message()));
    return 2;
  }
  sala::prefill::PrefillWorker worker(std::move(*engine), std::make_unique<sala::service::GrpcStateTransport>(), id,
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
