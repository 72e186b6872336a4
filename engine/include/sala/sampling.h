// Token sampling: greedy, temperature, top-k, top-p, seeded; one definition for the CPU and the GPU.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "sala/token_draw.h"

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

// The CPU definition of a draw; the GPU's (engine/src/cuda/sampling.cu) matches it.
int DrawToken(std::span<const float> logits, const TokenDraw& draw);

// A sequence's sampling: its parameters and a counter-based random stream, so that draw n of a
// seed is the same on every platform and a sequence can continue on another worker.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // The next token's draw (advances the stream unless greedy).
  TokenDraw Next();
  int Sample(std::span<const float> logits) { return DrawToken(logits, Next()); }
  // Advances the stream as `samples` non-greedy draws would.
  void Skip(int samples) { draws_ += uint64_t(samples); }

 private:
  SamplingParams params_;
  uint64_t seed_;
  uint64_t draws_ = 0;
};

}  // namespace sala
