// The NCCL kind of DeviceLink: a two-rank communicator between a prefill GPU (rank 0, the
// sender) and a decode GPU (rank 1, the receiver), with the CUDA stream its transfers run on.
// NCCL_* environment variables choose interfaces and devices as usual. An aborted link calls
// ncclCommAbort, which also frees kernels stuck waiting for the peer.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "sala/device_link.h"

namespace sala {

class NcclLink {
 public:
  // Whether this build has NCCL and this process sees a GPU.
  static bool Available();
  // A fresh NCCL unique id (made by the receiver, handed to the sender out of band).
  static absl::StatusOr<std::string> NewUniqueId();
  // Starts joining the communicator of `unique_id` as `rank` (0 sends, 1 receives) on the
  // current CUDA device and returns at once; WaitReady finishes the join.
  static absl::StatusOr<std::unique_ptr<DeviceLink>> Join(const std::string& unique_id, int rank);
};

}  // namespace sala
