// One gRPC channel per peer address, shared by every stub of the process.
#pragma once

#include <memory>
#include <string>

#include "grpcpp/channel.h"

namespace sala::service {

std::shared_ptr<grpc::Channel> SharedChannel(const std::string& address);
// Forgets a peer's channel (after it failed), so that the next call dials afresh.
void DropChannel(const std::string& address);

}  // namespace sala::service
