#include "sampling_proto.h"

namespace sala::service {

SamplingParams SamplingFromProto(const sala::v1::SamplingParameters& p) {
  SamplingParams s;
  s.temperature = p.has_temperature() ? p.temperature() : 0.9;
  s.top_k = p.top_k();
  s.top_p = p.has_top_p() ? p.top_p() : 1.0;
  s.seed = p.seed();
  s.max_new_tokens = p.has_max_new_tokens() ? p.max_new_tokens() : 256;
  s.stop_token_ids.assign(p.stop_token_ids().begin(), p.stop_token_ids().end());
  s.ignore_eos = p.ignore_eos();
  return s;
}

}  // namespace sala::service
