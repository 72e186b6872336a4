#include "sala/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <set>

#include "gtest/gtest.h"

namespace sala {
namespace {

TEST(SamplingTest, GreedyTakesTheArgmax) {
  SamplingParams p;
  p.temperature = 0;
  Sampler s(p);
  EXPECT_EQ(s.Sample(std::vector<float>{0.1f, 3.0f, -1.0f, 2.9f}), 1);
}

TEST(SamplingTest, TopKOneAndTinyTopPAreGreedy) {
  const std::vector<float> logits{0.5f, 0.1f, 2.0f, 1.9f};
  SamplingParams top_k;
  top_k.temperature = 1.0;
  top_k.seed = 3;
  top_k.top_k = 1;
  SamplingParams top_p = top_k;
  top_p.top_k = 0;
  top_p.top_p = 1e-6;
  for (const SamplingParams& p : {top_k, top_p}) {
    Sampler s(p);
    for (int n = 0; n < 50; ++n) EXPECT_EQ(s.Sample(logits), 2);
  }
}

TEST(SamplingTest, SeedMakesItRepeatable) {
  const std::vector<float> logits{0.5f, 0.1f, 2.0f, 1.9f, 1.0f};
  SamplingParams p;
  p.seed = 42;
  Sampler a(p), b(p);
  std::vector<int> x, y;
  for (int n = 0; n < 100; ++n) {
    x.push_back(a.Sample(logits));
    y.push_back(b.Sample(logits));
  }
  EXPECT_EQ(x, y);
  EXPECT_GT(std::set<int>(x.begin(), x.end()).size(), 2u);
}

TEST(SamplingTest, FollowsTheTemperedDistribution) {
  const std::vector<float> logits{0.0f, std::log(2.0f), std::log(4.0f)};  // p ∝ 1, 2, 4 at T=1
  SamplingParams p;
  p.temperature = 1.0;
  p.seed = 9;
  Sampler s(p);
  std::vector<int> count(3);
  const int n = 70000;
  for (int i = 0; i < n; ++i) ++count[s.Sample(logits)];
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(count[i] / double(n), (1 << i) / 7.0, 0.01) << i;
  // Top-p 0.6 keeps {2} (mass 4/7 = 0.571 < 0.6) plus {1}: renormalised 4/6 and 2/6.
  p.top_p = 0.6;
  Sampler nucleus(p);
  std::vector<int> c2(3);
  for (int i = 0; i < n; ++i) ++c2[nucleus.Sample(logits)];
  EXPECT_EQ(c2[0], 0);
  EXPECT_NEAR(c2[2] / double(n), 4.0 / 6.0, 0.01);
}

TEST(SamplingTest, TopKKeepsLogitsEqualToTheCut) {
  // Weights at T = 1: 1, e^-1, e^-1 (id 3 is cut): the third candidate is reachable.
  const std::vector<float> logits{3.0f, 2.0f, 2.0f, 1.0f};
  EXPECT_EQ(DrawToken(logits, {1.0f, 2, 1.0f, 0.9}), 2);
  EXPECT_EQ(DrawToken(logits, {1.0f, 2, 1.0f, 0.999999}), 2);
  EXPECT_EQ(DrawToken(logits, {1.0f, 0, 1.0f, 0.999999}), 3);
}

TEST(SamplingTest, TopPCutsByValueAndTheDrawWalksInIdOrder) {
  // Weights 1/4, 1/2, 1 relative to the largest; top-p 0.6 keeps ids 1 and 2 (mass 1.5).
  const std::vector<float> logits{0.0f, std::log(2.0f), std::log(4.0f)};
  EXPECT_EQ(DrawToken(logits, {1.0f, 0, 0.6f, 0.3}), 1);  // 0.45 of 1.5: inside id 1's 0.5
  EXPECT_EQ(DrawToken(logits, {1.0f, 0, 0.6f, 0.4}), 2);  // 0.6: past id 1
  EXPECT_EQ(DrawToken(logits, {1.0f, 0, 1.0f, 0.0}), 0);  // the lowest id first, not the largest logit
  EXPECT_EQ(DrawToken(logits, {0.0f, 0, 1.0f, 0.0}), 2);  // greedy ignores u
}

// DrawToken against a literal, quadratic reading of its definition (sala/token_draw.h), on
// small random logits with many ties and random parameters.
TEST(SamplingTest, DrawTokenFollowsItsDefinition) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 500; ++trial) {
    const int n = 1 + int(rng() % 40);
    std::vector<float> l(n);
    for (float& x : l) x = float(int(rng() % 9) - 4) * 0.5f;
    const TokenDraw d{float(0.3 + (rng() % 20) * 0.1), int(rng() % 6), float(0.05 + (rng() % 20) * 0.05),
                      (rng() % 10000) / 10000.0};
    std::vector<float> desc = l;
    std::sort(desc.begin(), desc.end(), std::greater<float>());
    const double m = desc[0];
    auto w = [&](int i) { return std::exp((double(l[i]) - m) / double(d.temperature)); };
    auto mass_at_or_above = [&](float v) {
      double sum = 0.0;
      for (int i = 0; i < n; ++i)
        if (l[i] >= v) sum += w(i);
      return sum;
    };
    float cut = d.top_k > 0 && d.top_k < n ? desc[d.top_k - 1] : -std::numeric_limits<float>::infinity();
    if (d.top_p < 1.0f) {
      const double target = double(d.top_p) * mass_at_or_above(cut);
      for (float v : desc)  // the largest value whose candidates at or above it reach the target
        if (v >= cut && mass_at_or_above(v) >= target) {
          cut = v;
          break;
        }
    }
    const double target = d.u * mass_at_or_above(cut);
    double running = 0.0;
    int expected = -1;
    for (int i = 0; i < n && expected < 0; ++i)
      if (l[i] >= cut && (running += w(i)) > target) expected = i;
    EXPECT_EQ(DrawToken(l, d), expected) << "trial " << trial;
  }
}

TEST(SamplingTest, SkipAdvancesTheStreamAsDrawsWould) {
  SamplingParams p;
  p.seed = 7;
  Sampler a(p), b(p);
  a.Next();
  a.Next();
  b.Skip(2);
  EXPECT_EQ(a.Next().u, b.Next().u);
  p.temperature = 0;
  Sampler greedy(p);
  EXPECT_EQ(greedy.Next().temperature, 0.0f);
}

TEST(SamplingTest, ValidatesParameters) {
  SamplingParams p;
  EXPECT_TRUE(ValidateSamplingParams(p, 10).ok());
  p.temperature = -1;
  EXPECT_FALSE(ValidateSamplingParams(p, 10).ok());
  p = {};
  p.top_p = 0;
  EXPECT_FALSE(ValidateSamplingParams(p, 10).ok());
  p = {};
  p.top_k = -2;
  EXPECT_FALSE(ValidateSamplingParams(p, 10).ok());
  p = {};
  p.temperature = std::nan("");
  EXPECT_FALSE(ValidateSamplingParams(p, 10).ok());
  p = {};
  p.stop_token_ids = {10};
  EXPECT_FALSE(ValidateSamplingParams(p, 10).ok());
  p = {};
  p.max_new_tokens = -1;
  EXPECT_FALSE(ValidateSamplingParams(p, 10).ok());
}

}  // namespace
}  // namespace sala
