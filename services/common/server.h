// What every gRPC server of the cluster has: health service, reflection, keepalive policy that
// tolerates the peers' pings, generous message sizes.
#pragma once

#include <string>

#include "grpcpp/server_builder.h"

namespace sala::service {

void ConfigureServerBuilder(grpc::ServerBuilder& builder);

// Sets grpc.health.v1 status of the whole server ("") and of `service_name`.
void SetServing(grpc::Server& server, const std::string& service_name, bool serving);

}  // namespace sala::service
