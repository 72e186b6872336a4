// Elementwise and normalisation kernels of the SALA forward (fp32 math; bf16 where a GEMM reads).
// Each has the same meaning as the CPU op of the same name in engine/src/cpu/cpu_ops.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace sala::cuda {

// h[t, :] = float(embed[ids[t], :]) * scale
absl::Status Embed(const int* ids, int rows, const __nv_bfloat16* embed, int width, float scale, float* h,
                   cudaStream_t stream);
// y = bf16(x * rsqrt(mean(x²) + eps) * weight) (weight in bf16), per row; `post_scale` multiplies the result.
absl::Status RmsNormToBf16(const float* x, int rows, int width, const __nv_bfloat16* weight, float eps,
                           float post_scale, __nv_bfloat16* y, cudaStream_t stream);
// Query or key heads [rows, heads, dim] for HeadNormRope: bf16 as projected (`in`), written to
// `out` in f16 (the same memory or another), with their norm weight (or null: no norm).
struct NormedHeads {
  const __nv_bfloat16* in;
  __half* out;
  int heads;
  const __nv_bfloat16* weight;
};
// q and k in one launch: per-head RMSNorm (where a weight is given) then NeoX RoPE at pos0 + row
// (if rope), in fp32, the result rounded to f16 (saturated at ±65504). Head dim 64, 128 or 256.
absl::Status HeadNormRope(NormedHeads q, NormedHeads k, int rows, int dim, float eps, int64_t pos0, double theta,
                          bool rope, cudaStream_t stream);
// The attention output: y = bf16(RMSNorm(o) * sigmoid(z)) over rows of `width`, norm and gate
// each optional (linear layers may have both, sparse layers only the gate). o and z are each fp32
// (a decode step) or bf16 (prefill: the linear kernel's output, the gate projection's).
template <typename O, typename Z>
absl::Status NormGateToBf16(const O* o, const Z* z, int rows, int width, const __nv_bfloat16* norm_weight, float eps,
                            __nv_bfloat16* y, cudaStream_t stream);
// y = bf16(silu(gate) * up), operands 16-byte aligned.
absl::Status SwiGluToBf16(const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n, __nv_bfloat16* y,
                          cudaStream_t stream);

// x[i] = bf16(mean + std * N(0, 1)), a counter-based generator: the same (seed, i) gives the same value.
absl::Status FillRandom(__nv_bfloat16* x, int64_t n, uint64_t seed, float std, float mean, cudaStream_t stream);

}  // namespace sala::cuda
