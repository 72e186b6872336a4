// The one place where errors change representation: absl::Status inside, gRPC status on the
// wire, HTTP status and OpenAI error type on the HTTP front.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace sala::service {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);
int HttpStatusFor(absl::StatusCode code);
// "invalid_request_error", "rate_limit_error", ... as OpenAI clients expect.
const char* OpenAiErrorType(absl::StatusCode code);
// Label of sala_requests_total{code}.
std::string CodeLabel(absl::StatusCode code);

}  // namespace sala::service
