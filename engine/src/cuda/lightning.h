// Simple-GLA of the linear layers (MODEL_SPEC §3) on the GPU, with fp32 states: prefill takes f16
// q and k and bf16 v (tensor-core operands) and gives a bf16 output, decode works in fp32.
#pragma once

#include <cuda_runtime.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sala::cuda {

// One sequence, T tokens, chunked form: q [T, H, D] and k [T, Hkv, D] in f16 (as HeadNormRope
// leaves them), v [T, Hkv, D] in bf16; state [H, D, D] (fp32) updated in place; o [T, H, D]
// in bf16, as the reference model gives it to the output norm. `slopes` (device, [H]) gives the
// log-decay g_h = -slope_h. D is 64 or 128. The sequence is cut into segments that run in
// parallel, their states combined in `scratch` (device, LinearAttentionScratchFloats(T, H, D)
// floats; may be null where that is 0).
absl::StatusOr<int64_t> LinearAttentionScratchFloats(int64_t T, int heads, int dim);
absl::Status LinearAttentionChunked(const __half* q, const __half* k, const __nv_bfloat16* v, int64_t T, int heads,
                                    int kv_heads, int dim, float scale, const float* slopes, float* state,
                                    __nv_bfloat16* o, float* scratch, cudaStream_t stream);

// What a decode step does to q and k before the update, as HeadNormRope does in prefill:
// per-head RMSNorm with these weights (null: none), then NeoX RoPE at positions[b] (a device
// array; with `rope`).
struct StepHeadPrep {
  const __nv_bfloat16* q_norm = nullptr;
  const __nv_bfloat16* k_norm = nullptr;
  float eps = 0.0f;
  const int64_t* positions = nullptr;
  double theta = 0.0;
  bool rope = false;
};

// One token for each of `batch` sequences: q [B, H, D]; k, v [B, Hkv, D] (q and k as projected,
// prepared by `prep` on the way in, left unchanged); states[b] -> [H, D, D]. D from 32 to 128.
absl::Status LinearAttentionStep(const float* q, const float* k, const float* v, int batch, int heads, int kv_heads,
                                 int dim, float scale, const float* slopes, float* const* states, float* o,
                                 const StepHeadPrep& prep, cudaStream_t stream);

}  // namespace sala::cuda
