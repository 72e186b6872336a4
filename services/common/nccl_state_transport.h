// StateTransport GPU to GPU: the state's device memory moves over an NCCL link per decode
// worker (engine/include/sala/nccl_link.h), while the TransferState stream carries the
// descriptors of each step, the first token and the receiver's commit.
//
// The link is set up lazily through the decode worker's OpenNcclLink (which makes the NCCL
// unique id), confirmed before each transfer, and kept for the next one. A transfer that fails
// tears the link down at both ends (ncclCommAbort); the next transfer sets up a new one. Where
// the decode worker has no GPU path (or the link cannot be set up) and fallback is allowed, the
// pair uses the gRPC byte stream instead for a while.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <semaphore>

#include "grpc_state_transport.h"
#include "sala/engine.h"
#include "sala/nccl_link.h"
#include "sala/state_transport.h"

namespace sala::service {

class NcclStateTransport final : public StateTransport {
 public:
  // `fallback`: send through host memory where NCCL is not possible, rather than fail.
  NcclStateTransport(Engine& engine, std::string worker_id, bool fallback);

  absl::StatusOr<std::unique_ptr<StateSender>> Open(const std::string& target, const std::string& session_id,
                                                    int64_t expected_tokens, absl::Time deadline) override;

  struct Link {
    std::string id;
    std::unique_ptr<NcclLink> nccl;
    // One transfer at a time (sends must match the receiver's order). A semaphore, not a mutex:
    // a transfer may be opened on one thread and finished on another.
    std::binary_semaphore busy{1};
  };

 private:
  struct Peer {
    std::shared_ptr<Link> link;
    absl::Time host_path_until = absl::InfinitePast();  // use the gRPC stream until then
  };
  // The link to `target`, set up or confirmed; null where the pair uses the gRPC stream.
  absl::StatusOr<std::shared_ptr<Link>> LinkTo(const std::string& target, absl::Time deadline);

  Engine& engine_;
  const std::string worker_id_;
  const bool fallback_;
  const bool gpu_path_;  // a CUDA backend and NCCL with a GPU
  GrpcStateTransport host_path_;
  std::mutex mu_;
  std::map<std::string, Peer> peers_;
};

}  // namespace sala::service
