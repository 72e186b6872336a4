// The prefill worker: a FIFO queue of prompts, run one at a time in chunks on the engine; the
// state is shipped to the decode worker while the prompt is computed.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "absl/status/statusor.h"
#include "sala/engine.h"
#include "sala/state_transport.h"
#include "sala/v1/worker.grpc.pb.h"

namespace sala::prefill {

class PrefillWorker final : public sala::v1::PrefillWorker::Service {
 public:
  PrefillWorker(std::unique_ptr<Engine> engine, std::unique_ptr<StateTransport> transport, std::string worker_id,
                std::string address, std::string model_name);
  ~PrefillWorker() override;

  grpc::Status Prefill(grpc::ServerContext* context, const sala::v1::PrefillTicket* ticket,
                       grpc::ServerWriter<sala::v1::PrefillProgress>* writer) override;
  grpc::Status Abort(grpc::ServerContext* context, const sala::v1::AbortRequest* request,
                     sala::v1::AbortResponse* response) override;
  grpc::Status GetWorkerInfo(grpc::ServerContext* context, const sala::v1::WorkerInfoRequest* request,
                             sala::v1::WorkerInfo* info) override;

  sala::v1::WorkerInfo Info() const;
  // Stops taking new prompts (health goes NOT_SERVING); queued ones still run.
  void Drain();

 private:
  struct Job;
  void Loop();
  absl::Status Run(Job& job);
  // Queues a progress event for the job's caller.
  void Progress(Job& job, const std::function<void(sala::v1::PrefillProgress&)>& fill);

  std::unique_ptr<Engine> engine_;
  std::unique_ptr<StateTransport> transport_;
  const std::string worker_id_, address_, model_name_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::map<std::string, std::shared_ptr<Job>> jobs_;  // by session id, queued or running
  int64_t queued_tokens_ = 0;
  bool draining_ = false, stop_ = false;
  std::thread thread_;
};

}  // namespace sala::prefill
