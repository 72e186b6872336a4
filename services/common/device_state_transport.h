// StateTransport GPU to GPU: the state's device memory moves over a DeviceLink per decode worker
// (engine/include/sala/device_link.h), while the TransferState stream carries the descriptors
// of each step, the first token and the receiver's commit.
//
// The link is set up lazily through the decode worker's OpenDeviceLink, confirmed before each
// transfer, and kept for the next one. A decode worker on this host offers a copy ring (copy
// engines over NVLink, which need no SMs, so the transfer keeps its speed while prefill
// computes); elsewhere, or where the ring cannot be mapped, the pair uses NCCL. A transfer that
// fails tears the link down at both ends; the next transfer sets up a new one. Where the decode
// worker has no GPU path (or no link can be set up) and fallback is allowed, the pair uses the
// gRPC byte stream instead for a while.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <semaphore>

#include "grpc_state_transport.h"
#include "sala/device_link.h"
#include "sala/engine.h"
#include "sala/state_transport.h"

namespace sala::service {

struct DeviceTransportOptions {
  bool copy_engines = true;  // copy links to decode workers on this host
  bool fallback = true;      // the gRPC byte stream where no GPU link can be had, rather than fail
  // The state goes out in steps of at least this many bytes (the last one may be smaller): each
  // step costs a fixed ~0.3 ms to start on the link, a chunk's rows are only ~70 MiB, and a
  // step that waits for more rows still leaves while prefill computes.
  int64_t min_step_bytes = int64_t(1) << 30;
};

class DeviceStateTransport final : public StateTransport {
 public:
  DeviceStateTransport(Engine& engine, std::string worker_id, DeviceTransportOptions options);

  absl::StatusOr<std::unique_ptr<StateSender>> Open(const std::string& target, const std::string& session_id,
                                                    int64_t expected_tokens, absl::Time deadline) override;

  struct Link {
    std::string id;
    std::unique_ptr<DeviceLink> device;
    // One transfer at a time (sends must match the receiver's order). A semaphore, not a mutex:
    // a transfer may be opened on one thread and finished on another.
    std::binary_semaphore busy{1};
  };

 private:
  struct Peer {
    std::shared_ptr<Link> link;
    absl::Time host_path_until = absl::InfinitePast();  // use the gRPC stream until then
    absl::Time nccl_until = absl::InfinitePast();       // ask for NCCL, not a copy ring, until then
  };
  // The link to `target`, set up or confirmed; null where the pair uses the gRPC stream.
  absl::StatusOr<std::shared_ptr<Link>> LinkTo(const std::string& target, absl::Time deadline);

  Engine& engine_;
  const std::string worker_id_;
  const DeviceTransportOptions options_;
  const bool gpu_path_;  // a CUDA backend with a GPU
  const std::string host_id_;
  GrpcStateTransport host_path_;
  std::mutex mu_;
  std::map<std::string, Peer> peers_;
};

}  // namespace sala::service
