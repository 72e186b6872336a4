// NeoX RoPE of one pair of a head, shared by the prefill's head norm + RoPE and the linear
// layers' fused decode step, so that both rotate alike.
#pragma once

#include <cstdint>

namespace sala::cuda {

// The sine and cosine of pair j's angle (pairs (x[j], x[j + dim/2]) of a head) at position `pos`
// (theta = 2^log2_theta). Angles in double: at a million positions fp32 angles drift by
// hundredths of a radian. Reduced to [-pi, pi] in double, the sine and cosine are then exact
// enough in fp32 (and far cheaper than double sincos and pow, which cost a prefill chunk
// milliseconds).
__device__ __forceinline__ void RopeSinCos(int j, int dim, int64_t pos, double log2_theta, float& sn, float& cs) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  const double angle = double(pos) * exp2(-2.0 * j / dim * log2_theta);
  sincosf(float(angle - kTwoPi * rint(angle / kTwoPi)), &sn, &cs);
}

__device__ __forceinline__ void Rotate(float& a, float& b, float sn, float cs) {
  const float ra = a * cs - b * sn, rb = b * cs + a * sn;
  a = ra;
  b = rb;
}

// Rotates (a, b) = (x[j], x[j + dim/2]) of a head at position `pos`.
__device__ __forceinline__ void RotatePair(float& a, float& b, int j, int dim, int64_t pos, double log2_theta) {
  float sn, cs;
  RopeSinCos(j, dim, pos, log2_theta, sn, cs);
  Rotate(a, b, sn, cs);
}

}  // namespace sala::cuda
