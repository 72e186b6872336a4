// A GPU-to-GPU link between a prefill GPU (the sender) and a decode GPU (the receiver) that moves
// DeviceSpans from device memory to device memory, in order, with the sends and receives of
// each step matched one to one. Two kinds: NCCL point-to-point (nccl_link.h: NVLink within a
// host, RDMA across hosts) and copy engines between GPUs of one host (copy_link.h).
//
// Every wait has a deadline. A link whose transfer failed, timed out or was abandoned halfway
// is aborted and must be replaced: what each end has queued no longer matches the other's.
#pragma once

#include <functional>
#include <span>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "sala/backend.h"

namespace sala {

class DeviceLink {
 public:
  virtual ~DeviceLink() = default;
  // "nccl" or "copy", for logs and metrics.
  virtual const char* kind() const = 0;
  // Until both ends are connected. Aborts the link when `deadline` passes first.
  virtual absl::Status WaitReady(absl::Time deadline) = 0;
  // Queues sends (sender) or receives (receiver) of `spans`, in order, behind the work already
  // queued on the default stream; returns without waiting for the data. Returns the bytes queued.
  // The spans' memory must stay allocated until Wait returns or the link is destroyed (a copy
  // link reads it from its own thread later).
  virtual absl::StatusOr<int64_t> Send(std::span<const DeviceSpan> spans) = 0;
  virtual absl::StatusOr<int64_t> Recv(std::span<const DeviceSpan> spans) = 0;
  // Until everything queued has moved. Aborts the link when `deadline` passes or `give_up`
  // (polled) returns true first.
  virtual absl::Status Wait(absl::Time deadline, const std::function<bool()>& give_up = {}) = 0;
  // Seconds the transfers queued so far spent on the wire (between their start and end events).
  virtual double busy_seconds() = 0;
  // Aborts the link; safe from any thread, at any time, more than once.
  virtual void Abort() = 0;
  virtual bool aborted() const = 0;
};

}  // namespace sala
