// StateTransport over the decode worker's TransferState client stream (host memory). Sends are
// queued and written by a thread of the sender, so that prefill computes the next chunk while
// the previous one is on the wire.
#pragma once

#include "sala/state_transport.h"

namespace sala::service {

class GrpcStateTransport final : public StateTransport {
 public:
  absl::StatusOr<std::unique_ptr<StateSender>> Open(const std::string& target, const std::string& session_id,
                                                    absl::Time deadline) override;
};

}  // namespace sala::service
