// SamplingParameters (generate.proto) as the engine's SamplingParams, with the API's defaults
// for unset fields, for the router's checks and both workers' samplers alike.
#pragma once

#include "sala/sampling.h"
#include "sala/v1/generate.pb.h"

namespace sala::service {

SamplingParams SamplingFromProto(const sala::v1::SamplingParameters& p);

}  // namespace sala::service
