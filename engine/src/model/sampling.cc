#include "sala/sampling.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>

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

namespace {

// SplitMix64's output function: draw n of a seed is Mix(seed + (n + 1) * golden), which is the
// n-th output of a SplitMix64 stream started at `seed`.
uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

Sampler::Sampler(const SamplingParams& params)
    : params_(params), seed_(params.seed ? *params.seed : (uint64_t(std::random_device{}()) << 32) ^ std::random_device{}()) {}

TokenDraw Sampler::Next() {
  TokenDraw d;
  if (params_.temperature == 0.0) return d;
  d.temperature = float(params_.temperature);
  d.top_k = params_.top_k;
  d.top_p = float(params_.top_p);
  d.u = double(Mix(seed_ + (++draws_) * 0x9e3779b97f4a7c15ull) >> 11) * 0x1.0p-53;
  return d;
}

int DrawToken(std::span<const float> logits, const TokenDraw& d) {
  const int n = int(logits.size());
  const int argmax = int(std::max_element(logits.begin(), logits.end()) - logits.begin());
  if (d.temperature <= 0.0f || n <= 1) return argmax;
  const double m = logits[argmax];
  std::vector<double> w(n);
  for (int i = 0; i < n; ++i) w[i] = std::exp((double(logits[i]) - m) / double(d.temperature));
  float cut = -std::numeric_limits<float>::infinity();
  if (d.top_k > 0 && d.top_k < n) {
    std::vector<float> v(logits.begin(), logits.end());
    std::nth_element(v.begin(), v.begin() + (d.top_k - 1), v.end(), std::greater<float>());
    cut = v[d.top_k - 1];
  }
  if (d.top_p < 1.0f) {
    std::vector<int> candidates;
    double mass = 0.0;
    for (int i = 0; i < n; ++i)
      if (logits[i] >= cut) {
        candidates.push_back(i);
        mass += w[i];
      }
    std::sort(candidates.begin(), candidates.end(), [&](int a, int b) { return logits[a] > logits[b]; });
    const double target = double(d.top_p) * mass;
    double above = 0.0;  // weight of the candidates above the value being looked at
    for (size_t g = 0; g < candidates.size();) {
      const float value = logits[candidates[g]];
      for (; g < candidates.size() && logits[candidates[g]] == value; ++g) above += w[candidates[g]];
      if (above >= target) {
        cut = value;
        break;
      }
    }
  }
  double total = 0.0;
  for (int i = 0; i < n; ++i)
    if (logits[i] >= cut) total += w[i];
  const double target = d.u * total;
  double running = 0.0;
  int last = argmax;
  for (int i = 0; i < n; ++i) {
    if (!(logits[i] >= cut)) continue;
    running += w[i];
    last = i;
    if (running > target) return i;
  }
  return last;
}

}  // namespace sala
