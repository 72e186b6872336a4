// How a prefill worker ships a sequence state to a decode worker. The bytes are the stream of
// state_serialization.h; a transport moves them (gRPC stream through host memory, or NCCL
// GPU to GPU) and reports the receiver's commit. Implementations live where their
// dependencies are allowed: the gRPC one in services/common, NCCL ones in engine/src/transfer.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace sala {

class StateSender {
 public:
  virtual ~StateSender() = default;
  // The next bytes of the state stream (header, then sparse-KV records as chunks finish).
  virtual absl::Status Send(std::string_view bytes) = 0;
  // The last bytes (linear states and commit record) with the first sampled token; returns
  // once the receiver has committed the state, or an error.
  virtual absl::Status Finish(std::string_view last_bytes, int first_token) = 0;
  // Gives up; the receiver drops what it got.
  virtual void Abort(const std::string& reason) = 0;
  // Bytes handed to Send/Finish so far.
  virtual int64_t bytes_sent() const = 0;
};

class StateTransport {
 public:
  virtual ~StateTransport() = default;
  // Opens a transfer of `session_id`'s state to the decode worker at `target`. Every wait of
  // the transfer ends by `deadline` (the sender's lease).
  virtual absl::StatusOr<std::unique_ptr<StateSender>> Open(const std::string& target,
                                                            const std::string& session_id,
                                                            absl::Time deadline) = 0;
};

}  // namespace sala
