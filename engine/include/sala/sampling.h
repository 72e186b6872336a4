// Token sampling: greedy, temperature, top-k, top-p, seeded.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace sala {

struct SamplingParams {
  double temperature = 0.9;  // 0 = greedy
  int top_k = 0;             // 0 = no limit
  double top_p = 1.0;        // nucleus mass in (0, 1]
  std::optional<uint64_t> seed;  // unset: a random seed
  int max_new_tokens = 256;
  std::vector<int> stop_token_ids;  // in addition to the model's eos ids
  bool ignore_eos = false;
};

absl::Status ValidateSamplingParams(const SamplingParams& params, int vocab_size);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  int Sample(std::span<const float> logits);
  // Advances the generator as `samples` non-greedy samples would (each draws once), so that a
  // sequence sampled partly elsewhere continues the same random stream.
  void Skip(int samples);

 private:
  double Uniform();  // [0, 1), the same on every platform for a given seed
  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace sala
