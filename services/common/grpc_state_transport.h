// StateTransport through host memory: the state_serialization.h byte stream over the decode
// worker's TransferState client stream. Also the StateStream that every transport's control
// messages travel on.
#pragma once

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>

#include "grpcpp/grpcpp.h"
#include "sala/engine.h"
#include "sala/state_transport.h"
#include "sala/v1/worker.grpc.pb.h"

namespace sala::service {

// The client end of a decode worker's TransferState stream. Chunks are queued and written by a
// thread of the stream, so that prefill computes the next chunk while one is on the wire.
class StateStream {
 public:
  // Every wait ends by `deadline`.
  StateStream(const std::string& target, absl::Time deadline);
  // Cancels the stream unless it finished.
  ~StateStream();

  // Queues a chunk; fails once the stream broke.
  absl::Status Write(sala::v1::StateChunk chunk);
  // Writes what is queued, closes the stream and returns the receiver's answer.
  absl::Status Finish();
  void Cancel(const std::string& reason);
  // The stream broke or was cancelled.
  bool failed() const;

 private:
  void WriteLoop();

  grpc::ClientContext context_;
  sala::v1::TransferAck ack_;
  std::unique_ptr<sala::v1::DecodeWorker::Stub> stub_;
  std::unique_ptr<grpc::ClientWriter<sala::v1::StateChunk>> writer_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<sala::v1::StateChunk> queue_;
  bool writing_ = false, closing_ = false, failed_ = false, finished_ = false;
  absl::Status error_ = absl::UnavailableError("state transfer failed");
  std::thread thread_;
};

class GrpcStateTransport final : public StateTransport {
 public:
  explicit GrpcStateTransport(Engine& engine) : engine_(engine) {}
  absl::StatusOr<std::unique_ptr<StateSender>> Open(const std::string& target, const std::string& session_id,
                                                    int64_t expected_tokens, absl::Time deadline) override;

 private:
  Engine& engine_;
};

}  // namespace sala::service
