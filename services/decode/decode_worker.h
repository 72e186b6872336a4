// The decode worker: sequences arrive as states (from prefill workers) or as follow-up turns
// of kept sessions; one loop runs a decode step for every running sequence at once
// (continuous batching) and streams each token to the router's Attach stream.
#pragma once

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "sala/engine.h"
#include "sala/v1/worker.grpc.pb.h"

namespace sala::decode {

struct DecodeOptions {
  int max_running_requests = 32;
  int64_t state_memory_bytes = int64_t(4) << 30;
  double kept_session_ttl_seconds = 600;  // a kept session not continued within this is freed
  // Device memory of the staging ring offered to each prefill worker on this host (copy
  // links); 0 offers NCCL links only.
  int64_t copy_ring_bytes = int64_t(128) << 20;
};

class DecodeWorker final : public sala::v1::DecodeWorker::Service {
 public:
  DecodeWorker(std::unique_ptr<Engine> engine, std::string worker_id, std::string address, std::string model_name,
               DecodeOptions options);
  ~DecodeWorker() override;

  grpc::Status Attach(grpc::ServerContext* context, const sala::v1::AttachRequest* request,
                      grpc::ServerWriter<sala::v1::DecodeEvent>* writer) override;
  grpc::Status TransferState(grpc::ServerContext* context, grpc::ServerReader<sala::v1::StateChunk>* reader,
                             sala::v1::TransferAck* ack) override;
  grpc::Status OpenDeviceLink(grpc::ServerContext* context, const sala::v1::DeviceLinkRequest* request,
                              sala::v1::DeviceLinkReply* reply) override;
  grpc::Status Abort(grpc::ServerContext* context, const sala::v1::AbortRequest* request,
                     sala::v1::AbortResponse* response) override;
  grpc::Status GetWorkerInfo(grpc::ServerContext* context, const sala::v1::WorkerInfoRequest* request,
                             sala::v1::WorkerInfo* info) override;

  sala::v1::WorkerInfo Info() const;
  void Drain();
  // No sequence attached or running (kept sessions do not count).
  bool Idle() const;

 private:
  struct Sequence;
  struct PeerLink;
  // The state over a GPU link; `chunk` is the stream's first message.
  absl::StatusOr<SequenceState> ReceiveOverLink(grpc::ServerContext* context,
                                                grpc::ServerReader<sala::v1::StateChunk>* reader,
                                                sala::v1::StateChunk& chunk, Sequence& seq, int64_t& bytes);
  // The state as a byte stream through host memory.
  absl::StatusOr<SequenceState> ReceiveBytes(grpc::ServerContext* context,
                                             grpc::ServerReader<sala::v1::StateChunk>* reader,
                                             sala::v1::StateChunk& chunk, Sequence& seq, int64_t& bytes);
  bool Cancelled(const Sequence& seq) const;
  // The stream's next message, unless the sequence was cancelled or the stream ended.
  absl::Status NextChunk(grpc::ServerContext* context, grpc::ServerReader<sala::v1::StateChunk>* reader,
                         const Sequence& seq, sala::v1::StateChunk& chunk) const;
  void Loop();
  void Step(std::vector<std::shared_ptr<Sequence>>& batch);
  void AppendPrefill(const std::shared_ptr<Sequence>& seq);
  // Emits a sampled token or finishes the sequence; called with mu_ held.
  void TakeTokenLocked(Sequence& seq, int token);
  void FinishLocked(Sequence& seq, int reason);
  void FailLocked(Sequence& seq, const absl::Status& status);
  int64_t UsedBytesLocked() const;
  int64_t EstimateBytes(int64_t tokens) const;
  void UpdateGaugesLocked() const;
  std::pair<int, int> RunningAndWaitingLocked() const;

  std::unique_ptr<Engine> engine_;
  const std::string worker_id_, address_, model_name_;
  const DecodeOptions options_;
  mutable std::mutex mu_;
  std::condition_variable work_cv_;    // wakes the loop
  std::condition_variable events_cv_;  // wakes Attach streams
  std::map<std::string, std::shared_ptr<Sequence>> sequences_;  // by session id
  uint64_t arrival_ = 0;
  bool draining_ = false, stop_ = false;
  std::mutex links_mu_;
  std::map<std::string, std::shared_ptr<PeerLink>> links_;  // by link id
  const std::string host_id_;  // offered copy rings to prefill workers with the same
  std::thread thread_;
};

}  // namespace sala::decode
