// A two-rank NCCL communicator between a prefill GPU (rank 0, the sender) and a decode GPU
// (rank 1, the receiver), with the CUDA stream its transfers run on. It moves DeviceSpans GPU
// memory to GPU memory (NVLink within a host, RDMA across hosts; NCCL_* environment variables
// choose interfaces and devices as usual).
//
// Every wait has a deadline. A link whose transfer failed, timed out or was abandoned halfway
// is aborted (ncclCommAbort, which also frees kernels stuck waiting for the peer) and must be
// replaced: the order of sends and receives no longer matches at both ends.
#pragma once

#include <functional>
#include <memory>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "sala/backend.h"

namespace sala {

class NcclLink {
 public:
  // Whether this build has NCCL and this process sees a GPU.
  static bool Available();
  // A fresh NCCL unique id (made by the receiver, handed to the sender out of band).
  static absl::StatusOr<std::string> NewUniqueId();
  // Starts joining the communicator of `unique_id` as `rank` (0 sends, 1 receives) on the
  // current CUDA device and returns at once; WaitReady finishes the join.
  static absl::StatusOr<std::unique_ptr<NcclLink>> Join(const std::string& unique_id, int rank);

  virtual ~NcclLink() = default;
  // Until both ranks have joined. Aborts the link when `deadline` passes first.
  virtual absl::Status WaitReady(absl::Time deadline) = 0;
  // Queues sends (rank 0) or receives (rank 1) of `spans`, in order, behind the work already
  // queued on the default stream; returns without waiting for the data. Returns the bytes queued.
  virtual absl::StatusOr<int64_t> Send(std::span<const DeviceSpan> spans) = 0;
  virtual absl::StatusOr<int64_t> Recv(std::span<const DeviceSpan> spans) = 0;
  // Until everything queued has moved. Aborts the link when `deadline` passes or `give_up`
  // (polled) returns true first.
  virtual absl::Status Wait(absl::Time deadline, const std::function<bool()>& give_up = {}) = 0;
  // Seconds the transfers queued so far spent on the wire (between their start and end events).
  virtual double busy_seconds() = 0;
  // Aborts the communicator; safe from any thread, at any time, more than once.
  virtual void Abort() = 0;
  virtual bool aborted() const = 0;
};

}  // namespace sala
