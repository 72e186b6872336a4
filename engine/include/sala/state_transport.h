// How a prefill worker ships a sequence state to a decode worker while it prefills: a transport
// moves the state (the byte stream of state_serialization.h through host memory over gRPC, or
// the device memory itself over NCCL, see nccl_link.h) and reports the receiver's commit. The
// transports live in services/common, since their control messages travel over gRPC.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "sala/sequence_state.h"

namespace sala {

class StateSender {
 public:
  virtual ~StateSender() = default;
  // Ships what `state` gained since the last call (the finished rows of a prefill chunk) while
  // the next chunk computes; queues, does not wait for the receiver.
  virtual absl::Status SendProgress(SequenceState& state) = 0;
  // Ships the rest (last rows, linear states) with the first sampled token; returns once the
  // receiver has committed the state, or an error.
  virtual absl::Status Finish(SequenceState& state, int first_token) = 0;
  // Gives up; the receiver drops what it got. Also what destroying an unfinished sender does.
  virtual void Abort(const std::string& reason) = 0;
  // State bytes shipped so far.
  virtual int64_t bytes_sent() const = 0;
  // Seconds the bytes spent on the wire, where the transport can tell (NCCL); 0 otherwise.
  virtual double wire_seconds() { return 0; }
  // "nccl" or "grpc", for logs and metrics.
  virtual const char* kind() const = 0;
};

class StateTransport {
 public:
  virtual ~StateTransport() = default;
  // Opens a transfer of `session_id`'s state, which will hold `expected_tokens` tokens, to the
  // decode worker at `target`. Every wait of the transfer ends by `deadline` (the sender's lease).
  virtual absl::StatusOr<std::unique_ptr<StateSender>> Open(const std::string& target,
                                                            const std::string& session_id,
                                                            int64_t expected_tokens, absl::Time deadline) = 0;
};

}  // namespace sala
