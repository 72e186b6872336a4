// Four consecutive bf16 values moved as one 8-byte access, converted to and from fp32: the
// norms' rows (ops.cu) and the GEMV's formed inputs (gemv.cu). Pointers 8-byte aligned.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace sala::cuda {

__device__ __forceinline__ void LoadBf16x4(const __nv_bfloat16* p, float* v) {
  const uint2 packed = *reinterpret_cast<const uint2*>(p);
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
  const float2 a = __bfloat1622float2(pairs[0]), b = __bfloat1622float2(pairs[1]);
  v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}

__device__ __forceinline__ void StoreBf16x4(__nv_bfloat16* p, const float* v) {
  const __nv_bfloat162 pairs[2] = {__floats2bfloat162_rn(v[0], v[1]), __floats2bfloat162_rn(v[2], v[3])};
  *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(pairs);
}

}  // namespace sala::cuda
