#include "sala/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace sala {

absl::Status ValidateSamplingParams(const SamplingParams& p, int vocab_size) {
  if (!(p.temperature >= 0.0) || p.temperature > 100.0)
    return absl::InvalidArgumentError(absl::StrCat("temperature must be in [0, 100], got ", p.temperature));
  if (p.top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  if (!(p.top_p > 0.0 && p.top_p <= 1.0))
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  if (p.max_new_tokens < 0)
    return absl::InvalidArgumentError(absl::StrCat("max_new_tokens must be >= 0, got ", p.max_new_tokens));
  for (int id : p.stop_token_ids)
    if (id < 0 || id >= vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("stop token id ", id, " is outside the vocabulary"));
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params)
    : params_(params), rng_(params.seed ? *params.seed : std::random_device{}()) {}

void Sampler::Skip(int samples) {
  for (int i = 0; i < samples; ++i) rng_();
}

double Sampler::Uniform() { return double(rng_() >> 11) * 0x1.0p-53; }

int Sampler::Sample(std::span<const float> logits) {
  const int n = int(logits.size());
  if (params_.temperature == 0.0) return int(std::max_element(logits.begin(), logits.end()) - logits.begin());
  // Candidates by descending logit (ties: lower id first), cut by top-k.
  std::vector<int> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  const int k = params_.top_k > 0 ? std::min(params_.top_k, n) : n;
  auto by_logit = [&](int a, int b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; };
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), by_logit);
  ids.resize(k);
  std::vector<double> p(k);
  const double m = logits[ids[0]];
  double sum = 0.0;
  for (int i = 0; i < k; ++i) sum += p[i] = std::exp((logits[ids[i]] - m) / params_.temperature);
  // Top-p: the smallest prefix whose mass reaches top_p.
  int keep = k;
  if (params_.top_p < 1.0) {
    double acc = 0.0;
    for (int i = 0; i < k; ++i) {
      acc += p[i] / sum;
      if (acc >= params_.top_p) { keep = i + 1; break; }
    }
  }
  double total = 0.0;
  for (int i = 0; i < keep; ++i) total += p[i];
  double u = Uniform() * total;
  for (int i = 0; i < keep; ++i) {
    u -= p[i];
    if (u < 0.0) return ids[i];
  }
  return ids[keep - 1];
}

}  // namespace sala
